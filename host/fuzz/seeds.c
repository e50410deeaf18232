/* seeds.c: writes the starting inputs of the fuzz targets, in the input
 * layout each target reads (see the DESIGN comment of host/fuzz/fuzz_*.c):
 * HTTP requests and responses, WebSocket frame streams for both roles,
 * messages made by the real encoder (mb_copy_encode) from many kinds of
 * values, and Erlang terms of every tag the term decoder knows and frames
 * of every distribution operation (written with ei, and by hand for the
 * encodings ei no longer writes). The campaigns start from these; what is
 * kept in spec/fuzz/ is the minimized corpus the fuzzer grew from them (see
 * README, "Fuzzing").
 *
 *   build/fuzz_seeds DIR    writes DIR/http/, DIR/ws/, DIR/copy/, DIR/etf/
 *                           (dirs must exist)
 */
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "copy.h"
#include "ei.h"
#include "fuzz.h"
#include "lauxlib.h"
#include "lib.h"
#include "lualib.h"
#include "pid.h"
#include "sock.h"

static const char *outdir;
static int nwritten;

static void write_seed(const char *target, const char *name, const uint8_t *hdr, size_t nhdr,
                       const void *data, size_t n)
{
  char path[4096];
  snprintf(path, sizeof path, "%s/%s/seed-%s", outdir, target, name);
  FILE *f = fopen(path, "wb");
  if (!f) {
    perror(path);
    exit(1);
  }
  fwrite(hdr, 1, nhdr, f);
  fwrite(data, 1, n, f);
  fclose(f);
  nwritten++;
}

/* -- HTTP: flags, cut, cut, stream ------------------------------------------ */

