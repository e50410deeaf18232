/* lstate.c: a process's lua_State, with lazily opened libraries and the
 * coroutine wrappers that keep runtime yields transparent (see lstate.h).
 */
#include <stdlib.h>
#include <string.h>

#include "code.h"
#include "lauxlib.h"
#include "lib.h"
#include "lstate.h"
#include "modcache.h"
#include "luajit.h"
#include "lualib.h"
#include "run.h"
#include "scheduler.h"

lua_CFunction mb_lstate_pcall_cf, mb_lstate_xpcall_cf, mb_lstate_load_cf;

/* Registry keys (the addresses are the keys). */
static char coroutine_key;

/* -- Coroutine wrappers --------------------------------------------------- */

/* A unique value: co_resume's "the inner coroutine made a runtime yield". */
static char pending_key;

/* co_resume(co, ...) -> true, results... | false, err | PENDING
 * Like coroutine.resume, but keeps the process's chain of running
 * coroutines (so the hook knows where it may yield) and reports a runtime
 * yield of co as PENDING instead of as an ordinary yield. */
static int co_resume(lua_State *L);
lua_CFunction mb_lstate_resume_cf = co_resume;

static int co_resume(lua_State *L)
{
  lua_State *co = lua_tothread(L, 1);
  luaL_argcheck(L, co != NULL, 1, "coroutine expected");
  mb_proc_t *p = mb_proc_of(L);
  int narg = lua_gettop(L) - 1;
  if (lua_status(co) == 0 && lua_gettop(co) == 0) {
    lua_pushboolean(L, 0);
    lua_pushliteral(L, "cannot resume dead coroutine");
    return 2;
  }
  if (p->con >= MB_MAX_COROUTINES) {
    lua_pushboolean(L, 0);
    lua_pushliteral(L, "C stack overflow (coroutines nested too deep)");
    return 2;
  }
  if (!lua_checkstack(co, narg))
    luaL_error(L, "too many arguments to resume");
  lua_xmove(L, co, narg);
  if (p->con == p->cocap) {
    p->cocap = p->cocap ? 2 * p->cocap : 4;
    p->costack = mb_realloc(p->costack, p->cocap * sizeof *p->costack);
  }
  p->costack[p->con++] = co;
  int st = lua_resume(co, narg);
  p->con--;
  if (st == LUA_YIELD && p->yield != MB_YIELD_NONE) {
    lua_settop(co, 0);
    lua_pushlightuserdata(L, &pending_key);
    return 1;
  }
  if (st == 0 || st == LUA_YIELD) {
    int nres = lua_gettop(co);
    if (!lua_checkstack(L, nres + 1))
      luaL_error(L, "too many results to resume");
    lua_pushboolean(L, 1);
    lua_xmove(co, L, nres);
    return nres + 1;
  }
  lua_pushboolean(L, 0);
  lua_xmove(co, L, 1);
  return 2;
}

/* rt_yield() -> values: pass a runtime yield up one level; returns what the
 * scheduler resumes the process with. */
static int co_rtyield(lua_State *L)
{
  return lua_yield(L, 0);
}

/* The Lua half: loops that re-yield PENDING upward and hand the values the
 * process is resumed with down to the inner coroutine. Tail calls keep the
 * C stack flat. */
static const char wrapper_src[] =
  "local c_resume, rt_yield, PENDING, create = ...\n"
  "local function finish(co, ok, ...)\n"
  "  if ok == PENDING then return finish(co, c_resume(co, rt_yield())) end\n"
  "  return ok, ...\n"
  "end\n"
  "local function wfinish(co, ok, ...)\n"
  "  if ok == PENDING then return wfinish(co, c_resume(co, rt_yield())) end\n"
  "  if ok then return ... end\n"
  "  error((...), 0)\n"
  "end\n"
  "local function resume(co, ...) return finish(co, c_resume(co, ...)) end\n"
  "local function wrap(f)\n"
  "  local co = create(f)\n"
  "  return function(...) return wfinish(co, c_resume(co, ...)) end\n"
  "end\n"
  "return resume, wrap\n";

