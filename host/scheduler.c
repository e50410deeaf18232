/* scheduler.c: the executor - scheduler threads, run queues, stealing, loops,
 * posted commands, halting (see scheduler.h). It knows nothing of Lua: a slice
 * is whatever the runner does with a process.
 */
#define _GNU_SOURCE   /* ppoll */
#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "reg.h"
#include "scheduler.h"

typedef struct cmd {
  struct cmd *next;
  void (*fn)(void *);
  void *arg;
} cmd_t;

struct mb_sched {
  int id;
  pthread_t thread;
  _Atomic pid_t tid;         /* the thread's, for the ticker's signal (poke) */
  uv_loop_t loop;
  uv_async_t async;          /* wakes the thread: commands, work, halt */
  mb_lock_t rq_lock;
  /* Two queues under rq_lock (see DESIGN in scheduler.h): processes made
   * runnable by an event (a message, a timer, I/O, a spawn) and processes
   * preempted at the end of their slice. rq_len counts both. */
  mb_proc_t *rq_head, *rq_tail;       /* woken */
  mb_proc_t *pre_head, *pre_tail;     /* preempted */
  int woken_run;                      /* woken ones taken in a row */
  atomic_int rq_len;
  atomic_int sleeping;
  mb_lock_t cmd_lock;
  cmd_t *cmd_head, **cmd_tail;
  uint64_t last_poll;
  /* What the watchdog (the main thread) sees of the current slice. */
  _Atomic uint64_t slice_start;   /* uv_hrtime() at its start; 0 between */
  _Atomic mb_pid_t slice_pid;
  atomic_int stuck;               /* its slice went over the threshold */
  atomic_int done;                /* the thread has left its loop */
  uint64_t reported;              /* main thread: the slice last reported */
  /* Preemption: what runs Lua now (the runner's), under plock; the ticker
   * calls the preempter only with it, under plock. */
  atomic_int plock;
  mb_proc_t *running;
  void *running_ctx;
  int running_timed;              /* MB_SLICE_*: how the ticker times it */
  uint64_t poked_slice, poked_at; /* ticker thread: its last poke here */
  _Atomic uint64_t poke_for;      /* the slice its last signal is for (on_poke) */
  /* A slice with nothing queued behind it runs longer (tick): the one the
   * ticker let run so, until a push here wakes it (0: none); the one whose
   * loop had I/O meanwhile (the ticker's); when the loop's next timer is
   * due (uv_hrtime ns, UINT64_MAX: none), said at each slice's start. */
  _Atomic uint64_t lone_slice;
  uint64_t io_slice;
  _Atomic uint64_t timer_due;
  /* Collecting the thread's heaps (collect_heaps): asked for (since
   * collect_since: own thread), and running now (new work goes to the
   * other schedulers meanwhile). */
  atomic_int collect_asked;
  uint64_t collect_since;
  atomic_int collecting;
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
static void (*on_collect[MB_SCHED_HOOKS])(void);
static int ncollect;
static void (*preempter)(mb_proc_t *p, void *ctx);
static pthread_t ticker;
static int ticker_started;
static atomic_int ticker_stop;
static atomic_int ticker_parked;
static int ticker_fd = -1;           /* eventfd (ticker_wake) */

static void ticker_wake(void);

/* -- Run queues ----------------------------------------------------------- */

static void append(mb_proc_t **head, mb_proc_t **tail, mb_proc_t *p)
{
  if (*tail)
    (*tail)->rq_next = p;
  else
    *head = p;
  *tail = p;
}

static mb_proc_t *take(mb_proc_t **head, mb_proc_t **tail)
{
  mb_proc_t *p = *head;
  *head = p->rq_next;
  if (*head == NULL)
    *tail = NULL;
  return p;
}

/* Whether a thief may take p, the next of s's n queued, leaving out a
 * stalled slice (that takes a clock read; the ticker watches for it): see
 * stealable. */
static int takeable(mb_sched_t *s, mb_proc_t *p, int n)
{
  return n >= MB_STEAL_HOMED || atomic_load_explicit(&p->home, memory_order_relaxed) != s;
}

/* Whether a thief may take p, the next of s's n queued: a process whose
 * socket lives on s's loop (p->home) stays there unless the queue is long
 * (MB_STEAL_HOMED) or s's slice has run for MB_STALL_NS (a process stuck in
 * a long C call must not hold the others): moved, it writes from another
 * thread and brings its state to another core, and goes back at its next
 * wake-up, which costs more than a short wait at home. */
static int stealable(mb_sched_t *s, mb_proc_t *p, int n)
{
  if (takeable(s, p, n))
    return 1;
  uint64_t st = atomic_load_explicit(&s->slice_start, memory_order_relaxed);
  return st != 0 && uv_hrtime() - st >= MB_STALL_NS;
}

/* The process to take next from s, which has n queued (rq_lock held), or
 * NULL: a woken one first (it has waited for its event, and will likely
 * block again soon), but never more than MB_WOKEN_BURST in a row while
 * preempted ones wait, so that a storm of messages cannot starve the
 * processes that compute; for a thief, NULL if that one is not stealable. */
static mb_proc_t *rq_next(mb_sched_t *s, int n, int stealing, int *woken)
{
  *woken = s->rq_head && (s->pre_head == NULL || s->woken_run < MB_WOKEN_BURST);
  mb_proc_t *next = *woken ? s->rq_head : s->pre_head;
  return next && (!stealing || stealable(s, next, n)) ? next : NULL;
}

/* Held for a few hundred instructions at most; if its holder was
 * descheduled meanwhile, give the core back instead of spinning. */
static void plock(mb_sched_t *s)
{
  for (int spins = 0; atomic_exchange_explicit(&s->plock, 1, memory_order_acquire); )
    while (atomic_load_explicit(&s->plock, memory_order_relaxed))
      if (++spins > 1000)
        sched_yield();
}

static void punlock(mb_sched_t *s)
{
  atomic_store_explicit(&s->plock, 0, memory_order_release);
}

/* -- Poking a slice -------------------------------------------------------- */

/* The preempter runs on the thread whose state it changes, never beside
 * it: LuaJIT's hook mask is one byte, and besides the hook's bits it holds
 * flags the owner thread sets and clears by itself - around every __gc
 * finalizer (hook_entergc, hook_restore), when pcall catches an error
 * (hook_leave) - each a read, a change and a write. lua_sethook from
 * another thread is a read, a change and a write of the same byte: when
 * the two overlap, one loses the other's change. Lost on the owner's side,
 * the finalizer's "in a hook" flag stays set: hooks stop firing, and the
 * next yield of a C function (mb.receive) is taken for a hook's, which
 * resumes into a frame that is not there - a crash (measured: 12 processes
 * that free userdata with __gc in loops of 1 ms, 4 s, crashed the host 4
 * times in 4). Lost on the ticker's side, the poke is gone while the hook
 * function stays set. So the ticker signals the scheduler's thread
 * (MB_POKE_SIGNAL) and the handler, on that thread, calls the preempter:
 * it runs between two instructions of the owner, as LuaJIT's own profiler
 * and lua.c's SIGINT handler call lua_sethook. An owner's write that it
 * interrupts can still lose the poke (never the owner's flag): the
 * preempter then finds the count missing and arms it again at the
 * ticker's next poke, a slice time later. The handler does nothing while
 * the thread holds its plock (the owner's own hook changes, mb_sched_running)
 * or runs another slice than the one the signal is for: the ticker pokes
 * again when it is still due. SIGURG: ignored by default (a stray one
 * does nothing), and unused here otherwise (no socket has an owner for
 * out-of-band data, F_SETOWN); Go's runtime preempts with it for the same
 * reasons. */
#define MB_POKE_SIGNAL SIGURG

/* Under s's plock, on its thread: poke the slice running there. */
static void poke_running(mb_sched_t *s)
{
  if (s->running && preempter)
    preempter(s->running, s->running_ctx);
}

static void on_poke(int sig)
{
  (void)sig;
  int saved = errno;
  mb_sched_t *s = self;
  if (s && !atomic_exchange_explicit(&s->plock, 1, memory_order_acquire)) {
    uint64_t st = atomic_load_explicit(&s->slice_start, memory_order_relaxed);
    if (st != 0 && atomic_load_explicit(&s->poke_for, memory_order_relaxed) == st)
      poke_running(s);
    punlock(s);
  }
  errno = saved;
}

/* The ticker's: signal s's thread to poke its slice (poke_for). A thread
 * that has ended meanwhile is not there to signal (tgkill finds no such
 * thread in this process). */
static void poke(mb_sched_t *s)
{
  pid_t tid = atomic_load_explicit(&s->tid, memory_order_relaxed);
  if (tid > 0)
    tgkill(getpid(), tid, MB_POKE_SIGNAL);
}

static int install_poke(void)
{
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_poke;
  sa.sa_flags = SA_RESTART | SA_ONSTACK;
  sigfillset(&sa.sa_mask);
  return sigaction(MB_POKE_SIGNAL, &sa, NULL) < 0 ? -errno : 0;
}

/* A lone slice of s has company (rq_push_as): cut it to its usual time.
 * Pushed from s's own thread, the push comes from the process running that
 * slice (between slices none is lone), so it is poked here, as the ticker
 * would, and yields at its next safe point: no eventfd write, and no
 * waiting for the ticker's thread to be scheduled (on a loaded host that
 * was most of a millisecond). A poke the state loses (see "Poking a
 * slice") is the ticker's to repeat when the slice's lone time is up, as
 * for any poke. From another thread: the ticker, woken, pokes it. */
static void nudge(mb_sched_t *s)
{
  if (s != self) {
    ticker_wake();
    return;
  }
  plock(s);
  poke_running(s);
  punlock(s);
}

/* Queue p: woken (an event made it runnable) or preempted. Returns whether
 * a sleeper should be woken to steal (only a push by s's own thread
 * spreads, see spread): the queue holds two or more and a thief may take
 * the one it would. */
static int rq_push_as(mb_sched_t *s, mb_proc_t *p, int preempted)
{
  p->rq_next = NULL;
  mb_lock(&s->rq_lock);
  if (preempted)
    append(&s->pre_head, &s->pre_tail, p);
  else
    append(&s->rq_head, &s->rq_tail, p);
  int n = atomic_fetch_add(&s->rq_len, 1) + 1, woken;
  int worth = s == self && n >= 2 && takeable(s, rq_next(s, n, 0, &woken), n);
  mb_unlock(&s->rq_lock);
  /* A slice let run alone there has company now (see alone()); not its
   * own process, requeued as its slice ends. */
  uint64_t lone = atomic_load(&s->lone_slice);
  if (lone && !(preempted && s == self) &&
      lone == atomic_load_explicit(&s->slice_start, memory_order_relaxed) &&
      atomic_compare_exchange_strong(&s->lone_slice, &lone, 0))
    nudge(s);
  return worth;
}

static int rq_push(mb_sched_t *s, mb_proc_t *p)
{
  return rq_push_as(s, p, 0);
}

static mb_proc_t *rq_take(mb_sched_t *s, int stealing)
{
  int n = atomic_load_explicit(&s->rq_len, memory_order_relaxed);
  if (n == 0)
    return NULL;
  mb_proc_t *p = NULL;
  int woken;
  mb_lock(&s->rq_lock);
  if (rq_next(s, n, stealing, &woken)) {
    if (woken) {
      p = take(&s->rq_head, &s->rq_tail);
      s->woken_run++;
    } else {
      p = take(&s->pre_head, &s->pre_tail);
      s->woken_run = 0;
    }
    atomic_fetch_sub(&s->rq_len, 1);
  }
  mb_unlock(&s->rq_lock);
  return p;
}

static mb_proc_t *rq_pop(mb_sched_t *s)
{
  return rq_take(s, 0);
}

/* Take the oldest process of the fullest other queue (see stealable). */
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
  return victim ? rq_take(victim, 1) : NULL;
}

