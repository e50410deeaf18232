/* tablib.h: table.sort, preemptible where it calls Lua.
 *
 * DESIGN
 * LuaJIT's table.sort is C, and it calls the comparator (or the elements'
 * __lt) from C: the process cannot yield there, so a preemption waits
 * until the sort returns. A sort of a million elements by a comparator
 * held its scheduler for a second; a comparator that never returned held
 * it for ever (only kill reached it), and a receive inside one raised.
 * Here table.sort is a Lua function that runs LuaJIT's algorithm in Lua
 * where Lua is called - a comparator, or elements whose __lt is a Lua
 * function - and hands everything else (no Lua to call, or a bad
 * argument) to LuaJIT's C sort, by a tail call, so that its errors name
 * the caller's line as before. A sort with a comparator takes half the
 * time LuaJIT's did in the host (a call from C costs more than the sort's
 * own bytecode); the Lua sort is made in a state when first needed, so a
 * state that opens the table library holds ~0.8 KB more, not ~2 KB
 * (BENCHMARKS.md). Same results, same order of equal elements,
 * the same errors; an error that comparing raises in the Lua sort's own
 * code (elements whose __lt differ, say) reads "table.sort:0: ..." where
 * LuaJIT's has no position.
 *
 * Threads: the owner thread of the process whose state opens it.
 */
#ifndef MB_TABLIB_H
#define MB_TABLIB_H

#include "lua.h"

/* Replace sort in the table library's table at index idx of L. */
void mb_tablib_open(lua_State *L, int idx);

#endif
