/* scheduler.c: the executor - scheduler threads, run queues, stealing, loops,
 * posted commands, halting (see scheduler.h). It knows nothing of Lua: a slice
 * is whatever the runner does with a process.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "scheduler.h"

typedef struct cmd {
  struct cmd *next;
  void (*fn)(void *);
  void *arg;
} cmd_t;

struct mb_sched {
  int id;
  pthread_t thread;
  uv_loop_t loop;
  uv_async_t async;          /* wakes the thread: commands, work, halt */
  uv_signal_t sigint, sigterm;  /* scheduler 0 only */
  pthread_mutex_t rq_lock;
  mb_proc_t *rq_head, *rq_tail;
  atomic_int rq_len;
  atomic_int sleeping;
  pthread_mutex_t cmd_lock;
  cmd_t *cmd_head, **cmd_tail;
  uint64_t last_poll;
};

mb_sched_opts_t mb_sched_opts;
static mb_sched_t *scheds;
static int nscheds;
static _Thread_local mb_sched_t *self;
static atomic_int halting;
static atomic_int exit_code;
static void (*runner)(mb_sched_t *s, mb_proc_t *p);
static int (*closers[MB_SCHED_HOOKS])(uv_handle_t *h);
static int ncloser;
static void (*after_loops[MB_SCHED_HOOKS])(void);
static int nafter;

/* -- Run queues ----------------------------------------------------------- */

static void rq_push(mb_sched_t *s, mb_proc_t *p)
{
  p->rq_next = NULL;
  pthread_mutex_lock(&s->rq_lock);
  if (s->rq_tail)
    s->rq_tail->rq_next = p;
  else
    s->rq_head = p;
  s->rq_tail = p;
  atomic_fetch_add(&s->rq_len, 1);
  pthread_mutex_unlock(&s->rq_lock);
}

static mb_proc_t *rq_pop(mb_sched_t *s)
{
  if (atomic_load_explicit(&s->rq_len, memory_order_relaxed) == 0)
    return NULL;
  pthread_mutex_lock(&s->rq_lock);
  mb_proc_t *p = s->rq_head;
  if (p) {
    s->rq_head = p->rq_next;
    if (s->rq_head == NULL)
      s->rq_tail = NULL;
    atomic_fetch_sub(&s->rq_len, 1);
  }
  pthread_mutex_unlock(&s->rq_lock);
  return p;
}

/* Take the oldest process of the fullest other queue. */
static mb_proc_t *steal(mb_sched_t *s)
{
  mb_sched_t *victim = NULL;
  int most = 0;
  for (int i = 0; i < nscheds; i++) {
    int n = atomic_load_explicit(&scheds[i].rq_len, memory_order_relaxed);
    if (&scheds[i] != s && n > most) {
      most = n;
      victim = &scheds[i];
    }
  }
  return victim ? rq_pop(victim) : NULL;
}

static void wake(mb_sched_t *s)
{
  if (atomic_exchange(&s->sleeping, 0))
    uv_async_send(&s->async);
}

/* A queue holds more than its thread can start now: let a sleeper steal. */
static void spread(void)
{
  for (int i = 0; i < nscheds; i++)
    if (atomic_load_explicit(&scheds[i].sleeping, memory_order_relaxed)) {
      wake(&scheds[i]);
      return;
    }
}

void mb_sched_enqueue(mb_proc_t *p)
{
  mb_sched_t *s = atomic_load_explicit(&p->home, memory_order_relaxed);
  if (s == NULL)
    s = self ? self : &scheds[0];
  rq_push(s, p);
  if (s != self)
    wake(s);
  else if (atomic_load_explicit(&s->rq_len, memory_order_relaxed) >= 2)
    spread();
}

/* A preempted process goes back to the shortest queue when its own is two
 * or more longer (see DESIGN in scheduler.h). */
