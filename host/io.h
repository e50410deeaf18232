/* io.h: blocking operations run off the scheduler threads.
 *
 * DESIGN
 * A process that calls a blocking operation (a file read, a stat) must not
 * hold its scheduler thread. The operation goes to libuv's thread pool
 * (uv_queue_work on the loop of the scheduler the process runs on) and the
 * process blocks in an MB_WAIT_IO wait, like a receive: it costs no CPU, and
 * only the operation's completion or an exit signal wakes it. The completion
 * runs on that loop's thread: it finds the process by pid and, if the same
 * wait (wait_seq) is still pending, hands it the finished request and makes
 * it runnable; the scheduler then pushes the results on the process's own
 * thread. A process killed meanwhile is simply not found, and the request
 * is freed: no result ever lands in a state that moved on.
 *
 * Memory: a request is owned by the thread pool until its work is done, then
 * by the process (until its results are pushed), or freed on the spot.
 *
 * What an operation buffers outside the process's heap (a file read, a
 * directory listing, a line of input, the copy of the data a write writes)
 * is counted as it grows, like the messages queued for a process: in the
 * host's total (mb_alloc_count, what --max-memory caps) and, for a started
 * request, in its process's alloc.charged, which counts under its
 * max_memory with its heap and its mailbox. A growth that would take either
 * over its cap is refused instead of made (mb_io_charge): the operation
 * fails with UV_ENOMEM, so that a read of something endless (/dev/zero, a
 * FIFO, a line that never ends) stops at what its process may hold, and a
 * buffer the allocator cannot give fails that operation, not the host.
 * Refusing, rather than killing the process as a flooded mailbox does,
 * because the process asked for this memory and can do without it (the
 * data never reached it); Erlang's file:read_file says {error, enomem}. The
 * counts are given back when the results are pushed, just before they are
 * copied into the heap (which counts them from then on: the copy is made on
 * the owner's thread and the buffer freed right after, so at most one such
 * copy per scheduler thread exists uncounted at a time), or when the
 * request is freed.
 *
 * Threads: the pool thread running the work adds to the charges; while it
 * does, the process waits for it (an MB_WAIT_IO ends only with the result
 * or the process), so no other thread adds to that process's charge and a
 * check of its limit holds (timers and messages only take away meanwhile,
 * or add to the mailbox, whose own check counts the charge in). The owner
 * or the loop thread gives back. The host's total is per-thread counters
 * (alloc.h), which any thread may add to.
 */
#ifndef MB_IO_H
#define MB_IO_H

#include <uv.h>

#include "proc.h"

typedef struct mb_io_req mb_io_req_t;

/* The work, in a thread-pool thread: must not touch any Lua state. */
typedef void (*mb_io_work_fn)(mb_io_req_t *req);
/* Push the results onto L (the process's own thread); returns how many. */
typedef int (*mb_io_push_fn)(lua_State *L, mb_io_req_t *req);

struct mb_io_req {
  uv_work_t work;
  mb_io_work_fn run;
  mb_io_push_fn push;
  void (*free)(mb_io_req_t *req);  /* frees what the op allocated, or NULL */
  mb_pid_t pid;
  uint32_t seq;
  /* Operation data: the ops in lib_fs.c use these as they need. */
  char *path, *path2;
  char *data;
  size_t len;
  int flags;
  int err;                         /* 0 or a negative errno */
  uv_stat_t st;
  void *extra;
  /* Counted bytes (see DESIGN): `charged` in the host's total, of which
   * `charged_proc` also in proc's alloc.charged. proc: the process that
   * started the request (a reference, from mb_io_start to mb_io_free), or
   * NULL. oom: why mb_io_charge refused, for the error message. */
  mb_proc_t *proc;
  size_t charged, charged_proc;
  const char *oom;
};

/* libuv's thread pool: MB_IO_THREADS threads (UV_THREADPOOL_SIZE, when
 * set, decides instead). Its default of 4 is as many file operations that
 * wait for long - a FIFO's open or read, a device's read, a name lookup
 * whose resolver does not answer (sock.c) - as it takes to hold back every
 * other file operation of the host; Erlang's dirty I/O schedulers are 10. */
#define MB_IO_THREADS 16

/* Set up: a dying process's finished operation, never taken, is freed (an
 * exit hook); the thread pool starts. Once, at start-up. */
void mb_io_init(void);

/* A zeroed request of at least `size` bytes (ops may embed it). */
mb_io_req_t *mb_io_new(size_t size, mb_io_work_fn run, mb_io_push_fn push);

/* Start req for the running process p and set up its wait; the caller must
 * then `return mb_sched_yield(L, MB_YIELD_WAIT)`. Owner thread of p, on a
 * scheduler thread. Takes ownership of req. */
int mb_io_start(mb_proc_t *p, mb_io_req_t *req);

/* Begin an MB_WAIT_IO of the running process p whose result some other
 * code will deliver (sock.c): returns the wait's seq for mb_io_deliver.
 * The caller then yields with MB_YIELD_WAIT. Owner thread of p. */
uint32_t mb_io_wait_begin(mb_proc_t *p);

/* Hand a finished request to process req->pid if it still waits in the
 * wait req->seq: returns 1 if it took req (wakes it), 0 if not (req is
 * still the caller's). Any thread. */
int mb_io_deliver(mb_io_req_t *req);

/* The scheduler's side: push the finished request's results on L and free
 * it. Owner thread of p. */
int mb_io_finish(lua_State *L, mb_io_req_t *req);

/* Free a request whose results will never be pushed. */
void mb_io_free(mb_io_req_t *req);

/* -- Counted buffers (see DESIGN) ----------------------------------------- */

/* Count n more bytes for req: in the host's total, and in its process's
 * max_memory once started (before mb_io_start, in the host's total only:
 * the owner thread uses that for a copy of data its heap already counts).
 * Returns 0, or UV_ENOMEM when that would take the process over its
 * max_memory (its heap, mailbox and charges) or the host over --max-memory,
 * with req->oom saying which; nothing is counted then. The thread that owns
 * req (the pool thread in the work). */
int mb_io_charge(mb_io_req_t *req, size_t n);
/* Give back every byte counted for req (again: nothing). Owner thread of
 * req's process (a push, before it copies into the heap), or wherever req
 * is freed (mb_io_free does it). */
void mb_io_uncharge(mb_io_req_t *req);
/* Grow *buf (mb_free-able; NULL at first) from *cap to n > *cap bytes,
 * counted in req: 0, or UV_ENOMEM (mb_io_charge's refusal, or the
 * allocator had no n bytes: then nothing changed). */
int mb_io_grow(mb_io_req_t *req, char **buf, size_t *cap, size_t n);
/* Does req's process still wait for it? An operation that may read long
 * stops when not (its process was killed): pool thread. */
int mb_io_wanted(mb_io_req_t *req);

#endif
