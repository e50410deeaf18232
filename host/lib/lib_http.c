/* lib_http.c: the `moonbeam.http_parser` Lua module - an incremental HTTP/1.x
 * parser on Debian's http-parser (libhttp-parser), used by moonbeam.http and
 * moonbeam.websocket.
 *
 * DESIGN
 * A parser is a userdata wrapping one `http_parser` (request or response
 * side). The Lua side feeds it whatever bytes a socket read returned;
 * parser:feed(data) runs http_parser_execute over them and returns how many
 * bytes it consumed and a list of events in stream order:
 *
 *   {type = "head", method =, url =, status =, version = "1.1",
 *    headers = {name1, value1, name2, value2, ...} (as sent, in order),
 *    keep_alive = bool, upgrade = bool, chunked = bool,
 *    content_length = n or nil}
 *   {type = "body", data = "..."}        (decoded: chunked framing removed)
 *   {type = "done", keep_alive = bool}   (the message is complete)
 *   {type = "upgrade", rest = "..."}     (the bytes after an upgrade head,
 *                                          which the parser did not consume)
 *   {type = "error", name =, message =, status = 400/413/414/431}
 *
 * After "upgrade" or "error" the parser stops: later feeds return 0 and the
 * same final event again. Several pipelined messages may come out of one
 * feed. The head of a message is collected in a C buffer (its pieces may
 * arrive split over many feeds) and becomes a Lua table only when complete,
 * so the parser callbacks touch Lua only to push finished events.
 *
 * The queue (parser:next), what moonbeam.http reads: the same events as
 * values (kind, a, b) in a table kept with the parser and reused (the
 * first event of a feed that finds it empty is returned without it), and a
 * request's head as the values moonbeam.http makes the handler's table of
 * (push_message: a constructor in Lua is a template copy, cheaper than a
 * table built through the C API), its headers a table built here with the
 * names lower-cased. A request without a body is one event. The cost model
 * is the server's: a keep-alive request is parsed and checked in one call
 * from Lua, with no event table.
 * The same file builds a response in one buffer and writes it
 * (http_parser.respond) and does the guard around a handler (see "Guarding
 * a connection" below); measured, those took a request's instructions from
 * 65,000 to 26,000 (BENCHMARKS.md).
 *
 * Limits, checked while parsing so that a hostile peer costs at most them:
 * head bytes (request line or status line and headers, counted as the bytes
 * of their text plus 4 per header; default 8 KiB -> status 431), the number
 * of headers (default 100 -> 431) and the URL length (default 4 KiB -> 414).
 * http-parser's own compile-time cap on raw head bytes (80 KiB, counting
 * whitespace too) also answers 431. Bodies are not limited here: the Lua side
 * sees content_length in the head and counts chunked bodies itself.
 *
 * Strictness. Debian builds http-parser with HTTP_PARSER_STRICT=0 (strict
 * mode is a compile-time switch, so it cannot be turned on here), and even
 * strict mode lets through what request smuggling is made of. So every byte
 * goes through a strict framing checker first (http_frame.h: line endings,
 * obs-fold, header names, chunk framing), which hands the parser a head at a
 * time and then follows the framing the parser chose, so that the two never
 * disagree on where a message ends. on_headers_complete then refuses what a
 * valid syntax can still make ambiguous: Transfer-Encoding sent twice, not
 * ending with chunked, with another coding (501), or in an HTTP/1.0
 * message; an HTTP/1.1 request without Host, or two Host headers; a major
 * version other than 1 (505). http-parser itself refuses Content-Length
 * twice (even equal) and together with Transfer-Encoding. The same rules
 * hold for responses (Host aside), where a violation is an error event too.
 *
 * The fast path. A whole request head without a body in one read (what a
 * client sends most) does not go through either:
 * fast_head reads it in one pass, within a narrow subset that both accept
 * and read alike, and gives the same event (see "The fast path" below);
 * anything else it leaves to them. Measured: 15,140 -> 13,900-14,100
 * instructions a keep-alive request, and a third fewer instruction-cache
 * misses (BENCHMARKS.md).
 *
 * Threads: a parser belongs to the process that made it (userdata in its
 * state); nothing here blocks or yields.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <pthread.h>

#include "http_parser.h"
#include "lauxlib.h"
#include "lib.h"
#include "alloc.h"
#include "err.h"
#include "http_frame.h"
#include "http_guard.h"
#include "msg.h"
#include "pid.h"
#include "proc.h"
#include "sock.h"
#include "timer.h"

#if defined(__has_include)
#if __has_include("ws.h")
#include "ws.h"
#define MB_HAVE_WS_H 1
#endif
#endif

#define PARSER_MT "moonbeam.http_parser"

/* Defaults of the limits (parser options max_head, max_headers, max_url). */
#define DEFAULT_MAX_HEAD 8192
#define DEFAULT_MAX_HEADERS 100
#define DEFAULT_MAX_URL 4096
/* Bytes counted for each header beyond its name and value (": ", CRLF), and
 * for the request line beyond its URL (method, version, spaces, CRLF). */
#define HEADER_OVERHEAD 4
#define LINE_OVERHEAD 16

/* The parser's own errors, beyond http-parser's HPE_* ones: limits, the
 * framing checker's and on_headers_complete's refusals. */
#define LIMIT_ERRORS(X)                                                   \
  X(NONE, "", 0)                                                          \
  X(HEAD_TOO_LARGE, "request head too large", 431)                        \
  X(TOO_MANY_HEADERS, "too many headers", 431)                            \
  X(URL_TOO_LONG, "URL too long", 414)                                    \
  X(BARE_LF, "line ended by LF without CR", 400)                          \
  X(BARE_CR, "CR not followed by LF", 400)                                \
  X(OBS_FOLD, "folded header line (obs-fold)", 400)                       \
  X(SPACE_BEFORE_HEADER, "whitespace before the first header", 400)       \
  X(SPACE_IN_NAME, "whitespace in or after a header name", 400)           \
  X(NO_COLON, "header line without a colon", 400)                         \
  X(BAD_CHUNK, "malformed chunked framing", 400)                         \
  X(TE_TWICE, "Transfer-Encoding sent twice", 400)                        \
  X(TE_NOT_CHUNKED, "Transfer-Encoding does not end with chunked", 400)   \
  X(TE_UNSUPPORTED, "transfer coding other than chunked", 501)            \
  X(TE_HTTP10, "Transfer-Encoding in an HTTP/1.0 message", 400)           \
  X(NO_HOST, "HTTP/1.1 request without Host", 400)                        \
  X(HOST_TWICE, "more than one Host header", 400)                         \
  X(BAD_VERSION, "HTTP version not supported", 505)

#define X_ENUM(n, s, st) LIM_##n,
enum { LIMIT_ERRORS(X_ENUM) };
#undef X_ENUM
#define X_NAME(n, s, st) #n,
static const char *const limit_names[] = { LIMIT_ERRORS(X_NAME) };
#undef X_NAME
#define X_TEXT(n, s, st) s,
static const char *const limit_texts[] = { LIMIT_ERRORS(X_TEXT) };
#undef X_TEXT
#define X_STATUS(n, s, st) st,
static const int limit_status[] = { LIMIT_ERRORS(X_STATUS) };
#undef X_STATUS

/* The framing checker's errors (MB_HFRAME_*, in its order) as ours. */
static const int frame_errors[] = {
  LIM_NONE, LIM_BARE_LF, LIM_BARE_CR, LIM_OBS_FOLD, LIM_SPACE_BEFORE_HEADER,
  LIM_SPACE_IN_NAME, LIM_NO_COLON, LIM_BAD_CHUNK
};

/* One header of the head being collected: offsets into hp_t.buf. */
typedef struct {
  uint32_t name, name_len, value, value_len;
} hdr_t;

/* The length of e's value without its trailing SP and HT: the whitespace
 * around a field value is not part of it (RFC 9110 5.5), and both parsers
 * keep what follows the value's first byte (http-parser drops only the
 * leading). The events give values so; the framing checks (check_te) read
 * them whole, strictly. */
static uint32_t trimmed_len(const char *buf, const hdr_t *e)
{
  uint32_t n = e->value_len;
  while (n > 0 && (buf[e->value + n - 1] == ' ' || buf[e->value + n - 1] == '\t'))
    n--;
  return n;
}

/* What a complete head says beyond its URL and headers, as the events
 * give it: read off http-parser (on_headers_complete) or found by the
 * fast path (fast_head). */
enum { FR_NONE, FR_LENGTH, FR_CHUNKED, FR_COMPLETE };
typedef struct {
  int method;            /* enum http_method (a request's) */
  int status;            /* a response's */
  int major, minor;
  int keep_alive, upgrade;
  int framing;           /* FR_LENGTH (length), FR_CHUNKED, FR_NONE; or
                            FR_COMPLETE: a request without a body, whose
                            head is the whole message (the fast path's) */
  uint64_t length;
} head_t;

