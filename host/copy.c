/* copy.c: the deep-copy codec's encoder, Lua values -> flat messages (see
 * copy.h; the decoder is copy_decode.c).
 *
 * DESIGN
 * The encoder walks the sender's values with the plain Lua API (no metamethod
 * is ever invoked, no Lua code runs, nothing is allocated in the sender's
 * state) and appends to one malloc'ed block that already starts with the
 * mb_msg_t header, so a successful encode is one malloc, a few geometric
 * reallocs for large messages and at most one final realloc (to shrink, or
 * to append the code pointers of the functions it carries).
 * The decoder rebuilds the values in the receiver with the Lua API and treats
 * the bytes as untrusted: every length, count, tag and back-reference is
 * checked against the buffer, and anything inconsistent raises "corrupt
 * message" instead of reading out of bounds. Bytecode, which LuaJIT's
 * loader does not verify, is never part of the bytes: a function travels as
 * a reference to a code object (code.h) that the message holds, interned
 * host-wide so that one function sent a million times is one copy.
 *
 * FORMAT: see copy_format.h.
 *
 * The encoder learns that an object is shared only when it meets it the
 * second time; it then sets the flag on the first occurrence's tag byte in
 * place, which is why a back-reference names a byte offset rather than an
 * object number. The hash-part count is patched in place for the same reason
 * (it is only known after the walk). The decoder creates a table or function
 * and registers it before decoding its contents, so cycles and a function
 * that is its own upvalue come back as they were. Upvalue cells are visited
 * like objects (by lua_upvalueid), so closures that share a local still share
 * it after the copy; upvalue values are copied, never shared with the sender.
 *
 * Tables, functions and upvalue cells met for the first time are recorded in
 * a visited set (pointer -> offset). Up to SMALL_SEEN entries live in the
 * encoder's frame; only larger messages allocate a heap open-addressing map.
 *
 * Errors name the value's path ("msg.handlers[2]: cannot send a coroutine").
 * The path is not built while encoding: each nesting level only records where
 * it is (a stack slot holding the key, an array index, an upvalue number) in
 * a fixed array, and the text is assembled from those records, while the keys
 * are still on the stack, only when something fails.
 *
 * Cost model: one pass over the values; per table one visited-set probe and
 * one lua_objlen (plus a scan of the array part when it is longer than 64,
 * to send mostly-nil arrays as pairs); per function one lua_dump, one probe
 * per upvalue and a scan of package.loaded per table/function upvalue; per
 * distinct C function a scan of every loaded module's fields (C functions
 * are rare in messages). Measured: {seq = 1, from = pid, body = "hello"}
 * encodes to 44 bytes, and encode + decode + free takes about 0.4 us.
 *
 * Threads: encode runs on the sender's thread, decode on the receiver's; the
 * only state outside the two lua_States is the thread-local `inflight`
 * record below.
 */
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lauxlib.h"
#include "code.h"
#include "copy.h"
#include "copy_format.h"
#include "pid.h"
#include "remote.h"
#include "term.h"

#define STR_(x) #x
#define STR(x) STR_(x)

/* First allocation: header plus this much payload. Small messages (most
 * are a few dozen bytes) then need neither a grow nor the final shrink;
 * measured, a 256-byte start made the small-message benchmark 25% slower. */
#define INITIAL_PAYLOAD (MB_MSG_SMALL - sizeof(mb_msg_t))
/* The final shrink is skipped when it would save less than this. */
#define SHRINK_SLACK 64
/* Visited-set entries kept in the encoder's own frame before a heap map. */
#define SMALL_SEEN 8
/* Longest string key quoted in full in an error path. */
#define PATH_KEY_MAX 40
/* Paths with more levels print the first and last PATH_KEEP only. */
#define PATH_KEEP 8

/* -- Encoder state ------------------------------------------------------- */

enum { P_FIELD, P_INDEX, P_KEY, P_UPVAL };

/* Where the value currently being encoded sits inside its container. */
typedef struct {
  int kind;      /* P_* */
  int idx;       /* P_FIELD, P_KEY: stack slot of the key; P_UPVAL: of the function */
  uint32_t n;    /* P_INDEX: array index; P_UPVAL: upvalue number */
} pathseg_t;

/* A visited object: a table or function (value: the payload offset of its
 * tag) or an upvalue cell (value: its first function's offset << 8 | the
 * upvalue number). */
typedef struct {
  const void *key;
  uint64_t val;
} slot_t;

