/* scheduler.h: the executor - one OS thread per core, each with a run queue
 * and a libuv loop, running processes one slice at a time.
 *
 * DESIGN
 * Each scheduler (mb_sched_t) is one thread with its own run queue and its
 * own libuv loop. The thread alternates between running a process for one
 * slice and polling its loop (timers, sockets, posted commands) without
 * blocking. With nothing to run it first steals from the fullest other
 * queue, then sleeps in uv_run(UV_RUN_ONCE) until an event or a
 * uv_async_send wakes it, so a blocked process, and an idle host, cost no
 * CPU.
 *
 * What a slice is belongs to the layer above: the executor knows nothing of
 * Lua. It hands each dequeued process to the runner (mb_sched_set_runner;
 * host/lib/run.c runs the process's Lua), which returns after the slice and
 * has put the process where it belongs: back in a queue (mb_sched_requeue,
 * mb_sched_push), waiting, or gone.
 *
 * Where a woken process goes: onto the queue of the scheduler whose thread
 * woke it (locality, as in the BEAM), except that a process that owns a
 * connection goes to the scheduler whose loop holds the socket (p->home),
 * where its reads and writes need no cross-thread post; a sleeping scheduler
 * is woken when its own queue gets work or when a busy scheduler's queue
 * holds more than one process and the one a thief would take next is one
 * it may take (see MB_STEAL_HOMED), so that work spreads without waking a
 * core for every message, nor for work it could not take. Busy schedulers
 * balance when a slice ends: a preempted process goes to a queue two or
 * more shorter than its own scheduler's, so four busy processes on two
 * cores do not stay split three to one.
 *
 * Preemption: one more thread, the ticker, watches the slices and asks the
 * runner to preempt one that has run its time (see "Preemption: the
 * ticker" in scheduler.c); it parks while no slice runs.
 *
 * Threads: everything in an mb_sched_t is its own thread's, except the run
 * queue (rq_lock), `sleeping` (atomic), the command list (cmd_lock), and
 * what runs Lua there (plock, shared with the ticker).
 * Signals: SIGINT and SIGTERM are taken by the main thread, which also
 * runs the watchdog (see MB_WATCHDOG_MS); no process can hold them up.
 * SIGINT halts at once; SIGTERM stops the host in order (mb_proc_stop),
 * and halts once the processes the stop waits for have ended, after
 * shutdown_ms, or on a second signal.
 * Shutdown: after the threads stop, every process left is ended (its exit
 * hooks run), each loop's remaining handles are closed (each by the closer
 * of the subsystem that owns it) and the loops are closed, then the
 * shutdown hooks run.
 */
#ifndef MB_SCHEDULER_H
#define MB_SCHEDULER_H

#include <uv.h>

#include "proc.h"

/* Poll the libuv loop between slices at least this often (ns): what a busy
 * scheduler adds to the latency of socket I/O and posted commands. 0.2 ms
 * costs one epoll_wait per 0.2 ms of work (under 1%). */
#define MB_POLL_INTERVAL_NS 200000
/* A scheduler never idle collects its heaps this long after it was asked
 * to (scheduler.c, collect). */
#define MB_COLLECT_DEFER_NS 2000000000ull
/* Woken processes run before preempted ones, but at most this many in a
 * row while a preempted one waits: a preempted process waits at most this
 * many short runs besides the slices of the others preempted before it. */
#define MB_WOKEN_BURST 8
/* An idle scheduler steals a process whose socket is on the victim's loop
 * (p->home) only from a queue at least this long (scheduler.c stealable). */
#define MB_STEAL_HOMED 32

typedef struct mb_sched mb_sched_t;