typedef struct {
  const char *tag;       /* &parser_tag (see check_parser) */
  http_parser p;
  lua_State *L;          /* during feed: the state, with the events table on top */
  int nevents;           /* events pushed during this feed */
  /* The queue of parser:next (see DESIGN): its table is the userdata's
   * environment, at stack index qidx while parsing; slots [qhead, qtail)
   * hold triples (kind, a, b). */
  int api;               /* API_NONE until the first feed or next */
  int qidx;
  int qhead, qtail;
  /* Limits. */
  uint32_t max_head, max_headers, max_url;
  /* The head being collected: URL then names and values, contiguous. */
  char *buf;
  uint32_t len, cap;
  uint32_t url_len;
  hdr_t *hdrs;
  uint32_t nhdrs, hcap;
  uint32_t head_bytes;   /* counted toward max_head */
  int last_value;        /* the last header callback was a value */
  int in_head;           /* between message begin and headers complete */
  int in_message;        /* between message begin and message complete */
  int skip_body;         /* response parser: the next response has no body */
  int fold;              /* queue mode, request parser: the head just queued
                            (at slot fold) has had no body yet, so its "done"
                            can be folded into it */
  /* Queue mode, during one parser:next: the first event of a feed that
   * found the queue empty stays on the stack (what parser:next returns),
   * only the events after it go through the queue table. */
  int direct_ok;         /* the next event may stay on the stack */
  int dbase, ndirect;    /* where it is and how many values (0: none) */
  int fold_at;           /* its framing's stack index, as fold (0: none) */
  mb_hframe_t frame;     /* the framing checker (http_frame.h) */
  /* Queue mode: the bytes of the last input not parsed yet, because the
   * queue held PARSE_AHEAD events already (see parser:next), and whether
   * the stream's end came after them. */
  char *pend;
  uint32_t pend_off, pend_len, pend_cap;   /* kept: pend[pend_off, pend_len) */
  int pend_eof;
  /* Final state. */
  int limit_err;         /* LIM_* that stopped the parser */
  int stopped;           /* 1: error, 2: upgrade (feeds do nothing now) */
} hp_t;


static const char *const type_names[] = { "request", "response", NULL };

/* Which of the two interfaces a parser serves (they must not be mixed: the
 * events of one would be missed by the other). */
enum { API_NONE, API_EVENTS, API_QUEUE };

/* -- Collecting the head -------------------------------------------------- */

/* Count n more head bytes; set the error and return -1 over the limit. */
static int count_head(hp_t *h, size_t n)
{
  if (h->head_bytes + n > h->max_head) {
    h->limit_err = LIM_HEAD_TOO_LARGE;
    return -1;
  }
  h->head_bytes += (uint32_t)n;
  return 0;
}

/* Append bytes to the head buffer; the callers counted them first, so the
 * buffer never grows past max_head plus the per-header overheads. */
static void append(hp_t *h, const char *at, size_t n)
{
  if (h->len + n > h->cap) {
    uint32_t cap = h->cap ? h->cap : 256;
    while (cap < h->len + n)
      cap *= 2;
    h->buf = mb_realloc(h->buf, cap);
    h->cap = cap;
  }
  memcpy(h->buf + h->len, at, n);
  h->len += (uint32_t)n;
}

/* A new header in the head being collected, starting at the buffer's end
 * (name and value empty so far); the callers checked max_headers. */
static hdr_t *new_hdr(hp_t *h)
{
  if (h->nhdrs == h->hcap) {
    h->hcap = h->hcap ? h->hcap * 2 : 16;
    h->hdrs = mb_realloc(h->hdrs, h->hcap * sizeof *h->hdrs);
  }
  hdr_t *e = &h->hdrs[h->nhdrs++];
  e->name = e->value = h->len;
  e->name_len = e->value_len = 0;
  return e;
}

static int on_message_begin(http_parser *p)
{
  hp_t *h = p->data;
  h->len = h->url_len = h->nhdrs = h->head_bytes = 0;
  h->last_value = 1;
  h->in_head = 1;
  h->in_message = 1;
  return count_head(h, LINE_OVERHEAD);
}

static int on_url(http_parser *p, const char *at, size_t n)
{
  hp_t *h = p->data;
  if (h->url_len + n > h->max_url) {
    h->limit_err = LIM_URL_TOO_LONG;
    return -1;
  }
  if (count_head(h, n))
    return -1;
  append(h, at, n);
  h->url_len += (uint32_t)n;
  return 0;
}

static int on_status(http_parser *p, const char *at, size_t n)
{
  return count_head(p->data, n);   /* the reason phrase is not kept */
}

static int on_header_field(http_parser *p, const char *at, size_t n)
{
  hp_t *h = p->data;
  int fresh = h->last_value;
  h->last_value = 0;
  if (count_head(h, fresh ? n + HEADER_OVERHEAD : n))
    return -1;
  if (!h->in_head)
    return 0;   /* a trailer after a chunked body: counted, not kept */
  if (fresh) {
    if (h->nhdrs >= h->max_headers) {
      h->limit_err = LIM_TOO_MANY_HEADERS;
      return -1;
    }
    new_hdr(h);
  }
  hdr_t *e = &h->hdrs[h->nhdrs - 1];
  append(h, at, n);
  e->name_len += (uint32_t)n;
  e->value = h->len;
  return 0;
}

static int on_header_value(http_parser *p, const char *at, size_t n)
{
  hp_t *h = p->data;
  h->last_value = 1;
  if (count_head(h, n))
    return -1;
  if (!h->in_head || h->nhdrs == 0)
    return 0;
  append(h, at, n);
  h->hdrs[h->nhdrs - 1].value_len += (uint32_t)n;
  return 0;
}

/* -- Events --------------------------------------------------------------- */

/* Append the table on top of the stack to the events table below it. */
static void push_event(hp_t *h)
{
  lua_rawseti(h->L, -2, ++h->nevents);
}

static void new_event(lua_State *L, const char *type, int nfields)
{
  lua_createtable(L, 0, nfields + 1);
  lua_pushstring(L, type);
  lua_setfield(L, -2, "type");
}

static void set_bool(lua_State *L, const char *k, int v)
{
  lua_pushboolean(L, v);
  lua_setfield(L, -2, k);
}

/* Is the header name at e `name` (lower case), ignoring case? */
static int name_is(const hp_t *h, const hdr_t *e, const char *name)
{
  size_t n = strlen(name);
  return e->name_len == n && strncasecmp(h->buf + e->name, name, n) == 0;
}

/* Check the Transfer-Encoding value v[0..n): a list whose only coding is
 * chunked (the only one we decode; a sender must not apply it twice).
 * Returns a LIM_* error or LIM_NONE. */
static int check_te(const char *v, size_t n)
{
  int codings = 0, last_chunked = 0, others = 0;
  size_t i = 0;
  while (i <= n) {
    size_t j = i;
    while (j < n && v[j] != ',')
      j++;
    size_t a = i, b = j;
    while (a < b && (v[a] == ' ' || v[a] == '\t'))
      a++;
    while (b > a && (v[b - 1] == ' ' || v[b - 1] == '\t'))
      b--;
    if (b > a) {
      codings++;
      last_chunked = b - a == 7 && strncasecmp(v + a, "chunked", 7) == 0;
      if (!last_chunked)
        others++;
    }
    i = j + 1;
  }
  if (!last_chunked)
    return LIM_TE_NOT_CHUNKED;
  if (codings - others > 1)
    return LIM_TE_NOT_CHUNKED;   /* chunked applied twice */
  return others ? LIM_TE_UNSUPPORTED : LIM_NONE;
}

/* What a well-formed head can still make ambiguous (see DESIGN). Returns a
 * LIM_* error or LIM_NONE. */
static int check_head(hp_t *h)
{
  http_parser *p = &h->p;
  if (p->http_major != 1)
    return LIM_BAD_VERSION;
  int te = 0, hosts = 0;
  const hdr_t *te_hdr = NULL;
  for (uint32_t i = 0; i < h->nhdrs; i++) {
    const hdr_t *e = &h->hdrs[i];
    if (name_is(h, e, "transfer-encoding")) {
      te++;
      te_hdr = e;
    } else if (name_is(h, e, "host")) {
      hosts++;
    }
  }
  if (te > 1)
    return LIM_TE_TWICE;
  if (te) {
    if (p->http_minor == 0)
      return LIM_TE_HTTP10;
    int err = check_te(h->buf + te_hdr->value, te_hdr->value_len);
    if (err)
      return err;
    /* Our reading and http-parser's must agree that the body is chunked. */
    if (!(p->flags & F_CHUNKED))
      return LIM_TE_NOT_CHUNKED;
  }
  if (p->type == HTTP_REQUEST) {
    if (hosts > 1)
      return LIM_HOST_TWICE;
    if (hosts == 0 && p->http_minor >= 1)
      return LIM_NO_HOST;
  }
  return LIM_NONE;
}

/* Queue mode: the n values of an event on top of the stack (kind, a, b; a
 * request's head has more, see push_message) go to the end of the queue,
 * or stay where they are as the one event parser:next returns directly. */
static void q_push(hp_t *h, int n)
{
  lua_State *L = h->L;
  if (h->direct_ok) {
    h->direct_ok = 0;
    h->ndirect = n;
    h->dbase = lua_gettop(L) - n + 1;
    return;
  }
  for (int i = n; i >= 1; i--)
    lua_rawseti(L, h->qidx, h->qtail + i);
  h->qtail += n;
}

static void push_version(lua_State *L, const head_t *m)
{
  if (m->major == 1 && m->minor == 1)
    lua_pushliteral(L, "1.1");
  else if (m->major == 1 && m->minor == 0)
    lua_pushliteral(L, "1.0");
  else
    lua_pushfstring(L, "%d.%d", m->major, m->minor);
}

/* Queue mode: the strings it pushes, kept as upvalues of parser:next (after
 * the metatable, upvalue 1) so that building a request interns no key. */