typedef struct {
  lua_State *L;
  mb_msg_t *msg;          /* header + payload being written */
  size_t len, cap;        /* payload bytes written / allocated */
  int depth;              /* containers entered (tables and functions) */
  bool failed;
  /* Naming of the root values, for error paths. */
  int vi, nvals;
  const char *root;
  const char *const *names;
  char *err;
  size_t errlen;
  /* Code objects of the functions met, in order (the message keeps them). */
  mb_code_t **codes;
  uint32_t ncode, codecap;
  /* Visited set: small[] until it overflows, then the heap map. */
  uint32_t nseen;
  uint32_t mask;          /* heap map capacity - 1 */
  slot_t *map;
  slot_t small[SMALL_SEEN];
  /* path[d] describes the slot being encoded inside the container at depth d. */
  pathseg_t path[MB_COPY_MAX_DEPTH + 1];
} enc_t;

/* An encode can be cut short by a Lua error: lua_checkstack raises when the
 * stack cannot grow (memory limit, or a sender already deep in recursion).
 * Its C allocations are remembered here and freed by the next encode on the
 * same thread, so such an error leaks nothing for long. Encodes never nest:
 * no Lua code, hook or finalizer runs while one is in progress (the encoder
 * creates no Lua objects, so the GC never steps inside it). */
static _Thread_local struct {
  mb_msg_t *msg;
  slot_t *map;
  mb_code_t **codes;
  uint32_t ncode;
} inflight;

/* -- Error text ---------------------------------------------------------- */

/* A bounded string builder over the caller's err buffer. */
typedef struct {
  char *p;
  size_t n, cap;
} sb_t;

static void sb_add(sb_t *b, const char *s, size_t n)
{
  if (b->cap == 0)
    return;
  size_t room = b->cap - 1 - b->n;
  if (n > room)
    n = room;
  memcpy(b->p + b->n, s, n);
  b->n += n;
  b->p[b->n] = '\0';
}

static void sb_puts(sb_t *b, const char *s)
{
  sb_add(b, s, strlen(s));
}

static void sb_printf(sb_t *b, const char *fmt, ...)
{
  char tmp[128];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
  va_end(ap);
  if (n > 0)
    sb_add(b, tmp, (size_t)n < sizeof tmp ? (size_t)n : sizeof tmp - 1);
}

static bool is_keyword(const char *s, size_t n)
{
  static const char *const kw[] = {
    "and", "break", "do", "else", "elseif", "end", "false", "for",
    "function", "goto", "if", "in", "local", "nil", "not", "or", "repeat",
    "return", "then", "true", "until", "while",
  };
  for (size_t i = 0; i < sizeof kw / sizeof kw[0]; i++)
    if (strlen(kw[i]) == n && memcmp(kw[i], s, n) == 0)
      return true;
  return false;
}

static bool is_identifier(const char *s, size_t n)
{
  if (n == 0 || n > PATH_KEY_MAX || (s[0] >= '0' && s[0] <= '9'))
    return false;
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    if (!(c == '_' || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
          (c >= '0' && c <= '9')))
      return false;
  }
  return !is_keyword(s, n);
}

/* ["..."] with escapes, cut after PATH_KEY_MAX bytes. */
static void sb_quoted(sb_t *b, const char *s, size_t n)
{
  sb_puts(b, "[\"");
  size_t shown = n > PATH_KEY_MAX ? PATH_KEY_MAX : n;
  for (size_t i = 0; i < shown; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c == '"' || c == '\\')
      sb_printf(b, "\\%c", c);
    else if (c < 0x20 || c >= 0x7F)
      sb_printf(b, "\\%u", c);
    else
      sb_add(b, (const char *)&c, 1);
  }
  sb_puts(b, shown < n ? "...\"]" : "\"]");
}

/* The key at stack slot k as a path segment: .name, ["str"], [1], [true],
 * [<0.5.0>] for a pid, [<table>] for keys that have no literal form. */
static void sb_key(sb_t *b, lua_State *L, int k)
{
  switch (lua_type(L, k)) {
  case LUA_TSTRING: {
    size_t n;
    const char *s = lua_tolstring(L, k, &n);
    if (is_identifier(s, n)) {
      sb_puts(b, ".");
      sb_add(b, s, n);
    } else {
      sb_quoted(b, s, n);
    }
    break;
  }
  case LUA_TNUMBER:
    sb_printf(b, "[%.14g]", (double)lua_tonumber(L, k));
    break;
  case LUA_TBOOLEAN:
    sb_puts(b, lua_toboolean(L, k) ? "[true]" : "[false]");
    break;
  case LUA_TUSERDATA: {
    uint64_t id;
    char text[MB_PID_TEXT_MAX];
    if ((id = mb_pid_test(L, k)) != 0)
      sb_printf(b, "[%s]", mb_pid_format(text, sizeof text, id));
    else if ((id = mb_ref_test(L, k)) != 0)
      sb_printf(b, "[#Ref<0.%llu>]", (unsigned long long)id);
    else
      sb_puts(b, "[<userdata>]");
    break;
  }
  default:
    sb_printf(b, "[<%s>]", lua_typename(L, lua_type(L, k)));
    break;
  }
}

