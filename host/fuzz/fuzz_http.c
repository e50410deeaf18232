/* fuzz_http.c: fuzz target for the HTTP head parser binding
 * (`moonbeam.http_parser`, host/lib/lib_http.c), driven through a real
 * lua_State as moonbeam.http drives it.
 *
 * DESIGN
 * Input: byte 0 chooses the parser (bit 0: response, else request; bit 1:
 * skip_body() first; bits 2-3: one of four sets of limits, from the defaults
 * down to 1 byte; bit 4: also call http_parser.reason and ws_accept; bits
 * 5-6: the stream is the rest repeated 1, 20, 3 or 60 times, within 64 KiB,
 * so that short inputs pass the queue's parse-ahead of 16 heads; bit 7:
 * queue mode feeds eagerly, see below), bytes 1 and 2 choose two cut
 * points, the rest is the stream. Events mode (parser:feed) is run twice on
 * fresh parsers: fed whole, then fed in the (up to) 3 pieces the cuts make,
 * each run ending with finish(). What must hold:
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
 * Queue mode (parser:next, what moonbeam.http reads) is run twice too, on
 * the same whole and cut streams, as lua/moonbeam/http_conn.lua drives it:
 * parser:next(piece), then parser:next() while an event says `more` (that
 * is how input kept past the parse-ahead gets parsed), then the next piece;
 * parser:next(true) at the end, drained the same way. With bit 7 it feeds
 * the next piece as soon as a piece gave an event, `more` or not (the API
 * allows it; it is the only way to reach kept input with more input, or
 * the end of the stream, arriving behind it). What must hold:
 *   - no crash, no sanitizer report, no Lua error out of parser:next,
 *     resting or in_message;
 *   - every event has the documented values (see l_next), a request's path
 *     and query are its URL split at the first '?', limits hold;
 *   - the events are events mode's, normalized (normalize_t): heads with
 *     their headers as the queue gives them (names lower-cased, repeats
 *     joined with ", "), a head that is its whole message (framing false
 *     in the queue, no body before its "done" in either) as head + done,
 *     body and upgrade bytes concatenated, an error or not at the end;
 *   - the queue holds no more heads than the parse-ahead allows (see
 *     check_ahead), after every parser:next;
 *   - drained (an event said no `more`, or none came), another
 *     parser:next() gives nothing, and parser:in_message() and resting()
 *     say what they say in events mode after the same pieces (the parser
 *     has read the same bytes then); resting() only between messages: not
 *     stopped, not in one, no head without its "done" recorded.
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
#include "lualib.h"

/* lib_http.c's per-head overheads, for checking what max_head allows. */
#define LINE_OVERHEAD 16
#define HEADER_OVERHEAD 4

static lua_State *L;
static mb_alloc_t heap;
static int module_ref, canon_ref;

/* canon(headers, is_list) -> count, text: a head's headers in one form for
 * both modes, as the queue gives them (names lower-cased, the values of a
 * repeated name joined with ", ", in a table), sorted by name so that the
 * queue's table order does not matter. is_list: events mode's list
 * {name1, value1, ...}, as sent. count: the names. In Lua because it is
 * table work, and checking code, not code under test. */