/* Install the wrappers into the coroutine table at the top of the stack. */
static void install_wrappers(lua_State *L)
{
  if (luaL_loadbuffer(L, wrapper_src, sizeof wrapper_src - 1, "=coroutine"))
    lua_error(L);
  lua_pushcfunction(L, co_resume);
  lua_pushcfunction(L, co_rtyield);
  lua_pushlightuserdata(L, &pending_key);
  lua_getfield(L, -5, "create");
  lua_call(L, 4, 2);
  lua_setfield(L, -3, "wrap");
  lua_setfield(L, -2, "resume");
}

/* -- Lazy libraries ------------------------------------------------------- */

static void open_lib(lua_State *L, lua_CFunction f, const char *name)
{
  lua_pushcfunction(L, f);
  lua_pushstring(L, name);
  lua_call(L, 1, 0);
}

/* os.exit([code]) halts the whole host, as the only process of a plain Lua
 * program would. true/false mean 0/1, like in Lua 5.2+. */
static int os_exit(lua_State *L)
{
  int code;
  if (lua_isboolean(L, 1))
    code = lua_toboolean(L, 1) ? 0 : 1;
  else
    code = (int)luaL_optinteger(L, 1, 0);
  return mb_lib_halt(L, code);
}

static void after_base(lua_State *L)
{
  /* Hide coroutine until asked for, so that only processes that use
   * coroutines pay for the wrappers. */
  lua_pushlightuserdata(L, &coroutine_key);
  lua_getfield(L, LUA_GLOBALSINDEX, "coroutine");
  lua_rawset(L, LUA_REGISTRYINDEX);
  lua_pushnil(L);
  lua_setfield(L, LUA_GLOBALSINDEX, "coroutine");
}

