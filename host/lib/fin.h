/* fin.h: __gc finalizers under the count hook.
 *
 * DESIGN
 * LuaJIT runs a __gc finalizer from inside the collector with hooks held
 * off: it sets two flags in the state's hook mask for the call (the hook
 * is "active", and a finalizer runs), and its dispatcher calls no hook
 * while the first is set. A finalizer that loops
 * (getmetatable(newproxy(true)).__gc = function() while true do end end)
 * therefore held its scheduler for good: no preemption, no exit signal,
 * no halt reached it.
 *
 * The public API cannot see or change those flags, so this reaches into
 * the hook mask itself, a byte of LuaJIT's global_State. Its place is not
 * assumed but found at start-up on a probe state, as lstate.c finds the
 * string header's: the byte that follows every lua_sethook mask, is clear
 * of both flags outside a finalizer and has both inside one (a C __gc run
 * by a full collection). If no single byte does, this stays off and
 * finalizers are as LuaJIT runs them.
 *
 * A preemption that finds its process in a finalizer (run.c, preempt:
 * the ticker's signal, on the process's own thread) clears the "active"
 * flag, so the count hook fires there. It cannot yield there (the
 * finalizer is a C call); the hook lets it run on for a bounded number of
 * instructions and then raises an error, which LuaJIT passes on, as any
 * finalizer's error, to the code whose allocation ran the collector. An
 * exit signal or the halt ends it the same way. The flag is written only
 * on the owner's thread: the handler runs between two of the owner's
 * instructions, so an owner's read-modify-write of the byte around it may
 * take the change back (the next poke makes it again), never the
 * reverse. */
#ifndef MB_FIN_H
#define MB_FIN_H

#include "lua.h"

/* Find the hook mask (see DESIGN). Once, at start-up, before any process
 * runs. */
void mb_fin_init(void);

/* Is a __gc finalizer running in L's state now? 0 when the hook mask was
 * not found. Owner thread. */
int mb_fin_running(lua_State *L);

/* If a finalizer runs in L's state, let the count hook fire there. Owner
 * thread (a signal handler on it may call this). */
void mb_fin_unhold(lua_State *L);

#endif