#define QUEUE_STRINGS(X)                                                    \
  X(METHOD, "method") X(URL, "url") X(PATH, "path") X(QUERY, "query")       \
  X(BODY, "body") X(VERSION, "version") X(HEADERS, "headers")               \
  X(KEEP_ALIVE, "keep_alive") X(UPGRADE, "upgrade") X(STATUS, "status")     \
  X(HEAD, "head") X(DONE, "done") X(ERROR, "error") X(EMPTY, "")            \
  X(V11, "1.1") X(V10, "1.0") X(COMMA, ", ") X(GET, "GET")
#define X_ENUM(n, s) K_##n,
enum { QUEUE_STRINGS(X_ENUM) K_COUNT };
#undef X_ENUM
#define X_TEXT(n, s) s,
static const char *const queue_strings[] = { QUEUE_STRINGS(X_TEXT) };
#undef X_TEXT

/* Push queue string k (only inside parser:next). */
#define KPUSH(L, k) lua_pushvalue((L), lua_upvalueindex(2 + (k)))

/* The values of a request's head event in the queue (see push_message). */
#define HEAD_VALUES 10

/* Queue mode: push the version ("1.1" and "1.0" from the queue strings). */
static void q_version(lua_State *L, const head_t *m)
{
  if (m->major == 1 && m->minor <= 1)
    KPUSH(L, m->minor ? K_V11 : K_V10);
  else
    lua_pushfstring(L, "%d.%d", m->major, m->minor);
}

/* The headers of the collected head as a table of lower-cased names
 * (repeated ones joined with ", "), on top of the stack. Only a name seen
 * before in this head is looked up in the table: the check is a compare of
 * lengths against the earlier names (which are lower-cased already), far
 * cheaper than a table look-up through the C API. */
static void push_headers(hp_t *h)
{
  lua_State *L = h->L;
  lua_createtable(L, 0, (int)h->nhdrs);
  for (uint32_t i = 0; i < h->nhdrs; i++) {
    const hdr_t *e = &h->hdrs[i];
    char *name = h->buf + e->name;
    for (uint32_t k = 0; k < e->name_len; k++)
      if (name[k] >= 'A' && name[k] <= 'Z')
        name[k] = (char)(name[k] + 32);
    int again = 0;
    for (uint32_t j = 0; j < i && !again; j++)
      again = h->hdrs[j].name_len == e->name_len
              && memcmp(h->buf + h->hdrs[j].name, name, e->name_len) == 0;
    lua_pushlstring(L, name, e->name_len);
    if (!again) {
      lua_pushlstring(L, h->buf + e->value, trimmed_len(h->buf, e));
    } else {
      lua_pushvalue(L, -1);
      lua_rawget(L, -3);
      KPUSH(L, K_COMMA);
      lua_pushlstring(L, h->buf + e->value, trimmed_len(h->buf, e));
      lua_concat(L, 3);
    }
    lua_rawset(L, -3);
  }
}

/* Queue mode: the head. A request's is the values moonbeam.http builds its
 * request table from ("head", framing, headers, method, url, path, query,
 * version, keep_alive, upgrade; see parser:next): a table constructor with
 * constant keys in Lua is a template copy, and filling it is a store per
 * field, where building it here cost a key look-up and insertion per field
 * through the C API (measured: 2,500 instructions a request). A response's
 * is ("head", message, framing), the message a table {status, version,
 * headers, keep_alive, upgrade}. framing: content_length | true (chunked)
 * | nil, made false by on_message_complete for a request complete with its
 * head. */
/* A message's framing: its content length, true (chunked), or nil. */
static void push_framing(lua_State *L, const head_t *m)
{
  if (m->framing == FR_CHUNKED)
    lua_pushboolean(L, 1);
  else if (m->framing == FR_LENGTH)
    lua_pushnumber(L, (lua_Number)m->length);
  else if (m->framing == FR_COMPLETE)
    lua_pushboolean(L, 0);
  else
    lua_pushnil(L);
}

static void push_message(hp_t *h, const head_t *m)
{
  lua_State *L = h->L;
  KPUSH(L, K_HEAD);
  if (h->p.type == HTTP_REQUEST) {
    push_framing(L, m);
    push_headers(h);
    if (m->method == HTTP_GET)
      KPUSH(L, K_GET);
    else
      lua_pushstring(L, http_method_str((enum http_method)m->method));
    const char *q = memchr(h->buf, '?', h->url_len);
    lua_pushlstring(L, h->buf, h->url_len);
    if (q) {
      size_t plen = (size_t)(q - h->buf);
      lua_pushlstring(L, h->buf, plen);
      lua_pushlstring(L, q + 1, h->url_len - plen - 1);
    } else {
      lua_pushvalue(L, -1);   /* the path is the whole URL */
      lua_pushnil(L);
    }
    q_version(L, m);
    lua_pushboolean(L, m->keep_alive);
    lua_pushboolean(L, m->upgrade);
    int direct = h->direct_ok;
    q_push(h, HEAD_VALUES);
    if (m->framing == FR_COMPLETE) {
      h->fold = h->fold_at = 0;   /* no "done" to fold: false already */
    } else if (direct) {
      h->fold_at = h->dbase + 1;
      h->fold = 0;
    } else {
      h->fold = h->qtail - HEAD_VALUES + 2;
    }
    return;
  }
  lua_createtable(L, 0, 7);
  int t = lua_gettop(L);
  KPUSH(L, K_STATUS);
  lua_pushinteger(L, m->status);
  lua_rawset(L, t);
  KPUSH(L, K_VERSION);
  q_version(L, m);
  lua_rawset(L, t);
  KPUSH(L, K_HEADERS);
  push_headers(h);
  lua_rawset(L, t);
  KPUSH(L, K_KEEP_ALIVE);
  lua_pushboolean(L, m->keep_alive);
  lua_rawset(L, t);
  KPUSH(L, K_UPGRADE);
  lua_pushboolean(L, m->upgrade);
  lua_rawset(L, t);
  push_framing(L, m);
  q_push(h, 3);
  h->fold = 0;
}

/* Events mode: the head event (see DESIGN). */
static void push_head_event(hp_t *h, const head_t *m)
{
  lua_State *L = h->L;
  new_event(L, "head", 9);
  if (h->p.type == HTTP_REQUEST) {
    lua_pushstring(L, http_method_str((enum http_method)m->method));
    lua_setfield(L, -2, "method");
    lua_pushlstring(L, h->buf, h->url_len);
    lua_setfield(L, -2, "url");
  } else {
    lua_pushinteger(L, m->status);
    lua_setfield(L, -2, "status");
  }
  push_version(L, m);
  lua_setfield(L, -2, "version");
  lua_createtable(L, (int)h->nhdrs * 2, 0);
  for (uint32_t i = 0; i < h->nhdrs; i++) {
    const hdr_t *e = &h->hdrs[i];
    lua_pushlstring(L, h->buf + e->name, e->name_len);
    lua_rawseti(L, -2, (int)(2 * i + 1));
    lua_pushlstring(L, h->buf + e->value, trimmed_len(h->buf, e));
    lua_rawseti(L, -2, (int)(2 * i + 2));
  }
  lua_setfield(L, -2, "headers");
  set_bool(L, "keep_alive", m->keep_alive);
  set_bool(L, "upgrade", m->upgrade);
  set_bool(L, "chunked", m->framing == FR_CHUNKED);
  if (m->framing == FR_LENGTH) {
    lua_pushnumber(L, (lua_Number)m->length);
    lua_setfield(L, -2, "content_length");
  }
  push_event(h);
}

/* The complete head the parser p has read, and what it says. */
static void push_head(hp_t *h, const head_t *m)
{
  if (h->api == API_QUEUE)
    push_message(h, m);
  else
    push_head_event(h, m);
  /* Keep the buffer of a large head from living on with the connection. */
  if (h->cap > 4096) {
    mb_free(h->buf);
    h->buf = NULL;
    h->cap = 0;
  }
  h->len = 0;
}

static int on_headers_complete(http_parser *p)
{
  hp_t *h = p->data;
  int bad = check_head(h);
  if (bad) {
    h->limit_err = bad;
    return -1;
  }
  h->in_head = 0;
  h->last_value = 1;
  head_t m = {
    .method = p->method, .status = p->status_code,
    .major = p->http_major, .minor = p->http_minor,
    .keep_alive = http_should_keep_alive(p), .upgrade = p->upgrade,
    .framing = (p->flags & F_CHUNKED) ? FR_CHUNKED
               : (p->flags & F_CONTENTLENGTH) ? FR_LENGTH : FR_NONE,
    .length = p->content_length,
  };
  push_head(h, &m);
  if (p->type == HTTP_RESPONSE && h->skip_body) {
    h->skip_body = 0;
    return 1;   /* the answer to a HEAD request: no body follows */
  }
  return 0;
}

static int on_body(http_parser *p, const char *at, size_t n)
{
  hp_t *h = p->data;
  lua_State *L = h->L;
  h->fold = h->fold_at = 0;
  if (h->api == API_QUEUE) {
    KPUSH(L, K_BODY);
    lua_pushlstring(L, at, n);
    lua_pushnil(L);
    q_push(h, 3);
    return 0;
  }
  new_event(L, "body", 1);
  lua_pushlstring(L, at, n);
  lua_setfield(L, -2, "data");
  push_event(h);
  return 0;
}

/* The "done" event of a message. */
static void push_done(hp_t *h, int keep_alive)
{
  lua_State *L = h->L;
  if (h->api == API_QUEUE) {
    KPUSH(L, K_DONE);
    lua_pushboolean(L, keep_alive);
    lua_pushnil(L);
    q_push(h, 3);
    return;
  }
  new_event(L, "done", 1);
  set_bool(L, "keep_alive", keep_alive);
  push_event(h);
}