static void http_seeds(void)
{
  static const struct { const char *name; uint8_t flags; const char *s; } seeds[] = {
    {"get", 0, "GET /index.html?q=1 HTTP/1.1\r\nHost: example.com\r\nUser-Agent: x\r\n\r\n"},
    {"pipelined", 0, "GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n"
                     "Connection: close\r\n\r\n"},
    {"post", 0, "POST /form HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\nhello world"},
    {"chunked", 0, "POST /up HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                   "5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nTrailer: t\r\n\r\n"},
    {"upgrade", 0, "GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
                   "\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58"},
    {"http10", 0, "GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"},
    {"folded", 0, "GET / HTTP/1.1\r\nX-Long: a\r\n  folded\r\nX-Empty:\r\n\r\n"},
    {"connect", 0, "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\nrest"},
    {"many-headers", 4, "GET /a/long/url/path HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\n"},
    {"tiny-limits", 8, "GET / HTTP/1.1\r\nHost: h\r\n\r\n"},
    {"bad", 0, "GET / HTTP/1.1\r\nHost h\r\n\r\n"},
    {"resp", 1, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nServer: s\r\n\r\nhello"},
    {"resp-chunked", 1, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                        "3\r\nabc\r\n0\r\n\r\n"},
    {"resp-eof", 1, "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nbody runs to the end"},
    {"resp-head", 3, "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nHTTP/1.1 404 Not Found\r\n"
                     "Content-Length: 0\r\n\r\n"},
    {"resp-101", 1, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                    "Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
                    "\r\n\x81\x02hi"},
    {"resp-204", 1 | 16, "HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 304 Not Modified\r\n\r\n"},
  };
  for (size_t i = 0; i < sizeof seeds / sizeof seeds[0]; i++) {
    size_t n = strlen(seeds[i].s);
    uint8_t hdr[3] = {seeds[i].flags, 80, 170};
    write_seed("http", seeds[i].name, hdr, 3, seeds[i].s, n);
  }
}

/* -- WebSocket: flags, callbacks, cut, cut, stream --------------------------- */

static void frame(fuzz_buf_t *b, uint8_t b0, int mask, const void *payload, size_t len)
{
  static const uint8_t key[4] = {0x37, 0xfa, 0x21, 0x3d};
  const uint8_t *pl = payload;
  uint8_t m = mask ? 0x80 : 0, c;
  fuzz_put(b, &b0, 1);
  if (len < 126) {
    c = m | (uint8_t)len;
    fuzz_put(b, &c, 1);
  } else if (len < 65536) {
    uint8_t h[3] = {m | 126, (uint8_t)(len >> 8), (uint8_t)len};
    fuzz_put(b, h, 3);
  } else {
    c = m | 127;
    fuzz_put(b, &c, 1);
    for (int i = 7; i >= 0; i--) {
      c = (uint8_t)((uint64_t)len >> (8 * i));
      fuzz_put(b, &c, 1);
    }
  }
  if (mask)
    fuzz_put(b, key, 4);
  for (size_t i = 0; i < len; i++) {
    c = mask ? pl[i] ^ key[i % 4] : pl[i];
    fuzz_put(b, &c, 1);
  }
}

static void ws_seed(const char *name, int client, int maxidx, uint8_t cbs, const fuzz_buf_t *b)
{
  uint8_t hdr[4] = {(uint8_t)(client | maxidx << 1), cbs, 70, 180};
  write_seed("ws", name, hdr, 4, b->p, b->n);
}

static void ws_seeds(void)
{
  static uint8_t big[1200];
  for (size_t i = 0; i < sizeof big; i++)
    big[i] = (uint8_t)(i * 7);
  for (int client = 0; client <= 1; client++) {
    int mask = !client;
    char name[64];
    fuzz_buf_t b = {0};
    frame(&b, 0x81, mask, "hello", 5);
    frame(&b, 0x82, mask, big, 300);
    frame(&b, 0x01, mask, "caf\xc3", 4);
    frame(&b, 0x89, mask, "ping", 4);
    frame(&b, 0x80, mask, "\xa9", 1);
    frame(&b, 0x8a, mask, "pong", 4);
    frame(&b, 0x88, mask, "\x03\xe8" "bye \xc3\xa9", 8);
    snprintf(name, sizeof name, "stream-%d", client);
    ws_seed(name, client, 7, 0, &b);
    ws_seed(strcat(name, "-small"), client, 2, 0, &b);
    b.n = 0;
    frame(&b, 0x82, mask, big, sizeof big);
    frame(&b, 0x81, mask, "\xed\xa0\x80", 3);
    snprintf(name, sizeof name, "big-%d", client);
    ws_seed(name, client, 5, 0, &b);
    b.n = 0;
    frame(&b, 0x81, mask, "echo me", 7);
    frame(&b, 0x81, mask, "and me", 6);
    frame(&b, 0x88, mask, "", 0);
    snprintf(name, sizeof name, "echo-%d", client);
    ws_seed(name, client, 7, 0x1 | 0x10 | 0x80, &b);
    snprintf(name, sizeof name, "free-%d", client);
    ws_seed(name, client, 7, 0x4, &b);
    b.n = 0;
    frame(&b, 0x09, mask, "p", 1);   /* fragmented ping */
    frame(&b, 0x88, mask, "\x03", 1);
    snprintf(name, sizeof name, "bad-%d", client);
    ws_seed(name, client, 7, 0x2 | 0x30, &b);
    b.n = 0;
    uint8_t longform[] = {0x82, (uint8_t)(mask << 7 | 126), 0, 5, 1, 2, 3, 4, 1, 2, 3, 4, 5};
    fuzz_put(&b, longform, mask ? sizeof longform : sizeof longform - 4);
    snprintf(name, sizeof name, "longform-%d", client);
    ws_seed(name, client, 7, 0x8, &b);
    free(b.p);
  }
}

/* -- Messages: nvalues, payload ---------------------------------------------- */

static void copy_seeds(void)
{
  static const char *const values[] = {
    "return nil, true, false",
    "return 0, -0.0, 1/0, -1/0, 0/0, 2^53, -1.5e-300, 42",
    "return '', 'short', string.rep('x', 127), string.rep('y', 128), string.rep('z', 5000)",
    "return '\\0binary\\255\\1'",
    "return {}",
    "return {1, 2, 3, nil, 5, 'six', {7}}",
    "return {a = 1, b = 'two', [3.5] = true, [false] = {}, [-1] = 'neg'}",
    "return {x = {y = {z = {w = {'deep'}}}}}",
    "local t = {} t.self = t return t",
    "local s = {v = 1} return {s, s, k = s, [s] = s}, s",
    "local a, b = {}, {} a.b = b b.a = a return a, b",
    "local t = {} for i = 1, 300 do t[i] = i * 1.5 end return t",
    "local t = {} for i = 1, 100 do t['k' .. i] = {i} end return t",
    "local t = {} local c = t for i = 1, 150 do c[1] = {} c = c[1] end return t",
    "return pid7, ref99, sock5, {from = pid7, ref = ref99, [pid7] = 'by pid', s = sock5}",
    "return {pid7, pid7, pidgen}",
    "return string, table.insert, print, {m = math, f = math.floor}",
    "local t = {1, 2} return t, t, t",
    "return 'a', 'b', 'c', 'd', 'e', 'f', 'g', 'h', 'i', 'j', 'k', 'l'",
  };
  lua_State *L = luaL_newstate();
  luaL_openlibs(L);
  mb_pid_push(L, 7);
  lua_setglobal(L, "pid7");
  mb_pid_push(L, ((mb_pid_t)3 << MB_PID_SLOT_BITS) | 12);
  lua_setglobal(L, "pidgen");
  mb_ref_push(L, 99);
  lua_setglobal(L, "ref99");
  mb_id_register(&mb_sock_kind);   /* as the TCP layer does at start-up */
  mb_id_push(L, 5, &mb_sock_kind);
  lua_setglobal(L, "sock5");
  for (size_t i = 0; i < sizeof values / sizeof values[0]; i++) {
    if (luaL_loadstring(L, values[i]) || lua_pcall(L, 0, LUA_MULTRET, 0)) {
      fprintf(stderr, "%s: %s\n", values[i], lua_tostring(L, -1));
      exit(1);
    }
    char err[256], name[32];
    mb_msg_t *m = mb_copy_encode(L, 1, lua_gettop(L), "msg", NULL, err, sizeof err);
    if (!m) {
      fprintf(stderr, "%s: %s\n", values[i], err);
      exit(1);
    }
    uint8_t nv = (uint8_t)m->nvalues;
    snprintf(name, sizeof name, "%02zu", i);
    write_seed("copy", name, &nv, 1, m->data, m->len);
    mb_msg_free(m);
    lua_settop(L, 0);
  }
  lua_close(L);
}

/* -- Erlang terms: flags, term; frames: 4, then (length, frame)... --------------- */

static void etf_seed(const char *name, uint8_t flags, ei_x_buff *x)
{
  write_seed("etf", name, &flags, 1, x->buff, (size_t)x->index);
  ei_x_free(x);
  ei_x_new_with_version(x);
}

/* A term from its bytes (the version byte added), for what ei does not
 * write: old encodings, funs, ports, malformed lengths. */
static void etf_raw(const char *name, const void *bytes, size_t n)
{
  uint8_t hdr[2] = {0, 131};
  write_seed("etf", name, hdr, 2, bytes, n);
}

static erlang_pid fz_pid(const char *node, unsigned num, unsigned creation)
{
  erlang_pid p;
  memset(&p, 0, sizeof p);
  snprintf(p.node, sizeof p.node, "%s", node);
  p.num = num;
  p.creation = creation;
  return p;
}

static erlang_ref fz_ref(const char *node, unsigned n0, int len, unsigned creation)
{
  erlang_ref r;
  memset(&r, 0, sizeof r);
  snprintf(r.node, sizeof r.node, "%s", node);
  r.len = len;
  r.n[0] = n0;
  for (int i = 1; i < len; i++)
    r.n[i] = (unsigned)i * 7919;
  r.creation = creation;
  return r;
}

static void term_seeds(void)
{
  ei_x_buff x;
  ei_x_new_with_version(&x);
  ei_x_encode_long(&x, 0);
  etf_seed("int-small", 0, &x);
  ei_x_encode_long(&x, -123456789);
  etf_seed("int", 0, &x);
  ei_x_encode_longlong(&x, 1ll << 62);
  etf_seed("int-big64", 0, &x);
  ei_x_encode_double(&x, 1.5);
  etf_seed("float", 0, &x);
  ei_x_encode_double(&x, -0.0);
  etf_seed("float-neg0", 0, &x);
  ei_x_encode_atom(&x, "ok");
  etf_seed("atom", 0, &x);
  ei_x_encode_atom(&x, "nil");
  etf_seed("atom-nil", 0, &x);
  ei_x_encode_boolean(&x, 1);
  etf_seed("atom-true", 0, &x);
  ei_x_encode_atom_len_as(&x, "caf\xc3\xa9", 5, ERLANG_UTF8, ERLANG_UTF8);
  etf_seed("atom-utf8", 0, &x);
  ei_x_encode_binary(&x, "hello", 5);
  etf_seed("binary", 0, &x);
  ei_x_encode_binary(&x, "", 0);
  etf_seed("binary-empty", 0, &x);
  ei_x_encode_bitstring(&x, "\xa0", 0, 3);
  etf_seed("bits", 0, &x);
  ei_x_encode_string(&x, "abc");
  etf_seed("string", 0, &x);
  ei_x_encode_empty_list(&x);
  etf_seed("nil", 0, &x);
  ei_x_format_wo_ver(&x, "[~i, ~a, ~s, {~f}]", 1, "two", "three", 4.0);
  etf_seed("list", 0, &x);
  ei_x_encode_list_header(&x, 2);
  ei_x_encode_atom(&x, "alias");
  ei_x_encode_atom(&x, "nil");
  ei_x_encode_long(&x, 7);
  etf_seed("list-improper", 0, &x);
  ei_x_encode_map_header(&x, 5);
  ei_x_encode_atom(&x, "a");
  ei_x_encode_long(&x, 1);
  ei_x_encode_binary(&x, "b", 1);
  ei_x_encode_atom(&x, "nil");
  ei_x_encode_long(&x, 1);
  ei_x_encode_atom(&x, "one");
  ei_x_format_wo_ver(&x, "{~a, ~i}", "k", 2);
  ei_x_format_wo_ver(&x, "[~a]", "v");
  ei_x_encode_atom(&x, "true");
  ei_x_encode_map_header(&x, 0);
  etf_seed("map", 0, &x);
  ei_x_encode_tuple_header(&x, 0);
  etf_seed("tuple-empty", 0, &x);
  ei_x_encode_tuple_header(&x, 300);
  for (int i = 0; i < 300; i++)
    ei_x_encode_long(&x, i);
  etf_seed("tuple-large", 0, &x);
  for (int i = 0; i < 189; i++)
    ei_x_encode_list_header(&x, 1);
  ei_x_encode_tuple_header(&x, 0);
  for (int i = 0; i < 189; i++)
    ei_x_encode_empty_list(&x);
  etf_seed("deep", 0, &x);
  erlang_pid pp = fz_pid(FUZZ_PEER, FUZZ_PEER_PROC, FUZZ_PEER_CREATION);
  erlang_pid op = fz_pid(FUZZ_NODE, FUZZ_PROC_PID, FUZZ_CREATION);
  erlang_pid stale = fz_pid(FUZZ_NODE, FUZZ_PROC_PID, FUZZ_CREATION + 1);
  erlang_ref pr = fz_ref(FUZZ_PEER, 1, 3, 3), pr5 = fz_ref(FUZZ_PEER, 1, 5, 3);
  erlang_ref alias = fz_ref(FUZZ_NODE, FUZZ_ALIAS, 3, FUZZ_CREATION);
  alias.n[1] = alias.n[2] = 0;
  ei_x_encode_tuple_header(&x, 7);
  ei_x_encode_pid(&x, &pp);
  ei_x_encode_pid(&x, &op);
  ei_x_encode_pid(&x, &stale);
  ei_x_encode_ref(&x, &pr);
  ei_x_encode_ref(&x, &pr5);
  ei_x_encode_ref(&x, &alias);
  ei_x_encode_atom(&x, FUZZ_NODE);
  etf_seed("ids", 0, &x);
  ei_x_encode_list_header(&x, 2);
  ei_x_encode_ref(&x, &pr);
  ei_x_encode_ref(&x, &pr);
  ei_x_encode_empty_list(&x);
  etf_seed("refs-same", 0, &x);
  erlang_port port = {FUZZ_PEER, 5, 3};
  ei_x_encode_port(&x, &port);
  etf_seed("port", 0, &x);
  ei_x_encode_atom(&x, "normal");
  etf_seed("reason-atom", 1, &x);
  ei_x_encode_binary(&x, "shutdown", 8);
  etf_seed("reason-binary", 1, &x);
  ei_x_format_wo_ver(&x, "{~a, ~a}", "shutdown", "x");
  etf_seed("reason-tuple", 1, &x);
  ei_x_free(&x);
  ei_x_new(&x);
  ei_x_format_wo_ver(&x, "{~a, [~i]}", "bare", 1);
  etf_seed("bare", 2, &x);
  ei_x_encode_atom(&x, "kill");
  etf_seed("bare-reason", 3, &x);
  ei_x_free(&x);

  /* Encodings ei does not write (the bytes as OTP 25's term_to_binary
   * writes them where it still does). */
  static const uint8_t small_big[] = {'n', 9, 1, 0, 0, 0, 0, 0, 0, 0, 0, 64};
  etf_raw("big-neg", small_big, sizeof small_big);
  static uint8_t large_big[6 + 300] = {'o', 0, 0, 1, 44, 0};
  large_big[6 + 299] = 1;                  /* 2^2392: beyond a double */
  etf_raw("big-huge", large_big, sizeof large_big);
  static const char old_float[] = "c1.50000000000000000000e+00\0\0\0\0\0";
  etf_raw("float-old", old_float, 32);
  static const uint8_t atoms[] = {'l', 0, 0, 0, 4, 'd', 0, 4, 'c', 'a', 'f', 0xe9,
                                  's', 2, 'o', 'k', 'v', 0, 2, 'o', 'k', 'w', 0, 'j'};
  etf_raw("atoms-old", atoms, sizeof atoms);
  static const uint8_t old_ids[] = {
    'h', 3,
    'g', 's', 14, 'p', 'e', 'e', 'r', '@', 'l', 'o', 'c', 'a', 'l', 'h', 'o', 's', 't',
    0, 0, 0, 5, 0, 0, 0, 0, 3,
    'e', 's', 14, 'p', 'e', 'e', 'r', '@', 'l', 'o', 'c', 'a', 'l', 'h', 'o', 's', 't',
    0, 0, 0, 9, 3,
    'r', 0, 2, 's', 14, 'p', 'e', 'e', 'r', '@', 'l', 'o', 'c', 'a', 'l', 'h', 'o', 's', 't',
    3, 0, 0, 0, 1, 0, 0, 0, 2};
  etf_raw("ids-old", old_ids, sizeof old_ids);
  static const uint8_t old_ports[] = {
    'l', 0, 0, 0, 2,
    'f', 's', 1, 'n', 0, 0, 0, 1, 3,
    'x', 's', 1, 'n', 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 3, 'j'};
  etf_raw("ports-old", old_ports, sizeof old_ports);
  /* term_to_binary([fun(X) -> X + 1 end]) and fun lists:map/2. */
  static const uint8_t fun[] = {
    108, 0, 0, 0, 1, 112, 0, 0, 0, 70, 1, 186, 56, 115, 213, 59, 48, 233, 129, 68, 54, 166,
    170, 71, 244, 171, 110, 0, 0, 0, 0, 0, 0, 0, 0, 100, 0, 2, 116, 50, 97, 0, 98, 5, 209,
    195, 158, 88, 100, 0, 13, 110, 111, 110, 111, 100, 101, 64, 110, 111, 104, 111, 115, 116,
    0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 106};
  etf_raw("fun", fun, sizeof fun);
  static const uint8_t export[] = {'h', 2, 'q', 100, 0, 5, 'l', 'i', 's', 't', 's',
                                   100, 0, 3, 'm', 'a', 'p', 'a', 2, 'a', 1};
  etf_raw("export", export, sizeof export);
  static const uint8_t compressed[] = {'P', 0, 0, 0, 1, 0x78, 0x9c, 0x63, 0, 0, 0, 1, 0, 1};
  etf_raw("compressed", compressed, sizeof compressed);
  static const uint8_t bad_len[] = {'l', 0x7f, 0xff, 0xff, 0xff, 'j'};
  etf_raw("bad-length", bad_len, sizeof bad_len);
}

/* A distribution frame: 112, the control tuple, the message (both built
 * with their version byte), after a 2-byte length. */
static void frame_add(fuzz_buf_t *s, const ei_x_buff *ctl, const ei_x_buff *msg)
{
  size_t n = 1 + (size_t)ctl->index + (msg ? (size_t)msg->index : 0);
  uint8_t h[3] = {(uint8_t)(n >> 8), (uint8_t)n, 112};
  fuzz_put(s, h, 3);
  fuzz_put(s, ctl->buff, (size_t)ctl->index);
  if (msg)
    fuzz_put(s, msg->buff, (size_t)msg->index);
}

static void frames_seed(const char *name, fuzz_buf_t *s)
{
  uint8_t flags = 4;
  write_seed("etf", name, &flags, 1, s->p, s->n);
  s->n = 0;
}

/* The control tuple {op, ...} of the items given: 'p' a pid, 'r' a ref,
 * 'a' an atom, 'i' an integer (a long), 'n' a NaN (which passes the check
 * but does not decode). */
static void ctl(ei_x_buff *x, long op, const char *items, ...)
{
  va_list ap;
  va_start(ap, items);
  ei_x_free(x);
  ei_x_new_with_version(x);
  ei_x_encode_tuple_header(x, 1 + (long)strlen(items));
  ei_x_encode_long(x, op);
  for (const char *c = items; *c; c++) {
    if (*c == 'p') {
      erlang_pid p = *va_arg(ap, const erlang_pid *);
      ei_x_encode_pid(x, &p);
    } else if (*c == 'r') {
      erlang_ref r = *va_arg(ap, const erlang_ref *);
      ei_x_encode_ref(x, &r);
    } else if (*c == 'a') {
      ei_x_encode_atom(x, va_arg(ap, const char *));
    } else if (*c == 'n') {
      ei_x_append_buf(x, "F\x7f\xf8\0\0\0\0\0\0", 9);
    } else {
      ei_x_encode_long(x, va_arg(ap, long));
    }
  }
  va_end(ap);
}

static void frame_seeds(void)
{
  erlang_pid pp = fz_pid(FUZZ_PEER, FUZZ_PEER_PROC, FUZZ_PEER_CREATION);
  erlang_pid op = fz_pid(FUZZ_NODE, FUZZ_PROC_PID, FUZZ_CREATION);
  erlang_pid gone = fz_pid(FUZZ_NODE, 5, FUZZ_CREATION);
  erlang_ref mon = fz_ref(FUZZ_NODE, FUZZ_MONITOR, 3, FUZZ_CREATION);
  mon.n[1] = mon.n[2] = 0;
  erlang_ref pr = fz_ref(FUZZ_PEER, 1, 3, 3), pr2 = fz_ref(FUZZ_PEER, 2, 3, 3);
  erlang_ref alias = fz_ref(FUZZ_NODE, FUZZ_ALIAS, 3, FUZZ_CREATION);
  alias.n[1] = alias.n[2] = 0;
  fuzz_buf_t s = {0};
  ei_x_buff c, m;
  ei_x_new(&c);
  ei_x_new_with_version(&m);
  ei_x_format_wo_ver(&m, "{~a, ~i, [~s]}", "hello", 1, "x");

  ctl(&c, 2, "ap", "", &op);
  frame_add(&s, &c, &m);
  frames_seed("send", &s);
  ctl(&c, 22, "pp", &pp, &op);
  frame_add(&s, &c, &m);
  ctl(&c, 6, "paa", &pp, "", FUZZ_PROC_NAME);
  frame_add(&s, &c, &m);
  ctl(&c, 33, "pr", &pp, &alias);
  frame_add(&s, &c, &m);
  ctl(&c, 34, "pra", &pp, &alias, "token");
  frame_add(&s, &c, &m);
  ctl(&c, 33, "pr", &pp, &pr);
  frame_add(&s, &c, &m);
  frames_seed("sends", &s);

  ei_x_buff auth;
  ei_x_new_with_version(&auth);
  ei_x_encode_tuple_header(&auth, 3);
  ei_x_encode_atom(&auth, "$gen_call");
  ei_x_encode_tuple_header(&auth, 2);
  ei_x_encode_pid(&auth, &pp);
  ei_x_encode_ref(&auth, &pr);
  ei_x_encode_tuple_header(&auth, 2);
  ei_x_encode_atom(&auth, "is_auth");
  ei_x_encode_atom(&auth, FUZZ_PEER);
  ctl(&c, 19, "par", &pp, "net_kernel", &pr2);
  frame_add(&s, &c, NULL);
  ctl(&c, 6, "paa", &pp, "", "net_kernel");
  frame_add(&s, &c, &auth);
  frames_seed("ping", &s);
  ei_x_free(&auth);

  ctl(&c, 1, "pp", &pp, &op);
  frame_add(&s, &c, NULL);
  frames_seed("link-down", &s);
  ctl(&c, 1, "pp", &pp, &op);
  frame_add(&s, &c, NULL);
  ctl(&c, 3, "ppa", &pp, &op, "shutdown");
  frame_add(&s, &c, NULL);
  ctl(&c, 1, "pp", &pp, &gone);
  frame_add(&s, &c, NULL);
  frames_seed("link-exit", &s);
  ctl(&c, 1, "pp", &pp, &op);
  frame_add(&s, &c, NULL);
  ctl(&c, 35, "ipp", 5L, &pp, &op);
  frame_add(&s, &c, NULL);
  ctl(&c, 4, "pp", &pp, &op);
  frame_add(&s, &c, NULL);
  ctl(&c, 36, "ipp", 5L, &pp, &op);
  frame_add(&s, &c, NULL);
  frames_seed("unlink", &s);
  ctl(&c, 8, "ppa", &pp, &op, "normal");
  frame_add(&s, &c, NULL);
  ctl(&c, 8, "ppa", &pp, &op, "kill");
  frame_add(&s, &c, NULL);
  frames_seed("exit2", &s);

  ctl(&c, 19, "ppr", &pp, &op, &pr);
  frame_add(&s, &c, NULL);
  frames_seed("monitor-down", &s);
  ctl(&c, 19, "ppr", &pp, &op, &pr);
  frame_add(&s, &c, NULL);
  ctl(&c, 19, "par", &pp, FUZZ_PROC_NAME, &pr2);
  frame_add(&s, &c, NULL);
  ctl(&c, 20, "ppr", &pp, &op, &pr);
  frame_add(&s, &c, NULL);
  ctl(&c, 19, "par", &pp, "nobody", &pr);
  frame_add(&s, &c, NULL);
  ctl(&c, 19, "ppr", &pp, &gone, &pr);
  frame_add(&s, &c, NULL);
  frames_seed("monitors", &s);
  ctl(&c, 21, "ppra", &pp, &op, &alias, "noproc");
  frame_add(&s, &c, NULL);
  ctl(&c, 21, "apra", FUZZ_PROC_NAME, &op, &pr, "normal");
  frame_add(&s, &c, NULL);
  ctl(&c, 21, "ppra", &pp, &op, &mon, "normal");
  frame_add(&s, &c, NULL);
  frames_seed("monitor-exit", &s);
  ctl(&c, 21, "pprn", &pp, &op, &pr);
  frame_add(&s, &c, NULL);
  frames_seed("monitor-exit-bad", &s);
  ctl(&c, 3, "ppn", &pp, &op);
  frame_add(&s, &c, NULL);
  frames_seed("exit-bad", &s);

  ctl(&c, 99, "a", "what");
  frame_add(&s, &c, NULL);
  static const uint8_t tick[] = {0, 0};
  fuzz_put(&s, tick, 2);
  ctl(&c, 2, "ap", "", &op);
  frame_add(&s, &c, NULL);              /* a SEND without its message */
  frames_seed("odd", &s);
  static const uint8_t not_dist[] = {0, 3, 'x', 131, 'j'};
  fuzz_put(&s, not_dist, sizeof not_dist);
  frames_seed("not-dist", &s);

  ei_x_free(&c);
  ei_x_free(&m);
  free(s.p);
}

static void etf_seeds(void)
{
  term_seeds();
  frame_seeds();
}

int main(int argc, char **argv)
{
  if (argc != 2) {
    fprintf(stderr, "usage: %s DIR (writes DIR/http, DIR/ws, DIR/copy, DIR/etf)\n", argv[0]);
    return 2;
  }
  outdir = argv[1];
  http_seeds();
  ws_seeds();
  copy_seeds();
  etf_seeds();
  printf("%d seeds written under %s\n", nwritten, outdir);
  return 0;
}
