/* run.c: the runner - what a slice of a process is: running its Lua (boot,
 * finishing its waits and I/O, resuming its body until it yields), its
 * preemption by the count hook, and its death (see run.h).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "code.h"
#include "codepath.h"
#include "io.h"
#include "copy.h"
#include "hookmask.h"
#include "lauxlib.h"
#include "lib.h"
#include "lstate.h"
#include "report.h"
#include "run.h"
#include "sock.h"
#include "timer.h"

/* -- Safe points and the hook --------------------------------------------- */

/* Can the running process p yield its body from L now? L must be the
 * innermost coroutine the process's wrappers know of, and every level of
 * the chain - L, then each coroutine that resumed the next through
 * co_resume, down to the body - must be yieldable: LuaJIT's own test
 * (lua_isyieldable: no C call boundary, such as a table.sort comparator or
 * a module's top level run by require, since that level was resumed).
 * pcall, xpcall and metamethods called by the VM are no boundary. Cost: a
 * flag test per level, where walking the frames with lua_getstack cost
 * ~370 instructions a receive. */
static int can_yield(mb_proc_t *p, lua_State *L)
{
  lua_State *top = p->con ? p->costack[p->con - 1] : p->co;
  if (L != top)
    return 0;  /* a coroutine resumed by C code we do not know of */
  for (int i = p->con; i >= 0; i--)
    if (!lua_isyieldable(i ? p->costack[i - 1] : p->co))
      return 0;
  return 1;
}

int mb_run_can_yield(mb_proc_t *p, lua_State *L)
{
  return !mb_lstate_in_user_hook(L) && can_yield(p, L);
}

int mb_run_yield(lua_State *L, mb_yield_t reason)
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
    p->exit_reason = mb_must(mb_msg_string("out of memory"));
  }
  if (atomic_load_explicit(&p->nsignals, memory_order_relaxed))
    mb_proc_drain(p);
  return p->exit_reason != NULL;
}

int mb_run_due(mb_proc_t *p)
{
  if (must_die(p) || mb_sched_halting())
    return 2;
  if (atomic_load_explicit(&p->preempt, memory_order_relaxed)) {
    if (!p->counted)
      p->budget = 0;   /* the ticker's poke: a whole slice ran (charge) */
    return 1;
  }
  return p->counted && (p->budget -= MB_REDS_PER_POLL) <= 0;
}

int mb_run_suspend(lua_State *L)
{
  mb_proc_t *p = mb_proc_of(L);
  lua_rawseti(L, LUA_REGISTRYINDEX, MB_REGSLOT_CONT);
  /* Pushers act on `wait` only while the process is WAITING, which it
   * is not (see end_wait). */
  __atomic_store_n(&p->wait, MB_WAIT_CALL, __ATOMIC_RELAXED);
  return mb_run_yield(L, MB_YIELD_PREEMPT);
}

/* When the process running on this thread first failed to find a safe
 * point for a preemption it owed in this slice (uv_hrtime), or 0, and the
 * count of mb_run_calls_lua then: a call that started since restarts it. */
static _Thread_local uint64_t owed_since;
static _Thread_local uint32_t calls, owed_calls;

void mb_run_calls_lua(void)
{
  calls++;
}

/* The count of the next look for a safe point: MB_HOOK_RETRY_INSTRUCTIONS
 * on average, varied, so that a loop whose period is a multiple of a fixed
 * count (a load whose reader is most of it) is not met at the same point
 * of it, inside the call, every time: its safe points are met in the
 * proportion of the loop they take. */
static int retry_count(void)
{
  static _Thread_local uint32_t x = 2463534242u;
  x ^= x << 13;
  x ^= x >> 17;
  x ^= x << 5;
  return MB_HOOK_RETRY_INSTRUCTIONS / 2 + (int)(x % (MB_HOOK_RETRY_INSTRUCTIONS + 1));
}

/* Does p run code LuaJIT runs with hooks held off - a __gc finalizer, its
 * debug hook function (hookmask.h)? */
static int held_off(mb_proc_t *p, lua_State *L)
{
  return p->in_uhook || mb_hookmask_in_gc(L);
}

/* One more hook of code that cannot yield past its slice (see mb_run_hook),
 * counted in *hooks: 0 while within max hooks; past them, 1, with the hook
 * set to throw at every instruction. */
static int over_budget(lua_State *L, uint8_t *hooks, int max)
{
  if (*hooks <= max && ++*hooks <= max) {
    mb_lstate_sethook(L, MB_HOOK_INSTRUCTIONS);
    return 0;
  }
  mb_lstate_sethook(L, 1);
  return 1;
}

/* Held-off code where a poke let this hook in: one more hook of its
 * budget, or its stop. */