static void sb_segment(sb_t *b, enc_t *e, int d)
{
  lua_State *L = e->L;
  const pathseg_t *s = &e->path[d];
  switch (s->kind) {
  case P_FIELD:
    sb_key(b, L, s->idx);
    break;
  case P_INDEX:
    sb_printf(b, "[%lu]", (unsigned long)s->n);
    break;
  case P_KEY:
    /* The failing value is the key itself, or something inside it. */
    if (d == e->depth)
      sb_puts(b, " (a key)");
    else
      sb_printf(b, "[<%s key>]", lua_typename(L, lua_type(L, s->idx)));
    break;
  case P_UPVAL: {
    const char *name = lua_getupvalue(L, s->idx, (int)s->n);
    if (name)
      lua_pop(L, 1);
    if (name && name[0])
      sb_printf(b, " (upvalue '%s')", name);
    else
      sb_printf(b, " (upvalue #%lu)", (unsigned long)s->n);
    break;
  }
  }
}

/* Record the first error, naming the path of the value being encoded:
 * "<root><segments>: <what>". Always returns -1. */
static int fail(enc_t *e, const char *what)
{
  if (e->failed)
    return -1;
  e->failed = true;
  sb_t b = {e->err, 0, e->err ? e->errlen : 0};
  if (b.cap)
    b.p[0] = '\0';
  if (e->names) {
    sb_puts(&b, e->names[e->vi] ? e->names[e->vi] : "?");
  } else {
    const char *root = e->root ? e->root : "value";
    if (e->nvals == 1)
      sb_puts(&b, root);
    else
      sb_printf(&b, "%s[%d]", root, e->vi + 1);
  }
  for (int d = 1; d <= e->depth; d++) {
    if (e->depth > 2 * PATH_KEEP && d == PATH_KEEP + 1) {
      sb_puts(&b, "...");
      d = e->depth - PATH_KEEP;
      continue;
    }
    sb_segment(&b, e, d);
  }
  sb_puts(&b, ": ");
  sb_puts(&b, what);
  return -1;
}

/* An error about the message as a whole: no path. */
static int fail_plain(enc_t *e, const char *what)
{
  if (!e->failed) {
    e->failed = true;
    if (e->err && e->errlen)
      snprintf(e->err, e->errlen, "%s", what);
  }
  return -1;
}

static int too_large(enc_t *e, size_t need)
{
  char buf[96];
  snprintf(buf, sizeof buf, "message too large (at least %zu bytes, limit %u MiB)",
           need, (unsigned)(MB_COPY_MAX_BYTES >> 20));
  return fail_plain(e, buf);
}

/* -- Output buffer ------------------------------------------------------- */

static int grow(enc_t *e, size_t n)
{
  size_t want = e->len + n;
  if (n > MB_COPY_MAX_BYTES || want > MB_COPY_MAX_BYTES)
    return too_large(e, want < e->len ? SIZE_MAX : want);
  size_t cap = e->cap * 2;
  if (cap < want)
    cap = want;
  if (cap > MB_COPY_MAX_BYTES)
    cap = MB_COPY_MAX_BYTES;
  mb_msg_t *m = realloc(e->msg, sizeof(mb_msg_t) + cap);
  if (!m)
    return fail_plain(e, "out of memory");
  e->msg = inflight.msg = m;
  e->cap = cap;
  return 0;
}

/* Make room for n more payload bytes. */
static inline int reserve(enc_t *e, size_t n)
{
  return e->cap - e->len >= n ? 0 : grow(e, n);
}

/* The next n bytes: only after reserve(e, n). */
static inline unsigned char *out(enc_t *e, size_t n)
{
  unsigned char *p = e->msg->data + e->len;
  e->len += n;
  return p;
}

static inline void put_varint(enc_t *e, uint32_t v)
{
  unsigned char *p = e->msg->data + e->len;
  while (v >= 0x80) {
    *p++ = (unsigned char)(v | 0x80);
    v >>= 7;
  }
  *p++ = (unsigned char)v;
  e->len = (size_t)(p - e->msg->data);
}

static inline int put_byte(enc_t *e, unsigned char c)
{
  if (reserve(e, 1) < 0)
    return -1;
  *out(e, 1) = c;
  return 0;
}

