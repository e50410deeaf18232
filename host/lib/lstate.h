/* lstate.h: building and closing a process's lua_State.
 *
 * DESIGN
 * A process should hold only what it uses (an idle process must stay small
 * and spawning must be cheap), so a new state opens no library at all.
 * Globals resolve lazily: _G has a metatable whose __index opens the library
 * that defines the name asked for (print -> base, string -> string, require
 * -> package, ...) and then answers from _G as usual; strings get a
 * placeholder metatable that opens the string library on first method call.
 * The `moonbeam` module is preloaded, and is installed without the package
 * library when a spawned function's upvalue refers to it.
 *
 * A state whose process returned or hibernated is reset and reused by the
 * next spawn or wake on its scheduler, unless its process opted into what a
 * reset cannot undo (lstate.c, "Reused states"): lua_newstate and lua_close
 * were more than half of a spawn.
 *
 * The string table exists from the start (strings index it, as in luajit)
 * but stays empty, with the same lazy metatable, until first used.
 *
 * Changes to the standard libraries, made when each one opens (and those
 * of sandbox.h: text-only loading, no FFI, no JIT):
 *  - base: coroutine.resume and coroutine.wrap are replaced by wrappers that
 *    pass runtime yields (preemption, receive, sleep) up to the scheduler
 *    instead of handing them to the user's resumer; coroutine.yield and
 *    coroutine.running treat the process body (and the main thread, where
 *    receive's match functions run) as luajit treats its main chunk: no
 *    yield ("attempt to yield across C-call boundary"), running() is nil;
 *  - debug: sethook/gethook chain the user's hook with the scheduler's count
 *    hook (the user's events arrive as asked, preemption goes on, gethook
 *    never shows the scheduler's hook);
 *  - math: each process gets its own random seed;
 *  - string: gsub checks the C stack first (mb_lstate_cstack_check);
 *  - os: os.exit(code) halts the host with that code;
 *  - package: path starts with the host's Lua directory (mb_lstate_lua_dir),
 *    then the usual LuaJIT and Debian Lua 5.1 directories; a process whose
 *    parent had other paths (or that hibernated with others) gets those
 *    (codepath.h);
 *  - jit: the JIT stays off (a count hook does not run in compiled code).
 * Known consequence: pairs(_G) lists only the libraries opened so far,
 * pairs(string) is empty until a string function was used, and
 * setmetatable(_G, ...) replaces the lazy lookup (open what you need first).
 */
#ifndef MB_LSTATE_H
#define MB_LSTATE_H

#include <pthread.h>

#include "code.h"
#include "proc.h"

/* Once, before the schedulers start (and after mb_lstate_noenv and
 * mb_sandbox_opts are set). */
void mb_lstate_init(void);

/* -E: every process's package library ignores LUA_PATH and LUA_CPATH. */
extern int mb_lstate_noenv;

/* Bring the entry of L's process's package paths (mb_proc_t.codepath,
 * codepath.h) up to date with its package table, before it spawns (the new
 * process takes a reference to it) or hibernates (it wakes with it). 0, or
 * -1 when no entry can be made (the process keeps the one it had). May
 * raise (out of memory). */
int mb_lstate_codepath_sync(lua_State *L);

/* The directory of the host's Lua modules: ../share/moonbeam/lua from the
 * binary when it exists (installed), else the source tree's lua/. */
const char *mb_lstate_lua_dir(void);

/* Create p->L and p->co for p (owner: p). Returns 0, or -1 when out of
 * memory. Any thread. */
int mb_lstate_new(mb_proc_t *p);
/* The first time p blocks with nothing to do, collect its state fully, so
 * that an idle process keeps only what it uses: the garbage of its start
 * (LuaJIT's 64-slot globals table, which the process replaced with an
 * empty one; a boot's temporaries). Once per state, ~2.5 us, paid by the
 * processes that wait, not by those that just run and end. Owner thread,
 * the body suspended. */
void mb_lstate_settle(mb_proc_t *p);

/* Close p's state, if any. */
void mb_lstate_close(mb_proc_t *p);
/* L's state may not be reused: its process loads a C module (see "Reused
 * states" in lstate.c). */
void mb_lstate_taint(lua_State *L);
/* The serial of the code object whose function the state mb_lstate_new
 * gave last on this thread keeps from its last process (run.c reuses it
 * for the same body), or 0. */
uint64_t mb_lstate_kept_body(void);
/* p returned or hibernates: reset its state for the next spawn or wake on
 * this scheduler, or close it if it cannot be reused (see lstate.c,
 * "Reused states"). Owner thread, the body finished or suspended for good. */