static void held_budget(lua_State *L, mb_proc_t *p)
{
  if (!over_budget(L, &p->held_hooks, MB_HELD_HOOKS))
    return;
  mb_hookmask_unhold(L);
  luaL_error(L, "%s ran past its slice by over %d VM instructions; it runs as one step "
             "that cannot be preempted, and must be quick",
             mb_hookmask_in_gc(L) ? "a __gc finalizer" : "a debug hook function",
             MB_HELD_HOOKS * MB_HOOK_INSTRUCTIONS);
}

/* The count hook. A process's slices start with no hook (the fast
 * dispatch) and the ticker pokes one that runs its time (preempt below):
 * the hook then fires at the next VM instruction. A process preempted so
 * computes: its next slices count, with the hook every MB_HOOK_INSTRUCTIONS
 * charging MB_REDS_PER_HOOK of its budget, until a slice ends by blocking
 * (p->counted, see run). The hook also fires while a preemption waits for
 * a safe point, and from the dispatcher of a user's debug.sethook, which
 * polls it every MB_HOOK_INSTRUCTIONS. It never takes itself off (see
 * preempt): in an uncounted slice the runner does, between slices; until
 * then, with nothing due, it fires every MB_HOOK_INSTRUCTIONS. */
void mb_run_hook(lua_State *L, lua_Debug *ar)
{
  (void)ar;
  mb_proc_t *p = mb_proc_of(L);
  if (p->host_lua) {
    /* The host's own Lua on the state (mb_run_host_lua): never a yield;
     * only code that holds hooks off has a budget there. */
    if (atomic_load_explicit(&p->preempt, memory_order_relaxed) && held_off(p, L))
      held_budget(L, p);
    else
      mb_lstate_sethook(L, MB_HOOK_INSTRUCTIONS);
    return;
  }
  if (p->co == NULL)
    return;
  int die = must_die(p);
  int poked = atomic_load_explicit(&p->preempt, memory_order_relaxed);
  if (p->counted && (p->budget -= MB_REDS_PER_HOOK) <= 0)
    poked = 1;
  if (!die && !poked && !mb_sched_halting()) {
    if (!p->counted && lua_gethook(L) == mb_run_hook)
      mb_lstate_sethook(L, MB_HOOK_INSTRUCTIONS);
    return;
  }
  /* A yield of the runtime's is on its way up from a user coroutine
   * (lstate.c: the wrappers' Lua between co_resume's PENDING and
   * rt_yield): not a safe point to preempt. Yielding here would put
   * PREEMPT in its place, and the receive or hibernate that made it would
   * return at once, with nothing. It reaches the scheduler in a few
   * instructions. A process that must die yields EXIT in its place (the
   * signal is drained: waiting, it would not be woken for it). */
  if (!die && p->yield != MB_YIELD_NONE) {
    mb_lstate_sethook(L, MB_HOOK_RETRY_INSTRUCTIONS);
    return;
  }
  if (can_yield(p, L)) {
    atomic_store_explicit(&p->preempt, 0, memory_order_relaxed);
    if (poked) {
      if (!p->counted)
        p->budget = 0;  /* the ticker's poke: it ran a whole slice (charge) */
      /* It computes. With others waiting for the core it counts its
       * slices from now on; alone, the ticker times them, at a longer
       * time (scheduler.c, tick), and it runs at full speed: the count
       * hook's dispatch cost a lone loop 4-8%. */
      mb_sched_t *s = mb_sched_self();
      p->alone = s && mb_sched_queued(s) == 0;
      p->counted = !p->alone;
    }
    mb_lstate_sethook(L, MB_HOOK_INSTRUCTIONS);   /* uncounted: off in run */
    p->yield = die ? MB_YIELD_EXIT : MB_YIELD_PREEMPT;
    lua_yield(L, 0);
    return;
  }
  /* Not a safe point: look again soon. A process that must die (or is
   * halted) checks at every instruction, since the safe points between two
   * C calls (pcall(table.sort, ...) in a loop) are a few instructions long,
   * and unwinds with an error until it reaches one (pcall may catch it; the
   * next hook throws again). LuaJIT re-enables hooks after an error thrown
   * from a hook only when pcall catches it or it ends a coroutine: a C-level
   * protected call catching it would leave the process with no hook, so
   * none may run user code - the sandbox's `load` calls its reader under
   * pcall (host/lib/sandbox.c). */
  die = die || mb_sched_halting();
  /* Code that cannot yield and may run only so long: code LuaJIT runs with
   * hooks held off - a __gc finalizer, the process's debug hook function -
   * where preempt let this hook through (hookmask.h), and a receive's match
   * function (lib_mb.c), called from C, whose next safe point is after the
   * whole scan. Each may run on past its slice for a budget of hooks, then
   * it is stopped with an error: LuaJIT raises a finalizer's where the
   * collection ran and a hook function's where the hook fired, receive a
   * match's (or, for a message that came while it waited, the process
   * ends). Past the budget the hook throws at every instruction, as for a
   * process that must die: a pcall inside the code catches one throw,
   * never all. In held-off code every throw first lets hooks through
   * again: the hook's own flag would stay set past a pcall made there
   * while LuaJIT held hooks off, and they would be off again. Any other
   * Lua that C called (an xpcall handler, load's reader...) gets
   * MB_OWED_MS of time from when the preemption found no safe point, or
   * from the start of the host's call it runs in (mb_run_calls_lua), and
   * is stopped the same way. */
  int held = held_off(p, L);
  if (!die && held) {
    held_budget(L, p);
    return;
  }
  if (!die && p->recv_testing) {
    if (!over_budget(L, &p->match_hooks, MB_MATCH_HOOKS))
      return;
    luaL_error(L, "receive: the match function ran past its slice by over %d VM "
               "instructions; a match runs as one step that cannot be preempted, and "
               "must be quick, as an Erlang guard is",
               MB_MATCH_HOOKS * MB_HOOK_INSTRUCTIONS);
  }
  if (!die) {
    uint64_t now = uv_hrtime();
    if (owed_since == 0 || owed_calls != calls) {
      owed_since = now;
      owed_calls = calls;
    }
    if (now - owed_since > (uint64_t)MB_OWED_MS * 1000000) {
      mb_lstate_sethook(L, 1);
      luaL_error(L, "Lua called from C (an xpcall handler, load's reader, a __tostring, "
                 "a package loader) ran past its slice by over %d ms; it runs as one step "
                 "that cannot be preempted, and must be quick", MB_OWED_MS);
    }
  }
  mb_lstate_sethook(L, die ? 1 : retry_count());
  if (die) {
    if (held)
      mb_hookmask_unhold(L);
    luaL_error(L, "process is exiting");
  }
}

