/* term.c: the atom table and tuples (see term.h). */
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>

#include "alloc.h"
#include "err.h"
#include "lauxlib.h"
#include "term.h"

/* -- Atoms ------------------------------------------------------------------ */

/* Entries in chunks that never move: atom id i is chunks[(i-1) >> CHUNK_BITS]
 * [(i-1) & CHUNK_MASK]. A chunk pointer is published (release) before an id
 * in it is handed out, and ids reach other threads only through messages or
 * locks, so a reader of a valid id always sees its entry. */
#define CHUNK_BITS 12
#define CHUNK_SIZE (1u << CHUNK_BITS)
#define CHUNK_MASK (CHUNK_SIZE - 1)
#define NCHUNKS (MB_ATOM_MAX / CHUNK_SIZE)

typedef struct atom {
  char *name;
  uint32_t len;
  uint32_t hash;
  uint32_t next;            /* hash chain: next atom id, or 0 */
} atom_t;

static _Atomic(atom_t *) chunks[NCHUNKS];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static atomic_uint natoms;
static uint32_t *buckets;   /* first atom id of each chain (under lock) */
static uint32_t nbuckets;

static int atom_tostring(lua_State *L)
{
  uint64_t id = *(uint64_t *)lua_touserdata(L, 1);
  size_t n;
  const char *s = mb_atom_name((uint32_t)id, &n);
  lua_pushlstring(L, s ? s : "?", s ? n : 1);
  return 1;
}

mb_idkind_t mb_atom_kind = {"atom", atom_tostring, NULL, MB_TAG_ATOM, 0, 0};

void mb_term_init(void)
{
  mb_id_register(&mb_atom_kind);
}

static uint32_t hash_name(const char *s, size_t n)
{
  uint32_t h = 2166136261u;                 /* FNV-1a */
  for (size_t i = 0; i < n; i++)
    h = (h ^ (unsigned char)s[i]) * 16777619u;
  return h;
}

static atom_t *entry(uint32_t id)
{
  uint32_t i = id - 1;
  atom_t *c = atomic_load_explicit(&chunks[i >> CHUNK_BITS], memory_order_acquire);
  return c ? &c[i & CHUNK_MASK] : NULL;
}

const char *mb_atom_name(uint32_t id, size_t *n)
{
  if (id == 0 || id > atomic_load_explicit(&natoms, memory_order_acquire))
    return NULL;
  atom_t *a = entry(id);
  if (a == NULL)
    return NULL;
  if (n)
    *n = a->len;
  return a->name;
}

uint32_t mb_atom_count(void)
{
  return atomic_load(&natoms);
}

/* The id of the atom s in the table, or 0; lock held. */
static uint32_t lookup(const char *s, size_t n, uint32_t h)
{
  if (nbuckets == 0)
    return 0;
  for (uint32_t id = buckets[h & (nbuckets - 1)]; id; ) {
    atom_t *a = entry(id);
    if (a->hash == h && a->len == n && memcmp(a->name, s, n) == 0)
      return id;
    id = a->next;
  }
  return 0;
}

static void rehash(uint32_t cap)
{
  mb_free(buckets);
  buckets = mb_calloc(cap, sizeof *buckets);
  nbuckets = cap;
  uint32_t n = atomic_load_explicit(&natoms, memory_order_relaxed);
  for (uint32_t id = 1; id <= n; id++) {
    atom_t *a = entry(id);
    uint32_t b = a->hash & (cap - 1);
    a->next = buckets[b];
    buckets[b] = id;
  }
}

uint32_t mb_atom_find(const char *s, size_t n)
{
  uint32_t h = hash_name(s, n);
  pthread_mutex_lock(&lock);
  uint32_t id = lookup(s, n, h);
  pthread_mutex_unlock(&lock);
  return id;
}

