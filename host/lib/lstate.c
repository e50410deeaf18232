/* lstate.c: a process's lua_State, with lazily opened libraries, the
 * coroutine wrappers that keep runtime yields transparent, and debug hooks
 * chained with the scheduler's count hook (see lstate.h).
 */
#define _GNU_SOURCE   /* pthread_getattr_np */
#include <execinfo.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "code.h"
#include "copy.h"
#include "lauxlib.h"
#include "lib.h"
#include "hookmask.h"
#include "lstate.h"
#include "codepath.h"
#include "modcache.h"
#include "pid.h"
#include "luajit.h"
#include "lualib.h"
#include "run.h"
#include "sandbox.h"
#include "scheduler.h"
#include "strmatch.h"
#include "tablib.h"

/* Where the host's Lua modules are, relative to the binary once installed
 * (bin/moonbeam -> share/moonbeam/lua). */
#ifndef MB_LUA_REL_DIR
#define MB_LUA_REL_DIR "../share/moonbeam/lua"
#endif

int mb_lstate_noenv;

/* Registry keys (the addresses are the keys). */
static char coroutine_key;

/* -- Coroutine wrappers --------------------------------------------------- */

/* A unique value: co_resume's "the inner coroutine made a runtime yield". */
static char pending_key;

/* Is L the body or the main thread of its process, which play the part of
 * luajit's main chunk (not a coroutine the user can see)? */
static int is_main(lua_State *L)
{
  mb_proc_t *p = mb_proc_of(L);
  return L == p->co || L == p->L;
}

/* Is co passing a runtime yield up (co_resume's PENDING)? To LuaJIT it is
 * suspended, but it is in the chain of running coroutines, waiting in a
 * receive or a suspended C call: only the wrappers' loop may resume it
 * (a __gc finalizer that resumed it made its receive return the values it
 * passed). It is marked by the key alone on its stack. */
static int passing_up(lua_State *co)
{
  return lua_status(co) == LUA_YIELD && lua_gettop(co) == 1 &&
         lua_touserdata(co, 1) == &pending_key;
}

/* Can co be resumed (cont: by the wrappers' loop, going on after a runtime
 * yield)? Pushes LuaJIT's message and returns 0 if not. */
static int resumable(lua_State *L, lua_State *co, int cont)
{
  int st = lua_status(co);
  if (passing_up(co)) {
    if (cont) {
      lua_settop(co, 0);
      return 1;
    }
    lua_pushliteral(L, "cannot resume non-suspended coroutine");
    return 0;
  }
  if (st == LUA_YIELD)
    return 1;
  lua_Debug ar;
  if (st == 0 && lua_getstack(co, 0, &ar))
    lua_pushliteral(L, "cannot resume running coroutine");  /* or normal */
  else if (st == 0 && lua_gettop(co) > 0)
    return 1;   /* not started yet */
  else
    lua_pushliteral(L, "cannot resume dead coroutine");
  return 0;
}

/* co_resume(co, ...) -> true, results... | false, err | PENDING
 * Like coroutine.resume, but keeps the process's chain of running
 * coroutines (so the hook knows where it may yield) and reports a runtime
 * yield of co as PENDING instead of as an ordinary yield. With upvalue 1
 * true (coroutine.wrap's), a coroutine that cannot be resumed raises, at
 * the wrapped function's caller, as in LuaJIT; with upvalue 2 true, it is
 * the wrappers' loop going on after PENDING (see passing_up). */
static int co_resume(lua_State *L);

static int co_resume(lua_State *L)
{
  lua_State *co = lua_tothread(L, 1);
  luaL_argcheck(L, co != NULL, 1, "coroutine expected");
  mb_proc_t *p = mb_proc_of(L);
  int narg = lua_gettop(L) - 1;
  if (!resumable(L, co, lua_toboolean(L, lua_upvalueindex(2)))) {
    if (lua_toboolean(L, lua_upvalueindex(1))) {
      luaL_where(L, 2);
      lua_insert(L, -2);
      lua_concat(L, 2);
      return lua_error(L);
    }
    lua_pushboolean(L, 0);
    lua_insert(L, -2);
    return 2;
  }
  if (p->con >= MB_MAX_COROUTINES) {
    lua_pushboolean(L, 0);
    lua_pushliteral(L, "C stack overflow (coroutines nested too deep)");
    return 2;
  }
  if (!lua_checkstack(co, narg))
    luaL_error(L, "too many arguments to resume");
  lua_xmove(L, co, narg);
  if (p->con == p->cocap) {
    p->cocap = p->cocap ? 2 * p->cocap : 4;
    p->costack = mb_realloc(p->costack, p->cocap * sizeof *p->costack);
  }
  p->costack[p->con++] = co;
  int st = lua_resume(co, narg);
  p->con--;
  if (st == LUA_YIELD && p->yield != MB_YIELD_NONE) {
    lua_settop(co, 0);
    lua_pushlightuserdata(co, &pending_key);   /* marked: see passing_up */
    lua_pushlightuserdata(L, &pending_key);
    return 1;
  }
  if (st == 0 || st == LUA_YIELD) {
    int nres = lua_gettop(co);
    if (!lua_checkstack(L, nres + 1))
      luaL_error(L, "too many results to resume");
    lua_pushboolean(L, 1);
    lua_xmove(co, L, nres);
    return nres + 1;
  }
  lua_pushboolean(L, 0);
  lua_xmove(co, L, 1);
  return 2;
}

/* rt_yield() -> values: pass a runtime yield up one level; returns what the
 * scheduler resumes the process with. */
static int co_rtyield(lua_State *L)
{
  return lua_yield(L, 0);
}

/* co_ismain() -> whether the caller is the body or the main thread, which
 * are luajit's main chunk: coroutine.yield (the wrappers') refuses to yield
 * them (the scheduler's yields are not the user's). The yield itself is
 * LuaJIT's own: lua_yield, from a C function, takes any yield made while a
 * __gc finalizer or a hook runs anywhere in the state for the hook's own
 * (LuaJIT's flag that one runs is global), and a coroutine resumed from a
 * finalizer that yielded so crashed the host when resumed again. */
static int co_ismain(lua_State *L)
{
  lua_pushboolean(L, is_main(L));
  return 1;
}

/* coroutine.status(co): "normal" for a coroutine passing a runtime yield
 * up (see passing_up), which LuaJIT would call suspended. */
static int co_status(lua_State *L)
{
  lua_State *co = lua_tothread(L, 1);
  luaL_argcheck(L, co != NULL, 1, "coroutine expected");
  if (passing_up(co)) {
    lua_pushliteral(L, "normal");
    return 1;
  }
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_insert(L, 1);
  lua_call(L, lua_gettop(L) - 1, 1);
  return 1;
}

/* coroutine.running() -> the running coroutine, or nil in the main chunk */
static int co_running(lua_State *L)
{
  if (is_main(L))
    lua_pushnil(L);
  else
    lua_pushthread(L);
  return 1;
}

/* The Lua half: loops that re-yield PENDING upward and hand the values the
 * process is resumed with down to the inner coroutine. Tail calls keep the
 * C stack flat. A bad argument is reported at the caller, as by LuaJIT's
 * coroutine.resume. */
static const char wrapper_src[] =
  "local c_resume, w_resume, rt_yield, PENDING, create, c_goon, ismain, lj_yield = ...\n"
  "local function finish(co, ok, ...)\n"
  "  if ok == PENDING then return finish(co, c_goon(co, rt_yield())) end\n"
  "  return ok, ...\n"
  "end\n"
  "local function wfinish(co, ok, ...)\n"
  "  if ok == PENDING then return wfinish(co, c_goon(co, rt_yield())) end\n"
  "  if ok then return ... end\n"
  "  error((...), 0)\n"
  "end\n"
  "local function yield(...)\n"
  "  if ismain() then error('attempt to yield across C-call boundary', 2) end\n"
  "  return lj_yield(...)\n"
  "end\n"
  "local function resume(co, ...)\n"
  "  if type(co) ~= 'thread' then\n"
  "    error(\"bad argument #1 to 'resume' (coroutine expected)\", 2)\n"
  "  end\n"
  "  return finish(co, c_resume(co, ...))\n"
  "end\n"
  "local function wrap(f)\n"
  "  local co = create(f)\n"
  "  return function(...) return wfinish(co, w_resume(co, ...)) end\n"
  "end\n"
  "return resume, wrap, yield\n";

/* co_resume: wrap's (raising), and the wrappers' loop's (going on). */
static void push_resume(lua_State *L, int wrap, int goon)
{
  lua_pushboolean(L, wrap);
  lua_pushboolean(L, goon);
  lua_pushcclosure(L, co_resume, 2);
}

/* Install the wrappers into the coroutine table at the top of the stack. */
static void install_wrappers(lua_State *L)
{
  mb_lstate_lexer(L);
  if (luaL_loadbuffer(L, wrapper_src, sizeof wrapper_src - 1, "=coroutine"))
    lua_error(L);
  push_resume(L, 0, 0);
  push_resume(L, 1, 0);
  lua_pushcfunction(L, co_rtyield);
  lua_pushlightuserdata(L, &pending_key);
  lua_getfield(L, -6, "create");
  push_resume(L, 0, 1);
  lua_pushcfunction(L, co_ismain);
  lua_getfield(L, -9, "yield");
  lua_call(L, 8, 3);
  lua_setfield(L, -4, "yield");
  lua_setfield(L, -3, "wrap");
  lua_setfield(L, -2, "resume");
  lua_getfield(L, -1, "status");
  lua_pushcclosure(L, co_status, 1);
  lua_setfield(L, -2, "status");
  lua_pushcfunction(L, co_running);
  lua_setfield(L, -2, "running");
}

/* -- Debug hooks ---------------------------------------------------------- */

/* LuaJIT has one hook per state, which the scheduler's count hook uses. A
 * hook set with debug.sethook is chained with it: while one is set, the
 * installed hook is uhook_dispatch, with the user's mask and a count that
 * reaches whichever of the two counts is due first; the scheduler keeps
 * preempting and the user's function sees its own events and counts.
 * The state lives at registry[&uhook_key] (created by the first
 * debug.sethook, then kept: the dispatcher holds on to it while the user's
 * function runs, which may set or clear the hook), the function at
 * registry[&uhookfn_key]. Every field is checked before use: debug.getregistry
 * lets a process change them. */
typedef struct uhook {
  int mask;        /* the user's LUA_MASK* bits; 0: no user hook */
  int count;       /* the user's count, 0 for none */
  int user_left;   /* instructions to the user's next count event */
  int sched;       /* the scheduler's interval (0: preemption off) */
  int sched_left;  /* instructions to the scheduler's next count */
  int step;        /* the count installed now */
} uhook_t;

static char uhook_key, uhookfn_key;

/* Every hook change of the owner thread: under the scheduler's preemption
 * lock, so that the ticker's poke (run.c) and this change never overlap. */
void mb_lstate_set_hook(lua_State *L, lua_Hook f, int mask, int count)
{
  mb_sched_hook_lock();
  lua_sethook(L, f, mask, count);
  mb_sched_hook_unlock();
}

