/* scheduler.c: scheduler threads, run queues, stealing, slices, preemption.
 * See scheduler.h for the design.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "io.h"
#include "lauxlib.h"
#include "lib.h"
#include "lstate.h"
#include "reg.h"
#include "sock.h"
#include "report.h"
#include "scheduler.h"
#include "timer.h"

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
static void requeue(mb_sched_t *s, mb_proc_t *p)
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

/* -- Safe points and the hook --------------------------------------------- */

/* Are all of T's frames from level `from` up yield-safe: Lua functions, or
 * the C functions that LuaJIT can yield across (pcall, xpcall)? An outer
 * coroutine's innermost frame is co_resume, which passes yields on. */
static int frames_ok(lua_State *T, int from)
{
  lua_Debug ar;
  for (int lvl = from; lua_getstack(T, lvl, &ar); lvl++) {
    if (!lua_checkstack(T, 1))
      return 0;
    lua_getinfo(T, "f", &ar);
    lua_CFunction cf = lua_iscfunction(T, -1) ? lua_tocfunction(T, -1) : NULL;
    lua_pop(T, 1);
    if (cf && cf != mb_lstate_pcall_cf && cf != mb_lstate_xpcall_cf &&
        !(lvl == 0 && cf == mb_lstate_resume_cf))
      return 0;
  }
  return 1;
}

/* Is the innermost C function on L's stack `load` (running its reader)? */
static int inside_load(lua_State *L)
{
  lua_Debug ar;
  for (int lvl = 0; lua_getstack(L, lvl, &ar); lvl++) {
    if (!lua_checkstack(L, 1))
      return 1;
    lua_getinfo(L, "f", &ar);
    lua_CFunction cf = lua_iscfunction(L, -1) ? lua_tocfunction(L, -1) : NULL;
    lua_pop(L, 1);
    if (cf)
      return cf == mb_lstate_load_cf;
  }
  return 0;
}

static int can_yield(mb_proc_t *p, lua_State *L, int skip_top)
{
  lua_State *top = p->con ? p->costack[p->con - 1] : p->co;
  if (L != top)
    return 0;  /* a coroutine resumed by C code we do not know of */
  for (int i = p->con; i >= 0; i--) {
    lua_State *T = i ? p->costack[i - 1] : p->co;
    if (!frames_ok(T, T == L ? skip_top : 0))
      return 0;
  }
  return 1;
}

int mb_sched_can_yield(mb_proc_t *p, lua_State *L)
{
  return !mb_lstate_in_user_hook(L) && can_yield(p, L, 1);
}

int mb_sched_yield(lua_State *L, mb_yield_t reason)
{
  mb_proc_of(L)->yield = reason;
  return lua_yield(L, 0);
}

/* Must the running process p die now? Handles pending exit signals and a
 * refused allocation. */
static int must_die(mb_proc_t *p)
{
  if (p->alloc.oom && p->exit_reason == NULL) {
    p->alloc.limit = 0;   /* room to unwind and report */
    p->exit_reason = mb_msg_string("out of memory");
  }
  if (atomic_load_explicit(&p->nsignals, memory_order_relaxed))
    mb_proc_drain(p);
  return p->exit_reason != NULL;
}

void mb_sched_hook(lua_State *L, lua_Debug *ar)
{
  mb_proc_t *p = mb_proc_of(L);
  if (p->co == NULL)
    return;
  atomic_store_explicit(&p->reductions,
      atomic_load_explicit(&p->reductions, memory_order_relaxed) + MB_REDS_PER_HOOK,
      memory_order_relaxed);
  p->budget -= MB_REDS_PER_HOOK;
  int die = must_die(p);
  if (!die && p->budget > 0 && !mb_sched_halting())
    return;
  if (can_yield(p, L, 0)) {
    mb_lstate_sethook(L, MB_HOOK_INSTRUCTIONS);
    p->yield = die ? MB_YIELD_EXIT : MB_YIELD_PREEMPT;
    lua_yield(L, 0);
    return;
  }
  /* Not a safe point: look again soon. A process that must die (or is
   * halted) checks at every instruction, since the safe points between two
   * C calls (pcall(table.sort, ...) in a loop) are a few instructions long,
   * and unwinds with an error until it reaches one (pcall may catch it; the
   * next hook throws again) - except inside `load`'s reader: LuaJIT only
   * re-enables hooks after an error thrown from a hook when pcall catches
   * it or it ends a coroutine, and one caught by `load` would leave the
   * process with no hook at all, unkillable. */
  die = die || mb_sched_halting();
  mb_lstate_sethook(L, die ? 1 : MB_HOOK_RETRY_INSTRUCTIONS);
  if (die && !inside_load(L))
    luaL_error(L, "process is exiting");
}

/* -- Running a slice ------------------------------------------------------ */