static const char canon_src[] =
  "local h, is_list = ...\n"
  "local t = h\n"
  "if is_list then\n"
  "  t = {}\n"
  "  for i = 1, #h, 2 do\n"
  "    local k = h[i]:lower()\n"
  "    t[k] = t[k] and t[k] .. ', ' .. h[i + 1] or h[i + 1]\n"
  "  end\n"
  "end\n"
  "local ks = {}\n"
  "for k, v in pairs(t) do\n"
  "  assert(type(k) == 'string' and type(v) == 'string', 'a header is not a string')\n"
  "  assert(k == k:lower(), 'a header name is not lower-cased')\n"
  "  ks[#ks + 1] = k\n"
  "end\n"
  "table.sort(ks)\n"
  "local out = {}\n"
  "for i, k in ipairs(ks) do out[i] = #k .. ':' .. k .. #t[k] .. ':' .. t[k] end\n"
  "return #ks, table.concat(out, '|')\n";

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
  /* For canon: base, string and table only (the jit library's blocks are
   * held where LeakSanitizer does not look, and would be reported). */
  static const lua_CFunction libs[] = {luaopen_base, luaopen_string, luaopen_table};
  for (size_t i = 0; i < sizeof libs / sizeof libs[0]; i++) {
    lua_pushcfunction(L, libs[i]);
    lua_call(L, 0, 0);
  }
  FUZZ_CHECK(luaL_loadstring(L, canon_src) == 0, "canon: %s", lua_tostring(L, -1));
  canon_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  return 0;
}

/* -- The normalized record (both modes) --------------------------------------
 * What events mode and queue mode must agree on, recorded the same way from
 * either: heads (framing: "C" chunked, "L<n>" Content-Length, "N" none, "-"
 * a request complete with its head), dones, body and upgrade bytes
 * concatenated, one "E" for an error. */
typedef struct {
  fuzz_buf_t b;
  char last;         /* the last event recorded: 'H', 'B', 'D', 'U', 'E', 0 */
  size_t fr_off;     /* where the last head's framing begins in b */
  int request;
} norm_t;

/* Record the headers (the table or list at index t) in canon form; returns
 * how many names. */
static int norm_headers(norm_t *nz, int t, int is_list)
{
  lua_rawgeti(L, LUA_REGISTRYINDEX, canon_ref);
  lua_pushvalue(L, t);
  lua_pushboolean(L, is_list);
  int rc = lua_pcall(L, 2, 2, 0);
  FUZZ_CHECK(rc == 0, "canon: %s", lua_tostring(L, -1));
  size_t len;
  const char *s = lua_tolstring(L, -1, &len);
  int count = (int)lua_tonumber(L, -2);
  fuzz_puts(&nz->b, "|");
  fuzz_put(&nz->b, s, len);
  lua_pop(L, 2);
  return count;
}

/* The end of a head's record: keep_alive, upgrade, then the framing, whose
 * place is remembered: a "done" right after the head makes it "-". */
static void norm_head_end(norm_t *nz, int keep, int upgrade, const char *framing)
{
  fuzz_putf(&nz->b, "|%lld", keep);
  fuzz_putf(&nz->b, "%lld|", upgrade);
  nz->fr_off = nz->b.n;
  fuzz_puts(&nz->b, framing);
  nz->last = 'H';
}

/* A "done". A request without a body is one event in the queue (framing
 * false, no "done"), a head and a "done" in events mode, and the queue also
 * gives the pair when the "done" came after the head was taken: all three
 * record as head with framing "-", then the done. */
static void norm_done(norm_t *nz, int keep)
{
  if (nz->last == 'H' && nz->request) {
    nz->b.n = nz->fr_off;
    fuzz_puts(&nz->b, "-");
  }
  fuzz_putf(&nz->b, "\nD%lld", keep);
  nz->last = 'D';
}

static void norm_bytes(norm_t *nz, char kind, const char *s, size_t len)
{
  if (len == 0 && kind == 'B')
    return;
  if (nz->last != kind) {
    char tag[2] = {'\n', kind};
    fuzz_put(&nz->b, tag, 2);
  }
  fuzz_put(&nz->b, s, len);
  nz->last = kind;
}

static void norm_error(norm_t *nz)
{
  if (nz->last != 'E')
    fuzz_puts(&nz->b, "\nE");
  nz->last = 'E';
}

