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
 * the caller's line as before. In the interpreter the Lua sort is as fast
 * as the C one calling a Lua comparator (each call from C costs what the
 * sort's own bytecode does). Same results, same order of equal elements,
 * the same errors; an error that comparing raises in the Lua sort's own
 * lines (no comparator, an element without __lt) names table.sort's line.
 *
 * Threads: the owner thread of the process whose state opens it.
 */
#ifndef MB_TABLIB_H
#define MB_TABLIB_H

#include "lua.h"

/* Replace sort in the table library's table at index idx of L. */
void mb_tablib_open(lua_State *L, int idx);

#endif