/* The watchdog: the main thread looks at the schedulers this often, and
 * reports a slice that has run longer than the watchdog threshold (a
 * process the count hook cannot preempt: a looping __gc finalizer, a long
 * C call); that scheduler's queued processes then move to the others, and
 * new work avoids it until it comes back. A halt waits this long for the
 * schedulers to stop, then ends the process without cleaning up.
 * Memory: when the processes hold more than max_memory in all, or an
 * allocation failed, the watchdog kills the process holding the most
 * (untrappable, reason "out of memory"), reports it, and waits for it to
 * be gone before it looks again. */
#define MB_WATCHDOG_TICK_MS 100
#define MB_WATCHDOG_MS 1000
#define MB_HALT_GRACE_MS 3000
/* SIGTERM stops the host (mb_proc_stop): the processes it waits for have
 * this long to end (--shutdown-timeout; docker stop's wait) before the
 * halt. */
#define MB_SHUTDOWN_MS 10000

/* Preemption (see "Preemption: the ticker" in scheduler.c): a slice of
 * slice_reds reductions runs slice_reds * MB_NS_PER_RED ns (500: 0.2 ms)
 * before the ticker asks the runner to preempt it; the ticker sleeps at
 * most MB_TICK_MAX_NS at a time, and parks after MB_TICK_PARK rounds
 * without a slice running. */
#define MB_NS_PER_RED 400
#define MB_TICK_MAX_NS 2000000
#define MB_TICK_PARK 16
/* A computing slice with nothing queued behind it on its scheduler runs
 * this long between pokes (they let the scheduler poll its loop). */
#define MB_TICK_LONE_NS 2000000
/* A slice that has run this long (its thread descheduled, or its CPU
 * taken by interrupt work) with processes queued behind it: the ticker
 * wakes an idle scheduler to take them (scheduler.c, tick). */
#define MB_STALL_NS 1000000

typedef struct mb_sched_opts {
  int schedulers;     /* threads; default: number of cores */
  int slice_reds;     /* reductions per slice (its time: MB_NS_PER_RED
                         each); 0 disables preemption */
  int watchdog_ms;    /* report slices longer than this; 0: no watchdog */
  long long max_memory; /* bytes the processes may hold in all (their heaps,
                           queues, continuations: mb_alloc_host_total);
                           over it the watchdog kills the biggest; 0: none */
  int shutdown_ms;    /* SIGTERM stops the host, halting after this at the
                         latest; 0: SIGTERM halts at once */
} mb_sched_opts_t;

/* Set up the schedulers and their loops (threads start in mb_sched_run).
 * Returns 0 or a negative libuv code. Main thread, once. */
int mb_sched_start(const mb_sched_opts_t *opts);
/* The function that runs one slice of p on s's thread (see DESIGN). Set
 * once, before mb_sched_run. */
void mb_sched_set_runner(void (*run)(mb_sched_t *s, mb_proc_t *p));
/* Start the threads (after the first process is queued). Returns 0 or a
 * negative errno. */
int mb_sched_run(void);
/* The first process ended: 0 normally, 1 crashed (the host's exit code
 * once no process is left). Any thread. */
void mb_sched_first_exit(int code);
/* Halt when the last process dies. */
void mb_sched_on_empty_install(void);
/* Block until the host halts; stop and join the threads, end every
 * process, close every loop. Returns the exit code. Main thread. */
int mb_sched_wait(void);

/* Make p runnable: onto p->home's queue, or the calling thread's scheduler
 * (scheduler 0 if the caller is not a scheduler). p->status must already be
 * MB_PS_RUNNABLE. Any thread. */
void mb_sched_enqueue(mb_proc_t *p);
/* The runner's side, on s's thread: p ran and is runnable again at once
 * (mb_sched_push: onto s's queue) or was preempted (mb_sched_requeue: onto
 * the shortest queue, see DESIGN). */
void mb_sched_push(mb_sched_t *s, mb_proc_t *p);
void mb_sched_requeue(mb_sched_t *s, mb_proc_t *p);

