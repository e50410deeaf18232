/* sandbox.c: the loaders and library patches that keep a process from
 * loading bytecode, the FFI or the JIT (see sandbox.h for what and why).
 */
#define _GNU_SOURCE   /* RTLD_NODELETE */
#include <dlfcn.h>
#include <string.h>

#include "lauxlib.h"
#include "lualib.h"
#include "lstate.h"
#include "modcache.h"
#include "run.h"
#include "sandbox.h"

mb_sandbox_opts_t mb_sandbox_opts;

/* LuaJIT's message when a chunk does not match the mode asked for. */
static const char XMODE_MSG[] = "attempt to load chunk with wrong mode";
#define BINARY_MSG "attempt to load a binary chunk (mode is 't'; " \
  "moonbeam --allow-bytecode allows bytecode)"
#define FFI_HINT "start moonbeam with --allow-ffi to trust code with it"
/* What LuaJIT's ffi.os and ffi.arch say on the platforms Moonbeam builds on. */
#define LJ_OS_NAME_STUB "Linux"
#if defined(__x86_64__)
#define LJ_ARCH_NAME_STUB "x64"
#elif defined(__aarch64__)
#define LJ_ARCH_NAME_STUB "arm64"
#else
#define LJ_ARCH_NAME_STUB "unknown"
#endif

/* -- Loading text only ---------------------------------------------------- */

/* The mode LuaJIT gets: the caller's, without 'b' unless bytecode is
 * allowed. Returns the literal "t" exactly when the caller allowed text. */
static const char *load_mode(const char *mode)
{
  if (mb_sandbox_opts.allow_bytecode)
    return mode;
  if (mode == NULL || strchr(mode, 't'))
    return "t";
  return "";
}

/* After a load: say "binary chunk" where LuaJIT says "wrong mode" for a
 * chunk that had text allowed (so it was binary); hide an FFI the parser
 * loaded for a 64-bit literal. */
static int after_load(lua_State *L, int status, const char *mode,
                      const char *path)
{
  if (status == LUA_ERRSYNTAX && mode != NULL && mode[0] == 't' &&
      !mb_sandbox_opts.allow_bytecode) {
    const char *msg = lua_tostring(L, -1);
    if (msg && strcmp(msg, XMODE_MSG) == 0) {
      lua_pop(L, 1);
      if (path)
        lua_pushfstring(L, "%s: " BINARY_MSG, path);
      else
        lua_pushliteral(L, BINARY_MSG);
    }
  }
  mb_sandbox_hide_ffi(L);
  return status;
}

/* Before a load: the parser may load the FFI (for a 64-bit literal), and
 * LuaJIT then keeps the module alive only through package.loaded - if
 * there is one: a state with no package library yet (libraries open
 * lazily) would have the module, and the tables LuaJIT's C side points
 * into, collected under it. */
static void before_load(lua_State *L)
{
  mb_lstate_lexer(L);   /* the reserved words, if the state let them go */
  lua_pushliteral(L, "_LOADED");
  lua_rawget(L, LUA_REGISTRYINDEX);
  int has = lua_istable(L, -1);
  lua_pop(L, 1);
  if (!has) {
    lua_pushliteral(L, "_LOADED");
    lua_newtable(L);
    lua_rawset(L, LUA_REGISTRYINDEX);
  }
}

int mb_sandbox_loadbuffer(lua_State *L, const char *buf, size_t len,
                          const char *name, const char *mode)
{
  mode = load_mode(mode);
  before_load(L);
  return after_load(L, luaL_loadbufferx(L, buf, len, name, mode), mode, NULL);
}

int mb_sandbox_loadfile(lua_State *L, const char *path, const char *mode)
{
  mode = load_mode(mode);
  before_load(L);
  return after_load(L, luaL_loadfilex(L, path, mode), mode,
                    path ? path : "stdin");
}

/* What load and loadfile return: the function (with env, if a table was
 * given at envidx), or nil and the message. */
static int load_result(lua_State *L, int status, int envidx)
{
  if (status == 0) {
    if (lua_istable(L, envidx)) {
      lua_pushvalue(L, envidx);
      lua_setfenv(L, -2);
    }
    return 1;
  }
  lua_pushnil(L);
  lua_insert(L, -2);
  return 2;
}

/* Call load's reader until it returns nil or "", and push the pieces as one
 * string. The reader runs under pcall (upvalue 1), not under lua_load's
 * C-level protected call: an error thrown there from a debug hook would
 * leave LuaJIT's hooks off for good (see LUAJIT-FACTS.md), and with them
 * preemption. Returns 0, or pushes a message and returns LUA_ERRRUN. */