static void wake(mb_sched_t *s)
{
  if (atomic_exchange(&s->sleeping, 0))
    uv_async_send(&s->async);
}

/* A queue holds more than its thread can start now: let a sleeper steal.
 * Only when the thief may take the process it would (rq_push_as): a
 * process whose socket is on the queue's loop stays there unless the
 * queue is long, so for it a sleeper would wake, find nothing it may take
 * and sleep again. That was most of an HTTP server's wake-ups: each poll
 * of a scheduler's loop queues the several connections it has data for,
 * and each such batch woke the other scheduler for nothing (a write to its
 * eventfd, its epoll_wait's return and a read). A stalled slice's queue is
 * the ticker's to hand over (MB_STALL_NS). */
static void spread(void)
{
  for (int i = 0; i < nscheds; i++)
    if (atomic_load_explicit(&scheds[i].sleeping, memory_order_relaxed)) {
      wake(&scheds[i]);
      return;
    }
}

static mb_sched_t *other_than(mb_sched_t *s);

void mb_sched_enqueue(mb_proc_t *p)
{
  mb_sched_t *s = atomic_load_explicit(&p->home, memory_order_relaxed);
  if (s == NULL)
    s = self ? self : &scheds[0];
  if (atomic_load_explicit(&s->stuck, memory_order_relaxed) ||
      atomic_load_explicit(&s->collecting, memory_order_relaxed)) {
    mb_sched_t *o = other_than(s);
    if (o)
      s = o;
  }
  int worth = rq_push(s, p);
  /* A wake-up from this scheduler's own idle loop must keep that loop
   * from blocking: libuv 1.44 runs the timers already due before it polls
   * (UV_RUN_ONCE), so a timer that came due while the scheduler was busy,
   * or a 0 ms send_after armed from a command, would make p runnable here
   * and the poll would then block until the next timer or I/O. uv_stop
   * does it on the loop's own thread (a poll after it does not block, and
   * uv_run returns): not uv_async_send, which cost a write to the loop's
   * eventfd, and an epoll_wait and a read to take it, every time the idle
   * loop's poll found I/O for a process (~0.02 a request of an HTTP
   * server under wrk -c64). */
  if (s != self)
    wake(s);
  else if (atomic_load_explicit(&s->sleeping, memory_order_relaxed)) {
    if (atomic_exchange(&s->sleeping, 0))
      uv_stop(&s->loop);
  } else if (worth) {
    spread();
  }
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
  int worth = rq_push_as(to, p, 1);
  if (to != s)
    wake(to);
  else if (worth)
    spread();
}