static int on_message_complete(http_parser *p)
{
  hp_t *h = p->data;
  lua_State *L = h->L;
  h->in_message = 0;
  if (h->api == API_QUEUE && h->fold_at) {
    /* A request without a body, complete with its head: no "done" event,
     * its head's framing says false instead (one event per request). */
    lua_pushboolean(L, 0);
    lua_replace(L, h->fold_at);
    h->fold_at = 0;
    return 0;
  }
  if (h->api == API_QUEUE && h->fold && h->fold + HEAD_VALUES - 2 == h->qtail) {
    lua_pushboolean(L, 0);
    lua_rawseti(L, h->qidx, h->fold);
    h->fold = 0;
    return 0;
  }
  h->fold = 0;
  push_done(h, http_should_keep_alive(p));
  return 0;
}

static const http_parser_settings settings = {
  .on_message_begin = on_message_begin,
  .on_url = on_url,
  .on_status = on_status,
  .on_header_field = on_header_field,
  .on_header_value = on_header_value,
  .on_headers_complete = on_headers_complete,
  .on_body = on_body,
  .on_message_complete = on_message_complete,
};

/* Push the error event of a stopped parser. */
static void push_error(hp_t *h)
{
  lua_State *L = h->L;
  enum http_errno e = HTTP_PARSER_ERRNO(&h->p);
  if (h->api == API_QUEUE) {
    KPUSH(L, K_ERROR);
    if (h->limit_err) {
      lua_pushinteger(L, limit_status[h->limit_err]);
      lua_pushstring(L, limit_texts[h->limit_err]);
    } else {
      lua_pushinteger(L, e == HPE_HEADER_OVERFLOW ? 431 : 400);
      lua_pushstring(L, http_errno_description(e));
    }
    q_push(h, 3);
    return;
  }
  new_event(L, "error", 3);
  if (h->limit_err) {
    lua_pushstring(L, limit_names[h->limit_err]);
    lua_setfield(L, -2, "name");
    lua_pushstring(L, limit_texts[h->limit_err]);
    lua_setfield(L, -2, "message");
    lua_pushinteger(L, limit_status[h->limit_err]);
  } else {
    lua_pushstring(L, http_errno_name(e));
    lua_setfield(L, -2, "name");
    lua_pushstring(L, http_errno_description(e));
    lua_setfield(L, -2, "message");
    lua_pushinteger(L, e == HPE_HEADER_OVERFLOW ? 431 : 400);
  }
  lua_setfield(L, -2, "status");
  push_event(h);
}

/* -- The userdata --------------------------------------------------------- */

/* The userdata of this file begin with the address of their type's tag,
 * which no other userdata can hold at its start (Lua code cannot write the
 * bytes of a userdata): checking it and the size is two compares, where
 * comparing metatables through the API (luaL_checkudata, or against an
 * upvalue) cost ~180 instructions a call, four calls a request. */
static const char parser_tag = 'p', guard_box_tag = 'g';

/* The parser at arg 1. */
static hp_t *check_parser(lua_State *L)
{
  hp_t *h = lua_touserdata(L, 1);
  if (h && lua_objlen(L, 1) == sizeof *h && h->tag == &parser_tag)
    return h;
  luaL_typerror(L, 1, PARSER_MT);
  return NULL;
}

static uint32_t opt_limit(lua_State *L, int t, const char *k, uint32_t dflt)
{
  lua_getfield(L, t, k);
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    return dflt;
  }
  if (!lua_isnumber(L, -1) || lua_tonumber(L, -1) < 1 || lua_tonumber(L, -1) > 1e9)
    luaL_error(L, "bad option '%s' to 'new' (a number from 1 to 1e9 expected)", k);
  uint32_t v = (uint32_t)lua_tonumber(L, -1);
  lua_pop(L, 1);
  return v;
}

/* http_parser.new([opts]) -> parser
 * opts: type = "request" (default) | "response", max_head (bytes, 8192),
 * max_headers (100), max_url (bytes, 4096). */
static int l_new(lua_State *L)
{
  int type = HTTP_REQUEST;
  uint32_t max_head = DEFAULT_MAX_HEAD, max_headers = DEFAULT_MAX_HEADERS,
           max_url = DEFAULT_MAX_URL;
  if (!lua_isnoneornil(L, 1)) {
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_getfield(L, 1, "type");
    if (!lua_isnil(L, -1))
      type = luaL_checkoption(L, -1, NULL, type_names) == 0 ? HTTP_REQUEST : HTTP_RESPONSE;
    lua_pop(L, 1);
    max_head = opt_limit(L, 1, "max_head", max_head);
    max_headers = opt_limit(L, 1, "max_headers", max_headers);
    max_url = opt_limit(L, 1, "max_url", max_url);
  }
  /* Safe before it owns anything: __gc of a zeroed parser frees nothing. */
  hp_t *h = lua_newuserdata(L, sizeof *h);
  memset(h, 0, sizeof *h);
  h->tag = &parser_tag;
  lua_rawgeti(L, LUA_REGISTRYINDEX, MB_REGSLOT_HTTP_MT);
  lua_setmetatable(L, -2);
  http_parser_init(&h->p, type);
  h->p.data = h;
  h->max_head = max_head;
  h->max_headers = max_headers;
  h->max_url = max_url;
  h->last_value = 1;
  mb_hframe_init(&h->frame);
  return 1;
}

/* The upgrade event: rest[0..n) are the bytes after the head. */
static void push_upgrade(hp_t *h, const char *rest, size_t n)
{
  lua_State *L = h->L;
  if (h->api == API_QUEUE) {
    KPUSH(L, K_UPGRADE);
    lua_pushlstring(L, rest, n);
    lua_pushnil(L);
    q_push(h, 3);
    return;
  }
  new_event(L, "upgrade", 1);
  lua_pushlstring(L, rest, n);
  lua_setfield(L, -2, "rest");
  push_event(h);
}

/* -- The fast path ---------------------------------------------------------
 * What a server reads most is a whole request head in one read, without a
 * body: "GET /x HTTP/1.1", a few headers, an empty line. For those,
 * http-parser's byte-at-a-time state machine, its callbacks and the
 * framing checker in front of it were ~2,400 of a
 * keep-alive request's ~15,000 instructions, and http_parser_execute
 * alone a ninth of its instruction-cache misses (BENCHMARKS.md). fast_head
 * reads such a head in one pass and gives the event the slow path would:
 * it collects the same URL and header pieces in the head buffer and ends
 * in the same push_head. Anything outside a narrow subset that both
 * parsers accept and read alike, it declines, leaving every byte to the
 * slow path, which answers or refuses it as before:
 *   - a method of the list below, one SP, a URL of visible ASCII starting
 *     with '/' and without '#', one SP, HTTP/1.1 or HTTP/1.0, CRLF;
 *   - header lines: a token, ':', optional SP or HT, a value of visible
 *     ASCII, SP, HT and bytes from 0x80 (what http-parser takes; like it,
 *     it keeps trailing SP and HT, which trimmed_len drops for both), CRLF;
 *     then CRLF;
 *   - no header whose name begins with Content-Length, Transfer-Encoding,
 *     Upgrade, Proxy-Connection or Connection (http-parser reads a name
 *     that only begins with Transfer-Encoding as one), but for at most one
 *     Connection saying keep-alive or close (any case);
 *   - one Host (at most one for HTTP/1.0);
 *   - within max_url, max_headers and max_head, counted as the callbacks
 *     count them, and FAST_MAX_HEAD bytes (http-parser has a cap of its
 *     own, 80 KiB, and a head that long is no common case).
 * It runs only where both parsers are between messages, and a head it
 * reads is a whole message, after which both are still there (a request
 * of HTTP/1.x without a body ends with its head; http-parser, built
 * lenient, reads on after a message not kept alive as after one that is):
 * the two never see parts of one message. The fuzzer
 * (host/fuzz/fuzz_http.c) feeds every input whole and cut in pieces, so a
 * head it reads whole is also read cut, by the slow path, and the two runs
 * must give the same events. */

#define FAST_MAX_HEAD 16384

/* Token characters besides letters and digits (RFC 9110 tchar). */
static const unsigned char tchar_punct[256] = {
  ['!'] = 1, ['#'] = 1, ['$'] = 1, ['%'] = 1, ['&'] = 1, ['\''] = 1,
  ['*'] = 1, ['+'] = 1, ['-'] = 1, ['.'] = 1, ['^'] = 1, ['_'] = 1,
  ['`'] = 1, ['|'] = 1, ['~'] = 1,
};

static int is_tchar(unsigned char c)
{
  return ((c | 0x20) >= 'a' && (c | 0x20) <= 'z') || (c >= '0' && c <= '9')
         || tchar_punct[c];
}

/* Does s[0..n) begin with `lower` (lower-case letters and '-', of length
 * len), ignoring case? (OR-ing 0x20 lowers a letter and keeps '-'; of the
 * bytes that may reach here, only letters and '-' give those.) */
static int fast_name_has(const unsigned char *s, size_t n, const char *lower, size_t len)
{
  if (n < len)
    return 0;
  for (size_t k = 0; k < len; k++)
    if ((s[k] | 0x20) != (unsigned char)lower[k])
      return 0;
  return 1;
}

/* The method s[0..n) if the fast path takes it (CONNECT, which makes an
 * upgrade, and the rarer methods go the slow path), else -1. */