static int read_chunk(lua_State *L, int reader)
{
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  for (;;) {
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_pushvalue(L, reader);
    lua_call(L, 1, 2);
    if (!lua_toboolean(L, -2)) {
      lua_remove(L, -2);
      return LUA_ERRRUN;
    }
    lua_remove(L, -2);
    int t = lua_type(L, -1);
    if (t == LUA_TNIL || ((t == LUA_TSTRING || t == LUA_TNUMBER) &&
                          lua_objlen(L, -1) == 0)) {
      lua_pop(L, 1);
      break;
    }
    if (t != LUA_TSTRING && t != LUA_TNUMBER) {
      lua_pop(L, 1);
      lua_pushliteral(L, "reader function must return a string");
      return LUA_ERRRUN;
    }
    luaL_addvalue(&b);
  }
  luaL_pushresult(&b);
  return 0;
}

/* load(chunk[, chunkname[, mode[, env]]]) -> function | nil, err
 * loadstring is the same function, as in LuaJIT. chunk is a string or a
 * reader function. */
static int sb_load(lua_State *L)
{
  const char *name = luaL_optstring(L, 2, NULL);
  const char *mode = luaL_optstring(L, 3, NULL);
  int status;
  lua_settop(L, 4);
  if (lua_type(L, 1) == LUA_TSTRING || lua_type(L, 1) == LUA_TNUMBER) {
    size_t len;
    const char *s = lua_tolstring(L, 1, &len);
    status = mb_sandbox_loadbuffer(L, s, len, name ? name : s, mode);
  } else {
    luaL_checktype(L, 1, LUA_TFUNCTION);
    mb_lstate_cstack_check(L);   /* a reader may call load again */
    mb_run_calls_lua();
    status = read_chunk(L, 1);
    if (status == 0) {
      size_t len;
      const char *s = lua_tolstring(L, -1, &len);
      status = mb_sandbox_loadbuffer(L, s, len, name ? name : "=(load)", mode);
    }
  }
  return load_result(L, status, 4);
}

/* loadfile([path[, mode[, env]]]) -> function | nil, err */
static int sb_loadfile(lua_State *L)
{
  const char *path = luaL_optstring(L, 1, NULL);
  const char *mode = luaL_optstring(L, 2, NULL);
  lua_settop(L, 3);
  return load_result(L, mb_sandbox_loadfile(L, path, mode), 3);
}

/* dofile([path]) -> results of the chunk */
static int sb_dofile(lua_State *L)
{
  const char *path = luaL_optstring(L, 1, NULL);
  lua_settop(L, 1);
  if (mb_sandbox_loadfile(L, path, NULL) != 0)
    return lua_error(L);
  lua_call(L, 0, LUA_MULTRET);
  return lua_gettop(L) - 1;
}

void mb_sandbox_base(lua_State *L)
{
  lua_pushliteral(L, "pcall");
  lua_rawget(L, LUA_GLOBALSINDEX);
  lua_pushcclosure(L, sb_load, 1);
  lua_pushvalue(L, -1);
  lua_setfield(L, LUA_GLOBALSINDEX, "loadstring");
  lua_setfield(L, LUA_GLOBALSINDEX, "load");
  lua_pushcfunction(L, sb_loadfile);
  lua_setfield(L, LUA_GLOBALSINDEX, "loadfile");
  lua_pushcfunction(L, sb_dofile);
  lua_setfield(L, LUA_GLOBALSINDEX, "dofile");
}

/* -- package -------------------------------------------------------------- */

/* LuaJIT's own library openers: a C loader that finds one of these (a
 * package.cpath naming libluajit, require "x-ffi") would hand out an
 * unpatched library. */
static const struct {
  lua_CFunction f;
  const char *name;
} openers[] = {
  {luaopen_base, "base"}, {luaopen_math, "math"}, {luaopen_string, "string"},
  {luaopen_table, "table"}, {luaopen_io, "io"}, {luaopen_os, "os"},
  {luaopen_package, "package"}, {luaopen_debug, "debug"}, {luaopen_bit, "bit"},
  {luaopen_jit, "jit"}, {luaopen_ffi, "ffi"},
  {luaopen_string_buffer, "string.buffer"},
};

/* A C loader's function, unless it is one of LuaJIT's own openers (see
 * above; with --allow-ffi any goes). Returns 1 with it on top. */
