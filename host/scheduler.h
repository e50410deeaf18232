/* scheduler.h: schedulers - one OS thread per core running processes in slices.
 *
 * DESIGN
 * Each scheduler (mb_sched_t) is one thread with its own run queue and its
 * own libuv loop. The thread alternates between running a process for one
 * slice (until it blocks, exits, or spends MB_SLICE_REDS reductions) and
 * polling its loop (timers, and later sockets) without blocking. With nothing
 * to run it first steals half of another scheduler's queue, then sleeps in
 * uv_run(UV_RUN_ONCE) until an event or a uv_async_send wakes it, so a blocked
 * process, and an idle host, cost no CPU.
 *
 * Preemption: a count hook fires every MB_HOOK_INSTRUCTIONS VM instructions
 * and charges MB_REDS_PER_HOOK reductions. When the slice is spent, the hook
 * yields the body coroutine - but only at a safe point: never across a C
 * function other than pcall/xpcall (a table.sort comparator, a gsub callback,
 * a module's top level), and only from the innermost coroutine that the
 * process's coroutine wrappers know about (see lstate.c), which pass the
 * yield up to the scheduler instead of to the user's resumer. At an unsafe
 * point the preemption waits for the next hook.
 *
 * Where a woken process goes: onto the queue of the scheduler whose thread
 * woke it (locality, as in the BEAM), except that a process that owns a
 * connection goes to the scheduler whose loop holds the socket, where its
 * reads and writes need no cross-thread post; a sleeping scheduler is woken when
 * its own queue gets work or when a busy scheduler's queue holds more than
 * one process, so that work spreads without waking a core for every message.
 * Busy schedulers balance when a slice ends: a preempted process goes to a
 * queue two or more shorter than its own scheduler's, so four busy
 * processes on two cores do not stay split three to one.
 *
 * Threads: everything in an mb_sched_t is its own thread's, except the run
 * queue (rq_lock), `sleeping` (atomic) and the command list (cmd_lock).
 */
#ifndef MB_SCHED_H
#define MB_SCHED_H

#include <uv.h>

#include "proc.h"

/* Budgets. One reduction is about MB_HOOK_INSTRUCTIONS / MB_REDS_PER_HOOK
 * = 100 Lua VM instructions. A slice of 500 reductions is 50,000
 * instructions: measured, 0.2 ms of interpreted Lua with the hook on (2000
 * reductions measured 0.8 ms, which let a ping-pong pair wait tens of ms
 * behind busy processes). The 1.4 us of a hook-driven yield stays under 1%.
 * Sending charges MB_REDS_PER_SEND plus one per 64 bytes copied. */
#define MB_HOOK_INSTRUCTIONS 1000
#define MB_REDS_PER_HOOK 10
#define MB_SLICE_REDS 500
#define MB_REDS_PER_SEND 1
/* While a preemption waits for a safe point, check again this often. */
#define MB_HOOK_RETRY_INSTRUCTIONS 100
/* Poll the libuv loop between slices at least this often (ns): what a busy
 * scheduler adds to the latency of socket I/O and posted commands. 0.2 ms
 * costs one epoll_wait per 0.2 ms of work (under 1%). */
#define MB_POLL_INTERVAL_NS 200000

typedef struct mb_sched mb_sched_t;

typedef struct mb_sched_opts {
  int schedulers;     /* threads; default: number of cores */
  int slice_reds;     /* reductions per slice; 0 disables preemption */
} mb_sched_opts_t;

/* Start the scheduler threads. Returns 0 or a negative errno. */
int mb_sched_start(const mb_sched_opts_t *opts);
/* Start the threads (after the first process is queued). */
int mb_sched_run(void);
/* The first process ended: 0 normally, 1 crashed (the host's exit code
 * once no process is left). */
void mb_sched_first_exit(int code);
/* Halt when the last process dies. */
void mb_sched_on_empty_install(void);
/* Block until the host halts; stop and join the threads, free every
 * process and loop. Returns the exit code. Main thread. */
int mb_sched_wait(void);

/* Make p runnable on the calling thread's scheduler (scheduler 0 if the
 * caller is not a scheduler). p->status must already be MB_PS_RUNNABLE.
 * Any thread. */
void mb_sched_enqueue(mb_proc_t *p);

/* Halt the host with code: schedulers stop after their current slice.
 * The first call decides the code. Any thread. */
void mb_sched_halt(int code);
int mb_sched_halting(void);

/* The calling thread's scheduler, or NULL on other threads. */
mb_sched_t *mb_sched_self(void);
uv_loop_t *mb_sched_loop(mb_sched_t *s);
/* The schedulers in turn (round robin), to spread work such as sockets
 * over the loops. Any thread. */
mb_sched_t *mb_sched_pick(void);
/* Run fn(arg) on s's thread soon (from its loop). Any thread. */
void mb_sched_post(mb_sched_t *s, void (*fn)(void *), void *arg);

/* Is it safe for the running process p to yield its body coroutine from the
 * C function now running in L (that function's own frame is not counted)?
 * See DESIGN. Owner thread. */
int mb_sched_can_yield(mb_proc_t *p, lua_State *L);

/* Yield the running process to its scheduler for reason. Must be called as
 * `return mb_sched_yield(L, reason)` from a C function, after
 * mb_sched_can_yield said yes. */
int mb_sched_yield(lua_State *L, mb_yield_t reason);

/* The count hook installed in every process's state. */
void mb_sched_hook(lua_State *L, lua_Debug *ar);

/* The host's options, for mb.info and -h. */
extern mb_sched_opts_t mb_sched_opts;

#endif