static inline size_t varint_size(size_t v)
{
  size_t n = 1;
  while (v >= 0x80) {
    v >>= 7;
    n++;
  }
  return n;
}

static int put_string(enc_t *e, const char *s, size_t n)
{
  if (n <= SHORTSTR_MAX) {
    if (reserve(e, 1 + n) < 0)
      return -1;
    *out(e, 1) = (unsigned char)(T_SHORTSTR | n);
  } else {
    /* Exact size, so that the limit is exact too. */
    if (reserve(e, 1 + varint_size(n) + n) < 0)
      return -1;
    *out(e, 1) = T_STRING;
    put_varint(e, (uint32_t)n);
  }
  memcpy(out(e, n), s, n);
  return 0;
}

/* A length-prefixed name inside a module or C-function record. */
static int put_cname(enc_t *e, const char *s, size_t n)
{
  if (reserve(e, 5 + n) < 0)
    return -1;
  put_varint(e, (uint32_t)n);
  memcpy(out(e, n), s, n);
  return 0;
}

static int put_name(enc_t *e, lua_State *L, int idx)
{
  size_t n;
  const char *s = lua_tolstring(L, idx, &n);
  return put_cname(e, s, n);
}

static int put_id(enc_t *e, unsigned char tag, uint64_t id)
{
  if (reserve(e, 9) < 0)
    return -1;
  unsigned char *p = out(e, 9);
  p[0] = tag;
  memcpy(p + 1, &id, 8);
  return 0;
}

/* A remote ref by its contents (copy_format.h): a message holds no entry
 * of the remote ref table (remote.h). The caller's state holds this one. */
static int put_rref(enc_t *e, uint64_t id)
{
  mb_rref_t r;
  if (mb_remote_ref_get(id, &r) < 0)
    return fail(e, "cannot send a ref of another node that is gone");
  if (reserve(e, 10 + 4 * (size_t)r.len) < 0)
    return -1;
  unsigned char *p = out(e, 10 + 4 * (size_t)r.len);
  p[0] = T_RREF;
  memcpy(p + 1, &r.node, 4);
  memcpy(p + 5, &r.creation, 4);
  p[9] = (unsigned char)r.len;
  memcpy(p + 10, r.n, 4 * (size_t)r.len);
  return 0;
}

/* -- Visited set --------------------------------------------------------- */

static inline uint32_t hash_ptr(const void *p)
{
  uint64_t x = (uint64_t)(uintptr_t)p;
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  return (uint32_t)x;
}

static void map_put(slot_t *map, uint32_t mask, const void *key, uint64_t val)
{
  uint32_t i = hash_ptr(key) & mask;
  while (map[i].key)
    i = (i + 1) & mask;
  map[i].key = key;
  map[i].val = val;
}

static int map_grow(enc_t *e)
{
  uint32_t ncap = e->map ? 2 * (e->mask + 1) : 4 * SMALL_SEEN;
  slot_t *nmap = calloc(ncap, sizeof *nmap);
  if (!nmap)
    return fail_plain(e, "out of memory");
  if (e->map) {
    for (uint32_t i = 0; i <= e->mask; i++)
      if (e->map[i].key)
        map_put(nmap, ncap - 1, e->map[i].key, e->map[i].val);
    free(e->map);
  } else {
    for (uint32_t i = 0; i < e->nseen; i++)
      map_put(nmap, ncap - 1, e->small[i].key, e->small[i].val);
  }
  e->map = inflight.map = nmap;
  e->mask = ncap - 1;
  return 0;
}

/* Look up the object p. Seen before: store its value in *found and return
 * 1. New: record it with value val and return 0. -1 on failure. */
static int visit(enc_t *e, const void *p, uint64_t val, uint64_t *found)
{
  if (!e->map) {
    for (uint32_t i = 0; i < e->nseen; i++)
      if (e->small[i].key == p) {
        *found = e->small[i].val;
        return 1;
      }
    if (e->nseen < SMALL_SEEN) {
      e->small[e->nseen].key = p;
      e->small[e->nseen].val = val;
      e->nseen++;
      return 0;
    }
    if (map_grow(e) < 0)
      return -1;
  }
  uint32_t i = hash_ptr(p) & e->mask;
  while (e->map[i].key) {
    if (e->map[i].key == p) {
      *found = e->map[i].val;
      return 1;
    }
    i = (i + 1) & e->mask;
  }
  /* Keep the load at most 1/2 so probes stay short. */
  if (2 * (e->nseen + 1) > e->mask + 1) {
    if (map_grow(e) < 0)
      return -1;
    map_put(e->map, e->mask, p, val);
  } else {
    e->map[i].key = p;
    e->map[i].val = val;
  }
  e->nseen++;
  return 0;
}