static int checked_c(lua_State *L, const char *name)
{
  lua_CFunction f = lua_tocfunction(L, -1);
  for (size_t i = 0; f && !mb_sandbox_opts.allow_ffi && i < sizeof openers / sizeof *openers; i++)
    if (f == openers[i].f)
      return luaL_error(L, "module " LUA_QS ": LuaJIT's own library " LUA_QS
                        " cannot be loaded from package.cpath (" FFI_HINT ")",
                        name, openers[i].name);
  return 1;
}

/* package.loaders[3] and [4](name): LuaJIT's C loader and its loader of a
 * dotted name's root (upvalue 1), with a search of package.cpath that opens
 * no file (modcache.h) first. LuaJIT's opens each candidate: with every
 * file descriptor taken, a new process could not require a C module that
 * the host had loaded long before (dlopen of a library already loaded
 * opens nothing). So the file is found here and its luaopen_ function
 * asked of LuaJIT's package.loadlib (upvalue 2), which does what LuaJIT's
 * loaders do with it; a library that does not load raises their error. A
 * library loaded so stays loaded until the host exits (as an Erlang NIF
 * library stays with its module), so later processes find it there.
 * Anything else - no such file, a library without the function (LuaJIT's
 * loaders then look for a module built into it as bytecode, and word
 * their errors) - goes to LuaJIT's loader as before. Upvalue 3: true for
 * the root loader. */
static int loader_c(lua_State *L)
{
  mb_lstate_taint(L);   /* a library it opens stays registered (LOADLIB) */
  const char *name = luaL_checkstring(L, 1);
  int root = lua_toboolean(L, lua_upvalueindex(3));
  const char *dot = strchr(name, '.');
  lua_getfield(L, LUA_GLOBALSINDEX, "package");
  lua_getfield(L, -1, "cpath");
  if (lua_type(L, -1) == LUA_TSTRING && (!root || dot)) {
    if (root)
      lua_pushlstring(L, name, (size_t)(dot - name));
    else
      lua_pushvalue(L, 1);
    int found = mb_modcache_locate(L, lua_tostring(L, -1), lua_tostring(L, -2), 0);
    if (found) {
      /* luaopen_ and the name after any '-', its dots as '_' */
      const char *mark = strchr(name, '-');
      lua_pushvalue(L, lua_upvalueindex(2));
      lua_pushvalue(L, -2);
      lua_pushstring(L, "luaopen_");
      luaL_gsub(L, mark ? mark + 1 : name, ".", "_");
      lua_concat(L, 2);
      lua_call(L, 2, 3);
      if (lua_iscfunction(L, -3)) {
        /* Loaded for good: LuaJIT closes a library with the last state
         * that loaded it, and the next process's require would open,
         * map and link the file again. */
        dlopen(lua_tostring(L, -4), RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE);
        lua_pop(L, 2);
        return checked_c(L, name);
      }
      /* A library that does not load is an error of LuaJIT's loaders too;
       * theirs would not find the file if it was a descriptor it lacked. */
      const char *where = lua_tostring(L, -1);
      if (where && strcmp(where, "open") == 0)
        return luaL_error(L, "error loading module " LUA_QS " from file " LUA_QS ":\n\t%s",
                          name, lua_tostring(L, -4), lua_tostring(L, -2));
    }
  }
  lua_settop(L, 1);
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_insert(L, 1);
  lua_call(L, 1, 1);
  return checked_c(L, name);
}

/* package.searchpath(name, path[, sep[, rep]]): LuaJIT's (upvalue 1), but
 * for the usual separators, searched without opening the files (modcache.h):
 * with every file descriptor taken, LuaJIT's found none (a supervisor's
 * check of a {module} child's module, before a restart, failed so). */
static int searchpath(lua_State *L)
{
  const char *name = luaL_checkstring(L, 1);
  const char *path = luaL_checkstring(L, 2);
  if (lua_gettop(L) > 2) {
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, lua_gettop(L) - 1, LUA_MULTRET);
    return lua_gettop(L);
  }
  if (mb_modcache_search(L, name, path, 1))
    return 1;
  lua_pushnil(L);
  lua_insert(L, -2);
  return 2;
}

/* package.loadlib(path, funcname) -> nil, err, "absent" */
static int loadlib_refused(lua_State *L)
{
  lua_pushnil(L);
  lua_pushliteral(L, "package.loadlib is off in Moonbeam processes (" FFI_HINT ")");
  lua_pushliteral(L, "absent");
  return 3;
}