/* The ticker's (scheduler.h): p's slice has run its time, a signal waits
 * for it, or the host halts. On the thread that runs p (scheduler.c's
 * signal handler, or a push of p's own), under the scheduler's preemption
 * lock: the state L is p's and stays so during the call (the runner says so
 * with mb_sched_running). Arms the hook to fire at the next VM
 * instruction, unless a count is set already - the scheduler's own
 * (counting a slice, or waiting for a safe point) or a user's dispatcher,
 * which polls: both look at p->preempt. A hook function without its count
 * is a poke that an owner's write of the hook mask took back (scheduler.c,
 * on_poke): it is armed again. The hook never takes itself off (mb_run_hook):
 * the runner does, between slices. A __gc finalizer or a debug hook
 * function running holds hooks off: on the poke's signal they are let
 * through (hookmask.h). */
static void preempt(mb_proc_t *p, void *ctx)
{
  lua_State *L = ctx;
  atomic_store_explicit(&p->preempt, 1, memory_order_relaxed);
  lua_Hook f = lua_gethook(L);
  if (!(lua_gethookmask(L) & LUA_MASKCOUNT) && (f == NULL || f == mb_run_hook))
    lua_sethook(L, mb_run_hook, LUA_MASKCOUNT, 1);
  if (MB_POKE_BY_SIGNAL && held_off(p, L))
    mb_hookmask_unhold(L);
}

/* p runs Lua on this thread's scheduler from now on (or no longer): the
 * ticker may preempt it. Built with ThreadSanitizer, where the ticker
 * calls preempt from its own thread (scheduler.h), the state's hook is
 * armed first and stays so, so that preempt only sets p->preempt there. */
static void runs_lua(mb_proc_t *p)
{
  mb_sched_t *s = mb_sched_self();
  if (!MB_POKE_BY_SIGNAL && p && lua_gethook(p->L) == NULL)
    mb_lstate_sethook(p->L, MB_HOOK_INSTRUCTIONS);
  if (s)
    mb_sched_running(s, p, p ? p->L : NULL, p == NULL || p->counted ? MB_SLICE_COUNTED
                                            : p->alone ? MB_SLICE_ALONE : MB_SLICE_TIMED);
}

void mb_run_host_lua(mb_proc_t *p, int on)
{
  mb_sched_t *s = mb_sched_self();
  if (!MB_POKE_BY_SIGNAL || s == NULL || p->host_lua == on || (on && p->L == NULL))
    return;
  /* Ending touches no state (it may be closed); a hook a poke armed meanwhile
   * goes at the process's next slice (run). */
  p->held_hooks = 0;
  p->host_lua = (uint8_t)on;
  mb_sched_running(s, on ? p : NULL, on ? p->L : NULL, MB_SLICE_COUNTED);
}

/* Reductions (mb.info) for the slice that ended: one, plus what a
 * counted slice spent of its budget, or a whole slice for one the ticker
 * preempted (no clock is read: most slices are short). */
static void charge(mb_proc_t *p)
{
  int spent = mb_sched_opts.slice_reds - p->budget;
  atomic_store_explicit(&p->reductions,
      atomic_load_explicit(&p->reductions, memory_order_relaxed) + 1 + (spent > 0 ? spent : 0),
      memory_order_relaxed);
}

/* -- Running a slice ------------------------------------------------------ */

