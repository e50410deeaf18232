/* copy_decode.c: the deep-copy codec's decoder, flat messages -> Lua values
 * in the receiver's state (see copy.h for the contract and copy_format.h
 * for the bytes). The bytes are untrusted: every length, count, tag and
 * back-reference is checked, and anything inconsistent raises "corrupt
 * message" instead of reading out of bounds.
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "lauxlib.h"
#include "code.h"
#include "copy.h"
#include "copy_format.h"
#include "pid.h"
#include "remote.h"
#include "term.h"

/* -- Decoder ------------------------------------------------------------- */

typedef struct {
  lua_State *L;
  const mb_msg_t *msg;
  const unsigned char *base, *p, *end;
  int objs;               /* stack slot of the shared-object table */
  bool has_objs;          /* whether that slot holds the table yet (else nil) */
  int depth;
} dec_t;

void (*mb_copy_on_ffi_bytecode)(lua_State *L);

static void corrupt(dec_t *d)
{
  lua_pushliteral(d->L, "corrupt message");
  lua_error(d->L);
}

static inline void need(dec_t *d, size_t n)
{
  if ((size_t)(d->end - d->p) < n)
    corrupt(d);
}

static uint32_t rd_varint(dec_t *d)
{
  uint32_t v = 0;
  for (int shift = 0; shift < 35; shift += 7) {
    need(d, 1);
    unsigned b = *d->p++;
    v |= (uint32_t)(b & 0x7F) << shift;
    if (!(b & 0x80))
      return v;
  }
  corrupt(d);
  return 0;
}

static uint32_t rd_u32(dec_t *d)
{
  uint32_t v;
  need(d, 4);
  memcpy(&v, d->p, 4);
  d->p += 4;
  return v;
}

static uint64_t rd_id(dec_t *d)
{
  uint64_t v;
  need(d, 8);
  memcpy(&v, d->p, 8);
  d->p += 8;
  if (v == 0)
    corrupt(d);
  return v;
}

/* A length-prefixed name: returns its bytes in the message, length in *n. */
static const char *rd_name(dec_t *d, size_t *n)
{
  *n = rd_varint(d);
  need(d, *n);
  const char *s = (const char *)d->p;
  d->p += *n;
  return s;
}

/* Remember the value on top as the object whose tag is at offset at. */
static void remember(dec_t *d, size_t at)
{
  lua_State *L = d->L;
  if (!d->has_objs) {
    lua_createtable(L, 0, 4);
    lua_replace(L, d->objs);
    d->has_objs = true;
  }
  lua_pushvalue(L, -1);
  lua_rawseti(L, d->objs, (int)at);
}

static void dec_enter(dec_t *d)
{
  if (++d->depth > MB_COPY_MAX_DEPTH)
    corrupt(d);
  if (!lua_checkstack(d->L, LEVEL_SLOTS))
    luaL_error(d->L, "message nested too deep for the Lua stack");
}

/* Push require(name), in the receiver. A module already loaded is taken
 * from package.loaded directly: that is what require would return, and it
 * spares a process whose closures only capture `moonbeam` (preinstalled at
 * spawn) from opening the package library at all. */
static void push_module(dec_t *d, const char *name, size_t n)
{
  lua_State *L = d->L;
  if (mb_copy_module && mb_copy_module(L, name, n))
    return;
  lua_getfield(L, LUA_REGISTRYINDEX, "_LOADED");
  if (lua_istable(L, -1)) {
    lua_pushlstring(L, name, n);
    lua_rawget(L, -2);
    lua_remove(L, -2);
    if (!lua_isnil(L, -1))
      return;
  }
  lua_pop(L, 1);
  if (mb_copy_require && mb_copy_require(L, name, n))
    return;
  lua_getglobal(L, "require");
  lua_pushlstring(L, name, n);
  lua_call(L, 1, 1);
}

static void dec_value(dec_t *d);

/* Under lua_pcall: push the ref whose id is the light userdata at 1. */
static int push_rref(lua_State *L)
{
  mb_id_push(L, (uint64_t)(uintptr_t)lua_touserdata(L, 1), &mb_ref_kind);
  return 1;
}

