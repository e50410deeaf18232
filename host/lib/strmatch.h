/* strmatch.h: string.find, string.match, string.gmatch and string.gsub,
 * preemptible.
 *
 * DESIGN
 * LuaJIT runs its pattern functions in C, where the count hook never
 * fires. A backtracking pattern (string.rep("a?", 40) .. string.rep("a",
 * 40)) or a quadratic one over a hostile input (the usual trim,
 * "^%s*(.-)%s*$", over a megabyte of spaces) held its scheduler for
 * minutes or for good, and no exit signal could end it: two such calls
 * froze a two-scheduler host. These are the same four functions, with
 * LuaJIT 2.1's behaviour (results, errors and their texts, its limits of
 * 32 captures and 200 nested match levels, a pattern ending at its first
 * NUL), run by a matcher that keeps its backtracking in an explicit stack
 * of frames instead of C recursion, so that it can stop between two steps.
 *
 * Every PM_POLL steps (a step is one pattern item tried; a scan over the
 * subject counts its length) it asks the runner whether to stop
 * (mb_run_due: the ticker's poke, a counted slice's budget, an exit
 * signal, the halt). Where the process can yield (mb_run_can_yield), the
 * call suspends: its matcher moves into a userdata and the process yields
 * as preempted with that continuation (mb_run_suspend), which its next
 * slices run until the match ends; the call then returns its results to
 * its Lua caller as if it had not stopped. Where it cannot yield (inside a
 * C callback), it goes on, as a Lua loop there does, but an exit signal
 * ends it with an error, as the count hook does there.
 *
 * Limits. A continuation cannot raise an error at the call site, so a
 * call that suspends checks its whole pattern first (and gsub's
 * replacement string) and raises at once an error the matcher would meet
 * further on: a malformed pattern, a capture index that cannot be valid,
 * an unfinished capture, or "pattern too complex" for a pattern whose
 * items could nest more than 200 levels on that subject - also where
 * LuaJIT would never have reached that part. gsub with a function or
 * table replacement is a Lua loop that calls them (strmatch.c, "gsub
 * calling Lua"), so that they run where the process can yield, and its
 * matcher suspends as find's; where the check finds an error in the
 * pattern, the C gsub does the call, calling Lua from its C frame, where
 * the matcher cannot suspend (an exit signal still ends it). One scan (a repetition's
 * greedy count, %b, a back-reference) is not cut: it is at most the
 * subject's length. find with plain = true (or a pattern without magic
 * characters) searches with memmem, in linear time (LuaJIT's own plain
 * search is quadratic at worst).
 *
 * Threads: the owner thread of the process whose state calls them.
 */
#ifndef MB_STRMATCH_H
#define MB_STRMATCH_H

#include "lua.h"

/* Put find, match, gmatch and gsub into the string library's table at
 * index idx of L, in place of LuaJIT's. May raise (out of memory). */
void mb_strmatch_open(lua_State *L, int idx);

#endif