static int fast_method(const unsigned char *s, size_t n)
{
  static const struct { char name[8]; size_t len; int method; } list[] = {
    {"GET", 3, HTTP_GET}, {"HEAD", 4, HTTP_HEAD}, {"POST", 4, HTTP_POST},
    {"PUT", 3, HTTP_PUT}, {"DELETE", 6, HTTP_DELETE}, {"OPTIONS", 7, HTTP_OPTIONS},
    {"PATCH", 5, HTTP_PATCH},
  };
  for (size_t k = 0; k < sizeof list / sizeof list[0]; k++)
    if (list[k].len == n && memcmp(list[k].name, s, n) == 0)
      return list[k].method;
  return -1;
}

/* Read a whole head at d[0..n) that the fast path takes (see above) and
 * push its event; returns its length, or 0 to leave it to the slow path. */
static size_t fast_head(hp_t *h, const char *d, size_t n)
{
  const unsigned char *s = (const unsigned char *)d;
  size_t lim = n < FAST_MAX_HEAD ? n : FAST_MAX_HEAD, i = 0;
  while (i < lim && s[i] >= 'A' && s[i] <= 'Z')
    i++;
  if (i == lim || s[i] != ' ')
    return 0;
  int method = fast_method(s, i);
  size_t url = ++i;
  if (method < 0 || i == lim || s[i] != '/')
    return 0;
  while (i < lim && s[i] > ' ' && s[i] < 0x7f && s[i] != '#')
    i++;
  size_t url_len = i - url;
  if (url_len > h->max_url || lim - i < 11 || memcmp(s + i, " HTTP/1.", 8) != 0
      || (s[i + 8] != '0' && s[i + 8] != '1') || s[i + 9] != '\r' || s[i + 10] != '\n')
    return 0;
  int minor = s[i + 8] - '0';
  i += 11;
  uint64_t bytes = LINE_OVERHEAD + url_len;
  if (bytes > h->max_head)
    return 0;
  int hosts = 0, conn = 0;   /* conn: 'k' keep-alive, 'c' close */
  /* (What a head declined below leaves in the buffer, the slow path's
   * on_message_begin clears.) */
  h->len = h->nhdrs = 0;
  append(h, d + url, url_len);
  h->url_len = (uint32_t)url_len;
  for (;;) {
    if (lim - i < 2)
      return 0;
    if (s[i] == '\r') {
      if (s[i + 1] != '\n')
        return 0;
      i += 2;
      break;
    }
    size_t name = i;
    while (i < lim && is_tchar(s[i]))
      i++;
    if (i == name || i == lim || s[i] != ':')
      return 0;
    size_t name_len = i - name;
    i++;
    while (i < lim && (s[i] == ' ' || s[i] == '\t'))
      i++;
    size_t value = i;
    while (i < lim && (s[i] >= ' ' ? s[i] != 0x7f : s[i] == '\t'))
      i++;
    size_t value_len = i - value;
    if (lim - i < 2 || s[i] != '\r' || s[i + 1] != '\n')
      return 0;
    i += 2;
    const unsigned char *nm = s + name;
    switch (nm[0] | 0x20) {   /* (only the names below matter) */
    case 'h':
      hosts += name_len == 4 && fast_name_has(nm, name_len, "host", 4);
      break;
    case 'c':
      if (fast_name_has(nm, name_len, "content-length", 14))
        return 0;
      if (fast_name_has(nm, name_len, "connection", 10)) {
        if (name_len != 10 || conn)
          return 0;
        if (value_len == 10 && fast_name_has(s + value, value_len, "keep-alive", 10))
          conn = 'k';
        else if (value_len == 5 && fast_name_has(s + value, value_len, "close", 5))
          conn = 'c';
        else
          return 0;
      }
      break;
    case 't':
      if (fast_name_has(nm, name_len, "transfer-encoding", 17))
        return 0;
      break;
    case 'u':
      if (fast_name_has(nm, name_len, "upgrade", 7))
        return 0;
      break;
    case 'p':
      if (fast_name_has(nm, name_len, "proxy-connection", 16))
        return 0;
      break;
    }
    bytes += name_len + HEADER_OVERHEAD + value_len;
    if (h->nhdrs >= h->max_headers || bytes > h->max_head)
      return 0;
    hdr_t *e = new_hdr(h);
    e->name_len = (uint32_t)name_len;
    append(h, d + name, name_len);
    e->value = h->len;
    e->value_len = (uint32_t)value_len;
    append(h, d + value, value_len);
  }
  if (hosts > 1 || (minor == 1 && hosts == 0))
    return 0;
  /* Kept alive: HTTP/1.1 unless it says close, HTTP/1.0 if it says
   * keep-alive (http_should_keep_alive). After a message that is not,
   * http-parser (built lenient, as Debian builds it) reads on as after one
   * that is: so do we. */
  int keep = minor == 1 ? conn != 'c' : conn == 'k';
  head_t m = { .method = method, .major = 1, .minor = minor, .keep_alive = keep,
               .framing = FR_COMPLETE };
  push_head(h, &m);
  if (h->api != API_QUEUE)
    push_done(h, keep);
  return i;
}

/* Queue mode parses ahead by at most this many values (16 request heads):
 * it stops at the next message boundary after that, and keeps the rest of
 * the input for the next parser:next. Every request of a read was parsed
 * at once before: a client pipelining without reading the answers made
 * each 64 KiB read some 2,400 requests' values and tables, 1-2 MB of a
 * connection process's heap. */
#define PARSE_AHEAD (16 * HEAD_VALUES)

/* Run the parser over data[0..n) (n == 0: the end of the stream). Events
 * mode: events go to the table on top of the stack; queue mode: to the
 * queue, at stack index h->qidx. Returns the bytes consumed: all of them
 * but in queue mode with PARSE_AHEAD values queued at a message boundary,
 * or when the parser stopped (an error, an upgrade's rest). */
static size_t parse(lua_State *L, hp_t *h, const char *data, size_t n)
{
  h->L = L;
  size_t used = 0;
  if (h->stopped == 1) {
    push_error(h);
  } else if (h->stopped == 2) {
    /* Upgraded: nothing more is HTTP. Hand the bytes back untouched. */
    push_upgrade(h, data, n);
  } else if (n == 0) {
    /* The end of the stream: completes a body read to the end, or is an
     * error in the middle of a message. */
    http_parser_execute(&h->p, &settings, data, 0);
    if (HTTP_PARSER_ERRNO(&h->p) != HPE_OK) {
      h->stopped = 1;
      push_error(h);
    }
  } else {
    /* Feed the parser what the framing checker passed, a head (or a
     * Content-Length body) at a time, so that every message boundary is
     * seen here; between messages, a head the fast path takes goes there
     * instead. */
    while (used < n) {
      if (h->api == API_QUEUE && h->qtail - h->qhead >= PARSE_AHEAD && !h->in_message &&
          mb_hframe_at_start(&h->frame))
        break;
      if (h->p.type == HTTP_REQUEST && !h->in_message && mb_hframe_at_start(&h->frame)) {
        size_t took = fast_head(h, data + used, n - used);
        if (took > 0) {
          used += took;
          continue;
        }
      }
      int err = MB_HFRAME_OK;
      size_t ok = mb_hframe_check(&h->frame, data + used, n - used, &err);
      if (ok > 0) {
        size_t took = http_parser_execute(&h->p, &settings, data + used, ok);
        used += took;
        if (HTTP_PARSER_ERRNO(&h->p) != HPE_OK) {
          h->stopped = 1;
          push_error(h);
          break;
        }
        if (h->p.upgrade && !h->in_message) {
          /* The connection now speaks another protocol for the rest of its
           * life: the head buffers are of no further use. http-parser sets
           * upgrade with the head but reads a body the head announces
           * first (Content-Length on an upgrade request or a 101): the
           * switch comes when that message is complete, not when a read
           * ends inside it. */
          h->stopped = 2;
          mb_free(h->buf);
          mb_free(h->hdrs);
          h->buf = NULL;
          h->hdrs = NULL;
          h->cap = h->hcap = 0;
          push_upgrade(h, data + used, n - used);
          break;
        }
      }
      if (err) {
        h->limit_err = frame_errors[err];
        h->stopped = 1;
        push_error(h);
        break;
      }
      if (mb_hframe_head_done(&h->frame)) {
        /* Follow the framing the parser chose (ULLONG_MAX: a response
         * read to the end of the stream). */
        uint64_t len = h->p.content_length;
        mb_hframe_body(&h->frame, !h->in_message, (h->p.flags & F_CHUNKED) != 0,
                       len == ULLONG_MAX ? UINT64_MAX : len);
      }
    }
  }
  h->L = NULL;
  return used;
}

/* Events mode: push consumed, events. */
static int run(lua_State *L, hp_t *h, const char *data, size_t n)
{
  if (h->api == API_QUEUE)
    return luaL_error(L, "this parser is read with parser:next");
  h->api = API_EVENTS;
  lua_newtable(L);
  h->nevents = 0;
  size_t used = parse(L, h, data, n);
  lua_pushnumber(L, (lua_Number)used);
  lua_insert(L, -2);
  return 2;
}

/* parser:feed(data) -> consumed, events   (see DESIGN for the events)
 * An empty string is data too: it does nothing (use parser:finish()). */
static int l_feed(lua_State *L)
{
  hp_t *h = check_parser(L);
  size_t n;
  const char *data = luaL_checklstring(L, 2, &n);
  if (n == 0) {
    lua_pushinteger(L, 0);
    lua_newtable(L);
    return 2;
  }
  return run(L, h, data, n);
}

/* parser:finish() -> 0, events
 * Tell the parser the stream ended: completes a response whose body runs to
 * the end of the connection, or reports a message cut short (an error event). */
