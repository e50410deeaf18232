/* hookmask.h: letting the count hook into code LuaJIT runs with hooks
 * held off - __gc finalizers and debug hook functions.
 *
 * DESIGN
 * LuaJIT keeps a state's hook settings in one byte of its global_State,
 * the hook mask. Besides the events asked for it holds two flags of its
 * own: "a hook is active", set while a hook function runs and while a
 * __gc finalizer runs, and "a finalizer runs". Its dispatcher calls no
 * hook while the first is set, so a finalizer that looped
 * (getmetatable(newproxy(true)).__gc = function() while true do end end),
 * or a debug hook function that did, held its scheduler for good: no
 * preemption, no exit signal, no halt reached it.
 *
 * The public API cannot see or change those flags, so this reaches into
 * the byte itself. Its place is not assumed but found at start-up on a
 * probe state, as lstate.c finds the string header's: the byte that
 * follows every lua_sethook mask, is clear of both flags outside a
 * finalizer and has both inside one (a C __gc run by a full collection).
 * If no single byte does, this stays off and such code runs as LuaJIT
 * runs it.
 *
 * A preemption that finds its process in such code (run.c, preempt: the
 * ticker's signal, on the process's own thread) clears the "active" flag,
 * so the count hook fires there. It cannot yield there (both are called
 * from C); the hook lets it run on for a budget of instructions and then
 * raises an error - LuaJIT passes a finalizer's on, as any finalizer
 * error, to the code whose allocation ran the collector, and a hook
 * function's to the code it hooked. An exit signal or the halt ends it
 * the same way. The flag is written only on the owner's thread: a signal
 * handler runs between two of the owner's instructions, so an owner's
 * read-modify-write of the byte around it may take the change back (the
 * next poke makes it again), never the reverse. */
#ifndef MB_HOOKMASK_H
#define MB_HOOKMASK_H

#include "lua.h"

/* Find the hook mask (see DESIGN). Once, at start-up, before any process
 * runs. */
void mb_hookmask_init(void);

/* Is a __gc finalizer running in L's state now? 0 when the hook mask was
 * not found. Owner thread. */
int mb_hookmask_in_gc(lua_State *L);

/* Let the count hook fire in L's state now, inside a finalizer or a hook
 * function that holds it off. Owner thread (a signal handler on it may
 * call this). */
void mb_hookmask_unhold(lua_State *L);

/* Hold hooks off again: for the host's hook dispatcher when the user's
 * hook function returns into it, where LuaJIT counts on the flag (a yield
 * from a hook without it is taken for a C function's, and resumes into a
 * frame that is not there). Owner thread. */
void mb_hookmask_hold(lua_State *L);

#endif