void mb_sandbox_package(lua_State *L)
{
  int pkg = lua_gettop(L);
  lua_getfield(L, pkg, "loaders");
  lua_getfield(L, pkg, "loadlib");
  if (lua_istable(L, -2) && lua_isfunction(L, -1)) {
    for (int i = 3; i <= 4; i++) {
      lua_rawgeti(L, -2, i);
      if (lua_isfunction(L, -1)) {
        lua_pushvalue(L, -2);
        lua_pushboolean(L, i == 4);
        lua_pushcclosure(L, loader_c, 3);
        lua_rawseti(L, -3, i);
      } else {
        lua_pop(L, 1);
      }
    }
  }
  lua_pop(L, 2);
  lua_getfield(L, pkg, "searchpath");
  if (lua_isfunction(L, -1)) {
    lua_pushcclosure(L, searchpath, 1);
    lua_setfield(L, pkg, "searchpath");
  } else {
    lua_pop(L, 1);
  }
  if (!mb_sandbox_opts.allow_ffi) {
    lua_pushcfunction(L, loadlib_refused);
    lua_setfield(L, pkg, "loadlib");
  }
}

/* -- ffi and string.buffer ------------------------------------------------ */

/* The stand-in for the ffi module: registry[&ffi_stub_key]. The FFI that
 * LuaJIT loaded by itself, once hidden: registry[&ffi_real_key] (see
 * mb_sandbox_hide_ffi). */
static char ffi_stub_key, ffi_real_key;

/* ffi.<name>(...) of the stand-in (upvalue 1: the name) */
static int ffi_off(lua_State *L)
{
  return luaL_error(L, "ffi.%s: the FFI is off in Moonbeam processes: it can "
                    "write anywhere in the host's memory (" FFI_HINT ")",
                    lua_tostring(L, lua_upvalueindex(1)));
}

/* package.preload.ffi without --allow-ffi: a stand-in whose functions all
 * raise (ffi.C too, on any index), so that code which only loads the module
 * (busted does, on LuaJIT) still runs, and code that uses it gets an error
 * that says why. ffi.os and ffi.arch are the real strings. */
static int ffi_stub_open(lua_State *L)
{
  static const char *const names[] = {"cdef", "load", "new", "cast", "typeof",
    "metatype", "gc", "sizeof", "alignof", "offsetof", "istype", "fill",
    "copy", "string", "abi", "errno", "tonumber", "toabs", NULL};
  lua_createtable(L, 0, 21);
  for (int i = 0; names[i]; i++) {
    lua_pushstring(L, names[i]);
    lua_pushcclosure(L, ffi_off, 1);
    lua_setfield(L, -2, names[i]);
  }
  lua_pushliteral(L, LJ_OS_NAME_STUB);
  lua_setfield(L, -2, "os");
  lua_pushliteral(L, LJ_ARCH_NAME_STUB);
  lua_setfield(L, -2, "arch");
  lua_newtable(L);                     /* ffi.C: any index raises */
  lua_createtable(L, 0, 1);
  lua_pushliteral(L, "C");
  lua_pushcclosure(L, ffi_off, 1);
  lua_setfield(L, -2, "__index");
  lua_setmetatable(L, -2);
  lua_setfield(L, -2, "C");
  lua_pushlightuserdata(L, &ffi_stub_key);
  lua_pushvalue(L, -2);
  lua_rawset(L, LUA_REGISTRYINDEX);
  return 1;
}

/* The FFI's own tables (its finalizer and type maps, which LuaJIT's C side
 * points to) are kept alive only by the module's functions: once loaded, the
 * module must stay reachable, or the GC frees them under LuaJIT (a crash at
 * lua_close, seen under TSan). So hiding it moves it from package.loaded to
 * a private registry key, which Lua cannot read: debug.getregistry is
 * refused too (mb_sandbox_debug). */
