/* seeds.c: writes the starting inputs of the fuzz targets, in the input
 * layout each target reads (see the DESIGN comment of host/fuzz/fuzz_*.c):
 * HTTP requests and responses, WebSocket frame streams for both roles, and
 * messages made by the real encoder (mb_copy_encode) from many kinds of
 * values. The campaigns start from these; what is kept in spec/fuzz/ is the
 * minimized corpus the fuzzer grew from them (see README, "Fuzzing").
 *
 *   build/fuzz_seeds DIR    writes DIR/http/, DIR/ws/, DIR/copy/ (dirs must exist)
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "copy.h"
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

int main(int argc, char **argv)
{
  if (argc != 2) {
    fprintf(stderr, "usage: %s DIR (writes DIR/http, DIR/ws, DIR/copy)\n", argv[0]);
    return 2;
  }
  outdir = argv[1];
  http_seeds();
  ws_seeds();
  copy_seeds();
  printf("%d seeds written under %s\n", nwritten, outdir);
  return 0;
}
