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
};

/* Set up: a dying process's finished operation, never taken, is freed (an
 * exit hook). Once, at start-up. */
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

#endif