static int put_backref(enc_t *e, uint64_t first)
{
  if (reserve(e, 1 + 5) < 0)
    return -1;
  e->msg->data[first] |= T_SHARED;
  *out(e, 1) = T_BACKREF;
  put_varint(e, (uint32_t)first);
  return 0;
}

/* -- Encoder ------------------------------------------------------------- */

static int enc_value(enc_t *e, int idx);

/* Enter one more level of nesting, or fail with the limit. */
static int enter(enc_t *e)
{
  if (e->depth >= MB_COPY_MAX_DEPTH)
    return fail(e, "message nested too deep (limit " STR(MB_COPY_MAX_DEPTH) ")");
  if (!lua_checkstack(e->L, LEVEL_SLOTS))
    return fail(e, "message nested too deep (Lua stack exhausted)");
  e->depth++;
  return 0;
}

/* A tuple (term.h): its elements 1..arity; other fields do not travel. */
static int enc_tuple(enc_t *e, int idx, uint32_t arity)
{
  lua_State *L = e->L;
  if (arity > MB_COPY_MAX_BYTES)
    return too_large(e, e->len + arity);
  if (reserve(e, 1 + 5) < 0)
    return -1;
  *out(e, 1) = T_TUPLE;
  put_varint(e, arity);
  pathseg_t *seg = &e->path[e->depth];
  seg->kind = P_INDEX;
  for (uint32_t i = 1; i <= arity; i++) {
    seg->n = i;
    lua_rawgeti(L, idx, (int)i);
    if (enc_value(e, lua_gettop(L)) < 0)
      return -1;
    lua_pop(L, 1);
  }
  e->depth--;
  return 0;
}

static int enc_table(enc_t *e, int idx)
{
  lua_State *L = e->L;
  uint64_t first;
  int seen = visit(e, lua_topointer(L, idx), e->len, &first);
  if (seen)
    return seen < 0 ? -1 : put_backref(e, first);
  if (enter(e) < 0)
    return -1;
  /* Only a table with a metatable can be a tuple: most have none, and
   * lua_getmetatable alone says so at a third of mb_tuple_test's cost. */
  uint32_t arity;
  if (lua_getmetatable(L, idx)) {
    lua_pop(L, 1);
    if (mb_tuple_test(L, idx, &arity))
      return enc_tuple(e, idx, arity);
  }

  size_t narr = lua_objlen(L, idx);
  if (narr > MB_COPY_MAX_BYTES)         /* at least a byte per element */
    return too_large(e, e->len + narr);
  if (narr > 64) {
    /* lua_objlen is any border; with holes, a long array section could be
     * mostly nils. Send sparse arrays as key/value pairs instead. */
    size_t live = 0;
    for (size_t i = 1; i <= narr; i++) {
      lua_rawgeti(L, idx, (int)i);
      live += !lua_isnil(L, -1);
      lua_pop(L, 1);
    }
    if (2 * live < narr)
      narr = 0;
  }
  if (reserve(e, 1 + 5 + 4) < 0)
    return -1;
  *out(e, 1) = T_TABLE;
  put_varint(e, (uint32_t)narr);
  size_t hpos = e->len;
  out(e, 4);

  pathseg_t *seg = &e->path[e->depth];
  seg->kind = P_INDEX;
  for (size_t i = 1; i <= narr; i++) {
    seg->n = (uint32_t)i;
    lua_rawgeti(L, idx, (int)i);
    if (enc_value(e, lua_gettop(L)) < 0)
      return -1;
    lua_pop(L, 1);
  }

  uint32_t nhash = 0;
  lua_pushnil(L);
  int k = lua_gettop(L);
  while (lua_next(L, idx)) {
    if (narr && lua_type(L, k) == LUA_TNUMBER) {
      lua_Number n = lua_tonumber(L, k);
      if (n >= 1 && n <= (lua_Number)narr && n == (lua_Number)(size_t)n) {
        lua_pop(L, 1);           /* already sent in the array section */
        continue;
      }
    }
    seg->kind = P_KEY;
    seg->idx = k;
    if (enc_value(e, k) < 0)
      return -1;
    seg->kind = P_FIELD;
    if (enc_value(e, k + 1) < 0)
      return -1;
    lua_pop(L, 1);
    nhash++;
  }
  memcpy(e->msg->data + hpos, &nhash, 4);
  e->depth--;
  return 0;
}

/* If the value at idx is a value of the sender's package.loaded, or the
 * module the layer keeps itself (mb_copy_own_module), write a module record
 * and return 1; 0 if it is not; -1 on failure. */