/* What finishing a wait or booting gives when it does not give the number
 * of values to resume the body with. */
enum {
  GOES_ON = -1,     /* the wait goes on: the process stays blocked */
  MUST_DIE = -2,    /* the process must end (p->exit_reason is set) */
  AGAIN = -3        /* a continuation goes on: back to the run queue */
};

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
    /* The timer stays the process's, for its next wait (timer.c). */
    mb_proc_lock(p);
    p->wait = MB_WAIT_NONE;
    p->expired = 0;
    p->wait_seq++;   /* a late timer of this wait will find no match */
    mb_proc_unlock(p);
  } else {
    /* Without a timer or I/O only pushers read `wait` (mb_proc_push, as
     * an atomic, and acting on it only while WAITING, which the process
     * is not while it runs). */
    __atomic_store_n(&p->wait, MB_WAIT_NONE, __ATOMIC_RELAXED);
  }
}

/* An exit reason that is a string longer than this is cut (and says so):
 * links and monitors get its start, not a message too large to send. */
#define MB_REASON_MAX (64 * 1024)

/* The error value at idx as a reason when it cannot be copied as it is: a
 * long string's start, or a sentence saying what it was. */
static mb_msg_t *reason_fallback(lua_State *L, int idx, const char *why)
{
  char tail[128];
  mb_msgb_t b;
  size_t n;
  if (lua_type(L, idx) == LUA_TSTRING && lua_objlen(L, idx) > MB_REASON_MAX) {
    const char *s = lua_tolstring(L, idx, &n);
    int t = snprintf(tail, sizeof tail, "... (an error of %zu bytes, cut)", n);
    mb_msgb_init(&b, MB_REASON_MAX + 16 + (size_t)t);
    /* One string value: its bytes are the start of s and the tail. */
    char *joined = malloc(MB_REASON_MAX + (size_t)t);
    if (joined == NULL)
      return NULL;
    memcpy(joined, s, MB_REASON_MAX);
    memcpy(joined + MB_REASON_MAX, tail, (size_t)t);
    mb_msgb_string(&b, joined, MB_REASON_MAX + (size_t)t);
    free(joined);
    return mb_msgb_finish(&b, 1);
  }
  char text[512];
  snprintf(text, sizeof text, "(error object is a %s value that cannot be copied: %s)",
           luaL_typename(L, idx), why);
  return mb_msg_string(text);
}

/* The error value on top of L as an exit reason (or fallback, if even a
 * description cannot be made); pops it. */
static mb_msg_t *pop_reason(lua_State *L, const char *fallback)
{
  char err[256];
  mb_msg_t *m = mb_copy_encode(L, -1, 1, "reason", NULL, err, sizeof err);
  if (m == NULL)
    m = reason_fallback(L, -1, err);
  lua_pop(L, 1);
  return m ? m : mb_must(mb_msg_string(fallback));
}

/* The reason "out of memory" for a process that dies of it, made once its
 * state is closed: when the host itself ran out, the dying state is what
 * holds the memory the message needs. */
static mb_msg_t *oom_reason(mb_proc_t *p)
{
  runs_lua(NULL);
  mb_lstate_close(p);
  mb_msg_t *m = mb_msg_string("out of memory");
  if (m == NULL && mb_alloc_failed())
    m = mb_msg_string("out of memory");
  return mb_must(m);
}

/* A wake-up's protected call failed: its error value (popped) is the exit
 * reason, except that a refused allocation is "out of memory" wherever it
 * struck (decoding a message while waiting, or in the body: the same). The
 * process then dies: its state may be closed here. */
static mb_msg_t *wake_failed(mb_proc_t *p, lua_State *L, int status,
                             const char *fallback)
{
  /* Copying the reason runs outside any protected call: an allocation
   * refused there would be LuaJIT's panic (the host's end). The process
   * ends, as a crashed one does: no limit from here on. */
  p->alloc.limit = 0;
  if (p->exit_reason) {
    /* Killed meanwhile (the hook unwound the call): that is the reason. */
    lua_pop(L, 1);
    mb_msg_t *m = p->exit_reason;
    p->exit_reason = NULL;
    return m;
  }
  if (p->alloc.oom || status == LUA_ERRMEM)
    return oom_reason(p);
  return pop_reason(L, fallback);
}

/* Protected, on the idle main thread: receive on behalf of p (whose inbox
 * finish_wait just drained) and pass the message to the suspended body
 * coroutine. */
static int try_receive_cf(lua_State *L)
{
  mb_proc_t *p = mb_proc_of(L);
  lua_settop(L, 0);
  p->recv_result = mb_lib_receive_queued(p, L);
  if (p->recv_result == 1)
    lua_xmove(L, p->co, 1);
  return 0;
}