/* Preemption. fn(p, ctx) is called on the thread that runs p - from a
 * signal handler when the ticker thread signals it (see scheduler.c,
 * "Poking a slice"), or directly when p's lone slice gets company from p
 * itself - under the scheduler's preemption lock, with the process and
 * context the runner said run Lua there (mb_sched_running, timed), when
 * that slice has run its time, when p has an exit signal pending, or while
 * the host halts; it must make p stop soon (and may be called again for
 * the same slice). Set once, before mb_sched_run. */
void mb_sched_set_preempter(void (*fn)(mb_proc_t *p, void *ctx));
/* ThreadSanitizer holds a signal back until its thread next calls the C
 * library, which a Lua loop never does: built with it, the ticker calls
 * fn from its own thread instead, and the runner keeps every slice's hook
 * armed, so that fn never changes the hook there (run.c). */
#if defined(__SANITIZE_THREAD__)
#define MB_POKE_BY_SIGNAL 0
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define MB_POKE_BY_SIGNAL 0
#endif
#endif
#ifndef MB_POKE_BY_SIGNAL
#define MB_POKE_BY_SIGNAL 1
#endif
/* The runner's side, on s's thread: p (with ctx) runs Lua now, or nothing
 * (p NULL); timed, how the ticker times the slice: MB_SLICE_COUNTED, not
 * at all (p counts its own); MB_SLICE_TIMED, its time; MB_SLICE_ALONE, p
 * computes and was alone on its scheduler when last preempted: its time
 * is MB_TICK_LONE_NS while nothing is queued behind it. Once this returns
 * with NULL, no preempter call for the old p is running or will start. */
enum { MB_SLICE_COUNTED, MB_SLICE_TIMED, MB_SLICE_ALONE };
void mb_sched_running(mb_sched_t *s, mb_proc_t *p, void *ctx, int timed);
/* Processes queued on s (a hint: any thread). */
int mb_sched_queued(mb_sched_t *s);
/* Hold off the preempter on the calling thread's scheduler (no-op on other
 * threads): around the owner's own changes to what the preempter changes. */
void mb_sched_hook_lock(void);
void mb_sched_hook_unlock(void);

/* Halt the host with code: schedulers stop after their current slice.
 * The first call decides the code. Any thread. */
void mb_sched_halt(int code);
int mb_sched_halting(void);

/* The calling thread's scheduler, or NULL on other threads. */
mb_sched_t *mb_sched_self(void);
uv_loop_t *mb_sched_loop(mb_sched_t *s);
/* A scheduler's number, 0 .. schedulers - 1, and back. */
int mb_sched_id(const mb_sched_t *s);
mb_sched_t *mb_sched_by_id(int id);
/* Whether s is stuck in a slice the watchdog reported. Any thread. */
int mb_sched_stuck(const mb_sched_t *s);
/* The schedulers in turn (round robin), to spread work such as sockets
 * over the loops. Any thread. */
mb_sched_t *mb_sched_pick(void);
/* Run fn(arg) on s's thread soon (from its loop), in the order posted.
 * Any thread. */
void mb_sched_post(mb_sched_t *s, void (*fn)(void *), void *arg);

/* Shutdown hooks, added at start-up by the subsystems that own handles or
 * tables. A closer is asked, for each handle still open on a loop, whether
 * the handle is its subsystem's: it then closes it (its own way) and
 * returns 1; handles no closer claims are closed plainly. An after-loops
 * hook runs once every loop is closed. At most MB_SCHED_HOOKS of each. */
#define MB_SCHED_HOOKS 8
void mb_sched_add_closer(int (*closer)(uv_handle_t *h));
void mb_sched_add_after_loops(void (*fn)(void));
/* fn runs on every scheduler thread when the host's memory went down (the
 * main thread's trim), before that thread gives its heaps' free pages back:
 * a layer above lets go of what it keeps per thread. At start-up. */
void mb_sched_add_on_collect(void (*fn)(void));

/* The host's options, for mb.info and -h. */
extern mb_sched_opts_t mb_sched_opts;

#endif