void mb_sched_push(mb_sched_t *s, mb_proc_t *p)
{
  rq_push(s, p);
}

/* -- Commands and halting ------------------------------------------------- */

static void run_commands(mb_sched_t *s)
{
  mb_lock(&s->cmd_lock);
  cmd_t *c = s->cmd_head;
  s->cmd_head = NULL;
  s->cmd_tail = &s->cmd_head;
  mb_unlock(&s->cmd_lock);
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
  mb_lock(&s->cmd_lock);
  *s->cmd_tail = c;
  s->cmd_tail = &c->next;
  mb_unlock(&s->cmd_lock);
  uv_async_send(&s->async);
}

static void on_async(uv_async_t *h)
{
  run_commands(h->data);
}

/* The main thread (mb_sched_wait) sleeps in sigtimedwait between its
 * rounds of MB_WATCHDOG_TICK_MS: this signal, blocked in every thread
 * and sent to it alone, ends the sleep when there is news for it (the
 * halt, a scheduler that stopped), so that a host ends as soon as its
 * work does, not up to a round later (100 ms on every run of a script). */
#define MB_WAKE_SIGNAL SIGRTMIN
static pthread_t main_thread;
static atomic_int main_waits;   /* main_thread is set */

/* The main thread's signals: blocked in every thread (mb_sched_run), taken
 * by sigtimedwait (wait_signal). */
static void main_signals(sigset_t *set)
{
  sigemptyset(set);
  sigaddset(set, SIGINT);
  sigaddset(set, SIGTERM);
  sigaddset(set, MB_WAKE_SIGNAL);
}

static void wake_main(void)
{
  if (atomic_load(&main_waits))
    pthread_kill(main_thread, MB_WAKE_SIGNAL);
}

void mb_sched_halt(int code)
{
  int expected = 0;
  if (!atomic_compare_exchange_strong(&halting, &expected, 1))
    return;
  atomic_store(&exit_code, code);
  for (int i = 0; i < nscheds; i++)
    uv_async_send(&scheds[i].async);
  wake_main();
}

int mb_sched_halting(void)
{
  return atomic_load_explicit(&halting, memory_order_relaxed);
}


mb_sched_t *mb_sched_self(void) { return self; }

mb_sched_t *mb_sched_pick(void)
{
  static atomic_uint next;
  return &scheds[atomic_fetch_add_explicit(&next, 1, memory_order_relaxed) % nscheds];
}
uv_loop_t *mb_sched_loop(mb_sched_t *s) { return &s->loop; }
int mb_sched_id(const mb_sched_t *s) { return s->id; }
mb_sched_t *mb_sched_by_id(int id) { return &scheds[id]; }
int mb_sched_stuck(const mb_sched_t *s)
{
  return atomic_load_explicit(&s->stuck, memory_order_relaxed);
}