void mb_sandbox_hide_ffi(lua_State *L)
{
  if (mb_sandbox_opts.allow_ffi)
    return;
  lua_pushliteral(L, "_LOADED");
  lua_rawget(L, LUA_REGISTRYINDEX);
  if (lua_istable(L, -1)) {
    lua_pushliteral(L, "ffi");
    lua_rawget(L, -2);
    lua_pushlightuserdata(L, &ffi_stub_key);
    lua_rawget(L, LUA_REGISTRYINDEX);
    int loaded = !lua_isnil(L, -2) && !lua_rawequal(L, -1, -2);
    lua_pop(L, 1);
    if (loaded) {
      lua_pushlightuserdata(L, &ffi_real_key);
      lua_pushvalue(L, -2);
      lua_rawset(L, LUA_REGISTRYINDEX);
      lua_pushliteral(L, "ffi");
      lua_pushnil(L);
      lua_rawset(L, -4);
    }
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
}

/* buf:ref(), buf:reserve(n), buf:putcdata(p, n) without --allow-ffi: each
 * gives or takes a raw pointer. */
static int buffer_pointer_refused(lua_State *L)
{
  return luaL_error(L, "string.buffer: raw pointers are off in Moonbeam processes "
                    "(" FFI_HINT ")");
}

/* buf:set(str) as LuaJIT's (upvalue 1); buf:set(cdata, len), which reads
 * len bytes at any address, is refused. */
static int buffer_set(lua_State *L)
{
  if (strcmp(luaL_typename(L, 2), "cdata") == 0)
    return buffer_pointer_refused(L);
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_insert(L, 1);
  lua_call(L, lua_gettop(L) - 1, LUA_MULTRET);
  return lua_gettop(L);
}

/* package.preload["string.buffer"]: LuaJIT's, with the pointer methods
 * patched in its method table (the metatable of every buffer, and the
 * environment of buffer.new). */
static int buffer_open(lua_State *L)
{
  lua_pushcfunction(L, luaopen_string_buffer);
  lua_call(L, 0, 1);
  if (mb_sandbox_opts.allow_ffi)
    return 1;
  lua_getfield(L, -1, "new");
  lua_getfenv(L, -1);
  if (lua_istable(L, -1)) {
    static const char *const raw[] = {"ref", "reserve", "putcdata"};
    for (size_t i = 0; i < sizeof raw / sizeof *raw; i++) {
      lua_pushcfunction(L, buffer_pointer_refused);
      lua_setfield(L, -2, raw[i]);
    }
    lua_getfield(L, -1, "set");
    lua_pushcclosure(L, buffer_set, 1);
    lua_setfield(L, -2, "set");
  }
  lua_pop(L, 2);
  return 1;
}

/* -- debug ---------------------------------------------------------------- */

/* debug.getregistry() without --allow-ffi */
static int getregistry_refused(lua_State *L)
{
  return luaL_error(L, "debug.getregistry is off in Moonbeam processes: the "
                    "registry holds the host's own state (" FFI_HINT ")");
}

void mb_sandbox_debug(lua_State *L)
{
  if (mb_sandbox_opts.allow_ffi)
    return;
  lua_pushcfunction(L, getregistry_refused);
  lua_setfield(L, -2, "getregistry");
}

/* -- jit ------------------------------------------------------------------ */

/* jit.on([f[, recursive]]) */
static int jit_on_refused(lua_State *L)
{
  return luaL_error(L, "jit.on: the JIT is off in every Moonbeam process "
                    "(compiled code cannot be preempted)");
}

/* jit.attach(f, event) */
static int jit_attach_refused(lua_State *L)
{
  return luaL_error(L, "jit.attach: refused in Moonbeam processes "
                    "(handlers run with hooks off, so they cannot be preempted)");
}

/* Raise msg from a refusing package.preload entry, after taking away the
 * mark require left in package.loaded[name]: a second require then raises
 * the same error, not "loop or previous error". */
static int refuse_module(lua_State *L, const char *msg)
{
  lua_pushliteral(L, "_LOADED");
  lua_rawget(L, LUA_REGISTRYINDEX);
  if (lua_istable(L, -1) && lua_type(L, 1) == LUA_TSTRING) {
    lua_pushvalue(L, 1);
    lua_pushnil(L);
    lua_rawset(L, -3);
  }
  return luaL_error(L, "%s", msg);
}

/* package.preload["jit.profile"] */
static int jit_profile_refused(lua_State *L)
{
  return refuse_module(L, "module 'jit.profile' is off in Moonbeam processes "
                       "(LuaJIT has one profiler per OS process)");
}

void mb_sandbox_jit(lua_State *L)
{
  lua_pushcfunction(L, jit_on_refused);
  lua_setfield(L, -2, "on");
  lua_pushcfunction(L, jit_attach_refused);
  lua_setfield(L, -2, "attach");
}

void mb_sandbox_preload(lua_State *L, int which)
{
  luaL_findtable(L, LUA_REGISTRYINDEX, "_PRELOAD", 4);
  if (which & MB_SANDBOX_PRELOAD_FFI) {
    lua_pushcfunction(L, mb_sandbox_opts.allow_ffi ? luaopen_ffi : ffi_stub_open);
    lua_setfield(L, -2, "ffi");
  }
  if (which & MB_SANDBOX_PRELOAD_BUFFER) {
    lua_pushcfunction(L, buffer_open);
    lua_setfield(L, -2, "string.buffer");
  }
  if (which & MB_SANDBOX_PRELOAD_PROFILE) {
    lua_pushcfunction(L, jit_profile_refused);
    lua_setfield(L, -2, "jit.profile");
  }
  lua_pop(L, 1);
}