static int l_finish(lua_State *L)
{
  hp_t *h = check_parser(L);
  return run(L, h, "", 0);
}

/* Keep n more bytes for the next parse (queue mode). */
static void pend_add(hp_t *h, const char *data, size_t n)
{
  if (h->pend_off > 0) {   /* what was parsed goes first (once per read) */
    h->pend_len -= h->pend_off;
    memmove(h->pend, h->pend + h->pend_off, h->pend_len);
    h->pend_off = 0;
  }
  if (h->pend_len + n > h->pend_cap) {
    size_t cap = h->pend_cap ? 2 * (size_t)h->pend_cap : 4096;
    while (cap < h->pend_len + n)
      cap *= 2;
    h->pend = mb_realloc(h->pend, cap);
    h->pend_cap = (uint32_t)cap;
  }
  memcpy(h->pend + h->pend_len, data, n);
  h->pend_len += (uint32_t)n;
}

static void pend_free(hp_t *h)
{
  mb_free(h->pend);
  h->pend = NULL;
  h->pend_off = h->pend_len = h->pend_cap = 0;
  h->pend_eof = 0;
}

/* Queue mode: parse what came (data, n; eof: the stream ended) after the
 * bytes kept from before, keeping what the parse leaves. */
static void parse_queued(lua_State *L, hp_t *h, const char *data, size_t n, int eof)
{
  if (h->pend_len == 0) {   /* nothing kept: parse in place, keep the rest */
    if (eof) {
      parse(L, h, "", 0);
    } else if (n > 0) {
      size_t used = parse(L, h, data, n);
      if (used < n && !h->stopped)
        pend_add(h, data + used, n - used);
    }
    return;
  }
  if (n > 0)
    pend_add(h, data, n);
  h->pend_eof |= eof;
  size_t used = parse(L, h, h->pend + h->pend_off, h->pend_len - h->pend_off);
  if (h->stopped) {
    pend_free(h);
    return;
  }
  h->pend_off += (uint32_t)used;   /* (moved only when more is added) */
  if (h->pend_off == h->pend_len) {
    eof = h->pend_eof;
    pend_free(h);
    if (eof)
      parse(L, h, "", 0);
  }
}

/* parser:next([data | true]) -> kind, a, b, more[, ...] | nothing   (queue mode)
 * Feeds data (more of the stream; true: the stream ended, as
 * parser:finish()), then takes the next event off the parser's queue:
 *   "head", framing, headers, more, method, url, path, query, version,
 *           keep_alive, upgrade                      (a request)
 *   "head", message, content_length | true (chunked) | nil   (a response)
 *   "body", data          "done", keep_alive        "upgrade", rest
 *   "error", status, message
 * or returns nothing when no event is ready; `more` says whether another
 * event is ready after this one (or input kept for later, which may make
 * one: the queue parses ahead by PARSE_AHEAD at most). A request's framing is its
 * Content-Length, true (chunked), nil, or false when it is complete with
 * its head (no body): then no "done" follows, one event per request. A
 * response's message is a table (see push_message). The queue is a table
 * kept with the parser and reused, so a request costs no event tables; the
 * first event of a feed that found it empty does not even go through it. */
static int l_next(lua_State *L)
{
  hp_t *h = check_parser(L);
  if (h->api == API_EVENTS)
    return luaL_error(L, "this parser is read with parser:feed");
  lua_settop(L, 2);
  if (h->api == API_NONE) {
    lua_createtable(L, 6, 0);
    lua_setfenv(L, 1);
    h->api = API_QUEUE;
  }
  lua_getfenv(L, 1);   /* the queue, at 3 */
  h->qidx = 3;
  h->ndirect = 0;
  h->direct_ok = h->qhead == h->qtail;
  if (h->direct_ok && !lua_checkstack(L, HEAD_VALUES + 12))
    return luaL_error(L, "not enough memory");
  if (lua_type(L, 2) == LUA_TBOOLEAN) {
    luaL_argcheck(L, lua_toboolean(L, 2), 2, "data or true expected");
    parse_queued(L, h, "", 0, 1);
  } else if (!lua_isnil(L, 2)) {
    size_t n;
    const char *data = luaL_checklstring(L, 2, &n);
    parse_queued(L, h, data, n, 0);
  } else if (h->pend_len && h->qhead == h->qtail) {
    parse_queued(L, h, "", 0, 0);
  }
  h->direct_ok = 0;
  h->fold_at = 0;   /* the direct event is returned now: too late to fold */
  if (h->ndirect) {
    int base = h->dbase, n = h->ndirect;
    h->ndirect = 0;
    int more = h->qhead != h->qtail || h->pend_len > 0;
    lua_pushboolean(L, more);
    lua_insert(L, base + 3);
    return n + 1;
  }
  if (h->qhead == h->qtail)
    return 0;
  int at = h->qhead;
  lua_rawgeti(L, 3, at + 1);
  int n = 3;
  if (h->p.type == HTTP_REQUEST && lua_rawequal(L, -1, lua_upvalueindex(2 + K_HEAD)))
    n = HEAD_VALUES;
  for (int i = 2; i <= n; i++)
    lua_rawgeti(L, 3, at + i);
  for (int i = 1; i <= n; i++) {
    lua_pushnil(L);
    lua_rawseti(L, 3, at + i);
  }
  h->qhead += n;
  if (h->fold && h->fold <= h->qhead)
    h->fold = 0;   /* taken: too late to fold its "done" into it */
  int more = h->qhead != h->qtail;
  if (!more)
    h->qhead = h->qtail = 0;   /* reuse the slots from the start */
  more = more || h->pend_len > 0;
  lua_pushboolean(L, more);
  lua_insert(L, 4 + 3);   /* after kind, a, b (the queue is at 3) */
  return n + 1;
}

/* parser:resting() -> bool: between messages, with nothing begun (not even
 * half of a CRLF) and no event waiting, so that a new parser would take the
 * stream on exactly where this one is (what hibernation needs). */
static int l_resting(lua_State *L)
{
  hp_t *h = check_parser(L);
  lua_pushboolean(L, !h->stopped && !h->in_message && h->qhead == h->qtail
                     && h->pend_len == 0 && mb_hframe_at_start(&h->frame));
  return 1;
}

/* parser:skip_body()
 * Response parser: the next response answers a HEAD request, so it has no
 * body whatever its Content-Length says. */
static int l_skip_body(lua_State *L)
{
  hp_t *h = check_parser(L);
  h->skip_body = 1;
  return 0;
}

/* parser:in_message() -> bool: a message has begun and is not complete. */
static int l_in_message(lua_State *L)
{
  hp_t *h = check_parser(L);
  lua_pushboolean(L, h->in_message);
  return 1;
}

/* parser:__gc() */
static int l_gc(lua_State *L)
{
  hp_t *h = check_parser(L);
  mb_free(h->buf);
  mb_free(h->hdrs);
  h->buf = NULL;
  h->hdrs = NULL;
  h->cap = h->hcap = 0;
  pend_free(h);
  return 0;
}

/* -- Guarding a connection ------------------------------------------------
 * What moonbeam.http does around each handler (see its DESIGN): the socket
 * ends the process when the client goes, the acceptor is the socket's heir,
 * and a timer tells the acceptor when handler_timeout has passed; then,
 * when the response starts, the timer and the heir go, and when it is
 * complete, the exit on close. The same as sock:set_exit_on_close,
 * sock:set_heir, mb.send_after and mb.cancel_timer, on a guard made once
 * per connection (http_guard.h): it keeps the socket looked up and one
 * lazy timer, so a request costs no socket look-up, no timer and no timer
 * value (those six calls were a fifth of a keep-alive request's
 * instructions, the per-request timer another twentieth). */

/* A guard's userdata: its tag (see check_parser) and the guard, NULL once
 * freed. */
typedef struct {
  const char *tag;
  mb_hguard_t *g;
} guard_box_t;

static int l_guard_free(lua_State *L);

/* The guard at arg 1; raises for another value or a freed guard. */
static mb_hguard_t *check_guard(lua_State *L)
{
  guard_box_t *box = lua_touserdata(L, 1);
  if (box && lua_objlen(L, 1) == sizeof *box && box->tag == &guard_box_tag) {
    if (box->g == NULL)
      luaL_argerror(L, 1, "guard freed");
    return box->g;
  }
  luaL_typerror(L, 1, "http guard");
  return NULL;
}

/* http_parser.guard_new(sock, acceptor[, ms, msg]) -> guard
 * A guard for sock, which the caller owns, with acceptor as the heir of
 * each request; with ms, the string msg goes to acceptor when a request
 * has run ms without its response starting. (A guard of a socket closed
 * already guards nothing but the time.) */
static int l_guard_new(lua_State *L)
{
  uint64_t id = mb_id_test(L, 1, &mb_sock_kind);
  if (id == 0)
    luaL_typerror(L, 1, "socket");
  mb_pid_t heir = mb_pid_check(L, 2);
  double ms = lua_isnoneornil(L, 3) ? -1 : luaL_checknumber(L, 3);
  const char *text = ms >= 0 ? luaL_checkstring(L, 4) : NULL;
  mb_pid_t self = mb_lib_self(L)->pid;
  guard_box_t *box = lua_newuserdata(L, sizeof *box);
  box->tag = &guard_box_tag;
  box->g = NULL;   /* safe before it owns anything: __gc frees nothing */
  lua_rawgeti(L, LUA_REGISTRYINDEX, MB_REGSLOT_GUARD_MT);   /* (the module's opener's) */
  lua_setmetatable(L, -2);
  mb_sock_t *s = mb_sock_get(id);
  if (s && s->kind != MB_SOCK_STREAM) {
    mb_sock_unref(s);
    return luaL_argerror(L, 1, "a stream socket expected");
  }
  box->g = mb_hguard_new(s, self, heir, ms, text);
  if (box->g == NULL) {
    if (s)
      mb_sock_unref(s);
    return luaL_error(L, "not enough memory");
  }
  return 1;
}