/* -- Preemption: the ticker ------------------------------------------------
 * Most slices are short (a message handled, a request answered): their
 * process runs with no count hook, so LuaJIT's interpreter dispatches at
 * full speed (the hook's instrumented dispatch cost every VM instruction
 * ~10 machine instructions: a tenth of an HTTP request). One ticker thread
 * watches those slices instead: when one has run for its time
 * (slice_reds * MB_NS_PER_RED), its process has an exit signal pending, or
 * the host halts, it signals that slice's thread, where the runner's
 * preempter arms the count hook of the process's state (see "Poking a
 * slice"); the hook then yields it at its next safe point
 * (host/lib/run.c). A process preempted that way computes: the runner
 * then lets it count its own slices with the hook, as before,
 * until it blocks, and says so (MB_SLICE_COUNTED), since a ticker that
 * woke every slice time for it cost ~20 us of CPU a wake-up on this
 * machine's VM: 8% of a core. Unless nothing waits for its core: a slice
 * due with its scheduler's queue empty runs on uncounted, up to
 * MB_TICK_LONE_NS or the loop's next timer (tick), as do the next slices
 * of a process preempted alone (MB_SLICE_ALONE); the ticker then watches
 * that loop's epoll fd, and a push onto that queue wakes it (rq_push_as;
 * a push by the lone process itself pokes it at once, see nudge), so
 * either cuts the slice to its usual time. A lone loop so runs at full
 * speed (the count hook's dispatch cost it 4-8%). The preempter runs
 * under the scheduler's plock, which the runner takes to say what runs Lua there
 * (mb_sched_running) and around its own hook changes, so the state it is
 * given is live and no hook change of the owner thread is lost.
 * The ticker sleeps until the earliest moment a running slice can be due,
 * but at least its gap: one slice time while it had something to preempt
 * lately, doubling each quiet round up to MB_TICK_MAX_NS, so that a host
 * whose slices are short wakes it ~500 times a second, and a loop that
 * starts after a quiet spell runs at most MB_TICK_MAX_NS more before its
 * first preemption. A poke the state missed (an owner's write of LuaJIT's
 * hook mask took it back, or the handler found the plock held) is
 * repeated after another slice time. With no slice running for
 * MB_TICK_PARK rounds it parks until a slice starts (ticker_unpark): an
 * idle host wakes no thread. */

void mb_sched_set_preempter(void (*fn)(mb_proc_t *p, void *ctx))
{
  preempter = fn;
}

/* Is s's slice st alone, nothing queued behind it? Marks it so, for a
 * push there to nudge it (rq_push_as): the marker reads rq_len after it
 * marks, a push reads the mark after the count went up, so one of the two
 * sees the other. */
static int mark_lone(mb_sched_t *s, uint64_t st)
{
  if (atomic_load(&s->rq_len) > 0)
    return 0;
  atomic_store(&s->lone_slice, st);
  if (atomic_load(&s->rq_len) == 0)
    return 1;
  atomic_store(&s->lone_slice, 0);
  return 0;
}

/* The ticker's: the same, unless I/O woke it for the slice's loop
 * (io_slice, the ticker's own). */
static int alone(mb_sched_t *s, uint64_t st)
{
  return s->io_slice != st && mark_lone(s, st);
}

void mb_sched_running(mb_sched_t *s, mb_proc_t *p, void *ctx, int timed)
{
  plock(s);
  s->running = p;
  s->running_ctx = ctx;
  s->running_timed = timed;
  punlock(s);
  /* A process preempted alone runs alone until company comes: marked so
   * at once, not when the ticker first looks at the slice, so that a push
   * meanwhile cuts it short at once too (nudge). */
  if (timed == MB_SLICE_ALONE)
    mark_lone(s, atomic_load_explicit(&s->slice_start, memory_order_relaxed));
}

int mb_sched_queued(mb_sched_t *s)
{
  return atomic_load_explicit(&s->rq_len, memory_order_relaxed);
}

void mb_sched_hook_lock(void)
{
  if (self)
    plock(self);
}

void mb_sched_hook_unlock(void)
{
  if (self)
    punlock(self);
}

/* Poke s's running process if its slice is due (or it must stop anyway);
 * returns when the slice there may next be due, or 0 if none runs that
 * the ticker times; *lone: it runs alone (alone()), the ticker watches
 * its loop. A slice due with nothing queued behind it runs on, to
 * MB_TICK_LONE_NS or its loop's next timer, and so does the next slice of
 * a process preempted so (MB_SLICE_ALONE) from its start: no one waits
 * for the core, and a ticker that woke every slice time costs more than
 * the count hook would (run.c's hook). */
static uint64_t tick(mb_sched_t *s, uint64_t now, uint64_t slice, int *poked, int *lone,
                     int *stalled)
{
  uint64_t st = atomic_load_explicit(&s->slice_start, memory_order_acquire);
  if (st == 0)
    return 0;
  int queued = atomic_load_explicit(&s->rq_len, memory_order_relaxed) > 0;
  if (queued && now - st >= MB_STALL_NS)
    *stalled = 1;
  uint64_t from = s->poked_slice == st ? s->poked_at : st, due = from + slice;
  int signal_it = 0;
  plock(s);
  mb_proc_t *p = s->running;
  if (p) {
    /* A counted slice stops itself at its budget, and sees signals at its
     * next hook, unless LuaJIT holds hooks off (a __gc finalizer or a
     * debug hook function runs) or a C call is long: one that has run
     * MB_STALL_NS is poked too, which lets hooks through (run.c, preempt)
     * and stops it at its next hook. */
    int counted = s->running_timed == MB_SLICE_COUNTED;
    int must = !counted && (mb_sched_halting() ||
                            atomic_load_explicit(&p->nsignals, memory_order_relaxed));
    if (counted) {
      if (s->poked_slice != st)
        due = st + MB_STALL_NS;
    } else if (!must && (now >= due || s->running_timed == MB_SLICE_ALONE) && alone(s, st)) {
      uint64_t timer = atomic_load_explicit(&s->timer_due, memory_order_relaxed);
      due = from + MB_TICK_LONE_NS < timer ? from + MB_TICK_LONE_NS
                                           : timer > due ? timer : due;
      *lone = 1;
    }
    if (must || now >= due) {
      if (MB_POKE_BY_SIGNAL) {
        atomic_store_explicit(&s->poke_for, st, memory_order_relaxed);
        signal_it = 1;   /* after the lock, which the handler takes */
      } else {
        preempter(p, s->running_ctx);
      }
      s->poked_slice = st;
      s->poked_at = now;
      due = now + slice;
      *poked = 1;
      *lone = 0;
    }
  }
  punlock(s);
  if (signal_it)
    poke(s);
  if (queued && (due == 0 || st + MB_STALL_NS < due))
    due = st + MB_STALL_NS;   /* look again then: is it stalled? */
  return due;
}

