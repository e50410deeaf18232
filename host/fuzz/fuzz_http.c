/* fuzz_http.c: fuzz target for the HTTP head parser binding
 * (`moonbeam.http_parser`, host/lib/lib_http.c), driven through a real
 * lua_State as moonbeam.http drives it.
 *
 * DESIGN
 * Input: byte 0 chooses the parser (bit 0: response, else request; bit 1:
 * skip_body() first; bits 2-3: one of four sets of limits, from the defaults
 * down to 1 byte; bit 4: also call http_parser.reason and ws_accept), bytes
 * 1 and 2 choose two cut points, the rest is the stream. Each input is run
 * twice on fresh parsers: fed whole, then fed in the (up to) 3 pieces the
 * cuts make, each run ending with finish(). What must hold:
 *   - no crash, no sanitizer report, no Lua error out of feed or finish;
 *   - consumed is 0..#data, and all of it unless the feed stopped the parser
 *     (error) or upgraded (then consumed + #rest == #data); a stopped parser
 *     consumes nothing and repeats its final event;
 *   - every event has the documented type and fields; an error's status is
 *     400, 414 or 431; a head respects max_url, max_headers and max_head
 *     (counted as lib_http.c counts, less the reason phrase it drops);
 *   - the events do not depend on where the stream was cut: the two runs
 *     give the same heads and dones, the same body and upgrade bytes (body
 *     events themselves may be cut differently), and both end in an error
 *     or neither does (which error may differ: see check_result).
 * Lua's heap is allocated through the host's allocator (alloc.h), which is
 * the C library's malloc in sanitizer builds, so ASan sees Lua's blocks too.
 */
#include <stdint.h>
#include <string.h>

#include "alloc.h"
#include "fuzz.h"
#include "lauxlib.h"
#include "lib.h"
#include "lua.h"

/* lib_http.c's per-head overheads, for checking what max_head allows. */
#define LINE_OVERHEAD 16
#define HEADER_OVERHEAD 4

static lua_State *L;
static mb_alloc_t heap;
static int module_ref;

typedef struct {
  const char *type;
  int skip_body, extras;
  double max_head, max_headers, max_url;   /* 0: the default */
} opts_t;

static const double limit_sets[4][3] = {
  {0, 0, 0},          /* defaults: 8192, 100, 4096 */
  {64, 2, 8},
  {1, 1, 1},
  {300, 8, 40},
};

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
  L = lua_newstate(mb_alloc_fn, &heap);
  FUZZ_CHECK(L != NULL, "lua_newstate");
  lua_pushcfunction(L, mb_lib_http_parser_open);
  lua_call(L, 0, 1);
  module_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  return 0;
}

/* -- Reading the events ----------------------------------------------------- */

static const char *field_str(int t, const char *k, size_t *len)
{
  lua_getfield(L, t, k);
  FUZZ_CHECK(lua_type(L, -1) == LUA_TSTRING, "field %s is a %s", k, luaL_typename(L, -1));
  const char *s = lua_tolstring(L, -1, len);
  lua_pop(L, 1);   /* still referenced by the event table */
  return s;
}

static int field_bool(int t, const char *k)
{
  lua_getfield(L, t, k);
  FUZZ_CHECK(lua_type(L, -1) == LUA_TBOOLEAN, "field %s is a %s", k, luaL_typename(L, -1));
  int v = lua_toboolean(L, -1);
  lua_pop(L, 1);
  return v;
}

static double field_num(int t, const char *k, int optional)
{
  lua_getfield(L, t, k);
  if (optional && lua_isnil(L, -1)) {
    lua_pop(L, 1);
    return -1;
  }
  FUZZ_CHECK(lua_type(L, -1) == LUA_TNUMBER, "field %s is a %s", k, luaL_typename(L, -1));
  double v = lua_tonumber(L, -1);
  lua_pop(L, 1);
  return v;
}