/* End the current wait: drop its timer and match function. */
static void end_wait(mb_proc_t *p)
{
  if (p->recv_match) {
    luaL_unref(p->L, LUA_REGISTRYINDEX, p->recv_match);
    p->recv_match = 0;
  }
  p->q_scan = &p->q_head;
  p->timed_out = 0;
  p->io_on_timeout = NULL;
  if (p->wait_timer || p->wait == MB_WAIT_IO) {
    if (p->wait_timer)
      mb_timer_wait_done(p->wait_timer);
    p->wait_timer = NULL;
    pthread_mutex_lock(&p->lock);
    p->wait = MB_WAIT_NONE;
    p->expired = 0;
    p->wait_seq++;   /* a late timer of this wait will find no match */
    pthread_mutex_unlock(&p->lock);
  } else {
    /* Without a timer or I/O only pushers read `wait`, and only while the
     * status is WAITING, which it is not while the process runs. */
    p->wait = MB_WAIT_NONE;
  }
}

/* The error value on top of L as an exit reason (or fallback, if the value
 * cannot be copied); pops it. */
static mb_msg_t *pop_reason(lua_State *L, const char *fallback)
{
  mb_msg_t *m = mb_copy_encode(L, -1, 1, "reason", NULL, NULL, 0);
  lua_pop(L, 1);
  return m ? m : mb_msg_string(fallback);
}

/* A wake-up's protected call failed: its error value (popped) is the exit
 * reason, except that a refused allocation is "out of memory" wherever it
 * struck (decoding a message while waiting, or in the body: the same). */
static mb_msg_t *wake_failed(mb_proc_t *p, lua_State *L, const char *fallback)
{
  if (p->alloc.oom) {
    lua_pop(L, 1);
    p->alloc.limit = 0;   /* room to unwind and report */
    return mb_msg_string("out of memory");
  }
  return pop_reason(L, fallback);
}

/* Under lua_cpcall on the idle main thread: receive on behalf of p and pass
 * the message to the suspended body coroutine. lua_cpcall rather than
 * lua_pcall: no closure is created per wake-up. */
static int try_receive_cf(lua_State *L)
{
  mb_proc_t *p = lua_touserdata(L, 1);
  lua_settop(L, 0);
  p->recv_result = mb_lib_try_receive(p, L);
  if (p->recv_result == 1)
    lua_xmove(L, p->co, 1);
  return 0;
}

/* Under lua_cpcall on the main thread: push an operation's results (or,
 * without one, what its timeout gives) and pass them to the suspended body
 * coroutine. */
static int push_io_cf(lua_State *L)
{
  mb_proc_t *p = lua_touserdata(L, 1);
  lua_settop(L, 0);
  p->recv_result = p->io_req ? p->io_req->push(L, p->io_req)
                             : p->io_on_timeout(L, p->io_timeout_arg);
  lua_xmove(L, p->co, p->recv_result);
  return 0;
}

/* An MB_WAIT_IO: resume with the operation's results once it is done. */
static int finish_io(mb_proc_t *p)
{
  pthread_mutex_lock(&p->lock);
  mb_io_req_t *req = p->io_done;
  p->io_done = NULL;
  pthread_mutex_unlock(&p->lock);
  /* Without a result, only the wait's timer can end it, and then the
   * operation says what a timeout gives. */
  if (req == NULL && (!p->timed_out || p->io_on_timeout == NULL))
    return -1;
  p->io_req = req;
  int rc = lua_cpcall(p->L, push_io_cf, p);
  p->io_req = NULL;
  if (req)
    mb_io_free(req);
  if (rc != 0) {
    p->exit_reason = wake_failed(p, p->L, "out of memory");
    return -2;
  }
  end_wait(p);
  return p->recv_result;
}

/* A waiting process was woken: can its wait end? Returns the number of
 * values pushed on co to resume it with, -1 if it must keep waiting, -2 if
 * it must die (p->exit_reason set). */
static int finish_wait(mb_proc_t *p)
{
  if (mb_proc_drain(p))
    return -2;
  if (p->wait == MB_WAIT_RECV) {
    /* The receive may call a match function: run it on the idle main
     * thread, protected, never on the suspended coroutine. */
    lua_State *L = p->L;
    if (lua_cpcall(L, try_receive_cf, p) != 0) {
      p->exit_reason = wake_failed(p, L, "receive failed");
      return -2;
    }
    if (p->recv_result < 0)
      return -2;
    if (p->recv_result == 0) {
      if (!p->timed_out)
        return -1;
      lua_pushnil(p->co);
    }
    end_wait(p);
    return 1;
  }
  if (p->wait == MB_WAIT_IO)
    return finish_io(p);
  if (p->wait == MB_WAIT_SLEEP && !p->timed_out)
    return -1;
  end_wait(p);
  return 0;
}

/* Under lua_cpcall on the main thread: the boot function leaves the body
 * function and its arguments, which go to the body coroutine. */
static int boot_cf(lua_State *L)
{
  mb_proc_t *p = lua_touserdata(L, 1);
  int n = p->boot(L);
  lua_xmove(L, p->co, n);
  p->recv_result = n;
  return 0;
}

/* Boot a new process; returns the number of arguments to resume its body
 * with, or -2 if it failed (reported, p->exit_reason set). */
