/* modcache.h: a host-wide cache of compiled Lua modules for `require`.
 *
 * DESIGN
 * Every process has its own state, so every process that requires a module
 * loads it again; a process per connection, or one waking from hibernation,
 * would otherwise read and parse the module's source each time (measured:
 * 324 us for moonbeam.http, 28 KB of source). The cache keeps each module
 * file's compiled main chunk as a code object (code.h, shared by all) and
 * loads that bytecode instead (7 us for the same module), so the parse
 * happens once per file. The first process that requires a module compiles
 * it from source and runs that; later ones run the dump.
 *
 * Bytecode loses nothing that matters: lua_dump drops the nil-valued keys
 * that LuaJIT's template tables use to presize constructors
 * ({a = x, b = y}), which made a constructor of 10 such fields 3.3x slower
 * in dumped code; the cache interns the dump with those keys put back
 * (code.h's mb_code_dump, bcdump.h).
 *
 * Descriptors: finding a module's file (access) and checking an entry
 * (stat) open nothing; only a compile reads the file. So a host with every
 * file descriptor taken still loads what it has compiled.
 *
 * Staleness: an entry is used without a look at its file for
 * MB_MODCACHE_CHECK_MS after the last check; then the file is stat'ed and
 * recompiled if its size or mtime changed. So an edited module reaches new
 * processes within a second, as a developer expects.
 *
 * Threads: any; one mutex.
 */
#ifndef MB_MODCACHE_H
#define MB_MODCACHE_H

#include "lua.h"

#define MB_MODCACHE_CHECK_MS 1000

/* Replace package.loaders[2] (the Lua-file searcher) of L's state with the
 * caching one. The package library must be open. */
void mb_modcache_install(lua_State *L);

/* package.searchpath's search, opening no file (with every file
 * descriptor taken, LuaJIT's finds nothing): push the first of path's
 * templates (package.path's syntax), with name's dots as directory
 * separators, that is a readable file; 1 if one is. Otherwise 0, and with
 * `list` push what LuaJIT's searchpath returns then ("\n\tno file '...'"
 * for each file). */
int mb_modcache_search(lua_State *L, const char *name, const char *path, int list);

/* mb_modcache_search, but what a name resolves to on a path, a file or
 * none, is remembered host-wide for MB_MODCACHE_CHECK_MS. For the
 * Lua-file searcher and the C loaders (sandbox.c). */
int mb_modcache_locate(lua_State *L, const char *name, const char *path, int list);

/* Push the loaded chunk of module `name` from the first file of `path` (in
 * package.path's syntax) that exists, as the caching searcher would; 1 if
 * a file matched, 0 (nothing pushed) if none did. For `require` before the
 * package library is open (lstate.c): it needs neither package.searchpath
 * nor package.path. Raises if the file does not load. */
int mb_modcache_find(lua_State *L, const char *name, const char *path);

/* The main chunks a reused state keeps (modcache.c, "Chunks kept in a
 * reused state"). At a reset (lstate.c): none of them holds anything of
 * the process that ends. At a process's first collection: let go of those
 * it did not use. */
void mb_modcache_reset_kept(lua_State *L);
void mb_modcache_drop_unused(lua_State *L);

/* Drop every entry (at shutdown). */
void mb_modcache_clear(void);

#endif