/* The ticker's eventfd: a slice starts while it is parked (ticker_unpark),
 * or a push gives a lone slice company (rq_push_as). */
static void ticker_wake(void)
{
  uint64_t one = 1;
  while (write(ticker_fd, &one, sizeof one) < 0 && errno == EINTR)
    ;
}

/* A slice starts on a scheduler: the ticker must be watching. (The
 * scheduler stores slice_start, then looks at ticker_parked; the ticker
 * sets ticker_parked, then looks at every slice_start: one of the two
 * sees the other.) */
static void ticker_unpark(void)
{
  if (atomic_exchange(&ticker_parked, 0))
    ticker_wake();
}

static int any_slice(void)
{
  for (int i = 0; i < nscheds; i++)
    if (atomic_load(&scheds[i].slice_start))
      return 1;
  return 0;
}

/* Wait for fds[0..n) until next (0: no limit); 1 if the eventfd woke it. */
static int ticker_wait(struct pollfd *fds, int n, uint64_t next)
{
  struct timespec ts, *tp = NULL;
  if (next) {
    uint64_t now = uv_hrtime(), d = next > now ? next - now : 0;
    ts.tv_sec = (time_t)(d / 1000000000u);
    ts.tv_nsec = (long)(d % 1000000000u);
    tp = &ts;
  }
  fds[0].revents = 0;
  if (ppoll(fds, (nfds_t)n, tp, NULL) <= 0 || !(fds[0].revents & POLLIN))
    return 0;
  uint64_t v;
  while (read(ticker_fd, &v, sizeof v) < 0 && errno == EINTR)
    ;
  return 1;
}

static void ticker_park(struct pollfd *fds)
{
  atomic_store(&ticker_parked, 1);
  while (atomic_load(&ticker_parked) && !any_slice() && !atomic_load(&ticker_stop))
    ticker_wait(fds, 1, 0);
  atomic_store(&ticker_parked, 0);
}

static void *ticker_main(void *arg)
{
  (void)arg;
  uint64_t slice = (uint64_t)mb_sched_opts.slice_reds * MB_NS_PER_RED;
  uint64_t gap = slice;
  int quiet = 0;
  /* fds[0] the eventfd, then the loops of the schedulers whose slice runs
   * alone: I/O there (a socket, a post, a thread pool's completion) gives
   * the slice company, as a push does. */
  struct pollfd *fds = mb_calloc((size_t)nscheds + 1, sizeof *fds);
  mb_sched_t **watched = mb_calloc((size_t)nscheds + 1, sizeof *watched);
  fds[0].fd = ticker_fd;
  fds[0].events = POLLIN;
  while (!atomic_load(&ticker_stop)) {
    uint64_t now = uv_hrtime(), next = now + MB_TICK_MAX_NS;
    int poked = 0, busy = 0, n = 1, stalled = 0;
    for (int i = 0; i < nscheds; i++) {
      int lone = 0;
      uint64_t due = tick(&scheds[i], now, slice, &poked, &lone, &stalled);
      if (due && due < next)
        next = due;
      busy |= due != 0;
      if (lone) {
        watched[n] = &scheds[i];
        fds[n].fd = uv_backend_fd(&scheds[i].loop);
        fds[n++].events = POLLIN;
      }
    }
    if (stalled)
      spread();
    quiet = busy ? 0 : quiet + 1;
    if (quiet >= MB_TICK_PARK) {
      ticker_park(fds);
      quiet = 0;
      gap = slice;
      continue;
    }
    gap = poked ? slice : gap * 2 < MB_TICK_MAX_NS ? gap * 2 : MB_TICK_MAX_NS;
    if (next < now + gap)
      next = now + gap;
    if (ticker_wait(fds, n, next))
      gap = slice;    /* a lone slice has company: time it as usual */
    for (int i = 1; i < n; i++)
      if (fds[i].revents) {
        watched[i]->io_slice = atomic_load(&watched[i]->slice_start);
        gap = slice;
      }
  }
  mb_free(fds);
  mb_free(watched);
  return NULL;
}

/* -- The scheduler thread ------------------------------------------------- */

static void migrate(mb_sched_t *s);
static atomic_int collect_busy;   /* a scheduler is collecting */

/* Give back s's free heap pages. A collection walks every page of the
 * thread's heaps (their blocks freed by other threads among them): with
 * 2,000 chat users, 0.5-12.6 ms, and a process queued behind it waited
 * that long (ten in a 12 s run: the chat's p99 doubled). So it waits
 * until the thread has nothing to run, and the processes that become
 * runnable meanwhile go to the other schedulers; one scheduler collects
 * at a time (so that there is another to go to), then wakes the next
 * that was asked to; after MB_COLLECT_DEFER_NS of a thread never idle,
 * it runs between two slices, its queue handed to the others first.
 * Returns whether it collected. */
static int collect(mb_sched_t *s)
{
  int expected = 0;
  if (!atomic_compare_exchange_strong(&collect_busy, &expected, 1))
    return 0;
  atomic_store(&s->collecting, 1);
  migrate(s);
  for (int i = 0; i < ncollect; i++)
    on_collect[i]();
  mb_alloc_collect();
  atomic_store(&s->collect_asked, 0);
  atomic_store(&s->collecting, 0);
  atomic_store(&collect_busy, 0);
  for (int i = 0; i < nscheds; i++)
    if (&scheds[i] != s && atomic_load(&scheds[i].collect_asked))
      wake(&scheds[i]);
  return 1;
}

/* Poll s's loop if it is due; returns the time it read (uv_hrtime) if it
 * did not run the loop, for the next slice's start to use (a clock read
 * is ~30 ns on this VM: a tenth of a short slice's overhead), else 0. */
static uint64_t poll_loop(mb_sched_t *s)
{
  uint64_t now = uv_hrtime();
  if (now - s->last_poll >= MB_POLL_INTERVAL_NS) {
    s->last_poll = now;
    uv_run(&s->loop, UV_RUN_NOWAIT);
    if (atomic_load_explicit(&s->collect_asked, memory_order_relaxed) &&
        now - s->collect_since >= MB_COLLECT_DEFER_NS)
      collect(s);
    return 0;
  }
  return now;
}