static void open_coroutine(lua_State *L)
{
  lua_pushlightuserdata(L, &coroutine_key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  install_wrappers(L);
  lua_setfield(L, LUA_GLOBALSINDEX, "coroutine");
}

static void after_os(lua_State *L)
{
  lua_getfield(L, LUA_GLOBALSINDEX, "os");
  lua_pushcfunction(L, os_exit);
  lua_setfield(L, -2, "exit");
  lua_pop(L, 1);
}

static int open_for(lua_State *L, const char *name, size_t len);

/* package.preload entry of a standard library: require "debug" works before
 * the global was ever touched. */
static int preload_std(lua_State *L)
{
  size_t len;
  const char *name = luaL_checklstring(L, 1, &len);
  open_for(L, name, len);
  lua_getfield(L, LUA_GLOBALSINDEX, name);
  return 1;
}

static void after_package(lua_State *L)
{
  lua_getfield(L, LUA_GLOBALSINDEX, "package");
  lua_getfield(L, -1, "path");
  lua_pushfstring(L, MB_LUA_DIR "/?.lua;" MB_LUA_DIR "/?/init.lua;%s",
                  lua_tostring(L, -1));
  lua_setfield(L, -3, "path");
  lua_pop(L, 1);
  mb_modcache_install(L);
  lua_getfield(L, -1, "preload");
  lua_pushcfunction(L, mb_lib_open);
  lua_setfield(L, -2, "moonbeam");
  lua_pushcfunction(L, mb_lib_fs_open);
  lua_setfield(L, -2, "moonbeam.fs");
  lua_pushcfunction(L, mb_lib_tcp_open);
  lua_setfield(L, -2, "moonbeam.tcp");
  lua_pushcfunction(L, mb_lib_http_parser_open);
  lua_setfield(L, -2, "moonbeam.http_parser");
  lua_pushcfunction(L, luaopen_ffi);
  lua_setfield(L, -2, "ffi");
  lua_pushcfunction(L, luaopen_string_buffer);
  lua_setfield(L, -2, "string.buffer");
  static const char *const std[] = {"_G", "coroutine", "string", "table",
    "math", "io", "os", "debug", "bit", "jit", NULL};
  for (int i = 0; std[i]; i++) {
    lua_getfield(L, -2, "loaded");
    lua_getfield(L, -1, std[i]);
    int loaded = !lua_isnil(L, -1);
    lua_pop(L, 2);
    if (!loaded) {
      lua_pushcfunction(L, preload_std);
      lua_setfield(L, -2, std[i]);
    }
  }
  lua_pop(L, 2);
}

static void after_jit(lua_State *L)
{
  luaJIT_setmode(L, 0, LUAJIT_MODE_ENGINE | LUAJIT_MODE_OFF);
}

typedef struct lazylib {
  const char *name;          /* the library's name for luaopen */
  lua_CFunction open;
  void (*after)(lua_State *L);
  const char *globals;       /* space-separated global names it defines */
} lazylib_t;

static const lazylib_t lazylibs[] = {
  {"", luaopen_base, after_base,
   " assert collectgarbage dofile error getfenv getmetatable ipairs load"
   " loadfile loadstring next pairs pcall print rawequal rawget rawset select"
   " setfenv setmetatable tonumber tostring type unpack xpcall _VERSION"
   " newproxy gcinfo _G "},
  {"string", luaopen_string, NULL, " string "},
  {"table", luaopen_table, NULL, " table "},
  {"math", luaopen_math, NULL, " math "},
  {"io", luaopen_io, NULL, " io "},
  {"os", luaopen_os, after_os, " os "},
  {"package", luaopen_package, after_package, " package require module "},
  {"debug", luaopen_debug, NULL, " debug "},
  {"bit", luaopen_bit, NULL, " bit "},
  {"jit", luaopen_jit, after_jit, " jit "},
};

/* Is name one of the space-separated words of list? */
static int listed(const char *list, const char *name, size_t len)
{
  for (const char *s = strstr(list, name); s; s = strstr(s + 1, name))
    if (s[-1] == ' ' && s[len] == ' ')
      return 1;
  return 0;
}

/* Open the library that defines global `name`; 1 if there was one. */
static int open_for(lua_State *L, const char *name, size_t len)
{
  if (memchr(name, '\0', len))
    return 0;   /* no library name has one; listed() relies on it */
  if (len == 9 && memcmp(name, "coroutine", 9) == 0) {
    lua_getfield(L, LUA_GLOBALSINDEX, "pcall");  /* base first */
    lua_pop(L, 1);
    lua_pushlightuserdata(L, &coroutine_key);
    lua_rawget(L, LUA_REGISTRYINDEX);
    int hidden = lua_istable(L, -1);
    lua_pop(L, 1);
    if (hidden)
      open_coroutine(L);
    return hidden;
  }
  for (size_t i = 0; i < sizeof lazylibs / sizeof *lazylibs; i++) {
    const lazylib_t *lib = &lazylibs[i];
    if (!listed(lib->globals, name, len))
      continue;
    lua_pushlightuserdata(L, (void *)lib);
    lua_rawget(L, LUA_REGISTRYINDEX);
    int opened = lua_toboolean(L, -1);
    lua_pop(L, 1);
    if (opened)
      return 0;
    lua_pushlightuserdata(L, (void *)lib);
    lua_pushboolean(L, 1);
    lua_rawset(L, LUA_REGISTRYINDEX);
    open_lib(L, lib->open, lib->name);
    if (lib->after)
      lib->after(L);
    return 1;
  }
  return 0;
}

/* _G's __index(t, k): open the library defining k, then rawget. */
static int lazy_global(lua_State *L)
{
  size_t len;
  const char *name = lua_type(L, 2) == LUA_TSTRING ? lua_tolstring(L, 2, &len) : NULL;
  if (name == NULL || len > 20 || memchr(name, ' ', len))
    return 0;
  if (!open_for(L, name, len))
    return 0;
  lua_settop(L, 2);
  lua_rawget(L, 1);
  return 1;
}

/* Strings' placeholder __index(s, k): open string, then string[k]. */
static int lazy_string(lua_State *L)
{
  lua_getfield(L, LUA_GLOBALSINDEX, "string");
  lua_pushvalue(L, 2);
  lua_gettable(L, -2);
  return 1;
}

/* -- State life ----------------------------------------------------------- */

static int setup(lua_State *L)
{
  lua_createtable(L, 0, 1);
  lua_pushcfunction(L, lazy_global);
  lua_setfield(L, -2, "__index");
  lua_setmetatable(L, LUA_GLOBALSINDEX);

  lua_pushliteral(L, "");
  lua_createtable(L, 0, 1);
  lua_pushcfunction(L, lazy_string);
  lua_setfield(L, -2, "__index");
  lua_setmetatable(L, -2);
  lua_pop(L, 1);
  return 0;
}

/* lua_newstate's first allocation is its GG_State: note its size. */
static size_t first_alloc;

static void *probe_alloc(void *ud, void *ptr, size_t osize, size_t nsize)
{
  (void)ud;
  (void)osize;
  if (nsize == 0) {
    free(ptr);
    return NULL;
  }
  if (ptr == NULL && first_alloc == 0)
    first_alloc = nsize;
  return realloc(ptr, nsize);
}

void mb_lstate_init(void)
{
  lua_State *P = lua_newstate(probe_alloc, NULL);
  if (P)
    lua_close(P);
  mb_alloc_state_arena(first_alloc);

  /* pcall, xpcall and load have the same addresses in every state (LuaJIT
   * fast functions and library code): record them once, before any thread
   * starts, for the scheduler's safe-point test. */
  lua_State *L = luaL_newstate();
  if (L == NULL)
    abort();
  luaopen_base(L);
  lua_getfield(L, LUA_GLOBALSINDEX, "pcall");
  mb_lstate_pcall_cf = lua_tocfunction(L, -1);
  lua_getfield(L, LUA_GLOBALSINDEX, "xpcall");
  mb_lstate_xpcall_cf = lua_tocfunction(L, -1);
  lua_getfield(L, LUA_GLOBALSINDEX, "load");
  mb_lstate_load_cf = lua_tocfunction(L, -1);
  lua_close(L);
}

int mb_lstate_new(mb_proc_t *p)
{
  p->alloc.limit = p->alloc.max;
  p->alloc.oom = 0;
  lua_State *L = lua_newstate(mb_alloc_fn, p);
  if (L == NULL)
    return -1;
  luaJIT_setmode(L, 0, LUAJIT_MODE_ENGINE | LUAJIT_MODE_OFF);
  if (lua_cpcall(L, setup, NULL) != 0) {
    lua_close(L);
    return -1;
  }
  /* The body coroutine stays anchored in slot 1 of the main thread. */
  p->co = lua_newthread(L);
  /* LuaJIT starts a state's first GC cycle only at 4x its size at birth
   * (~56 KB here), so a small process would carry all its garbage until
   * then: start counting from now, and a process's heap stays within the
   * usual pause (2x live). Measured: a chat user 43 -> 38 KB, spawn and idle
   * unchanged. Not for a wake from hibernation: that state is meant to live
   * until the next hibernation, and a cycle started at once spends its
   * time sweeping the fresh string table (measured: 19% of a hibernate +
   * wake cycle); a woken process that stays awake gets its first cycle at
   * the usual 4x. */
  if (p->wakes == 0)
    lua_gc(L, LUA_GCRESTART, 0);
  p->L = L;
  if (mb_sched_opts.slice_reds > 0)
    lua_sethook(L, mb_run_hook, LUA_MASKCOUNT, MB_HOOK_INSTRUCTIONS);
  return 0;
}

void mb_lstate_close(mb_proc_t *p)
{
  if (p->L == NULL)
    return;
  p->alloc.limit = 0;  /* finalizers may allocate */
  lua_close(p->L);
  p->L = p->co = NULL;
  for (int i = 0; i < p->nfncodes; i++)
    mb_code_unref(p->fncodes[i].code);
  p->nfncodes = 0;
  mb_free(p->costack);
  p->costack = NULL;
  p->con = p->cocap = 0;
}

void mb_lstate_push_module(lua_State *L)
{
  lua_getfield(L, LUA_REGISTRYINDEX, "_LOADED");
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushvalue(L, -1);
    lua_setfield(L, LUA_REGISTRYINDEX, "_LOADED");
  }
  lua_getfield(L, -1, "moonbeam");
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    lua_pushcfunction(L, mb_lib_open);
    lua_call(L, 0, 1);
    lua_pushvalue(L, -1);
    lua_setfield(L, -3, "moonbeam");
  }
  lua_remove(L, -2);
}
