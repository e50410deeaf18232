/* io.c: blocking operations on libuv's thread pool (see io.h). */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "alloc.h"
#include "io.h"
#include "scheduler.h"

mb_io_req_t *mb_io_new(size_t size, mb_io_work_fn run, mb_io_push_fn push)
{
  mb_io_req_t *req = mb_calloc(1, size < sizeof *req ? sizeof *req : size);
  req->run = run;
  req->push = push;
  return req;
}

void mb_io_free(mb_io_req_t *req)
{
  if (req->free)
    req->free(req);
  mb_io_uncharge(req);
  if (req->proc)
    mb_proc_unref(req->proc);
  mb_free(req->path);
  mb_free(req->path2);
  mb_free(req->data);
  mb_free(req);
}

static void on_work(uv_work_t *w)
{
  mb_io_req_t *req = w->data;
  req->run(req);
}

uint32_t mb_io_wait_begin(mb_proc_t *p)
{
  mb_proc_lock(p);
  uint32_t seq = p->wait_seq;
  p->io_done = NULL;
  mb_proc_unlock(p);
  p->pending_wait = MB_WAIT_IO;
  return seq;
}

/* On the loop's thread: hand the result to its process, if it still waits
 * for it (the same wait), else drop it. */
static void on_done(uv_work_t *w, int status)
{
  mb_io_req_t *req = w->data;
  if (status == UV_ECANCELED)
    req->err = status;
  if (!mb_io_deliver(req))
    mb_io_free(req);
}

int mb_io_deliver(mb_io_req_t *req)
{
  mb_proc_t *p = mb_proc_get(req->pid);
  int taken = 0, wake = 0;
  if (p) {
    mb_proc_lock(p);
    if (p->wait_seq == req->seq && p->io_done == NULL && !p->dead) {
      p->io_done = req;
      taken = 1;
      wake = mb_proc_wake_locked(p);
    }
    mb_proc_unlock(p);
    if (wake)
      mb_proc_on_runnable(p);
    mb_proc_unref(p);
  }
  return taken;
}

int mb_io_start(mb_proc_t *p, mb_io_req_t *req)
{
  req->seq = mb_io_wait_begin(p);
  req->pid = p->pid;
  /* A reference for the pool thread's charges (and mb_io_wanted): p may
   * die and be freed meanwhile. NULL if p is already dying. */
  req->proc = mb_proc_get(p->pid);
  req->work.data = req;
  int rc = uv_queue_work(mb_sched_loop(mb_sched_self()), &req->work, on_work, on_done);
  if (rc) {
    mb_io_free(req);
    return rc;
  }
  return 0;
}

int mb_io_finish(lua_State *L, mb_io_req_t *req)
{
  int n = req->push(L, req);
  mb_io_free(req);
  return n;
}

static void release(mb_proc_t *p)
{
  mb_proc_lock(p);
  mb_io_req_t *req = p->io_done;
  p->io_done = NULL;
  mb_proc_unlock(p);
  if (req)
    mb_io_free(req);
}

static void pool_noop(uv_work_t *w)
{
  (void)w;
}

/* Start libuv's thread pool with MB_IO_THREADS threads, unless
 * UV_THREADPOOL_SIZE asks for a number. libuv reads the variable once,
 * when the pool starts at its first job: a job on a loop of its own starts
 * it here, then the variable leaves the environment again, which
 * os.execute and io.popen pass on to other programs. */
static void pool_start(void)
{
  int set = getenv("UV_THREADPOOL_SIZE") == NULL;
  if (set) {
    char n[16];
    snprintf(n, sizeof n, "%d", MB_IO_THREADS);
    setenv("UV_THREADPOOL_SIZE", n, 1);
  }
  /* The pool's threads take no signal (they inherit this thread's mask):
   * SIGTERM and SIGINT are the main thread's (scheduler.h). */
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &old);
  uv_loop_t loop;
  uv_work_t w;
  if (uv_loop_init(&loop) == 0) {
    if (uv_queue_work(&loop, &w, pool_noop, NULL) == 0)
      uv_run(&loop, UV_RUN_DEFAULT);
    uv_loop_close(&loop);
  }
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  if (set)
    unsetenv("UV_THREADPOOL_SIZE");
}

void mb_io_init(void)
{
  mb_proc_add_exit_hook(release);
  pool_start();
}

/* -- Counted buffers ---------------------------------------------------------- */

int mb_io_charge(mb_io_req_t *req, size_t n)
{
  mb_proc_t *p = req->proc;
  int over = p ? mb_proc_room(p, n) : 0;
  if (over) {
    req->oom = over == 1 ? "the process's max_memory"
                         : "the process's memory outside its heap (4 GiB)";
    return UV_ENOMEM;
  }
  long long cap = mb_sched_opts.max_memory;
  if (cap && (long long)n > cap - mb_alloc_host_total()) {
    req->oom = "the host's --max-memory";
    return UV_ENOMEM;
  }
  if (p) {
    atomic_fetch_add_explicit(&p->alloc.charged, (unsigned)n, memory_order_relaxed);
    req->charged_proc += n;
  }
  req->charged += n;
  mb_alloc_count((long long)n);
  return 0;
}

/* Give back n of req's counted bytes (the process's part first). */
static void discharge(mb_io_req_t *req, size_t n)
{
  size_t np = n < req->charged_proc ? n : req->charged_proc;
  if (np) {
    atomic_fetch_sub_explicit(&req->proc->alloc.charged, (unsigned)np, memory_order_relaxed);
    req->charged_proc -= np;
  }
  req->charged -= n;
  mb_alloc_count(-(long long)n);
}

void mb_io_uncharge(mb_io_req_t *req)
{
  if (req->charged)
    discharge(req, req->charged);
}

int mb_io_grow(mb_io_req_t *req, char **buf, size_t *cap, size_t n)
{
  int rc = mb_io_charge(req, n - *cap);
  if (rc)
    return rc;
  char *b = mb_try_realloc(*buf, n);
  if (b == NULL) {
    discharge(req, n - *cap);
    req->oom = "what the host could allocate";
    return UV_ENOMEM;
  }
  *buf = b;
  *cap = n;
  return 0;
}

int mb_io_wanted(mb_io_req_t *req)
{
  mb_proc_t *p = req->proc;
  if (p == NULL)
    return 0;
  mb_proc_lock(p);
  int wanted = !p->dead && p->wait_seq == req->seq && p->io_done == NULL;
  mb_proc_unlock(p);
  return wanted;
}