void mb_sched_requeue(mb_sched_t *s, mb_proc_t *p)
{
  mb_sched_t *to = s;
  int best = atomic_load_explicit(&s->rq_len, memory_order_relaxed) - 1;
  for (int i = 0; i < nscheds; i++) {
    int n = atomic_load_explicit(&scheds[i].rq_len, memory_order_relaxed);
    if (&scheds[i] != s && n < best) {
      best = n;
      to = &scheds[i];
    }
  }
  rq_push(to, p);
  if (to != s)
    wake(to);
  else if (atomic_load_explicit(&s->rq_len, memory_order_relaxed) >= 2)
    spread();
}

void mb_sched_push(mb_sched_t *s, mb_proc_t *p)
{
  rq_push(s, p);
}

/* -- Commands and halting ------------------------------------------------- */

static void run_commands(mb_sched_t *s)
{
  pthread_mutex_lock(&s->cmd_lock);
  cmd_t *c = s->cmd_head;
  s->cmd_head = NULL;
  s->cmd_tail = &s->cmd_head;
  pthread_mutex_unlock(&s->cmd_lock);
  while (c) {
    cmd_t *next = c->next;
    c->fn(c->arg);
    mb_free(c);
    c = next;
  }
}

void mb_sched_post(mb_sched_t *s, void (*fn)(void *), void *arg)
{
  cmd_t *c = mb_malloc(sizeof *c);
  c->fn = fn;
  c->arg = arg;
  c->next = NULL;
  pthread_mutex_lock(&s->cmd_lock);
  *s->cmd_tail = c;
  s->cmd_tail = &c->next;
  pthread_mutex_unlock(&s->cmd_lock);
  uv_async_send(&s->async);
}

static void on_async(uv_async_t *h)
{
  run_commands(h->data);
}

void mb_sched_halt(int code)
{
  int expected = 0;
  if (!atomic_compare_exchange_strong(&halting, &expected, 1))
    return;
  atomic_store(&exit_code, code);
  for (int i = 0; i < nscheds; i++)
    uv_async_send(&scheds[i].async);
}

int mb_sched_halting(void)
{
  return atomic_load_explicit(&halting, memory_order_relaxed);
}

static void on_signal(uv_signal_t *h, int signum)
{
  mb_sched_halt(128 + signum);
}

mb_sched_t *mb_sched_self(void) { return self; }

mb_sched_t *mb_sched_pick(void)
{
  static atomic_uint next;
  return &scheds[atomic_fetch_add_explicit(&next, 1, memory_order_relaxed) % nscheds];
}
uv_loop_t *mb_sched_loop(mb_sched_t *s) { return &s->loop; }

/* -- The scheduler thread ------------------------------------------------- */

static void poll_loop(mb_sched_t *s, int force)
{
  uint64_t now = uv_hrtime();
  if (force || now - s->last_poll >= MB_POLL_INTERVAL_NS) {
    s->last_poll = now;
    uv_run(&s->loop, UV_RUN_NOWAIT);
  }
}

static int anyone_has_work(void)
{
  for (int i = 0; i < nscheds; i++)
    if (atomic_load(&scheds[i].rq_len) > 0)
      return 1;
  return 0;
}

static void *sched_main(void *arg)
{
  mb_sched_t *s = arg;
  self = s;
  while (!mb_sched_halting()) {
    mb_proc_t *p = rq_pop(s);
    if (p == NULL)
      p = steal(s);
    if (p) {
      MB_PROC_DBG_RUNNER(p, (unsigned long)pthread_self());
      runner(s, p);
      poll_loop(s, 0);
      continue;
    }
    /* Idle: announce it, look once more (a push may have raced the
     * announcement), then sleep in the loop until woken. */
    atomic_store(&s->sleeping, 1);
    if (anyone_has_work() || mb_sched_halting()) {
      atomic_store(&s->sleeping, 0);
      continue;
    }
    uv_run(&s->loop, UV_RUN_ONCE);
    atomic_store(&s->sleeping, 0);
  }
  self = NULL;
  return NULL;
}

