/* pid.c: pids and refs as interned Lua userdata (see pid.h).
 *
 * Each state keeps one weak-valued table per kind in its registry, id ->
 * userdata, created on first use so that a process that never sees a pid
 * pays nothing. Interning is what makes == and table keys work without a
 * __eq metamethod (which Lua 5.1 would not consult for table keys anyway).
 */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "lauxlib.h"
#include "pid.h"

/* The userdata's contents. `kind` is the address of the kind's metatable
 * key: checking it (with the size) recognises a pid or ref without a
 * metatable lookup, which matters on the send path. */
typedef struct {
  uint64_t id;
  const void *kind;
} idbox_t;

/* Registry keys: the address of each static is unique. */
static char pid_mt_key, pid_intern_key, ref_mt_key, ref_intern_key;

char *mb_pid_format(char *buf, size_t n, mb_pid_t pid)
{
  snprintf(buf, n, "<0.%" PRIu64 ".%" PRIu64 ">",
           pid & MB_PID_SLOT_MASK, pid >> MB_PID_SLOT_BITS);
  return buf;
}

static int pid_tostring(lua_State *L)
{
  idbox_t *b = lua_touserdata(L, 1);
  char buf[MB_PID_TEXT_MAX];
  lua_pushstring(L, mb_pid_format(buf, sizeof buf, b->id));
  return 1;
}

static int ref_tostring(lua_State *L)
{
  idbox_t *b = lua_touserdata(L, 1);
  char buf[40];
  snprintf(buf, sizeof buf, "#Ref<0.%" PRIu64 ">", b->id);
  lua_pushstring(L, buf);
  return 1;
}

/* Push the registry table stored under key, creating it on first use; for a
 * metatable, tostring is its __tostring; for an intern table, it is weak. */
static void push_regtable(lua_State *L, void *key, lua_CFunction tostring,
                          const char *name)
{
  lua_pushlightuserdata(L, key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  if (!lua_isnil(L, -1))
    return;
  lua_pop(L, 1);
  lua_createtable(L, 0, 3);
  if (tostring) {
    lua_pushcfunction(L, tostring);
    lua_setfield(L, -2, "__tostring");
    lua_pushstring(L, name);
    lua_setfield(L, -2, "__name");
    lua_pushboolean(L, 0);
    lua_setfield(L, -2, "__metatable");   /* getmetatable(pid) is false: opaque */
  } else {
    lua_pushliteral(L, "v");
    lua_setfield(L, -2, "__mode");
    lua_pushvalue(L, -1);
    lua_setmetatable(L, -2);               /* the table is its own metatable */
  }
  lua_pushlightuserdata(L, key);
  lua_pushvalue(L, -2);
  lua_rawset(L, LUA_REGISTRYINDEX);
}

static void push_interned(lua_State *L, uint64_t id, void *mtkey, void *inkey,
                          lua_CFunction tostring, const char *name)
{
  push_regtable(L, inkey, NULL, NULL);
  /* Ids fit a double exactly up to 2^53, far beyond what a host can use. */
  lua_pushnumber(L, (lua_Number)id);
  lua_rawget(L, -2);
  if (!lua_isnil(L, -1)) {
    lua_remove(L, -2);
    return;
  }
  lua_pop(L, 1);
  idbox_t *b = lua_newuserdata(L, sizeof *b);
  b->id = id;
  b->kind = mtkey;
  push_regtable(L, mtkey, tostring, name);
  lua_setmetatable(L, -2);
  lua_pushnumber(L, (lua_Number)id);
  lua_pushvalue(L, -2);
  lua_rawset(L, -4);
  lua_remove(L, -2);
}

static uint64_t test_kind(lua_State *L, int idx, void *mtkey)
{
  if (lua_type(L, idx) != LUA_TUSERDATA || lua_objlen(L, idx) != sizeof(idbox_t))
    return 0;
  idbox_t *b = lua_touserdata(L, idx);
  return b->kind == mtkey ? b->id : 0;
}

void mb_pid_push(lua_State *L, mb_pid_t pid)
{
  push_interned(L, pid, &pid_mt_key, &pid_intern_key, pid_tostring, "pid");
}

mb_pid_t mb_pid_test(lua_State *L, int idx)
{
  return test_kind(L, idx, &pid_mt_key);
}

mb_pid_t mb_pid_check(lua_State *L, int idx)
{
  mb_pid_t pid = mb_pid_test(L, idx);
  if (pid == 0)
    luaL_typerror(L, idx, "pid");
  return pid;
}

void mb_ref_push(lua_State *L, mb_ref_t ref)
{
  push_interned(L, ref, &ref_mt_key, &ref_intern_key, ref_tostring, "ref");
}

mb_ref_t mb_ref_test(lua_State *L, int idx)
{
  return test_kind(L, idx, &ref_mt_key);
}

mb_ref_t mb_ref_check(lua_State *L, int idx)
{
  mb_ref_t ref = mb_ref_test(L, idx);
  if (ref == 0)
    luaL_typerror(L, idx, "ref");
  return ref;
}