static int enc_module(enc_t *e, int idx)
{
  lua_State *L = e->L;
  lua_getfield(L, LUA_REGISTRYINDEX, "_LOADED");
  int loaded = lua_gettop(L);
  int r = 0;
  if (lua_istable(L, loaded)) {
    lua_pushnil(L);
    while (lua_next(L, loaded)) {
      if (lua_type(L, -2) == LUA_TSTRING && lua_rawequal(L, -1, idx)) {
        r = put_byte(e, T_MODULE) < 0 || put_name(e, L, -2) < 0 ? -1 : 1;
        break;
      }
      lua_pop(L, 1);
    }
  }
  lua_settop(L, loaded - 1);
  const char *name;
  if (r == 0 && mb_copy_own_module && (name = mb_copy_own_module(L)) != NULL) {
    if (lua_rawequal(L, -1, idx))
      r = put_byte(e, T_MODULE) < 0 || put_cname(e, name, strlen(name)) < 0 ? -1 : 1;
    lua_pop(L, 1);
  }
  return r;
}

/* If the C function at idx is a field of the module table at mod, named by
 * the string at name_idx (0: by name), write a C-field record and return
 * 1; 0 if it is not; -1 on failure. */
static int enc_cfield(enc_t *e, int idx, int mod, int name_idx, const char *name)
{
  lua_State *L = e->L;
  lua_pushnil(L);
  while (lua_next(L, mod)) {
    if (lua_type(L, -2) == LUA_TSTRING && lua_rawequal(L, -1, idx)) {
      int r = put_byte(e, T_CFIELD) < 0 ||
              (name_idx ? put_name(e, L, name_idx) : put_cname(e, name, strlen(name))) < 0 ||
              put_name(e, L, -2) < 0 ? -1 : 1;
      lua_pop(L, 2);
      return r;
    }
    lua_pop(L, 1);
  }
  return 0;
}

/* A C function cannot be dumped; it travels by name if it is a loaded module
 * or a field of one (print is _G.print, table.insert is table.insert). */
static int enc_cfunction(enc_t *e, int idx)
{
  lua_State *L = e->L;
  int r = enc_module(e, idx);
  if (r)
    return r < 0 ? -1 : 0;
  lua_getfield(L, LUA_REGISTRYINDEX, "_LOADED");
  int loaded = lua_gettop(L);
  if (lua_istable(L, loaded)) {
    lua_pushnil(L);
    while (!r && lua_next(L, loaded)) {
      int mod = lua_gettop(L);
      if (lua_type(L, mod - 1) == LUA_TSTRING && lua_istable(L, mod))
        r = enc_cfield(e, idx, mod, mod - 1, NULL);
      lua_settop(L, mod - 1);
    }
  }
  lua_settop(L, loaded - 1);
  const char *name;
  if (r == 0 && mb_copy_own_module && (name = mb_copy_own_module(L)) != NULL) {
    r = enc_cfield(e, idx, lua_gettop(L), 0, name);
    lua_pop(L, 1);
  }
  if (r == 0)
    return fail(e, "cannot send a C function");
  return r < 0 ? -1 : 0;
}

/* Keep c (a reference the caller passes on) in the message's code list;
 * returns its index, or -1. */
static int add_code(enc_t *e, mb_code_t *c)
{
  if (e->ncode == e->codecap) {
    uint32_t cap = e->codecap ? 2 * e->codecap : 4;
    if (e->ncode >= MB_MSG_MAX_CODES) {
      mb_code_unref(c);
      return fail_plain(e, "message has too many functions (limit 65535)");
    }
    mb_code_t **nc = realloc(e->codes, cap * sizeof *nc);
    if (nc == NULL) {
      mb_code_unref(c);
      return fail_plain(e, "out of memory");
    }
    e->codes = inflight.codes = nc;
    e->codecap = cap;
  }
  e->codes[e->ncode] = c;
  inflight.ncode = ++e->ncode;
  return (int)(e->ncode - 1);
}

void (*mb_copy_on_load)(lua_State *L, int idx, mb_code_t *code);
int (*mb_copy_load)(lua_State *L, mb_code_t *code);
mb_code_t *(*mb_copy_code_of)(lua_State *L, int idx);
void (*mb_copy_on_dump)(lua_State *L, int idx, mb_code_t *code);
int (*mb_copy_module)(lua_State *L, const char *name, size_t n);
int (*mb_copy_require)(lua_State *L, const char *name, size_t n);
const char *(*mb_copy_own_module)(lua_State *L);

