/* bcdump.h: LuaJIT's bytecode dumps, read and repaired for loading elsewhere.
 *
 * DESIGN
 * Code reaches most processes as bytecode: a spawned or sent function is
 * lua_dump'ed once and loaded into each receiver (copy.h, code.h), a module
 * is compiled from source once and loaded from its dump by every later
 * process (host/lib/modcache.c), and so are the host's own Lua chunks. But
 * lua_dump does not write everything the compiler made. A table
 * constructor with non-constant fields, `{hop = h + 1, from = me}` or
 * `{"ok", v}`, compiles to a copy of a template table (TDUP) followed by a
 * store per field (TSETS, TSETB); the compiler puts each such field's key
 * in the template with a nil value, so that the copy comes presized and
 * each store finds its slot. The dump keeps only a template's non-nil
 * entries, so after a load the copy starts empty and every field grows
 * the table by a rehash: a 2-field message ~260 instructions more a hop of
 * the ring (scripts/benchmarks/ring.lua), a 10-field constructor ~2.7x
 * slower (../shared/LUAJIT-FACTS.md).
 *
 * mb_bcdump_presize puts those keys back: it walks each prototype's
 * bytecode, and for every TDUP adds to its template, with nil values, the
 * string keys the stores into that register name after it (TSETS), and
 * array slots up to the small integer indices they name (TSETB), as the
 * compiler had them. The walk is a window of straight-line instructions
 * up to the next table made in the same register: it can take a key of a
 * later store into that register that is not the constructor's (a field
 * set just after, even under an `if`, or the register reused). That
 * presizes one slot more, which doubles the hash part when the
 * constructor's keys were a power of two: code that copies a template on
 * a hot path keeps such stores out of the window (a function of its own).
 * A nil-valued key is invisible to Lua (pairs, next, # skip it; a read
 * gives nil), so nothing a program can see changes; its string is kept
 * alive by the prototype, whose store names it too.
 *
 * It is not exact, neither here nor in the compiler's own templates:
 * LuaJIT's key insertion (lj_tab_newkey) takes a node whose value is nil
 * for a new key whose main position it is, so a template built with
 * nil-valued keys - by the compiler or by the loader reading the dump -
 * loses those that a later key collides with, and every copy inserts them
 * again at its stores. Which collide depends on the state's string hash
 * seed (random per state): measured on moonbeam.http_conn's 10-key request
 * table, 1.5 to 3 insertions a copy. The copy is still presized (no
 * rehash); a hot constructor avoids it with constant placeholders
 * overwritten at once (moonbeam.http_conn's request table).
 *
 * The opcode numbers are not part of LuaJIT's API: they are learnt once
 * from a probe chunk compiled and dumped by the LuaJIT the host runs on,
 * and if the probe does not come out as expected (another LuaJIT), or a
 * dump cannot be read, the dump is left as it is.
 *
 * Format: LuaJIT's lj_bcdump.h describes it; a dump is a header and the
 * prototypes, children first, each with its length. Threads: any.
 */
#ifndef MB_BCDUMP_H
#define MB_BCDUMP_H

#include <stddef.h>

/* If dump (len bytes, as lua_dump wrote it) has templates to repair,
 * returns a malloc'ed repaired copy (free it with free) and its length in
 * *outlen; else NULL, and the dump is to be used as it is. NULL too when
 * memory runs out: the dump still loads, only slower. */
unsigned char *mb_bcdump_presize(const unsigned char *dump, size_t len, size_t *outlen);

#endif
