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
 * Changes to the standard libraries, made when each one opens:
 *  - base: coroutine.resume and coroutine.wrap are replaced by wrappers that
 *    pass runtime yields (preemption, receive, sleep) up to the scheduler
 *    instead of handing them to the user's resumer;
 *  - os: os.exit(code) halts the host with that code;
 *  - package: path and cpath start with the host's lua/ directory, then the
 *    usual LuaJIT and Debian Lua 5.1 directories;
 *  - jit: the JIT stays off (a count hook does not run in compiled code).
 * Known consequence: pairs(_G) lists only the libraries opened so far, and
 * setmetatable(_G, ...) replaces the lazy lookup (open what you need first).
 */
#ifndef MB_LSTATE_H
#define MB_LSTATE_H

#include "proc.h"

/* Once, before the schedulers start. */
void mb_lstate_init(void);

/* Create p->L and p->co for p (owner: p). Returns 0, or -1 when out of
 * memory. Any thread. */
int mb_lstate_new(mb_proc_t *p);
/* Close p's state, if any. */
void mb_lstate_close(mb_proc_t *p);

/* Push the moonbeam module table of L's state (creating it once). */
void mb_lstate_push_module(lua_State *L);

/* Address of the C function behind coroutine wrappers' resume, so the
 * scheduler can recognise its frames as safe. */
extern lua_CFunction mb_lstate_resume_cf;
/* The C function pointers of pcall and xpcall (LuaJIT fast functions), and
 * of load (whose reader runs under a C-level protected call). */
extern lua_CFunction mb_lstate_pcall_cf, mb_lstate_xpcall_cf, mb_lstate_load_cf;

/* Maximal nesting of user coroutines the runtime tracks. */
#define MB_MAX_COROUTINES 200

#endif