/* Whether s has work queued, or another queue has work s may steal. */
static int work_for(mb_sched_t *s)
{
  for (int i = 0; i < nscheds; i++) {
    mb_sched_t *o = &scheds[i];
    int n = atomic_load(&o->rq_len), woken;
    if (n == 0)
      continue;
    if (o == s || n >= MB_STEAL_HOMED)
      return 1;
    mb_lock(&o->rq_lock);
    int can = rq_next(o, n, 1, &woken) != NULL;
    mb_unlock(&o->rq_lock);
    if (can)
      return 1;
  }
  return 0;
}

static void *sched_main(void *arg)
{
  mb_sched_t *s = arg;
  self = s;
  atomic_store(&s->tid, gettid());
  uint64_t now = 0;   /* the clock as the last slice ended, if nothing ran since */
  while (!mb_sched_halting()) {
    mb_proc_t *p = rq_pop(s);
    if (p == NULL)
      p = steal(s);
    if (p) {
      MB_PROC_DBG_RUNNER(p, (unsigned long)pthread_self());
      atomic_store_explicit(&s->slice_pid, p->pid, memory_order_relaxed);
      int ms = uv_backend_timeout(&s->loop);   /* for a slice that runs alone */
      atomic_store_explicit(&s->timer_due, ms < 0 ? UINT64_MAX
                            : (uv_now(&s->loop) + (uint64_t)ms) * 1000000u, memory_order_relaxed);
      atomic_store_explicit(&s->slice_start, now ? now : uv_hrtime(), memory_order_seq_cst);
      if (atomic_load(&ticker_parked))
        ticker_unpark();
      runner(s, p);
      atomic_store_explicit(&s->slice_start, 0, memory_order_release);
      if (atomic_load_explicit(&s->stuck, memory_order_relaxed))
        atomic_store(&s->stuck, 0);   /* it came back */
      now = poll_loop(s);
      continue;
    }
    now = 0;
    if (atomic_load_explicit(&s->collect_asked, memory_order_relaxed) && collect(s))
      continue;
    /* Idle: announce it, look once more (a push, or the end of another's
     * collection, may have raced the announcement), then sleep in the
     * loop until woken. */
    atomic_store(&s->sleeping, 1);
    if (work_for(s) || mb_sched_halting() ||
        (atomic_load(&s->collect_asked) && !atomic_load(&collect_busy))) {
      atomic_store(&s->sleeping, 0);
      continue;
    }
    uv_run(&s->loop, UV_RUN_ONCE);
    atomic_store(&s->sleeping, 0);
  }
  atomic_store(&s->tid, 0);
  self = NULL;
  atomic_store(&s->done, 1);
  wake_main();
  return NULL;
}