static void dec_table(dec_t *d, unsigned tag, size_t at)
{
  lua_State *L = d->L;
  uint32_t narr = rd_varint(d);
  uint32_t nhash = rd_u32(d);
  size_t rest = (size_t)(d->end - d->p);
  /* Every value takes at least one byte: this bounds the size hints. */
  if (narr > rest || nhash > rest / 2)
    corrupt(d);
  dec_enter(d);
  lua_createtable(L, (int)narr, (int)nhash);
  if (tag & T_SHARED)
    remember(d, at);
  for (uint32_t i = 1; i <= narr; i++) {
    dec_value(d);
    lua_rawseti(L, -2, (int)i);
  }
  for (uint32_t i = 0; i < nhash; i++) {
    /* A key that is a string (the usual case: a field name) can be neither
     * nil nor NaN: only other keys need the two checks (two API calls,
     * ~60 instructions a field). need() guards the peek; dec_value reads
     * the same byte again. */
    need(d, 1);
    unsigned ktag = *d->p;
    dec_value(d);
    if (!(ktag & T_SHORTSTR) && ktag != T_STRING &&
        (lua_isnil(L, -1) ||
         (lua_type(L, -1) == LUA_TNUMBER && lua_tonumber(L, -1) != lua_tonumber(L, -1))))
      corrupt(d);
    dec_value(d);
    lua_rawset(L, -3);
  }
  d->depth--;
}

static void dec_tuple(dec_t *d, unsigned tag, size_t at)
{
  lua_State *L = d->L;
  uint32_t n = rd_varint(d);
  if (n > (size_t)(d->end - d->p))     /* a byte per element at least */
    corrupt(d);
  dec_enter(d);
  lua_createtable(L, (int)n, 1);
  mb_tuple_make(L, -1, n);
  if (tag & T_SHARED)
    remember(d, at);
  for (uint32_t i = 1; i <= n; i++) {
    dec_value(d);
    lua_rawseti(L, -2, (int)i);
  }
  d->depth--;
}

static void dec_function(dec_t *d, unsigned tag, size_t at)
{
  lua_State *L = d->L;
  /* The bytecode is the message's code object number ci: bytes this host
   * produced with lua_dump and keeps, never bytes from the message. */
  uint32_t ci = rd_varint(d);
  if (ci >= d->msg->ncode)
    corrupt(d);
  size_t len;
  const unsigned char *bc = mb_code_bytes(mb_msg_codes(d->msg)[ci], &len);
  dec_enter(d);
  if ((mb_copy_load == NULL || !mb_copy_load(L, mb_msg_codes(d->msg)[ci])) &&
      luaL_loadbuffer(L, (const char *)bc, len, "=message") != 0)
    lua_error(L);   /* out of memory in the receiver */
  if (len > 4 && (bc[4] & 0x04) && mb_copy_on_ffi_bytecode)   /* BCDUMP_F_FFI */
    mb_copy_on_ffi_bytecode(L);
  if (mb_copy_on_load)
    mb_copy_on_load(L, lua_gettop(L), mb_msg_codes(d->msg)[ci]);
  if (tag & T_SHARED)
    remember(d, at);
  need(d, 1);
  unsigned nups = *d->p++;
  int f = lua_gettop(L);
  for (unsigned i = 1; i <= nups; i++) {
    need(d, 1);
    if (*d->p == T_UPJOIN) {
      size_t join_at = (size_t)(d->p - d->base);
      d->p++;
      uint32_t off = rd_varint(d);
      need(d, 1);
      int n = *d->p++;
      if (!d->has_objs || off >= join_at)
        corrupt(d);
      lua_rawgeti(L, d->objs, (int)off);
      /* lua_upvaluejoin only asserts: check both upvalues exist here. */
      if (!lua_isfunction(L, -1) || lua_iscfunction(L, -1) || n == 0 ||
          !lua_getupvalue(L, -1, n) || !lua_getupvalue(L, f, (int)i))
        corrupt(d);
      lua_pop(L, 2);
      lua_upvaluejoin(L, f, (int)i, f + 1, n);
      lua_pop(L, 1);
      continue;
    }
    dec_value(d);
    if (!lua_setupvalue(L, f, (int)i))
      corrupt(d);
  }
  if (lua_getupvalue(L, -1, (int)nups + 1))
    corrupt(d);                  /* fewer upvalues sent than the function has */
  d->depth--;
}