int64_t mb_atom_intern(const char *s, size_t n)
{
  if (n == 0 || n > MB_ATOM_MAX_LEN)
    return MB_EBADARG;
  uint32_t h = hash_name(s, n);
  pthread_mutex_lock(&lock);
  uint32_t id = lookup(s, n, h);
  if (id) {
    pthread_mutex_unlock(&lock);
    return id;
  }
  uint32_t count = atomic_load_explicit(&natoms, memory_order_relaxed);
  if (count >= MB_ATOM_MAX) {
    pthread_mutex_unlock(&lock);
    return MB_ETOOMANY;
  }
  id = count + 1;
  uint32_t i = id - 1;
  atom_t *c = atomic_load_explicit(&chunks[i >> CHUNK_BITS], memory_order_relaxed);
  if (c == NULL) {
    c = mb_calloc(CHUNK_SIZE, sizeof *c);
    atomic_store_explicit(&chunks[i >> CHUNK_BITS], c, memory_order_release);
  }
  atom_t *a = &c[i & CHUNK_MASK];
  a->name = mb_malloc(n + 1);
  memcpy(a->name, s, n);
  a->name[n] = '\0';
  a->len = (uint32_t)n;
  a->hash = h;
  atomic_store_explicit(&natoms, id, memory_order_release);
  /* Keep chains short: at most two atoms per bucket on average. */
  if (id > 2 * nbuckets)
    rehash(nbuckets ? 2 * nbuckets : 1024);
  else {
    uint32_t b = h & (nbuckets - 1);
    a->next = buckets[b];
    buckets[b] = id;
  }
  pthread_mutex_unlock(&lock);
  return id;
}

/* -- Tuples ----------------------------------------------------------------- */

static char tuple_mt_key;

static int tuple_tostring(lua_State *L)
{
  /* {a, b, c}, the elements as tostring shows them. */
  lua_Number n = 0;
  lua_getfield(L, 1, "n");
  if (lua_type(L, -1) == LUA_TNUMBER)
    n = lua_tonumber(L, -1);
  lua_pop(L, 1);
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  luaL_addchar(&b, '{');
  for (int i = 1; i <= (int)n && i <= 64; i++) {
    if (i > 1)
      luaL_addstring(&b, ", ");
    lua_getglobal(L, "tostring");
    lua_rawgeti(L, 1, i);
    if (lua_type(L, -1) == LUA_TSTRING) {
      lua_remove(L, -2);
      lua_pushliteral(L, "\"");
      lua_insert(L, -2);
      lua_pushliteral(L, "\"");
      lua_concat(L, 3);
    } else {
      lua_call(L, 1, 1);
    }
    luaL_addvalue(&b);
  }
  if (n > 64)
    luaL_addstring(&b, ", ...");
  luaL_addchar(&b, '}');
  luaL_pushresult(&b);
  return 1;
}

void mb_tuple_push_mt(lua_State *L)
{
  lua_pushlightuserdata(L, &tuple_mt_key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  if (!lua_isnil(L, -1))
    return;
  lua_pop(L, 1);
  lua_createtable(L, 0, 3);
  lua_pushliteral(L, "tuple");
  lua_setfield(L, -2, "__name");
  /* getmetatable(t) gives "tuple": the metatable cannot be replaced by
   * mistake, and mb.is_tuple is the test. */
  lua_pushliteral(L, "tuple");
  lua_setfield(L, -2, "__metatable");
  lua_pushcfunction(L, tuple_tostring);
  lua_setfield(L, -2, "__tostring");
  lua_pushlightuserdata(L, &tuple_mt_key);
  lua_pushvalue(L, -2);
  lua_rawset(L, LUA_REGISTRYINDEX);
}

int mb_tuple_test(lua_State *L, int idx, uint32_t *n)
{
  if (idx < 0 && idx > LUA_REGISTRYINDEX)
    idx = lua_gettop(L) + idx + 1;
  if (lua_type(L, idx) != LUA_TTABLE || !lua_getmetatable(L, idx))
    return 0;
  lua_pushlightuserdata(L, &tuple_mt_key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  int is = lua_rawequal(L, -1, -2);
  lua_pop(L, 2);
  if (is && n) {
    lua_pushliteral(L, "n");
    lua_rawget(L, idx);
    lua_Number v = lua_tonumber(L, -1);
    lua_pop(L, 1);
    *n = v >= 0 && v <= 0xFFFFFFFFu ? (uint32_t)v : 0;
  }
  return is;
}

void mb_tuple_make(lua_State *L, int idx, uint32_t n)
{
  if (idx < 0 && idx > LUA_REGISTRYINDEX)
    idx = lua_gettop(L) + idx + 1;
  lua_pushnumber(L, n);
  lua_setfield(L, idx, "n");
  mb_tuple_push_mt(L);
  lua_setmetatable(L, idx);
}