/* http_parser.guard_free(guard)   (and its __gc; freeing twice is nothing)
 * The guard's timer stops and its socket is let go. */
static int l_guard_free(lua_State *L)
{
  guard_box_t *box = lua_touserdata(L, 1);
  if (box && lua_objlen(L, 1) == sizeof *box && box->tag == &guard_box_tag && box->g) {
    mb_hguard_free(box->g);
    box->g = NULL;
  }
  return 0;
}

/* http_parser.guard(guard, on_fin) -> stopping
 * Before a handler runs: the socket ends its owner when the peer goes
 * (on_fin: its FIN too, else only a failure), the acceptor becomes its
 * heir, the timing starts, and the guard is busy until the response is
 * complete. stopping: the host is stopping (SIGTERM), so this response
 * should close its connection. */
static int l_guard(lua_State *L)
{
  mb_hguard_t *g = check_guard(L);
  mb_lib_self(L);   /* (a killed process may not act) */
  mb_hguard_start(g, lua_toboolean(L, 2) ? MB_SOCK_EXIT_ON_CLOSE : MB_SOCK_EXIT_ON_ERROR);
  lua_pushboolean(L, mb_proc_stopping());
  return 1;
}

/* http_parser.busy(pid) -> bool: is connection process pid's request in
 * its handler, or its response going out? (The acceptor's drain.) */
static int l_busy(lua_State *L)
{
  lua_pushboolean(L, mb_hguard_busy(mb_pid_check(L, 1)));
  return 1;
}

/* http_parser.started(guard) -> true | false
 * The response starts: the timing ends and the heir goes. false if the
 * time was up already (the acceptor's message is on its way). */
static int l_started(lua_State *L)
{
  mb_hguard_t *g = check_guard(L);
  int in_time = mb_hguard_stop(g);
  mb_hguard_sock(g);
  lua_pushboolean(L, in_time);
  return 1;
}

/* http_parser.finished(guard)
 * The response is complete: the peer's going no longer ends the owner. */
static int l_finished(lua_State *L)
{
  mb_hguard_t *g = check_guard(L);
  mb_sock_t *s = mb_hguard_sock(g);   /* (the heir went at started) */
  if (s)
    mb_sock_set_exit_on_close(s, 0);
  mb_hguard_done(g);
  return 0;
}

/* http_parser.trapping() -> bool: does the calling process trap exits?
 * (What mb.trap_exit would return, without setting it: an idle connection
 * asks before each wait, since its handler may have changed it.) */
static int l_trapping(lua_State *L)
{
  lua_pushboolean(L, mb_lib_self(L)->trap_exit);
  return 1;
}

/* http_parser.read(sock[, timeout_ms]) -> data | nil, err: sock:read, or
 * nil, "trapping" without reading when the calling process traps exits. A
 * connection process waits for its next request so (one call instead of
 * trapping() and the read: its handler may have turned trapping on, and
 * then it must see EXIT messages while it waits). */
static int l_read(lua_State *L)
{
  if (mb_lib_self(L)->trap_exit) {
    lua_pushnil(L);
    lua_pushliteral(L, "trapping");
    return 2;
  }
  return mb_lib_tcp_read(L);
}

/* -- Module functions ----------------------------------------------------- */

/* http_parser.reason(code) -> "Not Found" | nil  (the standard reason phrase) */
static int l_reason(lua_State *L)
{
  lua_Integer code = luaL_checkinteger(L, 1);
  const char *s = code >= 100 && code <= 999 ? http_status_str((enum http_status)code) : NULL;
  if (!s || strcmp(s, "<unknown>") == 0)
    lua_pushnil(L);
  else
    lua_pushstring(L, s);
  return 1;
}

/* Copy n bytes to w; returns the end. */
static char *put(char *w, const char *s, size_t n)
{
  memcpy(w, s, n);
  return w + n;
}

/* Bytes of a response head built on the C stack; a larger one (many or
 * long headers) gets a scratch userdata. */
#define HEAD_STACK_BUF 2048

/* Build a response from the arguments at a..a+4 (code, hlist, framing,
 * close, keep_alive; see http_parser.head) and body[0..blen) (the caller
 * checked it: the argument after those). Checks them all before it copies
 * anything. Writes into stack (stack_size bytes) when it fits, else into a
 * scratch userdata it pushes. Returns the length; *out is the bytes. Each
 * API call here is ~20 instructions, a fifth of the response's building:
 * one per argument, the error messages only on a failed check. */
static size_t build_response(lua_State *L, int a, const char *body, size_t blen,
                             char *stack, size_t stack_size, char **out)
{
  lua_Number cn = lua_tonumber(L, a);   /* (0 for what is not a number) */
  if (!(cn >= 100 && cn <= 999) || (lua_Number)(int)cn != cn) {
    luaL_checkinteger(L, a);   /* (a number expected) */
    luaL_argerror(L, a, "status code from 100 to 999 expected");
  }
  int code = (int)cn;
  int nh = 0;
  int ht = lua_type(L, a + 1);
  if (ht == LUA_TTABLE) {
    nh = (int)lua_objlen(L, a + 1);
    luaL_argcheck(L, nh % 2 == 0, a + 1, "name, value pairs expected");
  } else if (ht != LUA_TNIL && ht != LUA_TNONE) {
    luaL_checktype(L, a + 1, LUA_TTABLE);
  }
  int framing = lua_type(L, a + 2);
  lua_Number clen = 0;
  if (framing == LUA_TNUMBER) {
    clen = lua_tonumber(L, a + 2);
    luaL_argcheck(L, clen >= 0 && clen < 9.0e15, a + 2, "bad length");
  } else {
    luaL_argcheck(L, framing == LUA_TNIL || framing == LUA_TNONE || framing == LUA_TBOOLEAN,
                  a + 2, "number, true or nil expected");
    if (framing == LUA_TBOOLEAN && !lua_toboolean(L, a + 2))
      framing = LUA_TNIL;
  }
  int close = lua_toboolean(L, a + 3);
  int keep = !close && lua_toboolean(L, a + 4);
  const char *reason;
  size_t rlen;
  if (code == 200) {
    reason = "OK";
    rlen = 2;
  } else {
    reason = http_status_str((enum http_status)code);
    if (strcmp(reason, "<unknown>") == 0)
      reason = "Unknown";
    rlen = strlen(reason);
  }
  /* The size first (which also checks hlist), then the copy. */
  size_t need = 13 + rlen + 2 + 40 + 26 + 2 + blen;   /* status line, framing, connection, CRLF */
  for (int i = 1; i <= nh; i++) {
    size_t n;
    lua_rawgeti(L, a + 1, i);
    if (!lua_tolstring(L, -1, &n))
      luaL_argerror(L, a + 1, "strings expected");
    lua_pop(L, 1);
    need += n + 2;   /* ": " or CRLF */
  }
  char *o = need <= stack_size ? stack : lua_newuserdata(L, need);
  char *w = o;
  if (code == 200) {
    w = put(w, "HTTP/1.1 200 OK\r\n", 17);
  } else {
    w = put(w, "HTTP/1.1 ", 9);
    *w++ = (char)('0' + code / 100);
    *w++ = (char)('0' + code / 10 % 10);
    *w++ = (char)('0' + code % 10);
    *w++ = ' ';
    w = put(w, reason, rlen);
    w = put(w, "\r\n", 2);
  }
  for (int i = 1; i <= nh; i++) {
    size_t n;
    lua_rawgeti(L, a + 1, i);
    const char *v = lua_tolstring(L, -1, &n);
    w = put(w, v, n);
    w = put(w, i % 2 ? ": " : "\r\n", 2);
    lua_pop(L, 1);
  }
  if (framing == LUA_TNUMBER) {
    /* The digits of the length, backwards, then copied in order. */
    char d[24];
    int nd = 0;
    uint64_t v = (uint64_t)clen;
    do {
      d[nd++] = (char)('0' + v % 10);
      v /= 10;
    } while (v);
    w = put(w, "Content-Length: ", 16);
    while (nd)
      *w++ = d[--nd];
    w = put(w, "\r\n", 2);
  } else if (framing == LUA_TBOOLEAN) {
    w = put(w, "Transfer-Encoding: chunked\r\n", 28);
  }
  if (close)
    w = put(w, "Connection: close\r\n", 19);
  else if (keep)
    w = put(w, "Connection: keep-alive\r\n", 24);
  w = put(w, "\r\n", 2);
  if (body && blen)
    w = put(w, body, blen);
  *out = o;
  return (size_t)(w - o);
}

/* http_parser.head(code, hlist, framing, close, keep_alive[, body]) -> string
 * A response: the status line, the headers of hlist ({name1, value1, ...},
 * strings; nil for none), the framing (a number n: "Content-Length: n";
 * true: "Transfer-Encoding: chunked"; nil: none), "Connection: close" if
 * close, else "Connection: keep-alive" if keep_alive (an HTTP/1.0 client's
 * keep-alive), the empty line, then body if given: one string, so that it
 * goes out in one write. moonbeam.http checks names and values as they are
 * added (res:header); here they are only copied. */