/* LuaJIT's lua_cpcall makes a new C closure at every call (garbage: ~400
 * instructions a wake-up with its allocation, free and sweep, measured with
 * callgrind on the ring benchmark). The wake-ups' protected calls - a
 * receive's (try_receive_cf) and an I/O wait's (push_io_cf: every socket
 * read of an HTTP request) - are the hottest, so each is made once per
 * state, kept in the registry at its slot (pid.h: an integer key, which
 * costs a third of a light-userdata one), and called with lua_pcall. It is
 * made on the first such wake-up, not at spawn, so that a process that only
 * ever waits (an idle one) does not hold it; a reused state's reset drops
 * it. */
typedef struct kept_fn {
  int slot;
  lua_CFunction fn;
} kept_fn_t;

/* Under lua_cpcall, once per state: keep the function, then run it. */
static int first_call_cf(lua_State *L)
{
  const kept_fn_t *k = lua_touserdata(L, 1);
  lua_pushcfunction(L, k->fn);
  lua_rawseti(L, LUA_REGISTRYINDEX, k->slot);
  return k->fn(L);
}

/* Run k's function on L, protected: lua_pcall's status. */
static int call_kept(lua_State *L, const kept_fn_t *k)
{
  lua_rawgeti(L, LUA_REGISTRYINDEX, k->slot);  /* no allocation */
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    return lua_cpcall(L, first_call_cf, (void *)k);
  }
  return lua_pcall(L, 0, 0, 0);
}

static const kept_fn_t receive_fn = {MB_REGSLOT_RECEIVE, try_receive_cf};

/* Protected, on the main thread: push an operation's results (or, without
 * one, what its timeout gives) and pass them to the suspended body
 * coroutine. */
static int push_io_cf(lua_State *L)
{
  mb_proc_t *p = mb_proc_of(L);
  lua_settop(L, 0);
  p->recv_result = p->io_req ? p->io_req->push(L, p->io_req)
                             : p->io_on_timeout(L, p->io_timeout_arg);
  lua_xmove(L, p->co, p->recv_result);
  return 0;
}

static const kept_fn_t io_fn = {MB_REGSLOT_IO, push_io_cf};

/* An MB_WAIT_IO: resume with the operation's results once it is done. */
static int finish_io(mb_proc_t *p)
{
  mb_proc_lock(p);
  mb_io_req_t *req = p->io_done;
  p->io_done = NULL;
  mb_proc_unlock(p);
  /* Without a result, only the wait's timer can end it, and then the
   * operation says what a timeout gives. */
  if (req == NULL && (!p->timed_out || p->io_on_timeout == NULL))
    return GOES_ON;
  p->io_req = req;
  int rc = call_kept(p->L, &io_fn);
  p->io_req = NULL;
  if (req)
    mb_io_free(req);
  if (rc != 0) {
    p->exit_reason = wake_failed(p, p->L, rc, "out of memory");
    return MUST_DIE;
  }
  end_wait(p);
  return p->recv_result;
}

/* Protected, on the main thread: a step of a suspended C call's
 * continuation (mb_run_suspend); its results, once done, go to the
 * suspended body coroutine. */
static int cont_cf(lua_State *L)
{
  mb_proc_t *p = mb_proc_of(L);
  lua_settop(L, 0);
  lua_rawgeti(L, LUA_REGISTRYINDEX, MB_REGSLOT_CONT);
  mb_run_cont_t *c = lua_touserdata(L, 1);
  int n = c->step(L, c);
  if (n >= 0) {
    lua_xmove(L, p->co, n);
    lua_pushnil(L);
    lua_rawseti(L, LUA_REGISTRYINDEX, MB_REGSLOT_CONT);
  }
  p->recv_result = n;
  return 0;
}

static const kept_fn_t cont_fn = {MB_REGSLOT_CONT_FN, cont_cf};

/* An MB_WAIT_CALL: a step of the continuation; resume the body with its
 * results once it is done. */
static int finish_call(mb_proc_t *p)
{
  int rc = call_kept(p->L, &cont_fn);
  if (rc != 0) {
    p->exit_reason = wake_failed(p, p->L, rc, "out of memory");
    return MUST_DIE;
  }
  if (p->recv_result < 0)
    return AGAIN;
  end_wait(p);
  return p->recv_result;
}

/* A waiting process was woken: can its wait end? Returns the number of
 * values pushed on co to resume it with, GOES_ON, MUST_DIE or AGAIN. */