static int sched_init(mb_sched_t *s, int id)
{
  s->id = id;
  pthread_mutex_init(&s->rq_lock, NULL);
  pthread_mutex_init(&s->cmd_lock, NULL);
  s->cmd_tail = &s->cmd_head;
  int rc = uv_loop_init(&s->loop);
  if (rc)
    return rc;
  uv_async_init(&s->loop, &s->async, on_async);
  s->async.data = s;
  if (id == 0) {
    uv_signal_init(&s->loop, &s->sigint);
    uv_signal_init(&s->loop, &s->sigterm);
    uv_signal_start(&s->sigint, on_signal, SIGINT);
    uv_signal_start(&s->sigterm, on_signal, SIGTERM);
    uv_unref((uv_handle_t *)&s->sigint);
    uv_unref((uv_handle_t *)&s->sigterm);
  }
  return 0;
}

int mb_sched_start(const mb_sched_opts_t *opts)
{
  mb_sched_opts = *opts;
  mb_proc_on_runnable = mb_sched_enqueue;
  if (mb_sched_opts.schedulers <= 0) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    mb_sched_opts.schedulers = n > 0 ? (int)n : 1;
  }
  nscheds = mb_sched_opts.schedulers;
  scheds = mb_calloc(nscheds, sizeof *scheds);
  for (int i = 0; i < nscheds; i++) {
    int rc = sched_init(&scheds[i], i);
    if (rc)
      return rc;
  }
  return 0;
}

/* Threads start only when the first process is queued, so that the main
 * thread can set everything up first. */
int mb_sched_run(void)
{
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setstacksize(&attr, 8u << 20);  /* deep C recursion in libs */
  for (int i = 0; i < nscheds; i++) {
    int rc = pthread_create(&scheds[i].thread, &attr, sched_main, &scheds[i]);
    if (rc)
      return -rc;
  }
  pthread_attr_destroy(&attr);
  return 0;
}

void mb_sched_set_runner(void (*run)(mb_sched_t *s, mb_proc_t *p))
{
  runner = run;
}

void mb_sched_add_closer(int (*closer)(uv_handle_t *h))
{
  MB_ASSERT(ncloser < MB_SCHED_HOOKS);
  if (ncloser < MB_SCHED_HOOKS)
    closers[ncloser++] = closer;
}

void mb_sched_add_after_loops(void (*fn)(void))
{
  MB_ASSERT(nafter < MB_SCHED_HOOKS);
  if (nafter < MB_SCHED_HOOKS)
    after_loops[nafter++] = fn;
}

static void close_handle(uv_handle_t *h, void *arg)
{
  (void)arg;
  if (uv_is_closing(h))
    return;
  for (int i = 0; i < ncloser; i++)
    if (closers[i](h))
      return;
  uv_close(h, NULL);
}

int mb_sched_wait(void)
{
  for (int i = 0; i < nscheds; i++)
    pthread_join(scheds[i].thread, NULL);
  /* Processes first: their exit hooks may still post to the loops. */
  mb_proc_shutdown();
  for (int i = 0; i < nscheds; i++) {
    mb_sched_t *s = &scheds[i];
    self = s;
    run_commands(s);
    uv_walk(&s->loop, close_handle, NULL);
    uv_run(&s->loop, UV_RUN_DEFAULT);
    uv_loop_close(&s->loop);
    pthread_mutex_destroy(&s->rq_lock);
    pthread_mutex_destroy(&s->cmd_lock);
  }
  self = NULL;
  /* After the loops: their last commands may still create sockets. */
  for (int i = 0; i < nafter; i++)
    after_loops[i]();
  mb_proc_table_free();
  mb_free(scheds);
  return atomic_load(&exit_code);
}

/* -- The first process ---------------------------------------------------- */

static atomic_int first_code = -1;

void mb_sched_first_exit(int code)
{
  atomic_store(&first_code, code);
}

static void on_empty(void)
{
  int code = atomic_load(&first_code);
  mb_sched_halt(code < 0 ? 0 : code);
}

void mb_sched_on_empty_install(void)
{
  mb_proc_on_empty = on_empty;
}