static int enc_function(enc_t *e, int idx)
{
  lua_State *L = e->L;
  uint64_t first;
  int seen = visit(e, lua_topointer(L, idx), e->len, &first);
  if (seen)
    return seen < 0 ? -1 : put_backref(e, first);
  if (lua_iscfunction(L, idx))
    return enc_cfunction(e, idx);
  if (enter(e) < 0)
    return -1;

  size_t fpos = e->len;
  mb_code_t *c = mb_copy_code_of ? mb_copy_code_of(L, idx) : NULL;
  int dumped = c == NULL;
  if (dumped) {
    lua_pushvalue(L, idx);
    int st = mb_code_dump(L, &c);
    lua_pop(L, 1);
    if (st == LUA_ERRMEM)
      return fail(e, "cannot send a function: out of memory (the sender is at its max_memory)");
    if (st != 0 || c == NULL)
      return fail(e, "cannot send a function: out of memory");
  }
  int ci = add_code(e, c);   /* the message's reference, held from here */
  if (ci < 0)
    return -1;
  if (dumped && mb_copy_on_dump)
    mb_copy_on_dump(L, idx, c);
  if (reserve(e, 1 + 5) < 0)
    return -1;
  *out(e, 1) = T_FUNCTION;
  put_varint(e, (uint32_t)ci);

  if (reserve(e, 1) < 0)
    return -1;
  size_t npos = e->len;
  out(e, 1);
  pathseg_t *seg = &e->path[e->depth];
  seg->kind = P_UPVAL;
  seg->idx = idx;
  uint32_t i;
  for (i = 1; lua_getupvalue(L, idx, (int)i); i++) {
    int up = lua_gettop(L);
    seg->n = i;
    if (i > 0xFF)
      return fail(e, "cannot send a function with more than 255 upvalues");
    /* A cell shared with a function sent earlier is joined, not copied. */
    uint64_t cell;
    int joined = visit(e, lua_upvalueid(L, idx, (int)i), (uint64_t)fpos << 8 | i, &cell);
    if (joined < 0)
      return -1;
    if (joined) {
      if (reserve(e, 1 + 5 + 1) < 0)
        return -1;
      e->msg->data[cell >> 8] |= T_SHARED;
      *out(e, 1) = T_UPJOIN;
      put_varint(e, (uint32_t)(cell >> 8));
      *out(e, 1) = (unsigned char)(cell & 0xFF);
      lua_pop(L, 1);
      continue;
    }
    int t = lua_type(L, up), r = 0;
    if (t == LUA_TTABLE || t == LUA_TUSERDATA ||
        (t == LUA_TFUNCTION && !lua_iscfunction(L, up)))
      r = enc_module(e, up);
    if (r < 0 || (r == 0 && enc_value(e, up) < 0))
      return -1;
    lua_pop(L, 1);
  }
  e->msg->data[npos] = (unsigned char)(i - 1);
  e->depth--;
  return 0;
}

static int enc_value(enc_t *e, int idx)
{
  lua_State *L = e->L;
  switch (lua_type(L, idx)) {
  case LUA_TNONE:
  case LUA_TNIL:
    return put_byte(e, T_NIL);
  case LUA_TBOOLEAN:
    return put_byte(e, lua_toboolean(L, idx) ? T_TRUE : T_FALSE);
  case LUA_TNUMBER: {
    lua_Number d = lua_tonumber(L, idx);
    if (reserve(e, 9) < 0)
      return -1;
    unsigned char *p = out(e, 9);
    p[0] = T_NUMBER;
    memcpy(p + 1, &d, 8);
    return 0;
  }
  case LUA_TSTRING: {
    size_t n;
    const char *s = lua_tolstring(L, idx, &n);
    return put_string(e, s, n);
  }
  case LUA_TTABLE:
    return enc_table(e, idx);
  case LUA_TFUNCTION:
    return enc_function(e, idx);
  case LUA_TUSERDATA: {
    uint64_t id;
    const mb_idkind_t *kind = mb_id_kind_ud(L, idx, &id);
    if (kind == &mb_ref_kind && mb_id_is_remote(id))
      return put_rref(e, id);
    if (kind && kind->tag)
      return put_id(e, kind->tag, id);
    return fail(e, "cannot send a userdata");
  }
  case LUA_TLIGHTUSERDATA:
    return fail(e, "cannot send a light userdata");
  case LUA_TTHREAD:
    return fail(e, "cannot send a coroutine");
  case TYPE_CDATA:
    return fail(e, "cannot send a cdata");
  default:
    return fail(e, "cannot send a value of this type");
  }
}

static void drop_codes(mb_code_t **codes, uint32_t n)
{
  for (uint32_t i = 0; i < n; i++)
    mb_code_unref(codes[i]);
  free(codes);
}