void mb_lstate_recycle(mb_proc_t *p);

/* Push the moonbeam module table of L's state (creating it once). */
void mb_lstate_push_module(lua_State *L);

/* For the host's C code that needs a module (a message's decoder): push
 * require(name) and return 1, without making the process's require (a
 * Lua function, ~850 bytes of the state) if the process has not touched
 * it; return 0 with nothing pushed if it has: then call the process's
 * own, which it may have replaced. May raise, as require does. */
int mb_lstate_require(lua_State *L, const char *name, size_t len);

/* A function of the host's written in Lua: its source is compiled once for
 * the host, and each state loads that bytecode (cheaper than compiling,
 * and the sandbox's bytecode ban is for processes' code, not the host's).
 * Define one as MB_LSTATE_CHUNK(source, "=name"), or as
 * MB_LSTATE_LIBCHUNK(source, "=name") for a chunk whose bytecode goes
 * without its debug information (line numbers, names: half its size), as
 * the library functions of mb_lstate_push_lua_fn, which every state that
 * opens their library holds. */
typedef struct mb_lstate_chunk {
  const char *src;
  size_t srclen;
  const char *name;
  pthread_mutex_t lock;
  mb_code_t *code;           /* its bytecode, once made (held for the host's life) */
  int strip;                 /* made without debug information */
} mb_lstate_chunk_t;
#define MB_LSTATE_CHUNK(src, name) { src, sizeof src - 1, name, PTHREAD_MUTEX_INITIALIZER, NULL, 0 }
#define MB_LSTATE_LIBCHUNK(src, name) { src, sizeof src - 1, name, PTHREAD_MUTEX_INITIALIZER, NULL, 1 }

/* Push what chunk c returns when run with the table at env (an absolute or
 * pseudo index, not a relative one) as its environment. May raise (out of
 * memory). */
void mb_lstate_run_chunk(lua_State *L, mb_lstate_chunk_t *c, int env);

/* A library function of the host's written in Lua, where a C one could not
 * be preempted while the Lua it calls runs (a table.sort comparator). Chunk
 * c returns a maker: a function of the C functions cfns (NULL-ended) that
 * makes the library function and returns it, then every other function it
 * made. Push it, made once per state and kept for the processes that reuse
 * the state, with L's globals as the environment of all those functions
 * (a process reaches them: getfenv(2) in a comparator; a chunk keeps
 * nothing of a process in an upvalue past a call). May raise (out of
 * memory). */
void mb_lstate_push_lua_fn(lua_State *L, mb_lstate_chunk_t *c, const lua_CFunction *cfns);
/* The same for a part of fn's, made when first needed (what most
 * processes never run need not be in every state): chunk part returns a
 * maker of no arguments, which returns the functions of the part; push
 * the first, kept with fn's (c: its chunk, made already in L's state). */
void mb_lstate_push_lua_part(lua_State *L, mb_lstate_chunk_t *c, mb_lstate_chunk_t *part);

/* Make L's state able to compile Lua source: its reserved words known to
 * the lexer again (see lstate.c, "Reserved words"). Before every load of
 * source text into a process's state; may raise (out of memory). */
void mb_lstate_lexer(lua_State *L);

/* Raise "C stack overflow" when the calling thread's C stack is nearly
 * used up. For the C functions that call back into Lua with a large frame
 * of their own (string.gsub's and load's 8 KB buffers): recursion through
 * them reaches the end of the C stack long before the Lua stack's limit,
 * and LuaJIT 2.1 checks no C stack depth, so the host would crash. */
void mb_lstate_cstack_check(lua_State *L);

/* Set the scheduler's count hook to fire after `count` instructions, or
 * (count 0) take it off, keeping a debug hook the process set (see DESIGN;
 * under a debug hook the scheduler's hook still polls every
 * MB_HOOK_INSTRUCTIONS). The scheduler's only way to change its hook.
 * Owner thread. */
void mb_lstate_sethook(lua_State *L, int count);
/* lua_sethook under the scheduler's preemption lock (scheduler.h): every
 * hook change of a process's state goes through it. Owner thread. */
void mb_lstate_set_hook(lua_State *L, lua_Hook f, int mask, int count);
/* Is L's process running its debug hook function now? It may not block
 * there (LuaJIT cannot yield out of a hook). */
int mb_lstate_in_user_hook(lua_State *L);

/* Maximal nesting of user coroutines the runtime tracks. */
#define MB_MAX_COROUTINES 200

#endif