static void put_lstr(fuzz_buf_t *b, const char *s, size_t n)
{
  fuzz_putf(b, "%lld:", (long long)n);
  fuzz_put(b, s, n);
}

/* Check the head event at index t and record it. */
static void check_head(int t, const opts_t *o, int response, fuzz_buf_t *rec)
{
  double max_head = o->max_head ? o->max_head : 8192;
  double max_headers = o->max_headers ? o->max_headers : 100;
  double max_url = o->max_url ? o->max_url : 4096;
  size_t n;
  const char *s;
  double counted = LINE_OVERHEAD;
  fuzz_puts(rec, "\nH");
  if (response) {
    double st = field_num(t, "status", 0);
    FUZZ_CHECK(st >= 0 && st <= 999 && st == (int)st, "status %g", st);
    fuzz_putf(rec, "%lld", (long long)st);
    if (o->extras) {
      lua_rawgeti(L, LUA_REGISTRYINDEX, module_ref);
      lua_getfield(L, -1, "reason");
      lua_pushnumber(L, st);
      lua_call(L, 1, 1);
      FUZZ_CHECK(lua_isnil(L, -1) || lua_type(L, -1) == LUA_TSTRING, "reason()");
      lua_pop(L, 2);
    }
  } else {
    s = field_str(t, "method", &n);
    put_lstr(rec, s, n);
    s = field_str(t, "url", &n);
    FUZZ_CHECK(n <= max_url, "url of %zu bytes over max_url %g", n, max_url);
    counted += n;
    put_lstr(rec, s, n);
  }
  s = field_str(t, "version", &n);
  put_lstr(rec, s, n);
  lua_getfield(L, t, "headers");
  FUZZ_CHECK(lua_istable(L, -1), "headers");
  int nh = (int)lua_objlen(L, -1);
  FUZZ_CHECK(nh % 2 == 0 && nh / 2 <= max_headers, "%d header entries, max_headers %g", nh, max_headers);
  for (int i = 1; i <= nh; i++) {
    lua_rawgeti(L, -1, i);
    FUZZ_CHECK(lua_type(L, -1) == LUA_TSTRING, "header entry %d", i);
    s = lua_tolstring(L, -1, &n);
    counted += n + (i % 2 ? HEADER_OVERHEAD : 0);
    put_lstr(rec, s, n);
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  FUZZ_CHECK(counted <= max_head, "head of %g counted bytes over max_head %g", counted, max_head);
  fuzz_putf(rec, "|%lld", field_bool(t, "keep_alive"));
  fuzz_putf(rec, "%lld", field_bool(t, "upgrade"));
  fuzz_putf(rec, "%lld", field_bool(t, "chunked"));
  double cl = field_num(t, "content_length", 1);
  FUZZ_CHECK(cl == -1 || cl >= 0, "content_length %g", cl);
  char num[40];
  snprintf(num, sizeof num, "|%.17g", cl);   /* may be above 2^63 */
  fuzz_puts(rec, num);
}

/* Per run: the type of the last recorded event, so that body (and upgrade)
 * bytes cut into several events record the same as one event, and the
 * repeats of a stopped parser's final event record nothing. */
typedef struct {
  char last;
  int stopped;        /* 'E' or 'U' once the parser stopped */
} run_t;

/* Check what parser:feed(data) or finish() left on the stack (consumed,
 * events) for n bytes of data, and record the events. */
static void check_result(const opts_t *o, int response, size_t n, run_t *r, fuzz_buf_t *rec)
{
  FUZZ_CHECK(lua_type(L, -2) == LUA_TNUMBER, "consumed is a %s", luaL_typename(L, -2));
  double used = lua_tonumber(L, -2);
  FUZZ_CHECK(used >= 0 && used <= n && used == (size_t)used, "consumed %g of %zu", used, n);
  FUZZ_CHECK(lua_istable(L, -1), "events");
  int evs = lua_gettop(L);
  int nev = (int)lua_objlen(L, evs);
  int was_stopped = r->stopped;
  if (was_stopped)
    FUZZ_CHECK(used == 0 && nev == (n ? 1 : nev), "a stopped parser consumed %g, %d events", used, nev);
  int final = 0;
  for (int i = 1; i <= nev; i++) {
    lua_rawgeti(L, evs, i);
    int t = lua_gettop(L);
    FUZZ_CHECK(lua_istable(L, t), "event %d", i);
    FUZZ_CHECK(!final, "an event after the final one");
    size_t len;
    const char *type = field_str(t, "type", &len);
    const char *s;
    if (strcmp(type, "head") == 0) {
      check_head(t, o, response, rec);
      r->last = 'H';
    } else if (strcmp(type, "body") == 0) {
      s = field_str(t, "data", &len);
      FUZZ_CHECK(len <= n, "body of %zu bytes from %zu", len, n);
      if (len && r->last != 'B')
        fuzz_puts(rec, "\nB");
      fuzz_put(rec, s, len);
      if (len)
        r->last = 'B';
    } else if (strcmp(type, "done") == 0) {
      fuzz_putf(rec, "\nD%lld", field_bool(t, "keep_alive"));
      r->last = 'D';
    } else if (strcmp(type, "upgrade") == 0) {
      s = field_str(t, "rest", &len);
      FUZZ_CHECK(used + len == n, "consumed %g + rest %zu != %zu", used, len, n);
      FUZZ_CHECK(!was_stopped || was_stopped == 'U', "upgrade after an error");
      if (r->last != 'U')
        fuzz_puts(rec, "\nU");
      fuzz_put(rec, s, len);
      r->last = 'U';
      r->stopped = 'U';
      final = 1;
    } else if (strcmp(type, "error") == 0) {
      field_str(t, "name", &len);
      field_str(t, "message", &len);
      double st = field_num(t, "status", 0);
      FUZZ_CHECK(st == 400 || st == 414 || st == 431 || st == 501 || st == 505,
                 "error status %g", st);
      FUZZ_CHECK(!was_stopped || was_stopped == 'E', "error after an upgrade");
      /* Not which error: when the bytes break two rules, the cut decides
       * which one is seen first (an over-long URL cut inside is refused
       * for its length, whole for a bad character that comes after). */
      if (r->last != 'E')
        fuzz_puts(rec, "\nE");
      r->last = 'E';
      r->stopped = 'E';
      final = 1;
    } else {
      FUZZ_CHECK(0, "unknown event type '%s'", type);
    }
    lua_settop(L, evs);
  }
  if (!r->stopped)
    FUZZ_CHECK(used == n, "consumed %g of %zu without an error or upgrade", used, n);
  lua_pop(L, 2);
}

/* parser:method(...) with the parser at index p and nargs arguments on top;
 * leaves nres results. A Lua error here is a bug (only memory could fail). */
static void call_method(int p, const char *method, int nargs, int nres)
{
  lua_getfield(L, p, method);
  lua_insert(L, -1 - nargs);
  lua_pushvalue(L, p);
  lua_insert(L, -1 - nargs);
  int rc = lua_pcall(L, nargs + 1, nres, 0);
  FUZZ_CHECK(rc == 0, "parser:%s raised: %s", method, lua_tostring(L, -1));
}

/* One run: a fresh parser fed data in pieces [cut[i], cut[i+1]), then
 * finished; the events are recorded in rec. */
static void run(const opts_t *o, const uint8_t *data, const size_t cut[4], fuzz_buf_t *rec)
{
  int response = strcmp(o->type, "response") == 0;
  lua_rawgeti(L, LUA_REGISTRYINDEX, module_ref);
  lua_getfield(L, -1, "new");
  lua_createtable(L, 0, 4);
  lua_pushstring(L, o->type);
  lua_setfield(L, -2, "type");
  if (o->max_head) {
    lua_pushnumber(L, o->max_head);
    lua_setfield(L, -2, "max_head");
    lua_pushnumber(L, o->max_headers);
    lua_setfield(L, -2, "max_headers");
    lua_pushnumber(L, o->max_url);
    lua_setfield(L, -2, "max_url");
  }
  FUZZ_CHECK(lua_pcall(L, 1, 1, 0) == 0, "new: %s", lua_tostring(L, -1));
  int p = lua_gettop(L);
  if (o->skip_body)
    call_method(p, "skip_body", 0, 0);
  run_t r = {0, 0};
  for (int i = 0; i < 3; i++) {
    size_t n = cut[i + 1] - cut[i];
    if (i > 0 && n == 0 && cut[i] == cut[3])
      break;   /* no trailing empty pieces: the cut points ran out */
    lua_pushlstring(L, (const char *)data + cut[i], n);
    call_method(p, "feed", 1, 2);
    if (n == 0) {
      FUZZ_CHECK(lua_tonumber(L, -2) == 0 && lua_objlen(L, -1) == 0, "feed('') did something");
      lua_pop(L, 2);
    } else {
      check_result(o, response, n, &r, rec);
    }
    call_method(p, "in_message", 0, 1);
    FUZZ_CHECK(lua_isboolean(L, -1), "in_message");
    lua_pop(L, 1);
  }
  call_method(p, "finish", 0, 2);
  check_result(o, response, 0, &r, rec);
  /* A finished parser takes more input without harm (it reports an error,
   * or keeps handing back the bytes after an upgrade). */
  lua_pushliteral(L, "GET / HTTP/1.1\r\n\r\n");
  call_method(p, "feed", 1, 2);
  lua_pop(L, 2);
  lua_settop(L, p - 2);
}

int LLVMFuzzerTestOneInput(const uint8_t *in, size_t size)
{
  if (!L)
    LLVMFuzzerInitialize(NULL, NULL);
  uint8_t head[3] = {0, 0, 0};
  memcpy(head, in, size < 3 ? size : 3);
  const uint8_t *data = size > 3 ? in + 3 : in;
  size_t n = size > 3 ? size - 3 : 0;
  opts_t o = {
    .type = head[0] & 1 ? "response" : "request",
    .skip_body = (head[0] >> 1) & 1,
    .extras = (head[0] >> 4) & 1,
    .max_head = limit_sets[(head[0] >> 2) & 3][0],
    .max_headers = limit_sets[(head[0] >> 2) & 3][1],
    .max_url = limit_sets[(head[0] >> 2) & 3][2],
  };
  size_t whole[4] = {0, n, n, n}, cut[4];
  fuzz_cuts(n, head[1], head[2], cut);
  fuzz_buf_t a = {0}, b = {0};
  run(&o, data, whole, &a);
  run(&o, data, cut, &b);
  if (!fuzz_same(&a, &b)) {
    fuzz_dump("whole", &a);
    fprintf(stderr, "--- cut at %zu, %zu\n", cut[1], cut[2]);
    fuzz_dump("cut", &b);
    FUZZ_CHECK(0, "the events depend on where the stream was cut");
  }
  if (o.extras) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, module_ref);
    lua_getfield(L, -1, "ws_accept");
    lua_pushlstring(L, (const char *)data, n < 300 ? n : 300);
    lua_call(L, 1, 1);
    FUZZ_CHECK(n > 256 ? lua_isnil(L, -1) : lua_objlen(L, -1) == 28, "ws_accept");
    lua_pop(L, 2);
  }
  free(a.p);
  free(b.p);
  FUZZ_CHECK(lua_gettop(L) == 0, "stack left at %d", lua_gettop(L));
  /* Collect now, so that each input's parsers are freed (__gc) within the
   * input that made them and a fault there is blamed on it. */
  lua_gc(L, LUA_GCCOLLECT, 0);
  return 0;
}
