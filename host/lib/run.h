/* run.h: the runner - what one slice of a process is: its Lua run by the
 * executor's threads (scheduler.h).
 *
 * DESIGN
 * A process's body is a coroutine `co` of its own lua_State. A slice
 * resumes it until it yields to the runner: preempted (its budget of
 * reductions spent), blocked (receive, sleep, I/O: a "wait"), or ending.
 * The runner then puts the process back in a run queue, leaves it waiting
 * (a message, timer, I/O completion or signal makes it runnable again, on
 * any scheduler), or ends it (mb_proc_exit) with its reason and a crash
 * report if it crashed. Work done on a process's behalf while its body is
 * suspended (booting it, decoding the message a receive waits for, pushing
 * an I/O result, running a selective receive's match function, going on
 * with a long C call that stopped for the scheduler: mb_run_suspend) runs
 * under a protected call on the state's idle main thread, never on the
 * suspended coroutine.
 *
 * Preemption, in two modes. A slice starts uncounted: no hook, so LuaJIT's
 * interpreter dispatches at full speed, and the executor's ticker
 * (scheduler.c) times it; when it has run its time the ticker calls
 * preempt (run.c), which arms the count hook for the next VM instruction.
 * A process preempted that way computes, so its next slices count: the
 * hook fires every MB_HOOK_INSTRUCTIONS VM instructions and charges
 * MB_REDS_PER_HOOK reductions of the slice's budget, as the BEAM counts
 * reductions, until one of its slices ends by blocking. Either way the
 * hook yields the body coroutine - but only at a safe point: never across a C
 * function other than pcall/xpcall (a table.sort comparator, a gsub callback,
 * a module's top level), and only from the innermost coroutine that the
 * process's coroutine wrappers know about (see lstate.c), which pass the
 * yield up to the runner instead of to the user's resumer. At an unsafe
 * point the preemption waits for the next hook.
 *
 * Threads: everything here runs on the thread of the scheduler running the
 * process (the owner thread).
 */
#ifndef MB_RUN_H
#define MB_RUN_H

#include "proc.h"
#include "scheduler.h"

/* Budgets. In a counted slice one reduction is about MB_HOOK_INSTRUCTIONS /
 * MB_REDS_PER_HOOK = 100 Lua VM instructions, and a slice of 500
 * reductions 50,000 instructions: measured, 0.1-0.2 ms of interpreted Lua
 * with the hook on (2000 reductions measured 0.8 ms, which let a ping-pong
 * pair wait tens of ms behind busy processes). An uncounted slice lasts
 * MB_NS_PER_RED ns a reduction (scheduler.h): 0.2 ms. The 1.4 us of a
 * hook-driven yield stays under 1%. The hook fires every 10,000
 * instructions, not 1,000: each call costs a few hundred machine
 * instructions, and the hook benchmark's preempted/not ratio went from
 * 1.07-1.10 to 1.04-1.08 (A/B, 3 and 5 runs); a computing process sees an
 * exit signal within 10,000 instructions. mb.info's reductions: one a
 * slice, the budget a counted one spent or the whole of one the ticker
 * preempted, and for sending MB_REDS_PER_SEND plus one per
 * MB_COPY_BYTES_PER_RED bytes copied (as the BEAM's
 * ERTS_MSG_COPY_WORDS_PER_REDUCTION). */
#define MB_HOOK_INSTRUCTIONS 10000
#define MB_REDS_PER_HOOK 100
#define MB_SLICE_REDS 500
#define MB_REDS_PER_SEND 1
#define MB_COPY_BYTES_PER_RED 64
/* While a preemption waits for a safe point, check again this often. */
#define MB_HOOK_RETRY_INSTRUCTIONS 100
/* A receive's match function runs inside a C call and cannot yield: past
 * its process's slice it may run this many more hooks of
 * MB_HOOK_INSTRUCTIONS (2 million VM instructions, some 20-40 ms) before
 * receive raises, so that a loop in it holds its scheduler that long, not
 * for ever (run.c, mb_run_hook). */