static int finish_wait(mb_proc_t *p)
{
  if (mb_proc_drain(p))
    return MUST_DIE;
  if (p->wait == MB_WAIT_RECV) {
    /* The receive may call a match function: run it on the idle main
     * thread, protected, never on the suspended coroutine. */
    lua_State *L = p->L;
    int rc = call_kept(L, &receive_fn);
    if (rc != 0) {
      p->exit_reason = wake_failed(p, L, rc, "receive failed");
      return MUST_DIE;
    }
    if (p->recv_result < 0)
      return MUST_DIE;
    if (p->recv_result == 0) {
      if (!p->timed_out)
        return GOES_ON;
      lua_pushnil(p->co);
    }
    end_wait(p);
    return 1;
  }
  if (p->wait == MB_WAIT_IO)
    return finish_io(p);
  if (p->wait == MB_WAIT_CALL)
    return finish_call(p);
  if (p->wait == MB_WAIT_SLEEP && !p->timed_out)
    return GOES_ON;
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

/* The code serial of the body the state being booted kept from its last
 * process (mb_lstate_kept_body), set by boot for its own decode. */
static _Thread_local uint64_t boot_kept;

/* Boot a new process: make its state and rebuild its body function and
 * arguments. Returns the number of arguments to resume its body with, or
 * MUST_DIE if it failed (reported, p->exit_reason set). */
static int boot(mb_proc_t *p)
{
  if (p->L == NULL) {
    if (mb_lstate_new(p) != 0) {
      p->exit_reason = mb_must(mb_msg_string("out of memory"));
      return MUST_DIE;
    }
    boot_kept = mb_lstate_kept_body();   /* for load_body, this boot only */
  }
  runs_lua(p);
  p->booting = 1;
  int rc = lua_cpcall(p->L, boot_cf, p);
  p->booting = 0;
  boot_kept = 0;
  if (rc != 0) {
    mb_report_crash(p, p->L);
    /* Decoding the arguments over max_memory is "out of memory", as the
     * report says, not LuaJIT's "not enough memory". */
    p->exit_reason = wake_failed(p, p->L, rc, "spawn failed");
    return MUST_DIE;
  }
  p->boot = NULL;
  return p->recv_result - 1;
}

static void die(mb_proc_t *p, mb_msg_t *reason)
{
  if (p->first)   /* "shutdown" is the host's stop (proc.h) */
    mb_sched_first_exit(mb_msg_is_normal(reason) ||
                        (mb_proc_stopping() && mb_msg_is_shutdown(reason)) ? 0 : 1);
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
  if (status == LUA_ERRMEM)
    p->alloc.oom = 1;   /* the report says "out of memory", as the reason */
  mb_report_crash(p, p->co);
  if (reason == NULL && p->alloc.oom)
    reason = oom_reason(p);
  if (reason == NULL)
    reason = pop_reason(p->co, luaL_typename(p->co, -1));
  die(p, reason);
}

/* Drop p's state and keep only its continuation (boot + boot_msg, set by
 * mb.hibernate): until a message or signal wakes it, p costs its record,
 * its mailbox and the continuation. A message already queued wakes it at
 * once, as in Erlang. */
static void hibernate(mb_sched_t *s, mb_proc_t *p)
{
  if (p->wait_timer) {   /* kept from its last wait: no use asleep */
    mb_timer_wait_done(p->wait_timer);
    p->wait_timer = NULL;
  }
  mb_lstate_recycle(p);
  /* The continuation is kept long: in a block of its own size. The
   * encoder's buffer grew by doubling, and a realloc that shrinks a block
   * by less than half keeps it (a 248-byte chat user's took 384). */
  mb_msg_t *kept = mb_msg_dup(p->boot_msg);
  if (kept) {
    mb_msg_free(p->boot_msg);
    p->boot_msg = kept;
  }
  size_t held = mb_msg_size(p->boot_msg);
  atomic_store_explicit(&p->held, held, memory_order_relaxed);
  mb_alloc_count((long long)held);
  mb_proc_lock(p);
  p->hibernated = 1;
  p->wait = MB_WAIT_RECV;
  int again = p->in_head != NULL || p->q_head != NULL || p->woken;
  p->status = again ? MB_PS_RUNNABLE : MB_PS_WAITING;
  /* Last touch of p unless again: once unlocked, a waker may run it. */
  atomic_store_explicit(&p->running, 0, memory_order_relaxed);
  mb_proc_unlock(p);
  if (again)
    mb_sched_push(s, p);
}

/* A hibernated process was woken. Exit signals are handled first, without
 * a state: one that kills it ends it unwoken. Then, if a message is there,
 * it boots into its continuation; else (a signal that changed nothing) it
 * goes on hibernating. */
static int wake(mb_proc_t *p)
{
  if (mb_proc_drain(p))
    return MUST_DIE;
  if (p->q_head == NULL)
    return GOES_ON;
  mb_proc_lock(p);
  p->hibernated = 0;
  p->wait = MB_WAIT_NONE;
  mb_proc_unlock(p);
  mb_alloc_count(-(long long)atomic_exchange_explicit(&p->held, 0, memory_order_relaxed));
  p->wakes++;
  return boot(p);
}

/* p's wait goes on: block it, unless something came meanwhile. Returns 1
 * if p must be looked at again now; else p is WAITING, and this was the
 * last touch of it: once unlocked, a waker may run it elsewhere. */
static int wait_on(mb_proc_t *p)
{
  mb_proc_lock(p);
  int again = p->in_head != NULL || p->woken;
  if (!again) {
    atomic_store_explicit(&p->running, 0, memory_order_relaxed);
    p->status = MB_PS_WAITING;
  }
  mb_proc_unlock(p);
  return again;
}

static void run(mb_sched_t *s, mb_proc_t *p)
{
  atomic_store_explicit(&p->running, 1, memory_order_relaxed);
  p->budget = mb_sched_opts.slice_reds;
  /* A poke that came after the last slice's Lua ended is not for this
   * one; an uncounted slice starts with no hook (the hook leaves itself on:
   * see preempt). */
  if (atomic_load_explicit(&p->preempt, memory_order_relaxed))
    atomic_store_explicit(&p->preempt, 0, memory_order_relaxed);
  p->held_hooks = 0;
  owed_since = 0;
  if (MB_POKE_BY_SIGNAL && p->L && !p->counted && lua_gethook(p->L) == mb_run_hook)
    mb_lstate_sethook(p->L, 0);
  int nargs;
  for (;;) {
    if (p->L)
      runs_lua(p);
    if (p->hibernated)
      nargs = wake(p);
    else if (p->boot)
      nargs = boot(p);
    else if (p->wait != MB_WAIT_NONE)
      nargs = finish_wait(p);
    else
      nargs = must_die(p) ? MUST_DIE : 0;
    if (nargs != GOES_ON)
      break;
    runs_lua(NULL);
    if (!wait_on(p))
      return;
  }
  if (nargs == AGAIN) {
    runs_lua(NULL);
    charge(p);
    atomic_store_explicit(&p->running, 0, memory_order_relaxed);
    mb_sched_requeue(s, p);
    return;
  }
  if (nargs == MUST_DIE) {
    runs_lua(NULL);
    mb_msg_t *reason = p->exit_reason;
    p->exit_reason = NULL;
    if (!p->boot || p->hibernated)   /* a failed boot has reported */
      mb_report_exit(p, reason);
    die(p, reason);
    return;
  }
  int st = lua_resume(p->co, nargs);
  runs_lua(NULL);
  /* It stops running: what it corked goes out now (sock.c). */
  if (p->sock_last)
    mb_sock_uncork(p->sock_last, p->pid);
  charge(p);
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
    if (why == MB_YIELD_WAIT || why == MB_YIELD_HIBERNATE) {
      p->alone = 0;     /* it blocks: its next slices are short ones */
      if (p->counted) {
        p->counted = 0;
        if (MB_POKE_BY_SIGNAL)
          mb_lstate_sethook(p->L, 0);
      }
    }
    if (why == MB_YIELD_HIBERNATE) {
      hibernate(s, p);
      return;
    }
    if (why == MB_YIELD_WAIT) {
      /* The first time it goes idle with nothing queued (the count is
       * atomic: in_head is the pushers', read only under the lock). */
      if (!p->settled && atomic_load_explicit(&p->mailbox_len, memory_order_relaxed) == 0)
        mb_lstate_settle(p);
      mb_proc_lock(p);
      p->wait = p->pending_wait;
      int again = p->in_head != NULL || p->woken;
      p->status = again ? MB_PS_RUNNABLE : MB_PS_WAITING;
      /* Last touch of p unless again: once unlocked, a waker may run it. */
      atomic_store_explicit(&p->running, 0, memory_order_relaxed);
      mb_proc_unlock(p);
      if (again)
        mb_sched_push(s, p);
      return;
    }
    /* Preempted, mb.yield(), or a bare coroutine.yield() in the body. */
    atomic_store_explicit(&p->running, 0, memory_order_relaxed);
    mb_sched_requeue(s, p);
    return;
  }
  if (st == 0) {
    mb_msg_t *reason = p->exit_reason ? p->exit_reason
                                        : mb_must(mb_msg_string("normal"));
    p->exit_reason = NULL;
    if (!p->first)   /* the first process's end may halt the host */
      mb_lstate_recycle(p);
    die(p, reason);
    return;
  }
  crashed(p, st);
}

