/* pid.c: pids and refs as interned Lua userdata (see pid.h).
 *
 * Each state keeps one weak-valued table per kind in its registry, id ->
 * userdata, created on first use so that a process that never sees a pid
 * pays nothing. Interning is what makes == and table keys work without a
 * __eq metamethod (which Lua 5.1 would not consult for table keys anyway).
 *
 * A remote ref's userdata holds its entry of the remote ref table (remote.h)
 * from its creation to its __gc, which is how an entry knows that a state
 * still has the ref. Such userdata get their own metatable (the ref
 * metatable plus that __gc), so that local refs, made by every monitor and
 * call, cost the collector no finalizer.
 */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "lauxlib.h"
#include "pid.h"
#include "remote.h"

/* The userdata's contents. `kind` is checked (with the size) to recognise
 * a value of a kind without a metatable lookup, which matters on the send
 * path. */
typedef struct {
  uint64_t id;
  const mb_idkind_t *kind;
} idbox_t;

char *(*mb_id_format_remote)(char *buf, size_t n, uint64_t id, int is_ref);

static char *format_remote(char *buf, size_t n, uint64_t id, int is_ref)
{
  if (mb_id_format_remote)
    return mb_id_format_remote(buf, n, id, is_ref);
  snprintf(buf, n, "%s<?.%" PRIu64 ">", is_ref ? "#Ref" : "", id & ~MB_ID_REMOTE);
  return buf;
}

char *mb_pid_format(char *buf, size_t n, mb_pid_t pid)
{
  if (mb_id_is_remote(pid))
    return format_remote(buf, n, pid, 0);
  snprintf(buf, n, "<0.%" PRIu64 ".%" PRIu64 ">",
           pid & MB_PID_SLOT_MASK, pid >> MB_PID_SLOT_BITS);
  return buf;
}

char *mb_ref_format(char *buf, size_t n, mb_ref_t ref)
{
  if (mb_id_is_remote(ref))
    return format_remote(buf, n, ref, 1);
  snprintf(buf, n, "#Ref<0.%" PRIu64 ">", ref);
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
  char buf[MB_PID_TEXT_MAX];
  lua_pushstring(L, mb_ref_format(buf, sizeof buf, b->id));
  return 1;
}

mb_idkind_t mb_pid_kind = {"pid", pid_tostring, NULL, MB_TAG_PID, 0, 0};
mb_idkind_t mb_ref_kind = {"ref", ref_tostring, NULL, MB_TAG_REF, 0, 0};

/* Push the registry table at slot (or, for a kind without a wire tag, under
 * the light-userdata key), creating it on first use with make (which fills
 * the table on top). Registered kinds keep their tables at integer slots
 * (pid.h, MB_REGSLOT_INTERN and MB_REGSLOT_IDMT): a light-userdata key
 * costs ~110 instructions more, on every id a message carries and every
 * new id a state makes. */
static void push_regtable(lua_State *L, int slot, void *key,
                          void (*make)(lua_State *L, const mb_idkind_t *kind),
                          const mb_idkind_t *kind, int nrec)
{
  if (slot) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, slot);
  } else {
    lua_pushlightuserdata(L, key);
    lua_rawget(L, LUA_REGISTRYINDEX);
  }
  if (!lua_isnil(L, -1))
    return;
  lua_pop(L, 1);
  lua_createtable(L, 0, nrec);
  make(L, kind);
  lua_pushvalue(L, -1);
  if (slot) {
    lua_rawseti(L, LUA_REGISTRYINDEX, slot);
  } else {
    lua_pushlightuserdata(L, key);
    lua_insert(L, -2);
    lua_rawset(L, LUA_REGISTRYINDEX);
  }
}

/* A kind's metatable: opaque (getmetatable gives false), printable, and
 * with the kind's methods, if any. No __name: no one can read it (LuaJIT
 * does not, and the metatable is hidden), and it cost every process that
 * holds a pid 112 bytes (two strings, two more slots). */
static void make_mt(lua_State *L, const mb_idkind_t *kind)
{
  lua_pushcfunction(L, kind->tostring);
  lua_setfield(L, -2, "__tostring");
  lua_pushboolean(L, 0);
  lua_setfield(L, -2, "__metatable");
  if (kind->methods) {
    lua_newtable(L);
    luaL_register(L, NULL, kind->methods);
    lua_setfield(L, -2, "__index");
  }
}

static int rref_gc(lua_State *L)
{
  idbox_t *b = lua_touserdata(L, 1);
  mb_remote_ref_release(b->id);
  return 0;
}

static void make_rref_mt(lua_State *L, const mb_idkind_t *kind)
{
  make_mt(L, kind);
  lua_pushcfunction(L, rref_gc);
  lua_setfield(L, -2, "__gc");
}

/* An intern table: weak values, so that an id's userdata can be collected.
 * The mode is "__div": LuaJIT reads a mode string for a 'v' (and a 'k'),
 * and "__div" is a metamethod name every state holds already, where "v"
 * would cost every process that holds an id a string of its own. */
static void make_intern(lua_State *L, const mb_idkind_t *kind)
{
  (void)kind;
  lua_pushliteral(L, "__div");
  lua_setfield(L, -2, "__mode");
  lua_pushvalue(L, -1);
  lua_setmetatable(L, -2);               /* the table is its own metatable */
}

static void push_intern(lua_State *L, mb_idkind_t *kind)
{
  /* __mode and a first id; grows as ids come */
  push_regtable(L, kind->tag ? MB_REGSLOT_INTERN(kind->tag) : 0,
                &kind->intern_key, make_intern, kind, 2);
}