static void reclaim_inflight(void)
{
  free(inflight.msg);
  free(inflight.map);
  drop_codes(inflight.codes, inflight.ncode);
  inflight.msg = NULL;
  inflight.map = NULL;
  inflight.codes = NULL;
  inflight.ncode = 0;
}

mb_msg_t *mb_copy_encode(lua_State *L, int first, int n, const char *root,
                         const char *const *names, char *err, size_t errlen)
{
  /* Left over only if an earlier encode on this thread was cut short. */
  if (inflight.msg || inflight.map || inflight.codes)
    reclaim_inflight();
  if (err && errlen)
    err[0] = '\0';
  int top = lua_gettop(L);
  if (first < 0 && first > LUA_REGISTRYINDEX)
    first = top + first + 1;

  /* Only the fields used before an error are initialised: path[] and small[]
   * are written before they are read, and clearing them would cost more
   * than encoding a small message. */
  enc_t e;
  e.L = L;
  e.len = 0;
  e.depth = 0;
  e.failed = false;
  e.vi = 0;
  e.nvals = n;
  e.root = root;
  e.names = names;
  e.err = err;
  e.errlen = errlen;
  e.nseen = 0;
  e.mask = 0;
  e.map = NULL;
  e.msg = NULL;
  e.cap = 0;
  e.codes = NULL;
  e.ncode = e.codecap = 0;

  if (n < 0) {
    fail_plain(&e, "negative value count");
    return NULL;
  }
  /* One short string, as most lines between processes are (a chat room's
   * to its members): its bytes straight into a small message, without the
   * walk's set-up. Not shrunk (the generic path reallocs below 16 bytes):
   * the block stays the size the thread's cache of freed messages takes. */
  if (n == 1 && lua_type(L, first) == LUA_TSTRING) {
    size_t len;
    const char *s = lua_tolstring(L, first, &len);
    mb_msg_t *m = len + 1 <= INITIAL_PAYLOAD ? mb_msg_alloc_small() : NULL;
    if (m) {
      memset(m, 0, offsetof(mb_msg_t, data));
      m->nvalues = 1;
      m->len = len + 1;
      m->data[0] = (unsigned char)(T_SHORTSTR | len);
      memcpy(m->data + 1, s, len);
      return m;
    }
  }
  /* Before the first malloc: if this raises, nothing leaks. */
  if (!lua_checkstack(L, LEVEL_SLOTS)) {
    fail_plain(&e, "message nested too deep (Lua stack exhausted)");
    return NULL;
  }
  e.cap = INITIAL_PAYLOAD;
  e.msg = inflight.msg = mb_msg_alloc_small();
  if (!e.msg) {
    fail_plain(&e, "out of memory");
    return NULL;
  }

  for (e.vi = 0; e.vi < n; e.vi++)
    if (enc_value(&e, first + e.vi) < 0)
      break;
  lua_settop(L, top);
  free(e.map);
  mb_msg_t *m = e.msg;
  inflight.msg = NULL;
  inflight.map = NULL;
  inflight.codes = NULL;
  inflight.ncode = 0;
  if (e.failed) {
    free(m);
    drop_codes(e.codes, e.ncode);
    return NULL;
  }
  /* The code pointers and their bytes' sum (msg.h) go after the payload;
   * the final size is exact unless the slack is too small to be worth a
   * realloc. */
  size_t need = MB_MSG_CODES_AT(e.len) + MB_MSG_CODES_LEN(e.ncode);
  if (need > e.cap || e.cap - need > SHRINK_SLACK) {
    mb_msg_t *resized = realloc(m, sizeof(mb_msg_t) + need);
    if (resized)
      m = resized;
    else if (need > e.cap) {
      free(m);
      drop_codes(e.codes, e.ncode);
      if (err && errlen)
        snprintf(err, errlen, "out of memory");
      return NULL;
    }
  }
  /* Zero the whole header, fields added to mb_msg_t later included. */
  memset(m, 0, offsetof(mb_msg_t, data));
  m->nvalues = (uint32_t)n;
  m->len = e.len;
  m->ncode = (uint16_t)e.ncode;
  if (e.ncode) {
    /* Summed here, once: a mailbox reads it at every push and take. */
    size_t bytes = 0, len;
    for (uint32_t i = 0; i < e.ncode; i++) {
      mb_code_bytes(e.codes[i], &len);
      bytes += len;
    }
    memcpy(mb_msg_codes(m), e.codes, e.ncode * sizeof(mb_code_t *));
    memcpy(mb_msg_codes(m) + e.ncode, &bytes, sizeof bytes);
  }
  free(e.codes);
  return m;
}