static int l_head(lua_State *L)
{
  char stack[HEAD_STACK_BUF];
  char *out;
  lua_settop(L, 6);
  size_t blen = 0;
  const char *body = lua_isnil(L, 6) ? NULL : luaL_checklstring(L, 6, &blen);
  size_t n = build_response(L, 1, body, blen, stack, sizeof stack, &out);
  lua_pushlstring(L, out, n);
  return 1;
}

/* Bodies up to this size go out in one buffer with their head; a larger one
 * is written from its own string after the head (no copy of it). */
#define RESPOND_COPY_MAX 16384

/* http_parser.respond(guard, code, hlist, framing, close, keep_alive[, body])
 *   -> true | rest | false, response
 * http_parser.started, the response (as http_parser.head builds it), its
 * write and http_parser.finished, in one call when the kernel takes it all:
 * true - nothing can happen in between, since the caller does not yield,
 * and the response never becomes a Lua string. rest: the bytes
 * not written (all of them when the socket is not the caller's), for
 * sock:write, then http_parser.finished. false and the response: the time
 * was up (as for started), nothing written. */
static int l_respond(lua_State *L)
{
  char stack[HEAD_STACK_BUF];
  char *out;
  lua_settop(L, 7);
  mb_hguard_t *g = check_guard(L);
  size_t blen = 0;
  const char *body = lua_isnil(L, 7) ? NULL : luaL_checklstring(L, 7, &blen);
  int whole = blen <= RESPOND_COPY_MAX;
  size_t n = build_response(L, 2, body, whole ? blen : 0, stack, sizeof stack, &out);
  if (whole)
    blen = 0;   /* in out already */
  mb_lib_self(L);   /* (a killed process may not act) */
  int in_time = mb_hguard_stop(g);
  mb_sock_t *s = mb_hguard_sock(g);
  long done = 0;
  size_t left = n + blen;
  if (s && in_time) {
    uv_buf_t b[2];
    b[0].base = out;
    b[0].len = n;
    b[1].base = (char *)body;
    b[1].len = blen;
    done = mb_sock_write_now(s, b, blen ? 2 : 1);
    if (done < 0)
      done = 0;
    if ((size_t)done == left) {
      mb_sock_set_exit_on_close(s, 0);
      mb_hguard_done(g);
      lua_pushboolean(L, 1);
      return 1;
    }
  }
  int late = s && !in_time;
  if (late)
    lua_pushboolean(L, 0);
  /* What is left: the rest of the head (and of its copied body), then the
   * rest of a body sent from its own string. */
  if ((size_t)done >= n) {
    lua_pushlstring(L, body + (done - n), left - (size_t)done);
  } else {
    lua_pushlstring(L, out + done, n - (size_t)done);
    if (blen) {
      lua_pushlstring(L, body, blen);
      lua_concat(L, 2);
    }
  }
  return late ? 2 : 1;
}

/* http_parser.ws_accept(key) -> the Sec-WebSocket-Accept value for key
 * | nil (a key over 256 bytes, which no valid key is) */
static int l_ws_accept(lua_State *L)
{
  size_t n;
  const char *key = luaL_checklstring(L, 1, &n);
#ifdef MB_HAVE_WS_H
  char out[29];
  if (mb_ws_accept_key(key, n, out) != 0) {
    lua_pushnil(L);
    return 1;
  }
  lua_pushlstring(L, out, strnlen(out, 28));
  return 1;
#else
  (void)key;
  return luaL_error(L, "ws_accept: host/ws.c is not built yet");
#endif
}

/* -- The module ------------------------------------------------------------
 *
 * Every process that serves HTTP opens this module, a new connection
 * process included, and a function registered costs it a C closure and a
 * field whose name is interned (~600 instructions). So only what every
 * request uses is registered when the module opens; the rest is made on
 * the first lookup of its name (an __index that stores what it made, so
 * the next lookup is a plain field). Measured (callgrind, one scheduler, a
 * connection of one request): opening the module 16,600 -> 13,000
 * instructions. */

/* A parser's methods: what moonbeam.http's connection processes call on
 * every request, then the rest (made on first use). */
static const luaL_Reg methods[] = {
  {"next", l_next},
  {"in_message", l_in_message},
  {NULL, NULL}
};
static const luaL_Reg lazy_methods[] = {
  {"feed", l_feed},
  {"finish", l_finish},
  {"skip_body", l_skip_body},
  {"resting", l_resting},
  {NULL, NULL}
};

static const luaL_Reg funcs[] = {
  {"new", l_new},
  {"guard_new", l_guard_new},
  {"guard", l_guard},
  {"respond", l_respond},
  {"guard_free", l_guard_free},
  {"read", l_read},
  {NULL, NULL}
};
static const luaL_Reg lazy_funcs[] = {
  {"reason", l_reason},
  {"head", l_head},
  {"started", l_started},
  {"finished", l_finished},
  {"ws_accept", l_ws_accept},
  {"trapping", l_trapping},
  {"busy", l_busy},
  {NULL, NULL}
};

static const luaL_Reg *find_reg(const luaL_Reg *r, const char *name)
{
  for (; r->name; r++)
    if (strcmp(r->name, name) == 0)
      return r;
  return NULL;
}

/* Push method r: a closure over the parser metatable (its type check),
 * and for parser:next the queue's strings too. */
static void push_method(lua_State *L, const luaL_Reg *r, int mt)
{
  lua_pushvalue(L, mt);
  int n = 1;
  if (r->func == l_next) {
    for (int k = 0; k < K_COUNT; k++)
      lua_pushstring(L, queue_strings[k]);
    n += K_COUNT;
  }
  lua_pushcclosure(L, r->func, n);
}

/* Store function f (on the stack top) as t[name] (t at 1, name at 2) and
 * leave it on top. */
static int keep(lua_State *L)
{
  lua_pushvalue(L, 2);
  lua_pushvalue(L, -2);
  lua_rawset(L, 1);
  return 1;
}

static const char *key_name(lua_State *L)
{
  return lua_type(L, 2) == LUA_TSTRING ? lua_tostring(L, 2) : NULL;
}

/* __index(methods, name) (upvalue 1: the parser metatable): the method of
 * lazy_methods named so, made now; nil for any other key. */
static int lazy_method(lua_State *L)
{
  const char *name = key_name(L);
  const luaL_Reg *r = name ? find_reg(lazy_methods, name) : NULL;
  if (r == NULL)
    return 0;
  push_method(L, r, lua_upvalueindex(1));
  return keep(L);
}

/* __index(module, name): the function of lazy_funcs named so, made now;
 * nil for any other key. */
static int lazy_func(lua_State *L)
{
  const char *name = key_name(L);
  const luaL_Reg *r = name ? find_reg(lazy_funcs, name) : NULL;
  if (r == NULL)
    return 0;
  lua_pushcfunction(L, r->func);
  return keep(L);
}

/* A table of regs, with lazy_method (over mt, when not 0: the methods) or
 * lazy_func (the module) as its __index for the rest. */
static void new_lazy_table(lua_State *L, const luaL_Reg *regs, int nregs, int mt)
{
  lua_createtable(L, 0, nregs);
  for (const luaL_Reg *r = regs; r->name; r++) {
    if (mt)
      push_method(L, r, mt);
    else
      lua_pushcfunction(L, r->func);
    lua_setfield(L, -2, r->name);
  }
  lua_createtable(L, 0, 1);
  if (mt) {
    lua_pushvalue(L, mt);
    lua_pushcclosure(L, lazy_method, 1);
  } else {
    lua_pushcfunction(L, lazy_func);
  }
  lua_setfield(L, -2, "__index");
  lua_setmetatable(L, -2);
}

/* The parsers' metatable (with their methods, parser:next's queue strings
 * among their upvalues) and the guards' are kept at registry slots that a
 * reused state keeps (lstate.c, "Reused states"): a connection process per
 * connection opens this module, and making the parsers' was ~7,000 of its
 * ~12,500 instructions. Nothing of a process can be in them: they hold C
 * functions and strings, no process can reach them but through its
 * userdata's __index (their __metatable hides them from getmetatable; the
 * debug library, which would not, keeps a state from being reused), and
 * the methods a first use adds (lazy_method) are the same for every
 * process. The module table itself is made anew each time (a process may
 * change its own). */
int mb_lib_http_parser_open(lua_State *L)
{
  lua_rawgeti(L, LUA_REGISTRYINDEX, MB_REGSLOT_HTTP_MT);
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    lua_createtable(L, 0, 3);
    int mt = lua_gettop(L);
    new_lazy_table(L, methods, sizeof methods / sizeof *methods - 1, mt);
    lua_setfield(L, mt, "__index");
    lua_pushvalue(L, mt);
    lua_pushcclosure(L, l_gc, 1);
    lua_setfield(L, mt, "__gc");
    lua_pushliteral(L, "http parser");
    lua_setfield(L, mt, "__metatable");
    lua_rawseti(L, LUA_REGISTRYINDEX, MB_REGSLOT_HTTP_MT);
    lua_createtable(L, 0, 2);
    lua_pushcfunction(L, l_guard_free);
    lua_setfield(L, -2, "__gc");
    lua_pushliteral(L, "http guard");
    lua_setfield(L, -2, "__metatable");
    lua_rawseti(L, LUA_REGISTRYINDEX, MB_REGSLOT_GUARD_MT);
  } else {
    lua_pop(L, 1);
  }
  new_lazy_table(L, funcs, sizeof funcs / sizeof *funcs - 1, 0);
  return 1;
}