/* id's key in an intern table. Ids have few bits that vary (a pid is a
 * generation and a slot, gen << 24 | slot), and LuaJIT hashes a number's
 * bits as they are: in the spawn benchmark 2,048 pids fell into 432 of
 * 2,048 buckets, chains up to 8 long, and an insert cost ~1,000
 * instructions. So the key is the id scrambled by a bijection on 53 bits
 * (an odd multiplier, then an xorshift): distinct ids, distinct keys, each
 * exact as a double (ids are below 2^53: pid.h). */
static lua_Number intern_key(uint64_t id)
{
  const uint64_t bits53 = ((uint64_t)1 << 53) - 1;
  uint64_t x = (id * 0x9E3779B97F4A7C15u) & bits53;
  x ^= x >> 29;
  return (lua_Number)x;
}

/* Make id's userdata, intern it in the table on top (which it replaces). */
static void push_made(lua_State *L, uint64_t id, mb_idkind_t *kind)
{
  idbox_t *b = lua_newuserdata(L, sizeof *b);
  b->id = id;
  b->kind = kind;
  int rref = kind == &mb_ref_kind && mb_id_is_remote(id);
  if (rref)
    push_regtable(L, MB_REGSLOT_RREF_MT, NULL, make_rref_mt, kind, 4);   /* 3 keys */
  else
    push_regtable(L, kind->tag ? MB_REGSLOT_IDMT(kind->tag) : 0, &kind->mt_key,
                  make_mt, kind, kind->methods ? 4 : 2);
  lua_setmetatable(L, -2);
  if (rref)                  /* after anything that may raise */
    mb_remote_ref_retain(id);
  lua_pushnumber(L, intern_key(id));
  lua_pushvalue(L, -2);
  lua_rawset(L, -4);
  lua_remove(L, -2);
}

void mb_id_push(lua_State *L, uint64_t id, mb_idkind_t *kind)
{
  push_intern(L, kind);
  lua_pushnumber(L, intern_key(id));
  lua_rawget(L, -2);
  if (!lua_isnil(L, -1)) {
    lua_remove(L, -2);
    return;
  }
  lua_pop(L, 1);
  push_made(L, id, kind);
}

void mb_id_push_new(lua_State *L, uint64_t id, mb_idkind_t *kind)
{
  push_intern(L, kind);
  push_made(L, id, kind);
}

uint64_t mb_id_test(lua_State *L, int idx, const mb_idkind_t *kind)
{
  if (lua_type(L, idx) != LUA_TUSERDATA || lua_objlen(L, idx) != sizeof(idbox_t))
    return 0;
  idbox_t *b = lua_touserdata(L, idx);
  return b->kind == kind ? b->id : 0;
}

/* Registered kinds by wire tag; pids and refs from the start. */
static mb_idkind_t *kinds[MB_TAG_KIND_MAX + 1] = {
  [MB_TAG_PID] = &mb_pid_kind,
  [MB_TAG_REF] = &mb_ref_kind,
};

void mb_id_register(mb_idkind_t *kind)
{
  if (kind->tag && kind->tag <= MB_TAG_KIND_MAX)
    kinds[kind->tag] = kind;
}

int mb_id_regslot(double key)
{
  if (key == MB_REGSLOT_RREF_MT)
    return 1;
  /* The inverses of MB_REGSLOT_INTERN and MB_REGSLOT_IDMT */
  double t = key > MB_REGSLOT_INTERN(0) - 0x20 ? MB_REGSLOT_INTERN(0) - key
                                                : MB_REGSLOT_IDMT(0) - key;
  return t >= 1 && t <= MB_TAG_KIND_MAX && t == (double)(unsigned)t &&
         kinds[(unsigned)t] != NULL;
}

mb_idkind_t *mb_id_kind_of_tag(unsigned tag)
{
  return tag <= MB_TAG_KIND_MAX ? kinds[tag] : NULL;
}

const mb_idkind_t *mb_id_kind(lua_State *L, int idx, uint64_t *id)
{
  if (lua_type(L, idx) != LUA_TUSERDATA)
    return NULL;
  return mb_id_kind_ud(L, idx, id);
}

const mb_idkind_t *mb_id_kind_ud(lua_State *L, int idx, uint64_t *id)
{
  if (lua_objlen(L, idx) != sizeof(idbox_t))
    return NULL;
  idbox_t *b = lua_touserdata(L, idx);
  /* Another userdata of the same size holds anything in its second word:
   * only a pointer equal to a registered kind's is one (compared, never
   * followed before that). */
  if (b->kind == &mb_pid_kind) {
    *id = b->id;
    return b->kind;
  }
  for (unsigned t = 0; t <= MB_TAG_KIND_MAX; t++)
    if (kinds[t] && kinds[t] == b->kind) {
      *id = b->id;
      return b->kind;
    }
  return NULL;
}

void mb_pid_push(lua_State *L, mb_pid_t pid)
{
  mb_id_push(L, pid, &mb_pid_kind);
}

mb_pid_t mb_pid_test(lua_State *L, int idx)
{
  return mb_id_test(L, idx, &mb_pid_kind);
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
  mb_id_push(L, ref, &mb_ref_kind);
}

mb_ref_t mb_ref_test(lua_State *L, int idx)
{
  return mb_id_test(L, idx, &mb_ref_kind);
}

mb_ref_t mb_ref_check(lua_State *L, int idx)
{
  mb_ref_t ref = mb_ref_test(L, idx);
  if (ref == 0)
    luaL_typerror(L, idx, "ref");
  return ref;
}