/* -- Set-up ------------------------------------------------------------------ */

/* The codec's hooks (copy.h): remember the functions a boot rebuilds from
 * code objects, and give their code back when they are sent again. */
/* Remember that the function at idx is code object `code`: anchored in
 * the registry (by a reference, unless `anchored` already: the body at
 * MB_REGSLOT_BODY_FN), so that its address stays its own; the oldest
 * entry goes when all MB_FNCODES are taken. */
static void remember_code(mb_proc_t *p, lua_State *L, int idx, mb_code_t *code, int anchored)
{
  /* One entry first (most processes only ever have their body's), then
   * all: 24 bytes instead of 96 for an idle process. */
  if (p->nfncodes <= 1) {
    int cap = p->nfncodes == 0 ? 1 : MB_FNCODES;
    p->fncodes = mb_realloc(p->fncodes, (size_t)cap * sizeof *p->fncodes);
    memset(p->fncodes + p->nfncodes, 0, (size_t)(cap - p->nfncodes) * sizeof *p->fncodes);
  }
  int i = p->nfncodes < MB_FNCODES ? p->nfncodes++ : p->fncode_next++ % MB_FNCODES;
  if (p->fncodes[i].code) {
    luaL_unref(L, LUA_REGISTRYINDEX, p->fncodes[i].ref);
    mb_code_unref(p->fncodes[i].code);
    p->fncodes[i].code = NULL;
  }
  if (anchored) {
    p->fncodes[i].ref = LUA_NOREF;   /* luaL_unref: nothing to do */
  } else {
    lua_pushvalue(L, idx);
    p->fncodes[i].ref = luaL_ref(L, LUA_REGISTRYINDEX);
  }
  mb_code_ref(code);
  p->fncodes[i].fn = lua_topointer(L, idx);
  p->fncodes[i].code = code;
}