#define MB_MATCH_HOOKS 200
/* The same for a __gc finalizer or a debug hook function that runs past
 * its slice (hookmask.h). */
#define MB_HELD_HOOKS MB_MATCH_HOOKS
/* Any other Lua that C called and that therefore cannot yield - an xpcall
 * handler, load's reader, a __tostring that print or string.format
 * calls, a package.loaders function, a module that a
 * message's decoder requires - may run this long past the moment its
 * slice owed a preemption, then it is stopped with an error where it runs
 * (run.c, mb_run_hook). In time, not VM instructions: the hook looks for a
 * safe point every MB_HOOK_RETRY_INSTRUCTIONS there (a loop that calls
 * such code now and then has one a few instructions long between two
 * calls). */
#define MB_OWED_MS 100

/* A C function of the host's that calls a process's Lua where it cannot
 * yield (load its reader, print a __tostring, require a package loader)
 * says so as each call starts: MB_OWED_MS then counts from the start of
 * the call the hook finds running, so that a loop of short loads, whose
 * safe points between two calls the hook seldom meets, is not taken for
 * one long call. Scheduler thread. */
void mb_run_calls_lua(void);

/* Set the runner up (the executor's runner, the process exit hook that
 * frees what a process's Lua held). Once, at start-up. */
void mb_run_init(void);

/* The host runs Lua on p's state outside its slices (on 1, until 0): a
 * collection, a crash report, resetting or closing the state - where the
 * state's __gc finalizers run. The ticker times it as a counted slice, so
 * that a finalizer that loops there is stopped as in a slice (hookmask.h);
 * the hook never yields there. Around each such call, on the scheduler
 * running p (lstate.c's close ends it as the state's last block goes). */
void mb_run_host_lua(mb_proc_t *p, int on);

/* Is it safe for the running process p to yield its body coroutine from the
 * C function now running in L (that function's own frame is not counted)?
 * See DESIGN. Owner thread. */
int mb_run_can_yield(mb_proc_t *p, lua_State *L);

/* Yield the running process to the runner for reason. Must be called as
 * `return mb_run_yield(L, reason)` from a C function, after
 * mb_run_can_yield said yes. */
int mb_run_yield(lua_State *L, mb_yield_t reason);

/* A C function that runs long in C (strmatch.c's pattern matcher), where
 * the count hook never fires, polls mb_run_due every so often: 0 go on;
 * 1 its slice is over (the ticker's poke, a counted slice's budget); 2
 * the process must end (an exit signal, a refused allocation, the halt).
 * It charges a counted slice MB_REDS_PER_POLL reductions a call. Where
 * mb_run_can_yield says yes, the function then suspends (below); where
 * not, it goes on, as Lua code there does, but raises on 2. Owner thread. */
#define MB_REDS_PER_POLL 25
int mb_run_due(mb_proc_t *p);

/* A C function's continuation: a full userdata that starts with this.
 * step runs on the process's idle main thread L, protected, with the
 * userdata at index 1 (its environment table anchors what it points
 * into). It returns the number of results it pushed, which the suspended
 * call then returns to its Lua caller, or -1 to go on at the next slice.
 * It cannot raise an error at the call site: an error it raises ends the
 * process, with the error as the reason. */
typedef struct mb_run_cont {
  int (*step)(lua_State *L, void *self);
} mb_run_cont_t;

/* Suspend the running C function with the continuation at the top of L's
 * stack (popped): the process yields as preempted, and its next slices run
 * the continuation instead of its Lua until the continuation is done.
 * Use as `return mb_run_suspend(L)`, after mb_run_can_yield said yes. */
int mb_run_suspend(lua_State *L);

/* The count hook installed in every process's state. */
void mb_run_hook(lua_State *L, lua_Debug *ar);

#endif