static int sched_init(mb_sched_t *s, int id)
{
  s->id = id;
  mb_lock_init(&s->rq_lock);
  mb_lock_init(&s->cmd_lock);
  s->cmd_tail = &s->cmd_head;
  int rc = uv_loop_init(&s->loop);
  if (rc)
    return rc;
  uv_async_init(&s->loop, &s->async, on_async);
  s->async.data = s;
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
  /* SIGINT and SIGTERM go to the main thread alone (mb_sched_wait), which
   * no process can hold up: blocked here, before any thread starts, so
   * every thread made from now on inherits the mask. */
  sigset_t set;
  main_signals(&set);
  pthread_sigmask(SIG_BLOCK, &set, NULL);
  main_thread = pthread_self();
  atomic_store(&main_waits, 1);
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setstacksize(&attr, 8u << 20);  /* deep C recursion in libs */
  for (int i = 0; i < nscheds; i++) {
    int rc = pthread_create(&scheds[i].thread, &attr, sched_main, &scheds[i]);
    if (rc)
      return -rc;
  }
  pthread_attr_destroy(&attr);
  if (mb_sched_opts.slice_reds > 0 && preempter) {
    int rc = MB_POKE_BY_SIGNAL ? install_poke() : 0;
    if (rc)
      return rc;
    ticker_fd = eventfd(0, EFD_CLOEXEC);
    if (ticker_fd < 0)
      return -errno;
    rc = pthread_create(&ticker, NULL, ticker_main, NULL);
    if (rc)
      return -rc;
    ticker_started = 1;
  }
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

void mb_sched_add_on_collect(void (*fn)(void))
{
  MB_ASSERT(ncollect < MB_SCHED_HOOKS);
  if (ncollect < MB_SCHED_HOOKS)
    on_collect[ncollect++] = fn;
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

/* -- The watchdog (main thread) -------------------------------------------- */

/* Another scheduler than s, not stuck nor collecting, with the shortest
 * queue. */
static mb_sched_t *other_than(mb_sched_t *s)
{
  mb_sched_t *best = NULL;
  int len = 0;
  for (int i = 0; i < nscheds; i++) {
    mb_sched_t *o = &scheds[i];
    int n = atomic_load_explicit(&o->rq_len, memory_order_relaxed);
    if (o != s && !atomic_load_explicit(&o->stuck, memory_order_relaxed) &&
        !atomic_load_explicit(&o->collecting, memory_order_relaxed) &&
        (best == NULL || n < len)) {
      best = o;
      len = n;
    }
  }
  return best;
}

/* A stuck scheduler's queued processes go to the others. */
static void migrate(mb_sched_t *s)
{
  for (mb_proc_t *p; (p = rq_pop(s)) != NULL; ) {
    mb_sched_t *to = other_than(s);
    if (to == NULL) {        /* every scheduler is stuck: leave it */
      rq_push(s, p);
      return;
    }
    rq_push(to, p);
    wake(to);
  }
}

static void report_stuck(mb_sched_t *s, mb_pid_t pid, uint64_t ms)
{
  char text[MB_PID_TEXT_MAX], name[200] = "";
  mb_proc_t *p = mb_proc_get(pid);
  const char *origin = NULL;
  if (p) {
    char reg[160];
    if (mb_reg_name_of(p, reg, sizeof reg))
      snprintf(name, sizeof name, " registered as %s", reg);
    origin = atomic_load_explicit(&p->origin, memory_order_relaxed);
    mb_proc_unref(p);
  }
  fprintf(stderr,
          "=WATCHDOG REPORT==== %s%s%s%s%s\n"
          "scheduler %d has run it for %llu ms without reaching a preemption point "
          "(a long C call, or code the count hook cannot reach); "
          "its queued processes move to the other schedulers\n",
          mb_pid_format(text, sizeof text, pid), name,
          origin ? " spawned from module '" : "", origin ? origin : "",
          origin ? "'" : "", s->id, (unsigned long long)ms);
  fflush(stderr);
}

static void watchdog(void)
{
  uint64_t limit = (uint64_t)mb_sched_opts.watchdog_ms * 1000000;
  for (int i = 0; i < nscheds; i++) {
    mb_sched_t *s = &scheds[i];
    uint64_t st = atomic_load_explicit(&s->slice_start, memory_order_acquire);
    uint64_t now = uv_hrtime();   /* after st: a slice may start meanwhile */
    if (st == 0 || now < st || now - st < limit || s->reported == st)
      continue;
    s->reported = st;
    mb_pid_t pid = atomic_load_explicit(&s->slice_pid, memory_order_relaxed);
    atomic_store(&s->stuck, 1);
    report_stuck(s, pid, (now - st) / 1000000);
    migrate(s);
  }
}

/* The killer's victim: the process holding the most, but an essential one
 * (spawn_opt: a server's acceptor, a supervisor) only if no other can go,
 * and (unless an allocation failed) only if its end alone brings the host
 * under the cap. And none while the host is over by more than all the
 * processes it may end hold together. What is over is then held by no
 * process that may go - the first one's, or what processes just ended held
 * (their sockets, freed as their loops close them; their timers, freed by
 * commands on each scheduler) - and ending a bystander for it helps no one
 * (an HTTP acceptor holding 65 KB was ended for 700 KB that 200
 * connections' sockets still held; a process of 35 KB for 68 MB of a
 * killed target's timers). find_biggest fills a biggest_t for each kind,
 * [1] the essential, and sums what the killable hold. */
typedef struct biggest {
  mb_pid_t pid;
  long long bytes;
} biggest_t;

typedef struct watch {
  biggest_t both[2];
  long long killable;      /* what the processes the killer may end hold */
} watch_t;

static void find_biggest(mb_proc_t *p, void *ud)
{
  long long n = (long long)(atomic_load_explicit(&p->alloc.used, memory_order_relaxed) +
                            atomic_load_explicit(&p->mailbox_bytes, memory_order_relaxed) +
                            atomic_load_explicit(&p->alloc.charged, memory_order_relaxed) +
                            atomic_load_explicit(&p->held, memory_order_relaxed));
  mb_proc_lock(p);
  int dead = p->dead, essential = p->essential;
  mb_proc_unlock(p);
  watch_t *w = ud;
  biggest_t *b = &w->both[essential != 0];
  if (!p->first && !dead) {
    w->killable += n;
    if (n > b->bytes) {
      b->bytes = n;
      b->pid = p->pid;
    }
  }
}

/* The processes hold more than the host may (or an allocation failed):
 * end the one holding the most, once it is gone look again. */
static void memory_watch(void)
{
  static mb_pid_t victim;
  static uint64_t victim_since;
  int pressure = mb_alloc_take_pressure();
  long long total = mb_alloc_host_total(), cap = mb_sched_opts.max_memory;
  mb_alloc_set_over_cap(cap != 0 && total > cap);
  if (victim) {
    mb_proc_t *v = mb_proc_get(victim);
    if (v)
      mb_proc_unref(v);
    /* Still dying: wait (at most a second, for one that is stuck). */
    if (v && uv_hrtime() - victim_since < 1000000000ull)
      return;
    victim = 0;
    mb_alloc_reserve(MB_ALLOC_RESERVE);   /* again, once there is room */
  }
  if (!pressure && (cap == 0 || total <= cap))
    return;
  watch_t w = {{{0, 0}, {0, 0}}, 0};
  mb_proc_foreach(find_biggest, &w);
  biggest_t b = w.both[0].pid ? w.both[0] : w.both[1];
  if (b.pid == 0 || (!pressure && (w.killable < total - cap ||
                                    (!w.both[0].pid && b.bytes < total - cap))))
    return;
  char text[MB_PID_TEXT_MAX], reg[160];
  mb_proc_t *p = mb_proc_get(b.pid);
  int named = p && mb_reg_name_of(p, reg, sizeof reg);
  if (p)
    mb_proc_unref(p);
  if (pressure)
    fprintf(stderr, "=MEMORY REPORT==== %s%s%s\nan allocation failed (the host is out of "
            "memory): this process, holding the most (%lld bytes), is killed\n",
            mb_pid_format(text, sizeof text, b.pid), named ? " registered as " : "",
            named ? reg : "", b.bytes);
  else
    fprintf(stderr, "=MEMORY REPORT==== %s%s%s\nthe processes hold %lld bytes, over "
            "--max-memory %lld: this process, holding the most (%lld bytes), is killed\n",
            mb_pid_format(text, sizeof text, b.pid), named ? " registered as " : "",
            named ? reg : "", total, cap, b.bytes);
  fflush(stderr);
  mb_msg_t *m = mb_msg_string("out of memory");
  if (m) {
    mb_proc_exit_signal(b.pid, b.pid, m, 1);
    victim = b.pid;
    victim_since = uv_hrtime();
  }
}

/* Before an _exit that leaves threads where they are: flush stdout and
 * stderr if no thread holds them. fflush(NULL) would wait for every stream
 * another thread holds - stdin, under a read_line that waits for input;
 * stdout, under a print to a pipe nobody reads - that is, for ever. */
static void flush_unlocked(void)
{
  FILE *streams[] = {stdout, stderr};
  for (int i = 0; i < 2; i++)
    if (ftrylockfile(streams[i]) == 0) {
      fflush(streams[i]);
      funlockfile(streams[i]);
    }
}

/* Run loop until nothing is left on it (its handles closing, its thread-pool
 * jobs' completions); 0 if that takes over MB_HALT_GRACE_MS. */
static int drain_loop(uv_loop_t *loop)
{
  uint64_t deadline = uv_hrtime() + (uint64_t)MB_HALT_GRACE_MS * 1000000;
  while (uv_run(loop, UV_RUN_NOWAIT)) {
    if (uv_hrtime() > deadline)
      return 0;
    struct timespec ts = {0, 1000000};   /* 1 ms */
    nanosleep(&ts, NULL);
  }
  return 1;
}

static int all_done(void)
{
  for (int i = 0; i < nscheds; i++)
    if (!atomic_load(&scheds[i].done))
      return 0;
  return 1;
}

/* When the host's stop must end in a halt (uv_hrtime), or 0: main thread. */
static uint64_t stop_deadline;

/* Wait up to ms for a signal. SIGTERM starts the host's stop (proc.h), as
 * Erlang's init:stop; SIGINT, a second signal, or either with no time for
 * a stop halts at once. */
static void wait_signal(long ms)
{
  sigset_t set;
  main_signals(&set);
  struct timespec ts = {ms / 1000, (ms % 1000) * 1000000};
  int sig = sigtimedwait(&set, NULL, &ts);
  if (sig <= 0 || sig == MB_WAKE_SIGNAL)
    return;
  if (sig == SIGTERM && mb_sched_opts.shutdown_ms > 0 && stop_deadline == 0 &&
      !mb_sched_halting()) {
    stop_deadline = uv_hrtime() + (uint64_t)mb_sched_opts.shutdown_ms * 1000000;
    mb_proc_stop();
    return;
  }
  mb_sched_halt(128 + sig);
}

/* Name up to 4 of the processes the stop still waits for. */
typedef struct stop_left {
  char text[4 * (MB_PID_TEXT_MAX + 2)];
  int n;
} stop_left_t;

static void name_left(mb_proc_t *p, void *ud)
{
  stop_left_t *l = ud;
  mb_proc_lock(p);
  int waited = !p->dead && (p->stop & MB_STOP_WAITED);
  mb_proc_unlock(p);
  if (!waited || l->n++ >= 4)
    return;
  size_t at = strlen(l->text);
  if (at)
    at += (size_t)snprintf(l->text + at, sizeof l->text - at, ", ");
  mb_pid_format(l->text + at, sizeof l->text - at, p->pid);
}

/* The stop has run its time: say who held it, and halt. */
static void stop_timed_out(void)
{
  stop_left_t l = {.text = "", .n = 0};
  mb_proc_foreach(name_left, &l);
  long left = mb_proc_stop_left();
  fprintf(stderr, "moonbeam: stopping: %ld process%s had not ended after %d ms "
          "(--shutdown-timeout): %s%s; halting\n", left, left == 1 ? "" : "es",
          mb_sched_opts.shutdown_ms, l.text, l.n > 4 ? ", ..." : "");
  mb_sched_halt(128 + SIGTERM);
}

/* Memory was freed: each scheduler is asked to give back its heaps' free
 * pages (mimalloc's heaps are per thread; alloc.c), which it does when it
 * has nothing to run (collect). */
static void collect_heaps(void *arg)
{
  mb_sched_t *s = arg;
  if (!atomic_load(&s->collect_asked)) {
    s->collect_since = uv_hrtime();
    atomic_store(&s->collect_asked, 1);
  }
}

int mb_sched_wait(void)
{
  /* The main thread watches: signals, slices that run too long, and the
   * halt, which ends the host within MB_HALT_GRACE_MS even when a
   * scheduler never comes back. */
  while (!mb_sched_halting() || !all_done()) {
    wait_signal(MB_WATCHDOG_TICK_MS);
    if (mb_sched_opts.watchdog_ms > 0)
      watchdog();
    memory_watch();
    if (mb_alloc_trim())
      for (int i = 0; i < nscheds; i++)
        mb_sched_post(&scheds[i], collect_heaps, &scheds[i]);
    if (stop_deadline && !mb_sched_halting() && uv_hrtime() >= stop_deadline)
      stop_timed_out();
    if (!mb_sched_halting())
      continue;
    uint64_t deadline = uv_hrtime() + (uint64_t)MB_HALT_GRACE_MS * 1000000;
    while (!all_done() && uv_hrtime() < deadline)
      wait_signal(20);
    if (!all_done()) {
      for (int i = 0; i < nscheds; i++)
        if (!atomic_load(&scheds[i].done)) {
          char text[MB_PID_TEXT_MAX];
          fprintf(stderr, "moonbeam: halting: scheduler %d is stuck in %s; "
                  "exiting without cleaning up\n", i,
                  mb_pid_format(text, sizeof text, atomic_load(&scheds[i].slice_pid)));
        }
      flush_unlocked();
      _exit(atomic_load(&exit_code));
    }
  }
  for (int i = 0; i < nscheds; i++)
    pthread_join(scheds[i].thread, NULL);
  if (ticker_started) {
    atomic_store(&ticker_stop, 1);
    ticker_wake();
    pthread_join(ticker, NULL);
    close(ticker_fd);
  }
  /* Processes first: their exit hooks may still post to the loops. */
  mb_proc_shutdown();
  for (int i = 0; i < nscheds; i++) {
    mb_sched_t *s = &scheds[i];
    self = s;
    run_commands(s);
    uv_walk(&s->loop, close_handle, NULL);
    if (!drain_loop(&s->loop)) {
      /* A thread-pool job that never ends (a read_line that nothing
       * answers, a name lookup or a file system that hangs) would hold
       * this loop, and libuv's exit, which joins the pool's threads, for
       * good. */
      fprintf(stderr, "moonbeam: halting: work on the thread pool (a file operation "
              "or a name lookup) has not finished after %d ms; exiting without "
              "cleaning up\n", MB_HALT_GRACE_MS);
      flush_unlocked();
      _exit(atomic_load(&exit_code));
    }
    uv_loop_close(&s->loop);
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
  mb_proc_on_stopped = on_empty;   /* the halt ends the processes left */
}