/* The scheduler's polling interval under a user's hook: it must see a
 * poke (p->preempt) within this many instructions. */
static int sched_poll(void)
{
  return mb_sched_opts.slice_reds > 0 ? MB_HOOK_INSTRUCTIONS : 0;
}

static void uhook_dispatch(lua_State *L, lua_Debug *ar);

/* Push registry[&uhook_key]; return it, or NULL if it is not ours. */
static uhook_t *uhook_push(lua_State *L)
{
  lua_pushlightuserdata(L, &uhook_key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  if (lua_type(L, -1) != LUA_TUSERDATA || lua_objlen(L, -1) != sizeof(uhook_t))
    return NULL;
  return lua_touserdata(L, -1);
}

/* The scheduler's hook alone, as before any debug.sethook: it looks at
 * once whether a preemption is due, and takes itself off if not. */
static void uhook_restore(lua_State *L, uhook_t *h)
{
  if (h->sched > 0)
    mb_lstate_set_hook(L, mb_run_hook, LUA_MASKCOUNT, 1);
  else
    mb_lstate_set_hook(L, NULL, 0, 0);
}

/* Install the dispatcher for h's mask and the nearer of the two counts. */
static void uhook_install(lua_State *L, uhook_t *h)
{
  int step = h->sched > 0 ? h->sched_left : 0;
  if ((h->mask & LUA_MASKCOUNT) && h->count > 0 && (step <= 0 || h->user_left < step))
    step = h->user_left;
  if (step <= 0 && (h->sched > 0 || (h->mask & LUA_MASKCOUNT)))
    step = 1;
  h->step = step;
  int mask = (h->mask & (LUA_MASKCALL | LUA_MASKRET | LUA_MASKLINE)) |
             (step > 0 ? LUA_MASKCOUNT : 0);
  /* LuaJIT calls return hooks from its per-instruction hook, which with a
   * count (and no line) mask runs only when the count expires: return
   * events would be lost. A line mask makes it run at every instruction;
   * the dispatcher drops the line events the user did not ask for. */
  if ((mask & LUA_MASKRET) && (mask & LUA_MASKCOUNT))
    mask |= LUA_MASKLINE;
  mb_lstate_set_hook(L, uhook_dispatch, mask, step);
}

/* Call the user's function for event ar, as LuaJIT's debug.sethook does
 * (event name, line or nil). Blocking calls are refused while it runs (see
 * mb_lstate_in_user_hook): LuaJIT cannot yield from inside a hook. */
static void uhook_call(lua_State *L, uhook_t *h, lua_Debug *ar)
{
  static const char *const names[] = {"call", "return", "line", "count",
                                      "tail return"};
  lua_pushlightuserdata(L, &uhookfn_key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  if (!lua_isfunction(L, -1) || ar->event < 0 || ar->event > LUA_HOOKTAILRET) {
    lua_pop(L, 1);
    return;
  }
  lua_pushstring(L, names[ar->event]);
  if (ar->currentline >= 0)
    lua_pushinteger(L, ar->currentline);
  else
    lua_pushnil(L);
  mb_proc_t *p = mb_proc_of(L);
  p->in_uhook++;   /* a plain flag: the poke's signal handler reads it */
  int st = lua_pcall(L, 2, 0, 0);
  /* A poke may have let hooks into the function (hookmask.h): back in
   * LuaJIT's hook call, they are off again, and the scheduler's hook may
   * yield from here. Cleared first: a poke between the two finds no user
   * hook and leaves the flag alone. */
  p->in_uhook--;
  atomic_signal_fence(memory_order_seq_cst);
  mb_hookmask_hold(L);
  if (st)
    lua_error(L);   /* on to the user's pcall, as from LuaJIT's own hook */
}

static void uhook_dispatch(lua_State *L, lua_Debug *ar)
{
  uhook_t *h = uhook_push(L);   /* stays on the stack: anchored */
  if (h == NULL) {
    lua_pop(L, 1);
    mb_lstate_set_hook(L, sched_poll() ? mb_run_hook : NULL, LUA_MASKCOUNT, 1);
    return;
  }
  static const int wants[] = {LUA_MASKCALL, LUA_MASKRET, LUA_MASKLINE, 0,
                              LUA_MASKRET};
  int sched_due = 0, user_due = 0;
  if (ar->event >= 0 && ar->event <= LUA_HOOKTAILRET && ar->event != LUA_HOOKCOUNT)
    user_due = (h->mask & wants[ar->event]) != 0;
  if (ar->event == LUA_HOOKCOUNT) {
    if (h->sched > 0 && (h->sched_left -= h->step) <= 0) {
      sched_due = 1;
      h->sched_left = h->sched;
    }
    if (h->count > 0 && (h->user_left -= h->step) <= 0) {
      user_due = (h->mask & LUA_MASKCOUNT) != 0;
      h->user_left = h->count;
    }
    uhook_install(L, h);
  }
  /* Not inside the user's function itself, or a finalizer, where the
   * scheduler may have let hooks in (hookmask.h): LuaJIT calls no hook
   * there. */
  if (user_due && !mb_proc_of(L)->in_uhook && !mb_hookmask_in_gc(L))
    uhook_call(L, h, ar);
  /* The user's function may have cleared the hook: the dispatcher stayed
   * installed while it ran (see db_sethook); hand back to the scheduler. */
  if (h->mask == 0 && lua_gethook(L) == uhook_dispatch)
    uhook_restore(L, h);
  lua_pop(L, 1);
  if (sched_due)
    mb_run_hook(L, ar);
}

void mb_lstate_sethook(lua_State *L, int count)
{
  if (lua_gethook(L) == uhook_dispatch) {
    uhook_t *h = uhook_push(L);
    if (h) {
      h->sched = h->sched_left = count > 0 ? count : sched_poll();
      uhook_install(L, h);
      lua_pop(L, 1);
      return;
    }
    lua_pop(L, 1);
  }
  if (count > 0)
    mb_lstate_set_hook(L, mb_run_hook, LUA_MASKCOUNT, count);
  else
    mb_lstate_set_hook(L, NULL, 0, 0);
}

int mb_lstate_in_user_hook(lua_State *L)
{
  return mb_proc_of(L)->in_uhook > 0;
}

/* debug.sethook([thread,] [f, mask[, count]])
 * As LuaJIT's: one hook for the whole process (a thread argument is
 * accepted and changes nothing); no f clears it. */
static int db_sethook(lua_State *L)
{
  int arg = lua_type(L, 1) == LUA_TTHREAD ? 1 : 0;
  int mask = 0, count = 0;
  if (!lua_isnoneornil(L, arg + 1)) {
    const char *smask = luaL_checkstring(L, arg + 2);
    luaL_checktype(L, arg + 1, LUA_TFUNCTION);
    count = luaL_optint(L, arg + 3, 0);
    if (strchr(smask, 'c')) mask |= LUA_MASKCALL;
    if (strchr(smask, 'r')) mask |= LUA_MASKRET;
    if (strchr(smask, 'l')) mask |= LUA_MASKLINE;
    if (count > 0) mask |= LUA_MASKCOUNT;
  }
  lua_settop(L, arg + 1);
  lua_pushlightuserdata(L, &uhookfn_key);
  lua_pushvalue(L, arg + 1);
  lua_rawset(L, LUA_REGISTRYINDEX);
  int installed = lua_gethook(L) == uhook_dispatch;
  uhook_t *h = uhook_push(L);
  if (h == NULL) {
    if (mask == 0)
      return 0;   /* nothing was set, nothing to clear */
    lua_pop(L, 1);
    lua_pushlightuserdata(L, &uhook_key);
    h = lua_newuserdata(L, sizeof *h);
    memset(h, 0, sizeof *h);
    lua_rawset(L, LUA_REGISTRYINDEX);
    installed = 0;
  }
  if (!installed) {
    /* Take over the scheduler's count where it stands (a preemption
     * waiting for a safe point), else poll for the ticker's pokes. */
    h->sched = lua_gethook(L) == mb_run_hook ? lua_gethookcount(L) : sched_poll();
    h->sched_left = h->sched;
  }
  h->mask = mask;
  h->count = count > 0 ? count : 0;
  h->user_left = h->count;
  if (mask)
    uhook_install(L, h);
  else if (installed && !mb_proc_of(L)->in_uhook)
    uhook_restore(L, h);
  /* Cleared from inside the user's function: the dispatcher restores the
   * scheduler's hook when that function returns. */
  return 0;
}

/* debug.gethook([thread]) -> f, mask, count (nil, "", 0 when none is set) */
static int db_gethook(lua_State *L)
{
  uhook_t *h = uhook_push(L);
  int mask = h ? h->mask : 0;
  lua_pushlightuserdata(L, &uhookfn_key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  char smask[4];
  int n = 0;
  if (mask & LUA_MASKCALL) smask[n++] = 'c';
  if (mask & LUA_MASKRET) smask[n++] = 'r';
  if (mask & LUA_MASKLINE) smask[n++] = 'l';
  lua_pushlstring(L, smask, n);
  lua_pushinteger(L, h ? h->count : 0);
  return 3;
}

/* -- Lazy libraries ------------------------------------------------------- */

static void open_lib(lua_State *L, lua_CFunction f, const char *name)
{
  lua_pushcfunction(L, f);
  lua_pushstring(L, name);
  lua_call(L, 1, 0);
}

/* os.exit([code]) halts the whole host, as the only process of a plain Lua
 * program would. true/false mean 0/1, like in Lua 5.2+. */
static int os_exit(lua_State *L)
{
  int code;
  if (lua_isboolean(L, 1))
    code = lua_toboolean(L, 1) ? 0 : 1;
  else
    code = (int)luaL_optinteger(L, 1, 0);
  return mb_lib_halt(L, code);
}

/* newproxy(...): LuaJIT's, which is upvalue 1; a proxy may carry a
 * finalizer, which taints the state (see Reused states). */
static int newproxy_tainting(lua_State *L)
{
  mb_proc_of(L)->lstate_tainted = 1;
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_insert(L, 1);
  lua_call(L, lua_gettop(L) - 1, 1);
  return 1;
}

/* print(...): LuaJIT's, but the line goes out in one write. LuaJIT's
 * writes each argument and each tab by itself, and stdio locks stdout for
 * each call only: the lines of two processes printing at once on two
 * schedulers came out mixed ("readerreader\tnil..."). As LuaJIT's, it
 * converts each argument with the global tostring. */
static int host_print(lua_State *L)
{
  enum { PIECES = 32 };   /* joined as they come: any number of arguments */
  int n = lua_gettop(L);
  luaL_checkstack(L, PIECES + 4, "too many arguments to print");
  mb_run_calls_lua();
  lua_getfield(L, LUA_GLOBALSINDEX, "tostring");
  int ts = lua_gettop(L);
  for (int i = 1; i <= n; i++) {
    if (i > 1)
      lua_pushliteral(L, "\t");
    lua_pushvalue(L, ts);
    lua_pushvalue(L, i);
    lua_call(L, 1, 1);
    if (!lua_isstring(L, -1))
      return luaL_error(L, "'tostring' must return a string to 'print'");
    if (lua_gettop(L) - ts >= PIECES)
      lua_concat(L, lua_gettop(L) - ts);
  }
  lua_pushliteral(L, "\n");
  lua_concat(L, lua_gettop(L) - ts);
  size_t len;
  const char *line = lua_tolstring(L, -1, &len);
  fwrite(line, 1, len, stdout);
  return 0;
}

static void after_base(lua_State *L)
{
  lua_pushcfunction(L, host_print);
  lua_setfield(L, LUA_GLOBALSINDEX, "print");
  lua_getfield(L, LUA_GLOBALSINDEX, "newproxy");
  lua_pushcclosure(L, newproxy_tainting, 1);
  lua_setfield(L, LUA_GLOBALSINDEX, "newproxy");
  /* Hide coroutine until asked for, so that only processes that use
   * coroutines pay for the wrappers. */
  lua_pushlightuserdata(L, &coroutine_key);
  lua_getfield(L, LUA_GLOBALSINDEX, "coroutine");
  lua_rawset(L, LUA_REGISTRYINDEX);
  lua_pushnil(L);
  lua_setfield(L, LUA_GLOBALSINDEX, "coroutine");
  mb_sandbox_base(L);
}

/* The base library of a reused state. Opening it takes ~33k instructions
 * (LuaJIT's lj_lib_register: a closure, an interned name and a table slot
 * for each of ~40 functions, and the table's rehashes), more than a whole
 * spawn, and nearly every real process opens it (type, pairs, pcall). So
 * the first opening on a state keeps what it made, in the table at
 * MB_REGSLOT_BASE: f, name -> value for the base globals as after_base
 * left them; co, the coroutine functions (the table after_base hides);
 * restore, the Lua function that gives a process the same function
 * objects in tables of its own (a loop in C over the API cost ~20k
 * instructions, this one ~5k); a new process's globals are presized for
 * them when the state's last process opened it (setup). The functions
 * carry nothing of a process: C functions hold no state that Lua can reach
 * or change, except their environment, which only the C API sees (getfenv
 * of a C function gives the caller's globals) and which is the kept table,
 * so that no old globals stay alive through them. Their upvalues are host-made (pcall for the sandbox's load;
 * LuaJIT's newproxy and its weak table, but a call of newproxy taints the
 * state) and only the debug library, which taints it too, reaches them.
 * restore's bytecode is made once for the host (mb_lstate_run_chunk). */
static const char restore_src[] =
  "return function(f, co, G, loaded)\n"
  "  local next = f.next\n"
  "  for k, v in next, f do G[k] = v end\n"
  "  G._G = G\n"
  "  loaded._G = G\n"
  "  local c = {}\n"
  "  for k, v in next, co do c[k] = v end\n"
  "  loaded.coroutine = c\n"
  "  return c\n"
  "end\n";
static mb_lstate_chunk_t restore_chunk = MB_LSTATE_CHUNK(restore_src, "=base");

void mb_lstate_run_chunk(lua_State *L, mb_lstate_chunk_t *c, int env)
{
  pthread_mutex_lock(&c->lock);
  if (c->code == NULL) {
    lua_State *S = mb_must(luaL_newstate());
    int bad = luaL_loadbuffer(S, c->src, c->srclen, c->name) != 0;
    if (!bad && c->strip) {   /* string.dump(f, true), loaded back */
      lua_pushcfunction(S, luaopen_string);
      lua_call(S, 0, 1);
      lua_getfield(S, -1, "dump");
      lua_pushvalue(S, -3);
      lua_pushboolean(S, 1);
      lua_call(S, 2, 1);
      size_t n;
      const char *b = lua_tolstring(S, -1, &n);
      bad = luaL_loadbuffer(S, b, n, c->name) != 0;
    }
    if (bad || mb_code_dump(S, &c->code) != 0 || c->code == NULL) {
      fprintf(stderr, "moonbeam: cannot compile %s\n", c->name + 1);
      abort();
    }
    lua_close(S);
  }
  pthread_mutex_unlock(&c->lock);
  size_t len;
  const unsigned char *bc = mb_code_bytes(c->code, &len);
  if (luaL_loadbuffer(L, (const char *)bc, len, c->name) != 0)
    lua_error(L);   /* out of memory */
  lua_pushvalue(L, env);
  lua_setfenv(L, -2);
  lua_call(L, 0, 1);
}

/* Give the functions in the table at fns (mb_lstate_push_lua_fn's) the
 * table at env as their environment (absolute indices). */
static void set_lua_fn_env(lua_State *L, int fns, int env)
{
  for (int i = 1; lua_rawgeti(L, fns, i), !lua_isnil(L, -1); i++) {
    lua_pushvalue(L, env);
    lua_setfenv(L, -2);
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
}

/* Run maker chunk c with the nargs values on top of L as its arguments
 * (popped), append the functions it returns to the table at fns, with L's
 * globals as their environment, and push the first of them. */
static void make_into(lua_State *L, int fns, mb_lstate_chunk_t *c, int nargs)
{
  int first = lua_gettop(L) - nargs + 1;   /* the maker's slot, then its results */
  mb_lstate_run_chunk(L, c, fns);   /* the maker, with a neutral environment */
  lua_insert(L, first);
  lua_call(L, nargs, LUA_MULTRET);
  int n = (int)lua_objlen(L, fns);
  for (int i = first; i <= lua_gettop(L); i++) {
    lua_pushvalue(L, LUA_GLOBALSINDEX);
    lua_setfenv(L, i);
    lua_pushvalue(L, i);
    lua_rawseti(L, fns, ++n);
  }
  lua_settop(L, first);
}

/* Push the table of chunk c's kept functions in L's state, or nil. */
static void push_kept(lua_State *L, mb_lstate_chunk_t *c)
{
  lua_rawgeti(L, LUA_REGISTRYINDEX, MB_REGSLOT_LUAFNS);
  if (lua_istable(L, -1)) {
    lua_pushlightuserdata(L, c);
    lua_rawget(L, -2);
    lua_remove(L, -2);
  }
}

void mb_lstate_push_lua_fn(lua_State *L, mb_lstate_chunk_t *c, const lua_CFunction *cfns)
{
  push_kept(L, c);
  int fns = lua_gettop(L);
  if (lua_istable(L, fns)) {
    set_lua_fn_env(L, fns, LUA_GLOBALSINDEX);
    lua_rawgeti(L, fns, 1);
  } else {   /* make them, and keep them */
    lua_pop(L, 1);
    lua_rawgeti(L, LUA_REGISTRYINDEX, MB_REGSLOT_LUAFNS);
    if (!lua_istable(L, -1)) {
      lua_pop(L, 1);
      lua_createtable(L, 0, 2);
      lua_pushvalue(L, -1);
      lua_rawseti(L, LUA_REGISTRYINDEX, MB_REGSLOT_LUAFNS);
    }
    lua_pushlightuserdata(L, c);
    lua_createtable(L, 4, 0);
    lua_pushvalue(L, -1);
    lua_insert(L, fns);                /* fns: the new table */
    lua_rawset(L, -3);
    lua_pop(L, 1);
    int n = 0;
    for (; cfns[n]; n++)
      lua_pushcfunction(L, cfns[n]);
    make_into(L, fns, c, n);
  }
  lua_remove(L, fns);
}

void mb_lstate_push_lua_part(lua_State *L, mb_lstate_chunk_t *c, mb_lstate_chunk_t *part)
{
  push_kept(L, c);
  int fns = lua_gettop(L);
  if (!lua_istable(L, fns))
    luaL_error(L, "%s: not made in this state", c->name + 1);
  make_into(L, fns, part, 0);
  lua_remove(L, fns);
}

/* A reused state's kept Lua functions (mb_lstate_push_lua_fn) hold no
 * process's globals. */
static void reset_lua_fns(lua_State *L)
{
  lua_rawgeti(L, LUA_REGISTRYINDEX, MB_REGSLOT_LUAFNS);
  if (!lua_istable(L, -1)) {
    lua_pop(L, 1);
    return;
  }
  int kept = lua_gettop(L);
  lua_pushnil(L);
  while (lua_next(L, kept)) {
    set_lua_fn_env(L, kept + 2, kept);
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
}

/* Set the environment of the C functions in the table at t to the table
 * at env (absolute indices). */
static void detach_all(lua_State *L, int t, int env)
{
  lua_pushnil(L);
  while (lua_next(L, t)) {
    if (lua_iscfunction(L, -1)) {
      lua_pushvalue(L, env);
      lua_setfenv(L, -2);
    }
    lua_pop(L, 1);
  }
}

/* Keep the base library just opened (see above); names: its globals. */
static void keep_base(lua_State *L, const char *names)
{
  int top = lua_gettop(L);
  lua_createtable(L, 0, 4);
  int k = top + 1;
  lua_createtable(L, 0, 32);
  int f = top + 2;
  for (const char *w = names; *w; ) {
    size_t n = strcspn(w += strspn(w, " "), " ");
    if (n == 0)
      break;
    if (!(n == 2 && memcmp(w, "_G", 2) == 0)) {
      lua_pushlstring(L, w, n);
      lua_pushvalue(L, -1);
      lua_rawget(L, LUA_GLOBALSINDEX);
      lua_rawset(L, f);
    }
    w += n;
  }
  detach_all(L, f, k);
  lua_setfield(L, k, "f");
  lua_createtable(L, 0, 16);
  lua_pushlightuserdata(L, &coroutine_key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  if (lua_istable(L, -1)) {
    detach_all(L, top + 3, k);
    lua_pushnil(L);
    while (lua_next(L, top + 3)) {
      lua_pushvalue(L, -2);
      lua_insert(L, -2);
      lua_rawset(L, top + 2);
    }
  }
  lua_pop(L, 1);
  lua_setfield(L, k, "co");
  lua_rawseti(L, LUA_REGISTRYINDEX, MB_REGSLOT_BASE);
}

/* Give the globals the kept base library; 0 if there is none. */
static int restore_base(lua_State *L)
{
  int top = lua_gettop(L);
  lua_rawgeti(L, LUA_REGISTRYINDEX, MB_REGSLOT_BASE);
  if (!lua_istable(L, -1)) {
    lua_settop(L, top);
    return 0;
  }
  lua_getfield(L, top + 1, "restore");
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    mb_lstate_run_chunk(L, &restore_chunk, top + 1);
    lua_pushvalue(L, -1);
    lua_setfield(L, top + 1, "restore");
  }
  lua_getfield(L, top + 1, "f");
  lua_getfield(L, top + 1, "co");
  lua_pushvalue(L, LUA_GLOBALSINDEX);
  luaL_findtable(L, LUA_REGISTRYINDEX, "_LOADED", 16);
  lua_call(L, 4, 1);
  lua_pushlightuserdata(L, &coroutine_key);
  lua_insert(L, -2);
  lua_rawset(L, LUA_REGISTRYINDEX);
  lua_settop(L, top);
  return 1;
}

static void open_coroutine(lua_State *L)
{
  lua_pushlightuserdata(L, &coroutine_key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  install_wrappers(L);
  lua_setfield(L, LUA_GLOBALSINDEX, "coroutine");
}

static void after_os(lua_State *L)
{
  lua_getfield(L, LUA_GLOBALSINDEX, "os");
  lua_pushcfunction(L, os_exit);
  lua_setfield(L, -2, "exit");
  lua_pop(L, 1);
}

static int open_for(lua_State *L, const char *name, size_t len);

/* package.preload entry of a standard library: require "debug" works before
 * the global was ever touched. */
static int preload_std(lua_State *L)
{
  size_t len;
  const char *name = luaL_checklstring(L, 1, &len);
  open_for(L, name, len);
  lua_getfield(L, LUA_GLOBALSINDEX, name);
  return 1;
}

/* package.preload.moonbeam */
static int preload_moonbeam(lua_State *L)
{
  mb_lstate_push_module(L);
  return 1;
}

/* The modules the host builds in: their loaders. */
static const luaL_Reg host_modules[] = {
  {"moonbeam", preload_moonbeam},
  {"moonbeam.fs", mb_lib_fs_open},
  {"moonbeam.tcp", mb_lib_tcp_open},
  {"moonbeam.http_parser", mb_lib_http_parser_open},
  {NULL, NULL}
};

/* The standard libraries, which require finds in package.preload
 * (preload_std, set by after_package), and the sandbox's stand-ins there
 * (sandbox.h): light_loader leaves these names to the package library. */
static const char *const std_libs[] = {"_G", "coroutine", "string", "table",
  "math", "io", "os", "debug", "bit", "jit", NULL};
static const char *const std_stand_ins[] = {"ffi", "string.buffer", "jit.profile", NULL};

/* package.path (the table at idx) made the host's: its Lua directory
 * first, then what the package library made of LUA_PATH. */
static void set_host_path(lua_State *L, int idx)
{
  lua_getfield(L, idx, "path");
  const char *dir = mb_lstate_lua_dir();
  lua_pushfstring(L, "%s/?.lua;%s/?/init.lua;%s", dir, dir, lua_tostring(L, -1));
  lua_setfield(L, idx, "path");
  lua_pop(L, 1);
}

static void after_package(lua_State *L)
{
  lua_getfield(L, LUA_GLOBALSINDEX, "package");
  lua_pushvalue(L, -1);
  lua_rawseti(L, LUA_REGISTRYINDEX, MB_REGSLOT_PACKAGE);
  mb_proc_t *p = mb_proc_of(L);
  p->package_opened = 1;
  if (p->codepath) {   /* the paths it inherited (codepath.h) */
    lua_pushstring(L, mb_codepath_get(p->codepath, 0));
    lua_setfield(L, -2, "path");
    lua_pushstring(L, mb_codepath_get(p->codepath, 1));
    lua_setfield(L, -2, "cpath");
  } else {
    set_host_path(L, lua_gettop(L));
  }
  mb_sandbox_package(L);
  mb_modcache_install(L);   /* the Lua-file searcher, text only */
  /* jit.profile's entry comes with the jit library (after_jit): here it
   * would take package.preload past 16 entries, and its size to double. */
  mb_sandbox_preload(L, MB_SANDBOX_PRELOAD_FFI | MB_SANDBOX_PRELOAD_BUFFER);
  lua_getfield(L, -1, "loaded");
  lua_rawgeti(L, LUA_REGISTRYINDEX, MB_REGSLOT_MOONBEAM);
  lua_setfield(L, -2, "moonbeam");   /* nil if nothing captured it yet */
  lua_pop(L, 1);
  lua_getfield(L, -1, "preload");
  for (const luaL_Reg *m = host_modules; m->name; m++) {
    lua_pushcfunction(L, m->func);
    lua_setfield(L, -2, m->name);
  }
  lua_getfield(L, -2, "loaded");
  lua_pushcfunction(L, preload_std);   /* one closure for every library */
  for (int i = 0; std_libs[i]; i++) {
    lua_getfield(L, -2, std_libs[i]);
    int loaded = !lua_isnil(L, -1);
    lua_pop(L, 1);
    if (!loaded) {
      lua_pushvalue(L, -1);
      lua_setfield(L, -4, std_libs[i]);
    }
  }
  lua_pop(L, 4);
}

/* -- require ---------------------------------------------------------------
 * LuaJIT's require is a C function that runs the module it loads: a
 * module's top level (tables built, files read; a spawn by module name
 * runs one for every process) could not be preempted, nor wait - receive
 * raised "cannot block here" - and one that looped held its scheduler for
 * ever. So a process's require is a Lua function of the host's (kept, see
 * mb_lstate_push_lua_fn) over two C functions: plan finds the module's
 * value or its loader, as the package library's require does, and done
 * records what the loader returned; the loader, most often the module's
 * main chunk, is called from Lua. plan's errors are raised at the line
 * that called require (level 2: its caller is require's Lua function),
 * as LuaJIT's are at its caller's.
 *
 * Opening the package library costs a process ~42k instructions (its
 * tables, paths and loaders, and after_package), a third of what a
 * connection process of moonbeam.http spends on its Lua state, while such
 * a process only requires modules that the host builds in or that the
 * module cache holds. So until the library opens, plan answers as the
 * library would in those cases (light_loader): from package.loaded, then
 * the host's modules, then package.preload (LuaJIT's libraries add entries
 * to it before the package library exists), then the first file of the
 * default package.path through the module cache. Anything else - a
 * standard library by name, a C module, a module that is not found -
 * opens the package library, and from then on plan asks its loaders
 * (package.path, preload or loaders may have changed). */
static const char require_src[] =
  "return function(plan, done)\n"
  "  local C = {require = plan}\n"
  "  return function(...)\n"
  "    local value, loader, name = C.require(...)\n"
  "    if loader == nil then return value end\n"
  "    return done(name, loader(name))\n"
  "  end\n"
  "end\n";
static mb_lstate_chunk_t require_chunk = MB_LSTATE_LIBCHUNK(require_src, "=require");

static int open_for(lua_State *L, const char *name, size_t len);

/* package.path and cpath as after_package makes them for a process that
 * inherited no others (codepath.h). */
static char *light_path, *light_cpath;
static char sentinel;       /* package.loaded[name] while name loads */

static int listed_in(const char *const *list, const char *name)
{
  for (; *list; list++)
    if (strcmp(*list, name) == 0)
      return 1;
  return 0;
}

/* Raise the formatted message at the line that called require, as
 * LuaJIT's require does: none if that is not a line of Lua (C, or
 * require itself, whose stripped code has none: a module's top level
 * that requires in a tail call). */
static int require_error(lua_State *L, const char *fmt, ...)
{
  va_list ap;
  lua_Debug ar;
  if (lua_getstack(L, 2, &ar) && lua_getinfo(L, "Sl", &ar) && ar.currentline > 0)
    lua_pushfstring(L, "%s:%d: ", ar.short_src, ar.currentline);
  else
    lua_pushliteral(L, "");
  va_start(ap, fmt);
  lua_pushvfstring(L, fmt, ap);
  va_end(ap);
  lua_concat(L, 2);
  return lua_error(L);
}

/* Push the loader of module name that the package library would give
 * without being open, or return 0 with nothing pushed: it must answer. */
static int light_loader(lua_State *L, const char *name)
{
  for (const luaL_Reg *m = host_modules; m->name; m++)
    if (strcmp(m->name, name) == 0) {
      lua_pushcfunction(L, m->func);
      return 1;
    }
  lua_getfield(L, LUA_REGISTRYINDEX, "_PRELOAD");
  if (lua_istable(L, -1)) {
    lua_getfield(L, -1, name);
    lua_remove(L, -2);
    if (lua_isfunction(L, -1))
      return 1;
  }
  lua_pop(L, 1);
  if (listed_in(std_libs, name) || listed_in(std_stand_ins, name) || light_path == NULL)
    return 0;
  unsigned cp = mb_proc_of(L)->codepath;
  return mb_modcache_find(L, name, cp ? mb_codepath_get(cp, 0) : light_path);
}

/* Push the loader of module name from the package library's loaders (at
 * idx, absolute), in order, as its require finds it: the first that
 * returns a function; the messages of the others (strings) tell what was
 * tried when none does. */
static void library_loader(lua_State *L, const char *name, int idx)
{
  if (!lua_istable(L, idx))
    require_error(L, "'package.loaders' must be a table");
  mb_run_calls_lua();
  lua_pushliteral(L, "");
  for (int i = 1;; i++) {
    lua_rawgeti(L, idx, i);
    if (lua_isnil(L, -1))
      require_error(L, "module '%s' not found:%s", name, lua_tostring(L, -2));
    lua_pushstring(L, name);
    lua_call(L, 1, 1);
    if (lua_isfunction(L, -1))
      break;
    if (lua_isstring(L, -1))
      lua_concat(L, 2);
    else
      lua_pop(L, 1);
  }
  lua_remove(L, -2);
}

/* Push package.loaded (made if there is none yet). */
static void push_loaded(lua_State *L)
{
  lua_pushliteral(L, "_LOADED");
  lua_rawget(L, LUA_REGISTRYINDEX);
  if (!lua_istable(L, -1)) {
    lua_pop(L, 1);
    luaL_findtable(L, LUA_REGISTRYINDEX, "_LOADED", 16);
  }
}

/* plan(name) -> value if the module is loaded; else nil, loader, name,
 * with package.loaded[name] marked as loading. */
static int require_plan(lua_State *L)
{
  if (!lua_isstring(L, 1))
    return require_error(L, "bad argument #1 to 'require' (string expected, got %s)",
                         lua_isnone(L, 1) ? "no value" : luaL_typename(L, 1));
  lua_settop(L, 1);
  const char *name = lua_tostring(L, 1);   /* (a number becomes its string) */
  push_loaded(L);
  lua_getfield(L, 2, name);
  if (lua_toboolean(L, -1)) {
    if (lua_touserdata(L, -1) == &sentinel)
      return require_error(L, "loop or previous error loading module '%s'", name);
    return 1;
  }
  lua_pop(L, 1);
  lua_rawgeti(L, LUA_REGISTRYINDEX, MB_REGSLOT_PACKAGE);
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    if (!light_loader(L, name)) {
      open_for(L, "package", 7);
      lua_rawgeti(L, LUA_REGISTRYINDEX, MB_REGSLOT_PACKAGE);
    }
  }
  if (lua_istable(L, -1)) {
    lua_getfield(L, -1, "loaders");
    library_loader(L, name, lua_gettop(L));
  } else if (!lua_isfunction(L, -1)) {
    return require_error(L, "require: the package library did not open");
  }
  lua_pushlightuserdata(L, &sentinel);
  lua_setfield(L, 2, name);
  lua_pushnil(L);
  lua_insert(L, -2);
  lua_pushvalue(L, 1);
  return 3;
}

/* done(name, value) -> package.loaded[name]: value, if not nil; else what
 * the module put there; else true. */
static int require_done(lua_State *L)
{
  lua_settop(L, 2);
  const char *name = lua_tostring(L, 1);
  push_loaded(L);
  if (!lua_isnil(L, 2)) {
    lua_pushvalue(L, 2);
    lua_setfield(L, 3, name);
  }
  lua_getfield(L, 3, name);
  if (lua_touserdata(L, -1) == &sentinel) {
    lua_pushboolean(L, 1);
    lua_pushvalue(L, -1);
    lua_setfield(L, 3, name);
  }
  return 1;
}

/* Push a process's require (made once per state). */
static void push_require(lua_State *L)
{
  static const lua_CFunction fns[] = {require_plan, require_done, NULL};
  mb_lstate_push_lua_fn(L, &require_chunk, fns);
}

/* require(name) in C: plan, the loader and done, each called from C. */
static int require_in_c(lua_State *L)
{
  mb_run_calls_lua();
  lua_settop(L, 1);
  lua_pushcfunction(L, require_plan);
  lua_pushvalue(L, 1);
  lua_call(L, 1, 3);            /* value, loader, name at 2, 3, 4 */
  if (lua_isnil(L, 3)) {
    lua_settop(L, 2);
    return 1;
  }
  lua_pushcfunction(L, require_done);
  lua_pushvalue(L, 4);
  lua_pushvalue(L, 3);
  lua_pushvalue(L, 4);
  lua_call(L, 1, 1);            /* the loader's value */
  lua_call(L, 2, 1);
  return 1;
}

int mb_lstate_require(lua_State *L, const char *name, size_t len)
{
  lua_pushliteral(L, "require");
  lua_rawget(L, LUA_GLOBALSINDEX);
  int made = !lua_isnil(L, -1);
  lua_pop(L, 1);
  if (made)
    return 0;
  lua_pushcfunction(L, require_in_c);
  lua_pushlstring(L, name, len);
  lua_call(L, 1, 1);
  return 1;
}

/* The default package.path of the host's processes, for light_loader:
 * what the package library and after_package make of it, on a probe. */
static int probe_path(lua_State *L)
{
  if (mb_lstate_noenv) {
    lua_pushboolean(L, 1);
    lua_setfield(L, LUA_REGISTRYINDEX, "LUA_NOENV");
  }
  open_lib(L, luaopen_package, "package");
  lua_getfield(L, LUA_GLOBALSINDEX, "package");
  set_host_path(L, lua_gettop(L));
  lua_getfield(L, -1, "path");
  lua_getfield(L, -2, "cpath");
  light_path = strdup(lua_tostring(L, -2));
  light_cpath = strdup(lua_tostring(L, -1));
  return 0;
}

/* A package path of the package table at t, or NULL if it is not a
 * string (the package library would not use it). */
static const char *path_of(lua_State *L, int t, const char *field)
{
  lua_pushstring(L, field);
  lua_rawget(L, t);
  const char *s = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
  lua_pop(L, 1);   /* still anchored by the table */
  return s;
}

int mb_lstate_codepath_sync(lua_State *L)
{
  mb_proc_t *p = mb_proc_of(L);
  if (!p->package_opened || light_path == NULL || light_cpath == NULL)
    return 0;
  lua_rawgeti(L, LUA_REGISTRYINDEX, MB_REGSLOT_PACKAGE);
  if (!lua_istable(L, -1)) {
    lua_pop(L, 1);
    return 0;
  }
  int t = lua_gettop(L);
  const char *path = path_of(L, t, "path"), *cpath = path_of(L, t, "cpath");
  if (path == NULL)
    path = light_path;
  if (cpath == NULL)
    cpath = light_cpath;
  unsigned cur = p->codepath;
  int id;
  if (cur && strcmp(path, mb_codepath_get(cur, 0)) == 0 &&
      strcmp(cpath, mb_codepath_get(cur, 1)) == 0)
    id = (int)cur;    /* the most frequent: nothing changed */
  else if (strcmp(path, light_path) == 0 && strcmp(cpath, light_cpath) == 0)
    id = 0;
  else
    id = mb_codepath_intern(path, cpath);
  lua_pop(L, 1);
  if (id < 0)
    return -1;
  if ((unsigned)id != cur) {   /* intern's reference goes to p */
    mb_codepath_unref(cur);
    p->codepath = (uint16_t)id;
  }
  return 0;
}

static void after_jit(lua_State *L)
{
  luaJIT_setmode(L, 0, LUAJIT_MODE_ENGINE | LUAJIT_MODE_OFF);
  lua_getfield(L, LUA_GLOBALSINDEX, "jit");
  mb_sandbox_jit(L);
  lua_pop(L, 1);
  mb_sandbox_preload(L, MB_SANDBOX_PRELOAD_PROFILE);
}

static void after_debug(lua_State *L)
{
  lua_getfield(L, LUA_GLOBALSINDEX, "debug");
  lua_pushcfunction(L, db_sethook);
  lua_setfield(L, -2, "sethook");
  lua_pushcfunction(L, db_gethook);
  lua_setfield(L, -2, "gethook");
  mb_sandbox_debug(L);
  lua_pop(L, 1);
}

/* -- The C stack ------------------------------------------------------------
 * LuaJIT 2.1 bounds the Lua stack, not the C stack: a Lua function that
 * recurses through a C function calling back into Lua (string.gsub's
 * replacement function, load's reader) nests that C function's frame at
 * each level, and gsub's holds ~9 KB (strmatch.c's matcher): ~1,000
 * levels ended an 8 MB stack with SIGSEGV - the whole host, where luajit
 * itself crashes too.
 * So those functions check the stack first and raise instead while less
 * than an eighth of the thread's stack is left: the scheduler threads'
 * 8 MB (scheduler.c) leave room for ~750 levels, and the last eighth for
 * whatever one level and the error's unwinding take. The bounds are the
 * thread's own (pthread_getattr_np), found at its first check; the stack
 * grows down on every target the host builds for. */
static _Thread_local uintptr_t cstack_floor;   /* 0: not known yet */

static uintptr_t cstack_find_floor(void)
{
  pthread_attr_t a;
  void *lo;
  size_t size;
  if (pthread_getattr_np(pthread_self(), &a) != 0)
    return 1;   /* unknown: no check */
  int rc = pthread_attr_getstack(&a, &lo, &size);
  pthread_attr_destroy(&a);
  return rc == 0 ? (uintptr_t)lo + size / 8 : 1;
}

void mb_lstate_cstack_check(lua_State *L)
{
  if (__builtin_expect(cstack_floor == 0, 0))
    cstack_floor = cstack_find_floor();
  if ((uintptr_t)__builtin_frame_address(0) < cstack_floor)
    luaL_error(L, "C stack overflow");
}

/* The string library opened into the table strings index from the start
 * (see setup): it no longer needs the lazy metatable; its pattern
 * functions are the host's, which a long match does not keep from being
 * preempted or ended (strmatch.h). */
static void after_string(lua_State *L)
{
  lua_getfield(L, LUA_REGISTRYINDEX, "_LOADED");
  lua_getfield(L, -1, "string");
  if (lua_istable(L, -1)) {
    lua_pushnil(L);
    lua_setmetatable(L, -2);
    mb_strmatch_open(L, -1);
  }
  lua_pop(L, 2);
  mb_sandbox_preload(L, MB_SANDBOX_PRELOAD_BUFFER);
}

static void after_table(lua_State *L)
{
  lua_getfield(L, LUA_REGISTRYINDEX, "_LOADED");
  lua_getfield(L, -1, "table");
  if (lua_istable(L, -1))
    mb_tablib_open(L, -1);
  lua_pop(L, 2);
}

/* Each process draws its own math.random sequence (LuaJIT seeds every
 * state alike): a seed from a host-wide counter mixed with a salt read once
 * at start, so no system call per process. math.randomseed still gives the
 * same sequence as in luajit. */
static uint64_t seed_salt;
static atomic_uint_fast64_t seed_seq;

static uint64_t splitmix64(uint64_t x)
{
  x += 0x9e3779b97f4a7c15u;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9u;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebu;
  return x ^ (x >> 31);
}

static void after_math(lua_State *L)
{
  lua_getfield(L, LUA_GLOBALSINDEX, "math");
  lua_getfield(L, -1, "randomseed");
  uint64_t x = splitmix64(seed_salt + atomic_fetch_add(&seed_seq, 1));
  lua_pushnumber(L, (lua_Number)(x >> 11));   /* 53 bits: exact in a double */
  lua_call(L, 1, 0);
  lua_pop(L, 1);
}

typedef struct lazylib {
  const char *name;          /* the library's name for luaopen */
  lua_CFunction open;
  void (*after)(lua_State *L);
  const char *globals;       /* space-separated global names it defines */
} lazylib_t;

static const lazylib_t lazylibs[] = {
  {"", luaopen_base, after_base,
   " assert collectgarbage dofile error getfenv getmetatable ipairs load"
   " loadfile loadstring next pairs pcall print rawequal rawget rawset select"
   " setfenv setmetatable tonumber tostring type unpack xpcall _VERSION"
   " newproxy gcinfo _G "},
  {"string", luaopen_string, after_string, " string "},
  {"table", luaopen_table, after_table, " table "},
  {"math", luaopen_math, after_math, " math "},
  {"io", luaopen_io, NULL, " io "},
  {"os", luaopen_os, after_os, " os "},
  {"package", luaopen_package, after_package, " package module "},
  {"debug", luaopen_debug, after_debug, " debug "},
  {"bit", luaopen_bit, NULL, " bit "},
  {"jit", luaopen_jit, after_jit, " jit "},
};

/* Is name one of the space-separated words of list? */
static int listed(const char *list, const char *name, size_t len)
{
  for (const char *s = strstr(list, name); s; s = strstr(s + 1, name))
    if (s[-1] == ' ' && s[len] == ' ')
      return 1;
  return 0;
}

/* Before luaopen_string: make the strings' placeholder table (see setup)
 * _G.string, where luaopen_string looks for the table to fill - unless the
 * process set a string global of its own. */
static void adopt_string(lua_State *L)
{
  lua_pushliteral(L, "string");
  lua_rawget(L, LUA_GLOBALSINDEX);
  int taken = !lua_isnil(L, -1);
  lua_pop(L, 1);
  if (taken)
    return;
  int top = lua_gettop(L);
  lua_pushliteral(L, "");
  if (lua_getmetatable(L, -1)) {
    lua_pushliteral(L, "__index");
    lua_rawget(L, -2);
    if (lua_istable(L, -1) && lua_getmetatable(L, -1) &&
        lua_getmetatable(L, LUA_GLOBALSINDEX) && lua_rawequal(L, -1, -2)) {
      lua_pushliteral(L, "string");
      lua_pushvalue(L, -4);
      lua_rawset(L, LUA_GLOBALSINDEX);
    }
  }
  lua_settop(L, top);
}

/* Open the library that defines global `name`; 1 if there was one. */
static int open_for(lua_State *L, const char *name, size_t len)
{
  if (memchr(name, '\0', len))
    return 0;   /* no library name has one; listed() relies on it */
  if (len == 7 && memcmp(name, "require", 7) == 0) {
    push_require(L);
    lua_setfield(L, LUA_GLOBALSINDEX, "require");
    return 1;
  }
  if (len == 9 && memcmp(name, "coroutine", 9) == 0) {
    lua_getfield(L, LUA_GLOBALSINDEX, "pcall");  /* base first */
    lua_pop(L, 1);
    lua_pushlightuserdata(L, &coroutine_key);
    lua_rawget(L, LUA_REGISTRYINDEX);
    int hidden = lua_istable(L, -1);
    lua_pop(L, 1);
    if (hidden)
      open_coroutine(L);
    return hidden;
  }
  for (size_t i = 0; i < sizeof lazylibs / sizeof *lazylibs; i++) {
    const lazylib_t *lib = &lazylibs[i];
    if (!listed(lib->globals, name, len))
      continue;
    lua_pushlightuserdata(L, (void *)lib);
    lua_rawget(L, LUA_REGISTRYINDEX);
    int opened = lua_toboolean(L, -1);
    lua_pop(L, 1);
    if (opened)
      return 0;
    lua_pushlightuserdata(L, (void *)lib);
    lua_pushboolean(L, 1);
    lua_rawset(L, LUA_REGISTRYINDEX);
    if (lib->open == luaopen_string)
      adopt_string(L);
    if (lib->open == luaopen_io || lib->open == luaopen_debug || lib->open == luaopen_jit)
      mb_proc_of(L)->lstate_tainted = 1;   /* see Reused states */
    if (lib->open == luaopen_base) {
      mb_proc_of(L)->base_opened = 1;
      if (restore_base(L))
        return 1;
    }
    /* The package library sets the global require to its own: the
     * process's stays (see require above), or, if it was not made yet,
     * will be made on first use. */
    int req = 0;
    if (lib->open == luaopen_package) {
      lua_pushliteral(L, "require");
      lua_rawget(L, LUA_GLOBALSINDEX);
      req = lua_gettop(L);
    }
    open_lib(L, lib->open, lib->name);
    if (lib->after)
      lib->after(L);
    if (req) {
      lua_pushliteral(L, "require");
      lua_pushvalue(L, req);
      lua_rawset(L, LUA_GLOBALSINDEX);
      lua_remove(L, req);
    }
    if (lib->open == luaopen_base)
      keep_base(L, lib->globals);
    return 1;
  }
  return 0;
}

/* _G's __index(t, k): open the library defining k, then rawget. The same
 * metatable serves the string table until the string library opens in it
 * (see setup): then any key opens it. */
static int lazy_global(lua_State *L)
{
  if (!lua_rawequal(L, 1, LUA_GLOBALSINDEX)) {
    open_for(L, "string", 6);
    lua_settop(L, 2);
    lua_rawget(L, 1);
    if (lua_isnil(L, -1)) {
      /* The library opened into another table (the placeholder was not
       * reachable then: _G.string replaced, or the string metatable
       * swapped out for a while): answer from that one. */
      lua_getfield(L, LUA_REGISTRYINDEX, "_LOADED");
      if (lua_istable(L, -1)) {
        lua_getfield(L, -1, "string");
        if (lua_istable(L, -1) && !lua_rawequal(L, -1, 1)) {
          lua_pushvalue(L, 2);
          lua_rawget(L, -2);
          return 1;
        }
      }
      lua_settop(L, 2);
      lua_pushnil(L);
    }
    return 1;
  }
  size_t len;
  const char *name = lua_type(L, 2) == LUA_TSTRING ? lua_tolstring(L, 2, &len) : NULL;
  if (name == NULL || len > 20 || memchr(name, ' ', len))
    return 0;
  if (!open_for(L, name, len))
    return 0;
  lua_settop(L, 2);
  lua_rawget(L, 1);
  return 1;
}

/* -- Reserved words --------------------------------------------------------
 * lua_newstate interns Lua's 22 reserved words and fixes them (never
 * collected): the lexer tells a keyword from a name by a byte of its
 * interned string. That is 712 bytes of every state, used only to compile
 * source, which most processes never do: their code arrives as bytecode
 * (spawned functions, the module cache). So the words are unfixed -
 * collectable like any string - when a process gets its state, new or
 * reused, and fixed again (interned anew if they went, and marked as
 * keywords) before anything compiles source in that state:
 * mb_lstate_lexer, called by the sandbox's loads (which load, loadstring,
 * loadfile, dofile and the module cache go through) and by the host's own
 * chunks. A load that skipped it would fail with a syntax error, never
 * misbehave: a keyword that is not known is read as a name.
 *
 * The public API has no way to do this, so it reaches into LuaJIT's string
 * header (lj_obj.h's GCstr, in the GC64 layout of x86-64): the layout is
 * checked at start-up on a probe state - each word's type, keyword number,
 * length and fixed mark where this code expects them, and an ordinary
 * string's too - and the words are left alone (fixed) if anything differs.
 * Measured: an idle process 12.67 -> 11.96 KB of RSS. */
typedef struct strhdr {
  void *nextgc;
  uint8_t marked, gct, reserved, hashalg;
  uint32_t sid, hash, len;
} strhdr_t;
#define STR_GCT 4          /* ~LJ_TSTR */
#define STR_FIXED 0x20     /* LJ_GC_FIXED */

/* lj_lex.h's order: a word's keyword number is its index + 1. */
static const char *const words[] = {"and", "break", "do", "else", "elseif",
  "end", "false", "for", "function", "goto", "if", "in", "local", "nil",
  "not", "or", "repeat", "return", "then", "true", "until", "while"};
#define NWORDS ((int)(sizeof words / sizeof *words))
static int words_movable;   /* the probe found the layout expected */

static strhdr_t *str_hdr(lua_State *L, int idx)
{
  return (strhdr_t *)(void *)(lua_tostring(L, idx) - sizeof(strhdr_t));
}

/* Are the words pinned? They are pinned and let go all together, so the
 * first one tells (no allocation: it exists, pinned, or was let go). */
static int words_pinned(lua_State *L)
{
  lua_pushliteral(L, "and");
  int pinned = str_hdr(L, -1)->marked & STR_FIXED;
  lua_pop(L, 1);
  return pinned;
}

/* On the probe state, under lua_cpcall: is every header where and as
 * expected? The answer in *(int *)ud. */
static int words_check(lua_State *L)
{
  int *ok = lua_touserdata(L, 1);
  *ok = 0;
  for (int i = 0; i < NWORDS; i++) {
    lua_pushstring(L, words[i]);
    strhdr_t *h = str_hdr(L, -1);
    if (h->gct != STR_GCT || h->reserved != i + 1 || !(h->marked & STR_FIXED) ||
        h->len != strlen(words[i]))
      return 0;
    lua_pop(L, 1);
  }
  lua_pushliteral(L, "moonbeam probe");
  strhdr_t *h = str_hdr(L, -1);
  *ok = h->gct == STR_GCT && h->reserved == 0 && !(h->marked & STR_FIXED) &&
        h->len == 14;
  return 0;
}

/* Let the words go (no allocation: they exist). */
static void words_unfix(lua_State *L)
{
  if (!words_movable || !words_pinned(L))
    return;
  for (int i = 0; i < NWORDS; i++) {
    lua_pushstring(L, words[i]);
    str_hdr(L, -1)->marked &= (uint8_t)~STR_FIXED;
    lua_pop(L, 1);
  }
}

void mb_lstate_lexer(lua_State *L)
{
  if (!words_movable || words_pinned(L))
    return;
  /* Interning finds a word still there (and revives it if a sweep was
   * about to free it), or makes it anew. */
  for (int i = 0; i < NWORDS; i++) {
    lua_pushstring(L, words[i]);
    strhdr_t *h = str_hdr(L, -1);
    h->reserved = (uint8_t)(i + 1);
    h->marked |= STR_FIXED;
    lua_pop(L, 1);
  }
}

/* -- State life ----------------------------------------------------------- */

/* Under lua_cpcall: the first full collection of a process's state, which
 * first lets go of the module chunks kept from earlier processes that this
 * one did not use, so that a process that needs none does not carry them. */
static int collect(lua_State *L)
{
  mb_modcache_drop_unused(L);
  lua_gc(L, LUA_GCCOLLECT, 0);
  return 0;
}

void mb_lstate_settle(mb_proc_t *p)
{
  if (p->settled || p->L == NULL)
    return;
  p->settled = 1;
  /* Protected: a finalizer may raise. Its error is dropped: the process
   * goes on as a GC step's would have let it. Only a tainted state can
   * hold Lua finalizers (see Reused states), which the ticker must be able
   * to stop (run.c, mb_run_host_lua). */
  if (p->lstate_tainted)
    mb_run_host_lua(p, 1);
  if (lua_cpcall(p->L, collect, NULL) != 0)
    lua_pop(p->L, 1);
  mb_run_host_lua(p, 0);
}

/* A parked state's allocator: it allocates nothing while parked. */
static mb_alloc_t parked;

/* An error outside any protected call: LuaJIT exits the host after this
 * (EXIT_FAILURE). Say so, where and why, instead of ending silently. */
static int panic(lua_State *L)
{
  char pid[MB_PID_TEXT_MAX];
  const char *msg = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "?";
  void *ud;
  lua_getallocf(L, &ud);
  fprintf(stderr, "moonbeam: fatal: an error outside any protected call in %s: %s\n",
          ud == &parked ? "a parked state" : mb_pid_format(pid, sizeof pid, ((mb_proc_t *)ud)->pid),
          msg);
  void *frames[32];
  backtrace_symbols_fd(frames, backtrace(frames, 32), 2);
  return 0;
}

/* What setup makes: the globals' first size (on a state whose last process
 * opened the base library, room for it, as the next one will likely open
 * it too - the same body, often - so that restore_base fills them without
 * the table's five rehashes on the way to 32, ~7k instructions; else
 * none), and whether a body coroutine, left at MB_REGSLOT_NEW_CO: every
 * allocation is made under the protected call, where running out of
 * memory is an error, not LuaJIT's panic. */
typedef struct setup_s {
  int globals;
  int new_co;
} setup_t;

/* Under lua_cpcall, with a setup_t. */
static int setup(lua_State *L)
{
  const setup_t *st = lua_touserdata(L, 1);
  int globals = st->globals;
  words_unfix(L);
  /* lua_newstate made a globals table of 64 slots (1.5 KB) while a
   * process's globals start empty and mostly stay few: it gets an empty
   * one, and the old one goes with the first collection (mb_lstate_settle).
   * A function made inside a C function takes that function's environment
   * - setup's, the old table - so the ones made here get the new one. */
  lua_createtable(L, 0, globals);
  lua_replace(L, LUA_GLOBALSINDEX);
  lua_createtable(L, 0, 1);
  lua_pushcfunction(L, lazy_global);
  lua_pushvalue(L, LUA_GLOBALSINDEX);
  lua_setfenv(L, -2);
  lua_setfield(L, -2, "__index");
  lua_pushvalue(L, -1);
  lua_setmetatable(L, LUA_GLOBALSINDEX);

  /* Strings index the string table from the start, as in luajit
   * (getmetatable("").__index.f = ... works), but the table stays empty,
   * with _G's lazy metatable, until first used: luaopen_string then fills
   * this same table (adopt_string puts it in _G first, where luaopen_string
   * looks; an idle process does not even hold the key "string"). */
  lua_createtable(L, 0, 0);
  lua_insert(L, -2);
  lua_setmetatable(L, -2);
  lua_pushliteral(L, "");
  if (!lua_getmetatable(L, -1)) {   /* a reused state's is there, empty */
    lua_createtable(L, 0, 1);
    lua_pushvalue(L, -1);
    lua_setmetatable(L, -3);
  }
  lua_pushvalue(L, -3);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 3);

  if (mb_lstate_noenv) {   /* -E: package ignores LUA_PATH and LUA_CPATH */
    lua_pushboolean(L, 1);
    lua_setfield(L, LUA_REGISTRYINDEX, "LUA_NOENV");
  }
  if (st->new_co) {
    lua_newthread(L);
    lua_rawseti(L, LUA_REGISTRYINDEX, MB_REGSLOT_NEW_CO);
  }
  return 0;
}

/* lua_newstate's first allocation is its GG_State: note its size. */
static size_t first_alloc;

static void *probe_alloc(void *ud, void *ptr, size_t osize, size_t nsize)
{
  (void)ud;
  (void)osize;
  if (nsize == 0) {
    free(ptr);
    return NULL;
  }
  if (ptr == NULL && first_alloc == 0)
    first_alloc = nsize;
  return realloc(ptr, nsize);
}

static char lua_dir[PATH_MAX];

const char *mb_lstate_lua_dir(void)
{
  return lua_dir;
}

/* The host's Lua modules: MB_LUA_REL_DIR from the binary's directory when
 * that exists (an installed host), else the source tree's lua/ (compiled
 * in; a build directory). */
static void find_lua_dir(void)
{
  char exe[PATH_MAX], cand[2 * PATH_MAX];
  ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
  char *slash = n > 0 ? (exe[n] = '\0', strrchr(exe, '/')) : NULL;
  if (slash) {
    *slash = '\0';
    snprintf(cand, sizeof cand, "%s/%s", exe, MB_LUA_REL_DIR);
    struct stat st;
    if (realpath(cand, lua_dir) && stat(lua_dir, &st) == 0 && S_ISDIR(st.st_mode))
      return;
  }
  snprintf(lua_dir, sizeof lua_dir, "%s", MB_LUA_DIR);
}


/* -- Reused states ----------------------------------------------------------
 * lua_newstate and lua_close are ~34k of a spawn's ~57k instructions and
 * ~37k of a hibernate + wake cycle's ~73k (callgrind): interning LuaJIT's
 * fixed strings (keywords, metamethod names) one by one, then freeing them
 * with a sweep of the string table. So the state of a process that returned
 * normally or hibernated is reset instead and kept in a small pool of its
 * scheduler's, where the next spawn or wake on that scheduler takes it.
 *
 * A reset leaves nothing of the old process reachable: the registry is
 * emptied (every library, module and reference of the old process goes
 * with it; only host-made values stay, see kept_slot), the globals are
 * dropped and the string metatable emptied,
 * the GC's parameters are LuaJIT's defaults again, and the new process's
 * setup builds its globals as on a fresh state. The old world is then
 * garbage that the state's next collection frees (C finalizers, such as an
 * HTTP parser's, which only free memory, run then). What a reset cannot
 * undo lives in LuaJIT's global state and is only reachable through
 * libraries a process opts into; a state is closed, never reused, when its
 * process:
 *  - opened debug (hooks, the metatables of basic types, any upvalue), jit
 *    (the JIT's flags, event handlers) or io (the default files are GC
 *    roots of the state);
 *  - called newproxy (a finalizer in Lua could run during the next
 *    process's life, with getfenv(0) = that process's globals);
 *  - tried to load a C module (mb_lstate_taint from the sandbox's C
 *    loader: such modules' finalizers find their types' metatables by
 *    name in the registry, luaL_checkudata, so after a reset they would
 *    raise instead of freeing; lpeg's patterns leaked their code so);
 *  - crashed, was killed, or ran out of memory (left mid-way);
 *  - or the host runs with --allow-ffi (ctypes, callbacks, loaded C
 *    modules) or --allow-bytecode (hand-made bytecode may corrupt a state).
 * A state that holds more than REUSE_MAX is closed too, as is any state the
 * pool has no room for; a process whose max_memory the old garbage would
 * fill by a quarter starts on a collected state. The pools are emptied
 * after the schedulers stop. */

#define POOL_MAX 8
/* A state holding more than this (garbage included) is closed, not reset:
 * freeing a big old world object by object costs the same in lua_close as
 * in a collection, and a collection marks what lives besides. An HTTP
 * connection process holds ~57-72 KB and a reused one carries its
 * predecessors' garbage until its first collection: at 64 KB most were
 * closed; at 256 KB a connection costs ~242k instructions instead of ~277k
 * (callgrind) and the connection-per-request row went from 19.3k to 20.8k
 * requests/s (no collection at reset: the next process's own cycles free
 * the garbage). A pool holds at most POOL_MAX x 256 KB per scheduler. */
#define REUSE_MAX (256 * 1024)
#define REUSE_HEADROOM (48 * 1024)

typedef struct pool {
  int n;
  lua_State *L[POOL_MAX];
  size_t used[POOL_MAX];     /* bytes each state holds */
  uint64_t body_serial[POOL_MAX];   /* its kept body's (run.c) */
  uint8_t base[POOL_MAX];    /* its last process opened the base library */
  struct pool *next;         /* all threads' pools, for pools_free */
} pool_t;

static _Thread_local pool_t *my_pool;
static pool_t *pools;
static pthread_mutex_t pools_lock = PTHREAD_MUTEX_INITIALIZER;
static int reuse_off;        /* --allow-ffi or --allow-bytecode */

/* The host's memory went down: this scheduler's parked states are closed.
 * A parked state lives on from process to process, and the blocks it was
 * born with (its strings, its string table) sit in pages of the young Lua
 * heap among those of states long closed (alloc.c): a few parked states
 * kept hundreds of otherwise empty pages resident (chatidle, 19,000 users:
 * 2.3-2.4 KB/user with parked states kept, 1.9 without reuse). */
static void pool_empty(pool_t *pl)
{
  while (pl->n > 0) {
    pl->n--;
    mb_alloc_t a;                   /* ud for its last frees: not a process */
    memset(&a, 0, sizeof a);
    lua_setallocf(pl->L[pl->n], mb_alloc_fn, &a);
    lua_close(pl->L[pl->n]);
  }
}

static void pool_drain(void)
{
  if (my_pool)
    pool_empty(my_pool);
}

static void pools_free(void)
{
  pthread_mutex_lock(&pools_lock);
  for (pool_t *pl = pools, *next; pl; pl = next) {
    next = pl->next;
    pool_empty(pl);
    free(pl);
  }
  pools = NULL;
  pthread_mutex_unlock(&pools_lock);
}

/* This thread's pool, made on first use; NULL off the schedulers (the
 * main thread closes the processes left at halt: nothing would take their
 * states). */
static pool_t *pool(void)
{
  if (my_pool == NULL && mb_sched_self() != NULL) {
    pool_t *pl = calloc(1, sizeof *pl);
    if (pl == NULL)
      return NULL;
    pthread_mutex_lock(&pools_lock);
    pl->next = pools;
    pools = pl;
    pthread_mutex_unlock(&pools_lock);
    my_pool = pl;
  }
  return my_pool;
}

/* Registry slots a reset keeps: the ids' metatables and intern tables,
 * lib_mb.c's builder of DOWN and EXIT messages, run.c's last body (its
 * upvalues emptied), the base library (keep_base), the modules' main
 * chunks (modcache.c; their environment reset): host-made, nothing of the
 * process. */
static int kept_slot(double k)
{
  return mb_id_regslot(k) || k == MB_REGSLOT_SIGNAL_MSG || k == MB_REGSLOT_BODY_FN ||
         k == MB_REGSLOT_BASE || k == MB_REGSLOT_CHUNKS || k == MB_REGSLOT_HTTP_MT ||
         k == MB_REGSLOT_GUARD_MT || k == MB_REGSLOT_LUAFNS;
}

/* Under lua_cpcall: the old world unreachable (see Reused states). */
static int reset_roots(lua_State *L)
{
  /* The registry is emptied in place: a new table stored in its slot (a GC
   * root, marked once at the start of a cycle, with no write barrier)
   * could be freed by a cycle under way. */
  lua_pushnil(L);
  while (lua_next(L, LUA_REGISTRYINDEX)) {
    lua_pop(L, 1);
    if (lua_type(L, -1) == LUA_TNUMBER && kept_slot(lua_tonumber(L, -1)))
      continue;
    lua_pushvalue(L, -1);
    lua_pushnil(L);
    lua_rawset(L, LUA_REGISTRYINDEX);
  }
  lua_createtable(L, 0, 0);
  lua_replace(L, LUA_GLOBALSINDEX);
  mb_modcache_reset_kept(L);   /* nothing of this process in the kept chunks */
  reset_lua_fns(L);
  /* The last body, kept for the next process (run.c), holds nothing of
   * this one: no upvalue's value, the new empty globals. */
  lua_rawgeti(L, LUA_REGISTRYINDEX, MB_REGSLOT_BODY_FN);
  if (lua_isfunction(L, -1)) {
    for (int i = 1; lua_pushnil(L), lua_setupvalue(L, -2, i) != NULL; i++)
      ;
    lua_pop(L, 1);
    lua_pushvalue(L, LUA_GLOBALSINDEX);
    lua_setfenv(L, -2);
  }
  lua_pop(L, 1);
  /* The string metatable stays, emptied, and setup fills it again:
   * setting a basic type's metatable flushes LuaJIT's traces (~200
   * instructions with the JIT off, twice a spawn). Its own metatable goes
   * too (a process may have given it one). */
  lua_pushliteral(L, "");
  if (lua_getmetatable(L, -1)) {
    lua_pushnil(L);
    lua_setmetatable(L, -2);
    lua_pushnil(L);
    while (lua_next(L, -2)) {
      lua_pop(L, 1);
      lua_pushvalue(L, -1);
      lua_pushnil(L);
      lua_rawset(L, -4);
    }
  }
  return 0;
}

/* The next GC cycle of a reset state: as at birth (LuaJIT starts a new
 * state's first cycle at 4x its size), after another ~48 KB, so that a
 * process that runs and ends pays no GC step; LuaJIT's default pause and
 * step multiplier after (the old process may have changed them, or
 * stopped the GC). */
static void reset_gc(lua_State *L, size_t used)
{
  size_t total = used > 1024 ? used : 1024;
  lua_gc(L, LUA_GCSETPAUSE, (int)(100 * (total + REUSE_HEADROOM) / total));
  lua_gc(L, LUA_GCRESTART, -1);
  lua_gc(L, LUA_GCSETPAUSE, 200);
  lua_gc(L, LUA_GCSETSTEPMUL, 200);
}

static void drop_host_side(mb_proc_t *p)
{
  p->L = p->co = NULL;
  for (int i = 0; i < p->nfncodes; i++)
    if (p->fncodes[i].code)
      mb_code_unref(p->fncodes[i].code);
  mb_free(p->fncodes);
  p->fncodes = NULL;
  p->nfncodes = p->fncode_next = 0;
  mb_free(p->costack);
  p->costack = NULL;
  p->con = p->cocap = 0;
}

void mb_lstate_recycle(mb_proc_t *p)
{
  lua_State *L = p->L;
  pool_t *pl = L ? pool() : NULL;
  if (pl == NULL || pl->n == POOL_MAX || reuse_off || p->lstate_tainted ||
      p->alloc.oom || atomic_load_explicit(&p->alloc.used, memory_order_relaxed) > REUSE_MAX) {
    mb_lstate_close(p);
    return;
  }
  p->alloc.limit = 0;  /* C finalizers may allocate */
  /* A body coroutine that returned is kept for the next process, in slot 1
   * (its environment is set then; no process can have kept a reference to
   * it: a body is not a coroutine to Lua, coroutine.running() is nil). */
  int keep_co = lua_status(p->co) == 0 && lua_gettop(p->co) == 0;
  /* The body the state keeps (run.c): the first function its boot loaded,
   * fncodes[0] unless replaced since. */
  uint64_t body = 0;
  if (p->nfncodes > 0 && p->fncodes[0].code) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, MB_REGSLOT_BODY_FN);
    if (lua_topointer(L, -1) == p->fncodes[0].fn)
      body = mb_code_serial(p->fncodes[0].code);
    lua_pop(L, 1);
  }
  drop_host_side(p);
  lua_settop(L, keep_co);
  if (lua_cpcall(L, reset_roots, NULL) != 0) {
    lua_close(L);      /* still p's: p->alloc.used goes back to 0 */
    return;
  }
  reset_gc(L, atomic_load_explicit(&p->alloc.used, memory_order_relaxed));
  pl->used[pl->n] = atomic_exchange_explicit(&p->alloc.used, 0, memory_order_relaxed);
  pl->body_serial[pl->n] = body;
  pl->base[pl->n] = p->base_opened;
  lua_setallocf(L, mb_alloc_fn, &parked);
  pl->L[pl->n++] = L;
}

/* The code object serial of the body kept by the state mb_lstate_new gave
 * last on this thread (see run.c, load_body), or 0. */
static _Thread_local uint64_t kept_body;

uint64_t mb_lstate_kept_body(void)
{
  return kept_body;
}

/* A parked state of this scheduler's pool for p, or NULL; *base: whether
 * its last process opened the base library. */
static lua_State *pool_take(mb_proc_t *p, int *base)
{
  pool_t *pl = my_pool;
  if (pl == NULL || pl->n == 0)
    return NULL;
  pl->n--;
  *base = pl->base[pl->n];
  lua_State *L = pl->L[pl->n];
  atomic_store_explicit(&p->alloc.used, pl->used[pl->n], memory_order_relaxed);
  kept_body = pl->body_serial[pl->n];
  mb_alloc_young(&p->alloc);   /* its new process's blocks: as a new state's */
  lua_setallocf(L, mb_alloc_fn, p);
  return L;
}

/* lua_newstate's allocator. With no limit, a block is refused only when
 * the host is out of memory, and the first refusal gave back the host's
 * reserve (alloc.c): asked again, it is there. If it is not, the host ends
 * as mb_must says, rather than in LuaJIT's crash (see mb_lstate_new). */
static void *newstate_alloc(void *ud, void *ptr, size_t osize, size_t nsize)
{
  void *b = mb_alloc_fn(ud, ptr, osize, nsize);
  if (b == NULL && nsize > 0)
    b = mb_must(mb_alloc_fn(ud, ptr, osize, nsize));
  return b;
}

int mb_lstate_new(mb_proc_t *p)
{
  p->alloc.limit = p->alloc.max;
  p->alloc.oom = 0;
  p->lstate_tainted = 0;
  p->base_opened = 0;
  p->package_opened = 0;
  kept_body = 0;
  int base = 0;
  lua_State *L = pool_take(p, &base);
  if (L && p->alloc.max &&
      atomic_load_explicit(&p->alloc.used, memory_order_relaxed) > p->alloc.max / 4) {
    /* The old garbage would take a good part of max_memory: collected
     * first, with the limit lifted (the state may already be over it).
     * Not under a large limit: an HTTP connection's 64 MiB, where a
     * collection of the last connection's world cost 133k instructions. */
    p->alloc.limit = 0;
    int rc = lua_cpcall(L, collect, NULL);
    p->alloc.limit = p->alloc.max;
    if (rc != 0) {
      lua_close(L);
      return -1;
    }
  }
  if (L == NULL) {
    /* Not under the process's limit, and with newstate_alloc: LuaJIT 2.1
     * (this build) crashes when one of lua_newstate's own allocations
     * fails (its cleanup sweeps a string table it has not made yet: a
     * spawn_opt with a max_memory of a few KB ended the host). Its ~12 KB
     * are counted all the same, and setup, under the limit again, fails
     * cleanly when they are over it. */
    p->alloc.limit = 0;
    L = lua_newstate(newstate_alloc, p);
    p->alloc.limit = p->alloc.max;
    if (L == NULL)
      return -1;
    lua_setallocf(L, mb_alloc_fn, p);
    lua_atpanic(L, panic);
    luaJIT_setmode(L, 0, LUAJIT_MODE_ENGINE | LUAJIT_MODE_OFF);
  }
  int kept_co = lua_gettop(L) == 1;
  setup_t st = {base ? 32 : 0, !kept_co};
  if (lua_cpcall(L, setup, &st) != 0) {
    lua_close(L);
    return -1;
  }
  /* A woken state is meant to live until the next hibernation: it need
   * not settle. */
  p->settled = p->wakes > 0;
  /* The body coroutine stays anchored in slot 1 of the main thread; a
   * reused state may have kept its last one (mb_lstate_recycle), whose
   * environment becomes the new globals, as a new thread's would. */
  if (kept_co) {
    p->co = lua_tothread(L, 1);
    lua_pushvalue(L, LUA_GLOBALSINDEX);
    lua_xmove(L, p->co, 1);
    lua_replace(p->co, LUA_GLOBALSINDEX);
  } else {
    /* Made by setup; moved to the stack, which has room (no allocation),
     * and the slot emptied (a key that exists: no allocation either). */
    lua_rawgeti(L, LUA_REGISTRYINDEX, MB_REGSLOT_NEW_CO);
    p->co = lua_tothread(L, -1);
    lua_pushnil(L);
    lua_rawseti(L, LUA_REGISTRYINDEX, MB_REGSLOT_NEW_CO);
  }
  /* LuaJIT starts a state's first GC cycle only at 4x its size at birth
   * (~56 KB here), so a small process would carry all its garbage until
   * then. It is not started at birth (lua_gc(LUA_GCRESTART) cost a spawn
   * that runs and ends ~8% in useless GC steps), but when the process first
   * goes idle (mb_lstate_settle), which also sets the next cycle at the
   * usual pause (2x live). Measured: a chat user 43 -> 38 KB. */
  p->L = L;
  if (lua_gethook(L))          /* a reused state's, from its last process */
    lua_sethook(L, NULL, 0, 0);
  return 0;
}

void mb_lstate_taint(lua_State *L)
{
  mb_proc_t *p = mb_proc_of(L);
  if (p)
    p->lstate_tainted = 1;
}

/* The allocator of a tainted state's close. lua_close runs the state's
 * finalizers, which the ticker must be able to stop (run.c,
 * mb_run_host_lua), and frees the state's own block last: that block holds
 * the hook mask a poke writes, so the host's work on the state ends just
 * before it goes. The process is the allocator's data, as always
 * (mb_proc_of). */
static void *closing_alloc(void *ud, void *ptr, size_t osize, size_t nsize)
{
  mb_proc_t *p = ud;
  if (nsize == 0 && ptr == (void *)p->L)
    mb_run_host_lua(p, 0);
  return mb_alloc_fn(ud, ptr, osize, nsize);
}

void mb_lstate_close(mb_proc_t *p)
{
  if (p->L == NULL)
    return;
  p->alloc.limit = 0;  /* finalizers may allocate */
  if (p->lstate_tainted) {
    /* Only a tainted state can hold Lua finalizers (see Reused states). */
    lua_setallocf(p->L, closing_alloc, p);
    mb_run_host_lua(p, 1);
  }
  lua_close(p->L);
  drop_host_side(p);
}

/* The moonbeam module is kept at a registry slot (MB_REGSLOT_MOONBEAM),
 * not only in package.loaded: a process whose code only captures it (most
 * spawned functions) never opens the package library, and a package.loaded
 * made for it alone cost an idle process ~230 bytes (the table, its four
 * slots, the names "_LOADED" and "moonbeam"). Once the package library
 * opens, package.loaded.moonbeam is the same table (after_package), so
 * require "moonbeam" gives what the captures give. */
void mb_lstate_push_module(lua_State *L)
{
  lua_rawgeti(L, LUA_REGISTRYINDEX, MB_REGSLOT_MOONBEAM);
  if (!lua_isnil(L, -1))
    return;
  lua_pop(L, 1);
  lua_getfield(L, LUA_REGISTRYINDEX, "_LOADED");
  int loaded = lua_istable(L, -1);
  if (loaded)
    lua_getfield(L, -1, "moonbeam");   /* required before anything captured it */
  else
    lua_pushnil(L);
  if (!lua_istable(L, -1)) {
    lua_pop(L, 1);
    lua_pushcfunction(L, mb_lib_open);
    lua_call(L, 0, 1);
    if (loaded) {
      lua_pushvalue(L, -1);
      lua_setfield(L, -3, "moonbeam");
    }
  }
  lua_remove(L, -2);
  lua_pushvalue(L, -1);
  lua_rawseti(L, LUA_REGISTRYINDEX, MB_REGSLOT_MOONBEAM);
}

void mb_lstate_init(void)
{
  find_lua_dir();
  /* A probe state: the size of a state's first block, whether the reserved
   * words can be let go, the default package.path (without it,
   * require opens the package library at once). */
  lua_State *P = lua_newstate(probe_alloc, NULL);
  if (P) {
    int ok = 0;
    words_movable = lua_cpcall(P, words_check, &ok) == 0 && ok;
    lua_cpcall(P, probe_path, NULL);
    lua_close(P);
  }
  mb_alloc_state_arena(first_alloc);
  reuse_off = mb_sandbox_opts.allow_ffi || mb_sandbox_opts.allow_bytecode;
  mb_sched_add_after_loops(pools_free);
  mb_sched_add_on_collect(pool_drain);

  mb_copy_on_ffi_bytecode = mb_sandbox_hide_ffi;
  if (getrandom(&seed_salt, sizeof seed_salt, 0) != sizeof seed_salt)
    seed_salt = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
}