static void framing_code(char *out, size_t cap, int chunked, double cl)
{
  if (chunked)
    snprintf(out, cap, "C");
  else if (cl >= 0)
    snprintf(out, cap, "L%.17g", cl);   /* may be above 2^63 */
  else
    snprintf(out, cap, "N");
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

/* Record events mode's head event at index t in normalized form. */
static void norm_event_head(int t, int response, norm_t *nz)
{
  size_t n;
  const char *s;
  fuzz_puts(&nz->b, "\nH");
  if (response) {
    fuzz_putf(&nz->b, "%lld", (long long)field_num(t, "status", 0));
  } else {
    s = field_str(t, "method", &n);
    put_lstr(&nz->b, s, n);
    s = field_str(t, "url", &n);
    put_lstr(&nz->b, s, n);
  }
  s = field_str(t, "version", &n);
  put_lstr(&nz->b, s, n);
  lua_getfield(L, t, "headers");
  norm_headers(nz, lua_gettop(L), 1);
  lua_pop(L, 1);
  char fr[48];
  framing_code(fr, sizeof fr, field_bool(t, "chunked"), field_num(t, "content_length", 1));
  norm_head_end(nz, field_bool(t, "keep_alive"), field_bool(t, "upgrade"), fr);
}

/* Per run: the type of the last recorded event, so that body (and upgrade)
 * bytes cut into several events record the same as one event, and the
 * repeats of a stopped parser's final event record nothing; and the
 * normalized record, for comparing with queue mode. */
typedef struct {
  char last;
  int stopped;        /* 'E' or 'U' once the parser stopped */
  norm_t *nz;
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
      norm_event_head(t, response, r->nz);
      r->last = 'H';
    } else if (strcmp(type, "body") == 0) {
      s = field_str(t, "data", &len);
      FUZZ_CHECK(len <= n, "body of %zu bytes from %zu", len, n);
      if (len && r->last != 'B')
        fuzz_puts(rec, "\nB");
      fuzz_put(rec, s, len);
      norm_bytes(r->nz, 'B', s, len);
      if (len)
        r->last = 'B';
    } else if (strcmp(type, "done") == 0) {
      fuzz_putf(rec, "\nD%lld", field_bool(t, "keep_alive"));
      norm_done(r->nz, field_bool(t, "keep_alive"));
      r->last = 'D';
    } else if (strcmp(type, "upgrade") == 0) {
      s = field_str(t, "rest", &len);
      FUZZ_CHECK(used + len == n, "consumed %g + rest %zu != %zu", used, len, n);
      FUZZ_CHECK(!was_stopped || was_stopped == 'U', "upgrade after an error");
      if (r->last != 'U')
        fuzz_puts(rec, "\nU");
      fuzz_put(rec, s, len);
      norm_bytes(r->nz, 'U', s, len);
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
      norm_error(r->nz);
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

/* A fresh parser for o, left on top of the stack. */
static int new_parser(const opts_t *o)
{
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
  return p;
}

/* Record parser:in_message() and resting() in st (both modes record them
 * after the same pieces, and must agree), and check that resting() is true
 * only between messages: nothing stopped, none begun, no head recorded
 * without its "done". */
static void record_state(int p, const norm_t *nz, fuzz_buf_t *st)
{
  call_method(p, "in_message", 0, 1);
  FUZZ_CHECK(lua_isboolean(L, -1), "in_message");
  int in = lua_toboolean(L, -1);
  lua_pop(L, 1);
  call_method(p, "resting", 0, 1);
  FUZZ_CHECK(lua_isboolean(L, -1), "resting");
  int rest = lua_toboolean(L, -1);
  lua_pop(L, 1);
  FUZZ_CHECK(!rest || (!in && (nz->last == 0 || nz->last == 'D')),
             "resting, with in_message %d and the last event '%c'", in, nz->last ? nz->last : '0');
  fuzz_putf(st, "%lld", in);
  fuzz_putf(st, "%lld,", rest);
}

/* One run in events mode: a fresh parser fed data in pieces
 * [cut[i], cut[i+1]), then finished; the events are recorded in rec (and
 * normalized in nz), the state after each piece in st. */
static void run(const opts_t *o, const uint8_t *data, const size_t cut[4], fuzz_buf_t *rec,
                norm_t *nz, fuzz_buf_t *st)
{
  int response = strcmp(o->type, "response") == 0;
  int p = new_parser(o);
  run_t r = {0, 0, nz};
  nz->request = !response;
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
    record_state(p, nz, st);
  }
  call_method(p, "finish", 0, 2);
  check_result(o, response, 0, &r, rec);
  record_state(p, nz, st);
  /* A finished parser takes more input without harm (it reports an error,
   * or keeps handing back the bytes after an upgrade). */
  lua_pushliteral(L, "GET / HTTP/1.1\r\n\r\n");
  call_method(p, "feed", 1, 2);
  lua_pop(L, 2);
  lua_settop(L, p - 2);
}

/* -- Queue mode -------------------------------------------------------------- */

static int is_num(int i) { return lua_type(L, i) == LUA_TNUMBER; }
static int is_str(int i) { return lua_type(L, i) == LUA_TSTRING; }
static int is_bool(int i) { return lua_type(L, i) == LUA_TBOOLEAN; }

/* A queue head's framing at index i ("-" for false: complete, no "done"
 * follows) as framing_code gives events mode's. */
static void q_framing(int i, int response, char *out, size_t cap)
{
  if (lua_isnil(L, i)) {
    framing_code(out, cap, 0, -1);
  } else if (is_bool(i)) {
    FUZZ_CHECK(lua_toboolean(L, i) || !response, "a response's framing is false");
    if (lua_toboolean(L, i))
      framing_code(out, cap, 1, -1);
    else
      snprintf(out, cap, "-");
  } else {
    FUZZ_CHECK(is_num(i) && lua_tonumber(L, i) >= 0, "framing is a %s", luaL_typename(L, i));
    framing_code(out, cap, 0, lua_tonumber(L, i));
  }
}

/* Check and record a request's head: the values at k.. (see l_next). */
static void q_request_head(const opts_t *o, int k, norm_t *nz)
{
  double max_url = o->max_url ? o->max_url : 4096;
  double max_headers = o->max_headers ? o->max_headers : 100;
  FUZZ_CHECK(lua_istable(L, k + 2), "headers is a %s", luaL_typename(L, k + 2));
  FUZZ_CHECK(is_str(k + 4) && is_str(k + 5) && is_str(k + 6) && is_str(k + 8),
             "method, url, path, version");
  FUZZ_CHECK(is_bool(k + 9) && is_bool(k + 10), "keep_alive, upgrade");
  size_t ulen, plen, qlen = 0, n;
  const char *url = lua_tolstring(L, k + 5, &ulen);
  const char *path = lua_tolstring(L, k + 6, &plen);
  FUZZ_CHECK(ulen <= max_url, "url of %zu bytes over max_url %g", ulen, max_url);
  /* path and query: the URL split at its first '?' (no query: nil). */
  const char *q = memchr(url, '?', ulen);
  if (q) {
    FUZZ_CHECK(is_str(k + 7), "query is a %s", luaL_typename(L, k + 7));
    const char *query = lua_tolstring(L, k + 7, &qlen);
    FUZZ_CHECK(plen == (size_t)(q - url) && memcmp(path, url, plen) == 0
               && qlen == ulen - plen - 1 && memcmp(query, q + 1, qlen) == 0,
               "path and query are not the URL split at '?'");
  } else {
    FUZZ_CHECK(lua_isnil(L, k + 7), "query without a '?'");
    FUZZ_CHECK(plen == ulen && memcmp(path, url, ulen) == 0, "path is not the URL");
  }
  fuzz_puts(&nz->b, "\nH");
  const char *s = lua_tolstring(L, k + 4, &n);
  put_lstr(&nz->b, s, n);
  put_lstr(&nz->b, url, ulen);
  s = lua_tolstring(L, k + 8, &n);
  put_lstr(&nz->b, s, n);
  int names = norm_headers(nz, k + 2, 0);
  FUZZ_CHECK(names <= max_headers, "%d header names, max_headers %g", names, max_headers);
  char fr[48];
  q_framing(k + 1, 0, fr, sizeof fr);
  norm_head_end(nz, lua_toboolean(L, k + 9), lua_toboolean(L, k + 10), fr);
  if (fr[0] == '-')
    norm_done(nz, lua_toboolean(L, k + 9));   /* folded in: see norm_done */
}

/* Check and record a response's head: message at k + 1, framing at k + 2. */
static void q_response_head(int k, norm_t *nz)
{
  int t = k + 1;
  FUZZ_CHECK(lua_istable(L, t), "message is a %s", luaL_typename(L, t));
  double st = field_num(t, "status", 0);
  FUZZ_CHECK(st >= 0 && st <= 999 && st == (int)st, "status %g", st);
  fuzz_puts(&nz->b, "\nH");
  fuzz_putf(&nz->b, "%lld", (long long)st);
  size_t n;
  const char *s = field_str(t, "version", &n);
  put_lstr(&nz->b, s, n);
  lua_getfield(L, t, "headers");
  FUZZ_CHECK(lua_istable(L, -1), "message.headers");
  norm_headers(nz, lua_gettop(L), 0);
  lua_pop(L, 1);
  char fr[48];
  q_framing(k + 2, 1, fr, sizeof fr);
  norm_head_end(nz, field_bool(t, "keep_alive"), field_bool(t, "upgrade"), fr);
}

/* The parse-ahead bound (PARSE_AHEAD in lib_http.c): the queue stops
 * taking events at the first message boundary with this many values in it,
 * so after any parser:next it holds at most one message's head more than
 * fit below that: 16 request heads (10 values each), 54 response heads (3).
 * Read off the queue itself, the parser's environment table: slots
 * [qhead, qtail) of kind, a, b (a request's head: 10 values), nil before. */
#define AHEAD_VALUES 160

static void check_ahead(int p, int response)
{
  lua_getfenv(L, p);
  int q = lua_gettop(L);
  FUZZ_CHECK(lua_istable(L, q), "the queue is a %s", luaL_typename(L, q));
  lua_Number lo = 0, hi = 0;
  lua_pushnil(L);
  while (lua_next(L, q)) {
    lua_pop(L, 1);
    FUZZ_CHECK(lua_type(L, -1) == LUA_TNUMBER, "a queue key is a %s", luaL_typename(L, -1));
    lua_Number k = lua_tonumber(L, -1);
    if (lo == 0 || k < lo)
      lo = k;
    if (k > hi)
      hi = k;
  }
  int per_head = response ? 3 : 10, heads = 0;
  for (int k = (int)lo; lo > 0 && k <= (int)hi;) {
    lua_rawgeti(L, q, k);
    FUZZ_CHECK(is_str(-1), "queue slot %d is a %s", k, luaL_typename(L, -1));
    int head = strcmp(lua_tostring(L, -1), "head") == 0;
    lua_pop(L, 1);
    heads += head;
    k += head ? per_head : 3;
  }
  FUZZ_CHECK(heads <= (AHEAD_VALUES - 1) / per_head + 1,
             "%d heads queued: parsed ahead past the bound", heads);
  lua_settop(L, q - 1);
}

/* parser:next(...) with the parser at p and nargs (0 or 1) arguments on
 * top: check and record the event it returns. Returns its `more` (0 or
 * 1), or -1 when it returned nothing. stopped: as run_t's. */
static int q_next(const opts_t *o, int p, int nargs, norm_t *nz, int *stopped)
{
  int response = strcmp(o->type, "response") == 0;
  int base = lua_gettop(L) - nargs;
  lua_getfield(L, p, "next");
  lua_insert(L, base + 1);
  lua_pushvalue(L, p);
  lua_insert(L, base + 2);
  int rc = lua_pcall(L, nargs + 1, LUA_MULTRET, 0);
  FUZZ_CHECK(rc == 0, "parser:next raised: %s", lua_tostring(L, -1));
  int nres = lua_gettop(L) - base, k = base + 1;
  check_ahead(p, response);
  if (nres == 0)
    return -1;
  FUZZ_CHECK(is_str(k), "kind is a %s", luaL_typename(L, k));
  const char *kind = lua_tostring(L, k);
  int head = strcmp(kind, "head") == 0;
  FUZZ_CHECK(nres == (head && !response ? 11 : 4), "%d values for a %s", nres, kind);
  FUZZ_CHECK(is_bool(k + 3), "more is a %s", luaL_typename(L, k + 3));
  int more = lua_toboolean(L, k + 3);
  size_t len;
  const char *s;
  if (*stopped)
    FUZZ_CHECK(kind[0] == *stopped - 'A' + 'a', "a %s after the parser stopped (%c)", kind, *stopped);
  if (head) {
    if (response)
      q_response_head(k, nz);
    else
      q_request_head(o, k, nz);
  } else if (strcmp(kind, "body") == 0) {
    FUZZ_CHECK(is_str(k + 1) && lua_isnil(L, k + 2), "body values");
    s = lua_tolstring(L, k + 1, &len);
    norm_bytes(nz, 'B', s, len);
  } else if (strcmp(kind, "done") == 0) {
    FUZZ_CHECK(is_bool(k + 1) && lua_isnil(L, k + 2), "done values");
    norm_done(nz, lua_toboolean(L, k + 1));
  } else if (strcmp(kind, "upgrade") == 0) {
    FUZZ_CHECK(is_str(k + 1) && lua_isnil(L, k + 2), "upgrade values");
    s = lua_tolstring(L, k + 1, &len);
    norm_bytes(nz, 'U', s, len);
    *stopped = 'U';
  } else if (strcmp(kind, "error") == 0) {
    FUZZ_CHECK(is_num(k + 1) && is_str(k + 2), "error values");
    double st = lua_tonumber(L, k + 1);
    FUZZ_CHECK(st == 400 || st == 414 || st == 431 || st == 501 || st == 505,
               "error status %g", st);
    norm_error(nz);
    *stopped = 'E';
  } else {
    FUZZ_CHECK(0, "unknown event kind '%s'", kind);
  }
  lua_settop(L, base);
  return more;
}

/* parser:next() while the last event said more; then, drained, another
 * parser:next() must give nothing. */
static void q_drain(const opts_t *o, int p, int more, norm_t *nz, int *stopped)
{
  while (more == 1)
    more = q_next(o, p, 0, nz, stopped);
  if (more == 0)
    FUZZ_CHECK(q_next(o, p, 0, nz, stopped) == -1, "an event after one that said no more");
}

/* One run in queue mode, as moonbeam.http drives it (see DESIGN); eager:
 * the next piece is fed as soon as a piece gave an event. Normalized
 * events in nz, the state after each piece (when drained) in st. */
static void qrun(const opts_t *o, const uint8_t *data, const size_t cut[4], int eager,
                 norm_t *nz, fuzz_buf_t *st)
{
  int p = new_parser(o);
  int stopped = 0, more = -1;
  nz->request = strcmp(o->type, "request") == 0;
  for (int i = 0; i < 3; i++) {
    size_t n = cut[i + 1] - cut[i];
    if (i > 0 && n == 0 && cut[i] == cut[3])
      break;   /* as run() */
    lua_pushlstring(L, (const char *)data + cut[i], n);
    more = q_next(o, p, 1, nz, &stopped);
    if (eager && more == 1)
      continue;
    q_drain(o, p, more, nz, &stopped);
    more = -1;
    record_state(p, nz, st);
  }
  /* The end of the stream (after the rest of the last piece, if eager). */
  lua_pushboolean(L, 1);
  q_drain(o, p, q_next(o, p, 1, nz, &stopped), nz, &stopped);
  record_state(p, nz, st);
  /* As run(): more input after the end does no harm (not recorded). */
  norm_t scratch = {.request = nz->request};
  lua_pushliteral(L, "GET / HTTP/1.1\r\n\r\n");
  q_drain(o, p, q_next(o, p, 1, &scratch, &stopped), &scratch, &stopped);
  free(scratch.b.p);
  lua_settop(L, p - 2);
}

/* Fail, showing the two records. */
static void differ(const char *what, const char *la, const fuzz_buf_t *a, const char *lb,
                   const fuzz_buf_t *b, const size_t cut[4])
{
  fuzz_dump(la, a);
  fprintf(stderr, "--- cut at %zu, %zu of %zu\n", cut[1], cut[2], cut[3]);
  fuzz_dump(lb, b);
  FUZZ_CHECK(0, "%s", what);
}

/* Stream repeats, by bits 5-6 of byte 0: 20 and 60 pass the queue's
 * parse-ahead (16 heads) with the shortest requests, 3 only pipelines. */
static const int repeats[4] = {1, 20, 3, 60};
#define MAX_STREAM 65536

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
  int eager = head[0] >> 7;
  size_t reps = (size_t)repeats[(head[0] >> 5) & 3];
  if (n && n * reps > MAX_STREAM)
    reps = MAX_STREAM / n > 1 ? MAX_STREAM / n : 1;
  /* The stream, exactly as long as it is (ASan sees a read past it). */
  const uint8_t *stream = data;
  uint8_t *copy = NULL;
  size_t len = n;
  if (reps > 1 && n) {
    len = n * reps;
    stream = copy = malloc(len);
    FUZZ_CHECK(copy != NULL, "malloc");
    for (size_t i = 0; i < reps; i++)
      memcpy(copy + i * n, data, n);
  }
  size_t whole[4] = {0, len, len, len}, cut[4];
  fuzz_cuts(len, head[1], head[2], cut);
  fuzz_buf_t a = {0}, b = {0}, sa = {0}, sb = {0}, qsa = {0}, qsb = {0};
  norm_t na = {.last = 0}, nb = {.last = 0}, qa = {.last = 0}, qb = {.last = 0};
  run(&o, stream, whole, &a, &na, &sa);
  run(&o, stream, cut, &b, &nb, &sb);
  if (!fuzz_same(&a, &b))
    differ("the events depend on where the stream was cut", "whole", &a, "cut", &b, cut);
  qrun(&o, stream, whole, eager, &qa, &qsa);
  qrun(&o, stream, cut, eager, &qb, &qsb);
  if (!fuzz_same(&na.b, &qa.b))
    differ("queue mode's events differ from events mode's (whole)", "events", &na.b,
           "queue", &qa.b, whole);
  if (!fuzz_same(&nb.b, &qb.b))
    differ("queue mode's events differ from events mode's (cut)", "events", &nb.b,
           "queue", &qb.b, cut);
  /* Eager feeding records the state only where it drained. */
  if (!eager && !fuzz_same(&sa, &qsa))
    differ("in_message/resting differ in queue mode (whole)", "events", &sa, "queue", &qsa, whole);
  if (!eager && !fuzz_same(&sb, &qsb))
    differ("in_message/resting differ in queue mode (cut)", "events", &sb, "queue", &qsb, cut);
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
  free(sa.p);
  free(sb.p);
  free(qsa.p);
  free(qsb.p);
  free(na.b.p);
  free(nb.b.p);
  free(qa.b.p);
  free(qb.b.p);
  free(copy);
  FUZZ_CHECK(lua_gettop(L) == 0, "stack left at %d", lua_gettop(L));
  /* Collect now, so that each input's parsers are freed (__gc) within the
   * input that made them and a fault there is blamed on it. */
  lua_gc(L, LUA_GCCOLLECT, 0);
  return 0;
}