static void dec_value(dec_t *d)
{
  lua_State *L = d->L;
  need(d, 1);
  size_t at = (size_t)(d->p - d->base);
  unsigned tag = *d->p++;
  if (tag & T_SHORTSTR) {
    size_t n = tag & SHORTSTR_MAX;
    need(d, n);
    lua_pushlstring(L, (const char *)d->p, n);
    d->p += n;
    return;
  }
  switch (tag) {
  case T_NIL:
    lua_pushnil(L);
    return;
  case T_FALSE:
  case T_TRUE:
    lua_pushboolean(L, tag == T_TRUE);
    return;
  case T_NUMBER: {
    lua_Number n;
    need(d, 8);
    memcpy(&n, d->p, 8);
    d->p += 8;
    lua_pushnumber(L, n);
    return;
  }
  case T_STRING: {
    size_t n;
    const char *s = rd_name(d, &n);
    lua_pushlstring(L, s, n);
    return;
  }
  case T_TABLE:
  case T_TABLE | T_SHARED:
    dec_table(d, tag, at);
    return;
  case T_FUNCTION:
  case T_FUNCTION | T_SHARED:
    dec_function(d, tag, at);
    return;
  case T_TUPLE:
  case T_TUPLE | T_SHARED:
    dec_tuple(d, tag, at);
    return;
  case T_BACKREF: {
    uint32_t off = rd_varint(d);
    if (!d->has_objs || off >= at)
      corrupt(d);
    lua_rawgeti(L, d->objs, (int)off);
    if (lua_isnil(L, -1))
      corrupt(d);
    return;
  }
  case T_MODULE:
  case T_MODULE | T_SHARED: {
    size_t n;
    const char *name = rd_name(d, &n);
    push_module(d, name, n);
    break;
  }
  case T_CFIELD:
  case T_CFIELD | T_SHARED: {
    size_t mn, fn;
    const char *mod = rd_name(d, &mn);
    const char *field = rd_name(d, &fn);
    push_module(d, mod, mn);
    if (lua_istable(L, -1)) {
      /* Not raw: a module may make its functions on first use, as the
       * moonbeam module does (the sender's had made this one). */
      lua_pushlstring(L, field, fn);
      lua_gettable(L, -2);
    } else {
      lua_pushnil(L);
    }
    lua_remove(L, -2);
    if (!lua_isfunction(L, -1)) {
      lua_pushliteral(L, "cannot rebuild message: no function ");
      lua_pushlstring(L, mod, mn);
      lua_pushliteral(L, ".");
      lua_pushlstring(L, field, fn);
      lua_pushliteral(L, " in the receiver");
      lua_concat(L, 5);
      lua_error(L);
    }
    break;
  }
  case T_RREF: {
    /* Interned now that a state holds it (remote.h); the userdata takes its
     * own hold, so ours is let go. */
    mb_rref_t r;
    memset(&r, 0, sizeof r);
    need(d, 9);
    memcpy(&r.node, d->p, 4);
    memcpy(&r.creation, d->p + 4, 4);
    r.len = d->p[8];
    d->p += 9;
    if (r.len < 1 || r.len > MB_REF_MAX_WORDS)
      corrupt(d);
    need(d, 4 * (size_t)r.len);
    memcpy(r.n, d->p, 4 * (size_t)r.len);
    d->p += 4 * (size_t)r.len;
    /* The hold must be let go however the push ends: it runs protected
     * (it allocates), and the function is pushed before the hold is taken. */
    lua_pushcfunction(L, push_rref);
    int64_t id = mb_remote_ref(&r);
    if (id < 0)
      luaL_error(L, "cannot rebuild message: too many refs of other nodes (%d)",
                 (int)MB_REMOTE_MAX);
    lua_pushlightuserdata(L, (void *)(uintptr_t)id);
    int rc = lua_pcall(L, 1, 1, 0);
    mb_remote_ref_release((uint64_t)id);
    if (rc != 0)
      lua_error(L);
    return;
  }
  default: {
    mb_idkind_t *kind = mb_id_kind_of_tag(tag);
    if (kind == NULL)
      corrupt(d);
    mb_id_push(L, rd_id(d), kind);
    return;
  }
  }
  if (tag & T_SHARED)
    remember(d, at);
}

int mb_copy_decode(lua_State *L, const mb_msg_t *msg)
{
  dec_t d;
  d.L = L;
  d.msg = msg;
  d.base = d.p = msg->data;
  d.end = msg->data + msg->len;
  d.has_objs = false;
  d.depth = 0;
  /* Every value takes at least one byte. */
  if (msg->len > MB_COPY_MAX_BYTES || msg->nvalues > msg->len)
    corrupt(&d);
  /* One short string, as most lines between processes are (a chat room's
   * to its members): pushed without the walk's set-up. */
  if (msg->nvalues == 1 && (msg->data[0] & T_SHORTSTR) &&
      (size_t)(msg->data[0] & SHORTSTR_MAX) + 1 == msg->len) {
    if (!lua_checkstack(L, 1))
      luaL_error(L, "message has too many values for the Lua stack");
    lua_pushlstring(L, (const char *)msg->data + 1, msg->len - 1);
    return 1;
  }
  if (!lua_checkstack(L, (int)msg->nvalues + LEVEL_SLOTS))
    luaL_error(L, "message has too many values for the Lua stack");
  lua_pushnil(L);
  d.objs = lua_gettop(L);
  for (uint32_t i = 0; i < msg->nvalues; i++)
    dec_value(&d);
  if (d.p != d.end)
    corrupt(&d);
  lua_remove(L, d.objs);
  return (int)msg->nvalues;
}