/* A state keeps the function its last process's body was loaded as
 * (MB_REGSLOT_BODY_FN; its code object's serial travels in C, with the
 * state in the pool: mb_lstate_kept_body), across resets (lstate.c, which
 * drops the values of its upvalues): the next process spawned on the state with
 * the same function takes it instead of loading its bytecode again
 * (luaL_loadbuffer cost ~1,100 of a spawn's ~21,000 instructions). The
 * decoder sets all its upvalues (it refuses a message that sends fewer
 * than the function has), and its environment becomes the new process's
 * globals here. The body is the first function a boot decodes; a body
 * never loaded whole (a module name) leaves the slot as it is. */
static int load_body(lua_State *L, mb_code_t *code)
{
  mb_proc_t *p = mb_proc_of(L);
  if (p == NULL || !p->booting || p->nfncodes > 0 || boot_kept == 0 ||
      boot_kept != mb_code_serial(code))
    return 0;
  lua_rawgeti(L, LUA_REGISTRYINDEX, MB_REGSLOT_BODY_FN);
  if (!lua_isfunction(L, -1)) {
    lua_pop(L, 1);
    boot_kept = 0;   /* on_load keeps the one it loads instead */
    return 0;
  }
  lua_pushvalue(L, LUA_GLOBALSINDEX);
  lua_setfenv(L, -2);
  return 1;
}

static void on_load(lua_State *L, int idx, mb_code_t *code)
{
  mb_proc_t *p = mb_proc_of(L);
  if (p == NULL || !p->booting)
    return;
  int body = p->nfncodes == 0;
  /* The body, kept for the state's next process (unless load_body gave
   * the kept one: boot_kept is still its serial then). */
  if (body && boot_kept != mb_code_serial(code)) {
    lua_pushvalue(L, idx);
    lua_rawseti(L, LUA_REGISTRYINDEX, MB_REGSLOT_BODY_FN);
  }
  boot_kept = 0;
  if (p->nfncodes < MB_FNCODES)
    remember_code(p, L, idx, code, body);
}

/* A function the process dumps to send is likely sent again (spawned in a
 * loop, hibernated into): the last few are remembered. */
static void on_dump(lua_State *L, int idx, mb_code_t *code)
{
  mb_proc_t *p = mb_proc_of(L);
  if (p && p->L)
    remember_code(p, L, idx, code, 0);
}

static int provide_module(lua_State *L, const char *name, size_t n)
{
  if (n != 8 || memcmp(name, "moonbeam", 8) != 0)
    return 0;
  mb_lstate_push_module(L);
  return 1;
}

static const char *own_module(lua_State *L)
{
  lua_rawgeti(L, LUA_REGISTRYINDEX, MB_REGSLOT_MOONBEAM);
  if (lua_istable(L, -1))
    return "moonbeam";
  lua_pop(L, 1);
  return NULL;
}

static mb_code_t *code_of(lua_State *L, int idx)
{
  mb_proc_t *p = mb_proc_of(L);
  if (p == NULL)
    return NULL;
  const void *fn = lua_topointer(L, idx);
  for (int i = 0; i < p->nfncodes; i++)
    if (p->fncodes[i].fn == fn) {
      mb_code_ref(p->fncodes[i].code);
      return p->fncodes[i].code;
    }
  return NULL;
}

/* An exit hook, after the state's close (whose finalizers may require):
 * the process's package paths (codepath.h). */
static void drop_codepath(mb_proc_t *p)
{
  mb_codepath_unref(p->codepath);
  p->codepath = 0;
}

void mb_run_init(void)
{
  mb_copy_on_load = on_load;
  mb_copy_load = load_body;
  mb_copy_on_dump = on_dump;
  mb_copy_code_of = code_of;
  mb_copy_module = provide_module;
  mb_copy_require = mb_lstate_require;
  mb_copy_own_module = own_module;
  mb_lstate_init();
  mb_hookmask_init();
  mb_sched_set_runner(run);
  mb_sched_set_preempter(preempt);
  mb_proc_add_exit_hook(mb_lstate_close);
  mb_proc_add_exit_hook(drop_codepath);
}