static int boot(mb_proc_t *p)
{
  if (lua_cpcall(p->L, boot_cf, p) != 0) {
    mb_report_crash(p, p->L);
    p->exit_reason = pop_reason(p->L, "spawn failed");
    return -2;
  }
  p->boot = NULL;
  return p->recv_result - 1;
}

static void die(mb_proc_t *p, mb_msg_t *reason)
{
  if (p->first)
    mb_sched_first_exit(mb_msg_is_normal(reason) ? 0 : 1);
  mb_proc_exit(p, reason);
}

/* The body raised an error: report it and die with it as the reason. */
static void crashed(mb_proc_t *p, int status)
{
  p->alloc.limit = 0;
  mb_msg_t *reason = p->exit_reason;
  p->exit_reason = NULL;
  if (reason && !p->alloc.oom) {
    /* Killed at an unsafe point: the error was only the way out. */
    die(p, reason);
    return;
  }
  if (reason == NULL && (p->alloc.oom || status == LUA_ERRMEM))
    reason = mb_msg_string("out of memory");
  if (reason == NULL) {
    mb_report_crash(p, p->co);
    die(p, pop_reason(p->co, luaL_typename(p->co, -1)));
    return;
  }
  mb_report_crash(p, p->co);
  die(p, reason);
}

static void run(mb_sched_t *s, mb_proc_t *p)
{
  atomic_store_explicit(&p->running, 1, memory_order_relaxed);
  int nargs = 0;
  if (p->boot) {
    nargs = boot(p);
  } else if (p->wait != MB_WAIT_NONE) {
    for (;;) {
      nargs = finish_wait(p);
      if (nargs != -1)
        break;
      pthread_mutex_lock(&p->lock);
      int again = p->in_head != NULL || p->woken;
      if (!again) {
        /* Last touch of p: once unlocked, a waker may run it elsewhere. */
        atomic_store_explicit(&p->running, 0, memory_order_relaxed);
        p->status = MB_PS_WAITING;
      }
      pthread_mutex_unlock(&p->lock);
      if (!again)
        return;
    }
  } else if (must_die(p)) {
    nargs = -2;
  }
  if (nargs == -2) {
    mb_msg_t *reason = p->exit_reason;
    p->exit_reason = NULL;
    if (!p->boot)
      mb_report_exit(p, reason);
    die(p, reason);
    return;
  }
  p->budget = mb_sched_opts.slice_reds;
  int st = lua_resume(p->co, nargs);
  if (p->alloc.oom && st != LUA_ERRRUN && st != LUA_ERRMEM && must_die(p)) {
    /* A refused allocation was caught (pcall) and the process went on:
     * the limit still ends it, as in Erlang's max_heap_size. */
    st = LUA_YIELD;
    p->yield = MB_YIELD_EXIT;
  }
  if (st == LUA_YIELD) {
    mb_yield_t why = p->yield;
    p->yield = MB_YIELD_NONE;
    if (lua_gettop(p->co) > 0)
      lua_settop(p->co, 0);   /* values of a bare coroutine.yield() */
    if (why == MB_YIELD_EXIT) {
      mb_msg_t *reason = p->exit_reason;
      p->exit_reason = NULL;
      mb_report_exit(p, reason);
      die(p, reason);
      return;
    }
    if (why == MB_YIELD_WAIT) {
      pthread_mutex_lock(&p->lock);
      p->wait = p->pending_wait;
      int again = p->in_head != NULL || p->woken;
      p->status = again ? MB_PS_RUNNABLE : MB_PS_WAITING;
      /* Last touch of p unless again: once unlocked, a waker may run it. */
      atomic_store_explicit(&p->running, 0, memory_order_relaxed);
      pthread_mutex_unlock(&p->lock);
      if (again)
        rq_push(s, p);
      return;
    }
    /* Preempted, mb.yield(), or a bare coroutine.yield() in the body. */
    atomic_store_explicit(&p->running, 0, memory_order_relaxed);
    requeue(s, p);
    return;
  }
  if (st == 0) {
    mb_msg_t *reason = p->exit_reason ? p->exit_reason : mb_msg_string("normal");
    p->exit_reason = NULL;
    die(p, reason);
    return;
  }
  crashed(p, st);
}

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
      run(s, p);
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
  mb_lstate_init();
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

static void close_handle(uv_handle_t *h, void *arg)
{
  if (uv_is_closing(h))
    return;
  if (h->type == UV_TCP)
    mb_sock_close_handle(h);    /* every TCP handle is a socket's */
  else if (h->type == UV_TIMER && h->data == NULL)
    return;                     /* a socket's timer: closed with its socket */
  else if (h->type == UV_TIMER)
    mb_timer_close_handle(h);   /* other timers are mb_timer_t */
  else
    uv_close(h, NULL);
}

int mb_sched_wait(void)
{
  for (int i = 0; i < nscheds; i++)
    pthread_join(scheds[i].thread, NULL);
  /* Processes first: their finalizers may still post to the loops. */
  mb_proc_shutdown();
  mb_reg_shutdown();
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
  mb_sock_shutdown();
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
