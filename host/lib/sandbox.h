/* sandbox.h: what a process may load - text chunks only, no FFI, no JIT -
 * unless the host was started to trust its code.
 *
 * DESIGN
 * Every process shares the host's address space, so code that can write
 * memory (the FFI, package.loadlib, string.buffer's raw pointers) or that
 * LuaJIT does not verify (bytecode: flipped bytes in a string.dump crash the
 * VM) could take down every process at once. By default a process gets
 * neither: the libraries are patched when they open (lstate.c opens them
 * lazily and calls the functions below right after each one):
 *  - base: load, loadstring, loadfile and dofile accept text chunks only
 *    ("attempt to load a binary chunk"); load's reader function runs under
 *    pcall from here, not under LuaJIT's C-level protected call (an error
 *    thrown there from a debug hook would leave hooks off for good);
 *  - package: the Lua file loader is text-only too (modcache.c's, which
 *    replaces LuaJIT's, compiles through mb_sandbox_loadbuffer); package.loadlib is
 *    refused; the C loaders refuse LuaJIT's own library openers (a cpath
 *    pointing at libluajit would give back an unpatched library);
 *    require "ffi" gives a stand-in whose every function (and ffi.C) raises
 *    an error naming --allow-ffi: code that only loads the module (busted
 *    does, on LuaJIT) still runs, code that uses it learns why it cannot;
 *  - string.buffer: ref, reserve, putcdata and set(cdata, len) - the
 *    methods that take or give raw pointers - raise;
 *  - debug: getregistry raises (the registry holds the host's own state,
 *    the hidden FFI among it);
 *  - jit: jit.on raises (the JIT stays off: a count hook does not run in
 *    compiled code, so compiled code could not be preempted), jit.attach
 *    raises (its handlers run with hooks off), jit.profile is refused (one
 *    profiler per OS process, tied to one state).
 * LuaJIT loads its FFI by itself when it parses a 64-bit literal (1LL) or
 * reads bytecode that has one; that registers package.loaded.ffi, which
 * mb_sandbox_hide_ffi moves to a private registry key after each such load
 * (the module must stay alive: LuaJIT's C side points into its tables).
 * --allow-ffi and --allow-bytecode (mb_sandbox_opts) turn each back on for
 * trusted code; the JIT stays off either way.
 * The host's own C code (the message codec) loads bytecode with
 * luaL_loadbuffer directly: it only ever loads what lua_dump produced.
 */
#ifndef MB_SANDBOX_H
#define MB_SANDBOX_H

#include <stddef.h>

#include "lua.h"

/* Host-wide rules, set by main before the schedulers start. */
typedef struct mb_sandbox_opts {
  int allow_ffi;       /* --allow-ffi: ffi, loadlib, buffer pointers */
  int allow_bytecode;  /* --allow-bytecode: binary chunks load */
} mb_sandbox_opts_t;
extern mb_sandbox_opts_t mb_sandbox_opts;

/* luaL_loadbufferx and luaL_loadfilex under the rules above: a binary
 * chunk fails with LUA_ERRSYNTAX and "attempt to load a binary chunk ..."
 * unless bytecode is allowed. path NULL reads stdin. */
int mb_sandbox_loadbuffer(lua_State *L, const char *buf, size_t len,
                          const char *name, const char *mode);
int mb_sandbox_loadfile(lua_State *L, const char *path, const char *mode);

/* Patch a library that lstate.c just opened (see DESIGN). base: _G;
 * package: the package table at the top of the stack; jit: the jit table
 * at the top. */
void mb_sandbox_base(lua_State *L);
void mb_sandbox_package(lua_State *L);
void mb_sandbox_jit(lua_State *L);
/* debug: the debug table at the top of the stack. */
void mb_sandbox_debug(lua_State *L);
/* (Re)install our package.preload entries (which: MB_SANDBOX_PRELOAD_*
 * bits): ffi and string.buffer after package opens, string.buffer again
 * after string and jit.profile after jit, whose luaopen puts LuaJIT's own
 * entries there. */
#define MB_SANDBOX_PRELOAD_FFI 1
#define MB_SANDBOX_PRELOAD_BUFFER 2
#define MB_SANDBOX_PRELOAD_PROFILE 4
void mb_sandbox_preload(lua_State *L, int which);

/* Hide package.loaded.ffi unless the FFI is allowed (see DESIGN). */
void mb_sandbox_hide_ffi(lua_State *L);

#endif
