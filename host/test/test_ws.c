/* test_ws.c: tests of the WebSocket framing layer (ws.h).
 *
 * Frames are built by hand with a small builder, fed to an mb_ws_t, and what
 * comes back (messages, the closed() report, the bytes given to out()) is
 * recorded and checked; the frames out() produced are parsed back. Streams
 * are also fed one byte at a time and split at every offset, since a socket
 * may cut them anywhere. Every check prints one line; the exit code is 0
 * only if all passed. Also run under ASan+UBSan (no leaks, no UB).
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "ws.h"

enum { OP_CONT = 0, OP_TEXT = 1, OP_BIN = 2, OP_CLOSE = 8, OP_PING = 9, OP_PONG = 10 };

static const uint8_t KEY[4] = {0x37, 0xfa, 0x21, 0x3d};


/* -- Frame builder -------------------------------------------------------- */

typedef struct buf {
  uint8_t *p;
  size_t n, cap;
} buf_t;

static void put(buf_t *b, const void *data, size_t n)
{
  if (b->n + n > b->cap) {
    b->cap = (b->n + n) * 2 + 64;
    b->p = realloc(b->p, b->cap);
    if (!b->p)
      abort();
  }
  if (n)
    memcpy(b->p + b->n, data, n);
  b->n += n;
}

static void put1(buf_t *b, uint8_t c) { put(b, &c, 1); }

/* Append a frame: first byte `b0` (FIN, RSV and opcode as given), payload
 * masked with KEY if mask, length in its shortest form unless `lenform` asks
 * for 126 or 127. */
static void raw_frame(buf_t *b, uint8_t b0, int mask, int lenform,
                      const void *payload, size_t len)
{
  const uint8_t *pl = payload;
  uint8_t m = mask ? 0x80 : 0;
  put1(b, b0);
  if (lenform == 0)
    lenform = len < 126 ? 0 : len < 65536 ? 126 : 127;
  if (lenform == 0) {
    put1(b, m | (uint8_t)len);
  } else if (lenform == 126) {
    put1(b, m | 126);
    put1(b, (uint8_t)(len >> 8));
    put1(b, (uint8_t)len);
  } else {
    put1(b, m | 127);
    for (int i = 7; i >= 0; i--)
      put1(b, (uint8_t)((uint64_t)len >> (8 * i)));
  }
  if (mask)
    put(b, KEY, 4);
  for (size_t i = 0; i < len; i++)
    put1(b, mask ? pl[i] ^ KEY[i % 4] : pl[i]);
}

/* A frame as a client sends it (masked). */
static void frame(buf_t *b, int fin, int op, const void *payload, size_t len)
{
  raw_frame(b, (uint8_t)((fin ? 0x80 : 0) | op), 1, 0, payload, len);
}

static void text(buf_t *b, const char *s) { frame(b, 1, OP_TEXT, s, strlen(s)); }

static void close_frame(buf_t *b, int mask, int code, const char *reason)
{
  uint8_t pl[128];
  size_t n = 0;
  if (code) {
    pl[0] = (uint8_t)(code >> 8);
    pl[1] = (uint8_t)code;
    n = 2 + strlen(reason);
    memcpy(pl + 2, reason, n - 2);
  }
  raw_frame(b, 0x80 | OP_CLOSE, mask, 0, pl, n);
}


/* -- Frame parser, for what out() produced --------------------------------- */

typedef struct wire {
  int fin, op, masked;
  uint8_t payload[200000];
  size_t len;
} wire_t;

static wire_t W;

/* Parse the frame at b[*pos..n) into W, unmasked; false if there is none. */
static bool parse(const uint8_t *b, size_t n, size_t *pos)
{
  size_t i = *pos;
  if (n - i < 2)
    return false;
  W.fin = b[i] >> 7;
  W.op = b[i] & 0x0f;
  W.masked = b[i + 1] >> 7;
  uint64_t len = b[i + 1] & 0x7f;
  i += 2;
  int ext = len == 126 ? 2 : len == 127 ? 8 : 0;
  if (ext) {
    if (n - i < (size_t)ext)
      return false;
    len = 0;
    for (int k = 0; k < ext; k++)
      len = len << 8 | b[i + k];
    i += ext;
  }
  uint8_t key[4] = {0};
  if (W.masked) {
    if (n - i < 4)
      return false;
    memcpy(key, b + i, 4);
    i += 4;
  }
  if (n - i < len || len > sizeof W.payload)
    return false;
  for (size_t k = 0; k < len; k++)
    W.payload[k] = b[i + k] ^ key[k % 4];
  W.len = len;
  *pos = i + len;
  return true;
}


/* -- Recorder: the callbacks ---------------------------------------------- */

typedef struct rec {
  mb_ws_t *ws;
  buf_t out;            /* everything out() was given */
  int outcalls;
  int fail_out;         /* out() returns -1 */
  int nmsg;
  char log[8192];       /* "T:<text>;" or "B:<len>:<sum>;" per message */
  size_t loglen;
  uint8_t last[200000];
  size_t lastlen;
  int nclosed, code;
  char reason[256];
  size_t rlen;
  long long held;       /* the sum of held()'s deltas */
  int echo;             /* message(): send it back */
  int close_in_msg;     /* message(): start the close handshake */
  int free_in_msg;      /* message(): free the mb_ws_t */
  int send_rc;          /* what the send from message() returned */
} rec_t;

static rec_t R;

static int cb_out(void *ud, const uint8_t *data, size_t len)
{
  rec_t *r = ud;
  r->outcalls++;
  if (r->fail_out)
    return -1;
  put(&r->out, data, len);
  return 0;
}

static void cb_message(void *ud, const uint8_t *data, size_t len, int binary)
{
  rec_t *r = ud;
  r->nmsg++;
  if (len <= sizeof r->last)
    memcpy(r->last, data, len);
  r->lastlen = len;
  char entry[300];
  if (binary) {
    unsigned sum = 0;
    for (size_t i = 0; i < len; i++)
      sum = sum * 31 + data[i];
    snprintf(entry, sizeof entry, "B:%zu:%u;", len, sum);
  } else {
    snprintf(entry, sizeof entry, "T:%.*s;", len > 200 ? 200 : (int)len, (const char *)data);
  }
  size_t n = strlen(entry);
  if (r->loglen + n < sizeof r->log) {
    memcpy(r->log + r->loglen, entry, n + 1);
    r->loglen += n;
  }
  if (r->echo)
    r->send_rc = mb_ws_send(r->ws, data, len, binary);
  if (r->close_in_msg)
    mb_ws_close(r->ws, 1000, "enough", 6);
  if (r->free_in_msg) {
    mb_ws_free(r->ws);
    r->ws = NULL;
  }
}

static void cb_held(void *ud, long long delta)
{
  ((rec_t *)ud)->held += delta;
}

static void cb_closed(void *ud, int code, const char *reason, size_t len)
{
  rec_t *r = ud;
  r->nclosed++;
  r->code = code;
  r->rlen = len < sizeof r->reason ? len : sizeof r->reason - 1;
  memcpy(r->reason, reason, r->rlen);
  r->reason[r->rlen] = 0;
}

/* A fresh recorder and endpoint. */
static mb_ws_t *fresh(int client, size_t max_message)
{
  free(R.out.p);
  memset(&R, 0, sizeof R);
  mb_ws_cb_t cb = {&R, cb_out, cb_message, cb_closed, cb_held};
  R.ws = mb_ws_new(client, max_message, &cb);
  if (!R.ws) {
    fprintf(stderr, "mb_ws_new failed\n");
    exit(2);
  }
  return R.ws;
}

static void done_with(void)
{
  mb_ws_free(R.ws);
  R.ws = NULL;
}

/* Feed b whole; returns what mb_ws_feed returned. */
static int feed(const buf_t *b) { return mb_ws_feed(R.ws, b->p, b->n); }

/* Whether out() got exactly one frame, of opcode op, and (for close) code. */
static bool out_is(int op, int masked, int code)
{
  size_t pos = 0;
  if (!parse(R.out.p, R.out.n, &pos) || pos != R.out.n)
    return false;
  if (W.op != op || W.masked != masked || !W.fin)
    return false;
  if (op == OP_CLOSE && code)
    return W.len >= 2 && (W.payload[0] << 8 | W.payload[1]) == code;
  if (op == OP_CLOSE)
    return W.len == 0;
  return true;
}


/* -- Tests ----------------------------------------------------------------- */

static void test_accept_key(void)
{
  char out[29];
  const char *key = "dGhlIHNhbXBsZSBub25jZQ==";
  check(mb_ws_accept_key(key, strlen(key), out) == 0 &&
        strcmp(out, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=") == 0,
        "accept key of RFC 6455's example (%s)", out);
  char big[300];
  memset(big, 'a', sizeof big);
  check(mb_ws_accept_key(big, sizeof big, out) == -1, "accept key refuses a 300-byte key");
}

static void test_utf8(void)
{
  static const struct { const char *s; int ok; } cases[] = {
    {"", 1}, {"hello", 1}, {"\xc3\xa9t\xc3\xa9", 1}, {"\xe2\x82\xac", 1},
    {"\xf0\x9d\x84\x9e", 1}, {"\xf4\x8f\xbf\xbf", 1}, {"\xed\x9f\xbf", 1},
    {"\xc3\x28", 0}, {"\xc3", 0}, {"\xe2\x82", 0}, {"\x80", 0}, {"\xbf", 0},
    {"\xc0\x80", 0}, {"\xc1\xbf", 0}, {"\xe0\x80\x80", 0}, {"\xf0\x80\x80\x80", 0},
    {"\xed\xa0\x80", 0}, {"\xed\xbf\xbf", 0}, {"\xf4\x90\x80\x80", 0},
    {"\xf8\x88\x80\x80\x80", 0}, {"\xff", 0}, {"a\xe2\x82\xac\xc3", 0},
  };
  int bad = 0;
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    const char *s = cases[i].s;
    if (mb_ws_utf8_valid((const uint8_t *)s, strlen(s)) != cases[i].ok) {
      printf("     (utf8 case %zu wrong)\n", i);
      bad++;
    }
  }
  check(bad == 0, "mb_ws_utf8_valid: %zu cases (overlong, surrogates, > U+10FFFF, truncated)",
        sizeof cases / sizeof cases[0]);
}

static void test_messages(void)
{
  buf_t b = {0};
  fresh(0, 0);
  text(&b, "hello");
  uint8_t bin[] = {0, 1, 2, 255, 0};
  frame(&b, 1, OP_BIN, bin, sizeof bin);
  frame(&b, 1, OP_TEXT, "", 0);
  int rc = feed(&b);
  check(rc == 0 && R.nmsg == 3 && strcmp(R.log, "T:hello;B:5:39618;T:;") == 0,
        "masked text, binary and empty messages arrive whole (%s)", R.log);
  check(R.out.n == 0 && R.outcalls == 0 && R.nclosed == 0 && !mb_ws_done(R.ws),
        "messages cause no output and no close");
  done_with();

  /* 16-bit and 64-bit lengths. */
  fresh(0, 100000);
  b.n = 0;
  static uint8_t big[70000];
  for (size_t i = 0; i < sizeof big; i++)
    big[i] = (uint8_t)(i * 7);
  frame(&b, 1, OP_BIN, big, 300);
  frame(&b, 1, OP_BIN, big, sizeof big);
  rc = feed(&b);
  check(rc == 0 && R.nmsg == 2 && R.lastlen == sizeof big && memcmp(R.last, big, sizeof big) == 0,
        "messages of 300 (16-bit length) and 70000 bytes (64-bit length)");
  done_with();

  /* Fragmented text with a ping between the fragments. */
  fresh(0, 0);
  b.n = 0;
  frame(&b, 0, OP_TEXT, "Hel", 3);
  frame(&b, 1, OP_PING, "p!", 2);
  frame(&b, 0, OP_CONT, "l", 1);
  frame(&b, 1, OP_CONT, "o \xc3\xa9", 4);
  rc = feed(&b);
  check(rc == 0 && R.nmsg == 1 && strcmp(R.log, "T:Hello \xc3\xa9;") == 0,
        "fragmented text (text + 2 continuations) is one message (%s)", R.log);
  check(out_is(OP_PONG, 0, 0) && W.len == 2 && memcmp(W.payload, "p!", 2) == 0,
        "a ping between fragments is answered by an unmasked pong with its payload");
  done_with();

  /* UTF-8 cut between fragments is fine. */
  fresh(0, 0);
  b.n = 0;
  frame(&b, 0, OP_TEXT, "caf\xc3", 4);
  frame(&b, 1, OP_CONT, "\xa9", 1);
  rc = feed(&b);
  check(rc == 0 && strcmp(R.log, "T:caf\xc3\xa9;") == 0,
        "a character split between two fragments is accepted");
  done_with();

  /* A pong is consumed silently. */
  fresh(0, 0);
  b.n = 0;
  frame(&b, 1, OP_PONG, "x", 1);
  text(&b, "after");
  rc = feed(&b);
  check(rc == 0 && R.nmsg == 1 && R.out.n == 0, "an unsolicited pong is ignored");
  done_with();
  free(b.p);
}

static void test_close(void)
{
  buf_t b = {0};
  /* The peer closes. */
  fresh(0, 0);
  text(&b, "last");
  close_frame(&b, 1, 1000, "bye \xc3\xa9");
  text(&b, "ignored");
  int rc = feed(&b);
  check(rc == 0 && R.nmsg == 1 && R.nclosed == 1 && R.code == 1000 &&
        strcmp(R.reason, "bye \xc3\xa9") == 0,
        "peer's close: closed(1000, reason) after the messages before it (%d, '%s')",
        R.code, R.reason);
  check(out_is(OP_CLOSE, 0, 1000), "peer's close is answered with a close 1000");
  check(mb_ws_done(R.ws), "done after the peer's close and our reply");
  check(mb_ws_send(R.ws, (const uint8_t *)"x", 1, 0) == -1, "sending after the close fails");
  check(mb_ws_close(R.ws, 1000, NULL, 0) == 0, "closing after the peer's close is a no-op");
  size_t n = R.out.n;
  b.n = 0;
  text(&b, "more");
  close_frame(&b, 1, 1000, "");
  rc = feed(&b);
  check(rc == 0 && R.nclosed == 1 && R.nmsg == 1 && R.out.n == n,
        "bytes after the close are ignored; closed is called once");
  done_with();

  /* The peer closes without a code. */
  fresh(0, 0);
  b.n = 0;
  close_frame(&b, 1, 0, NULL);
  rc = feed(&b);
  check(rc == 0 && R.nclosed == 1 && R.code == 1005 && R.rlen == 0 && out_is(OP_CLOSE, 0, 0) &&
        mb_ws_done(R.ws),
        "peer's close without a code: closed(1005), an empty close in reply");
  done_with();

  /* We close first. */
  fresh(0, 0);
  rc = mb_ws_close(R.ws, 1001, "going", 5);
  check(rc == 0 && out_is(OP_CLOSE, 0, 1001) && W.len == 7 && memcmp(W.payload + 2, "going", 5) == 0,
        "mb_ws_close sends close 1001 'going' at once");
  check(!mb_ws_done(R.ws) && R.nclosed == 0, "not done before the peer's reply");
  check(mb_ws_close(R.ws, 1000, NULL, 0) == 0 && R.outcalls == 1, "closing twice sends one close");
  check(mb_ws_send(R.ws, (const uint8_t *)"x", 1, 0) == -1, "sending while closing fails");
  b.n = 0;
  text(&b, "in flight");
  close_frame(&b, 1, 1001, "");
  rc = feed(&b);
  check(rc == 0 && R.nmsg == 1 && R.nclosed == 1 && R.code == 1001 && R.outcalls == 1 &&
        mb_ws_done(R.ws),
        "a message in flight still arrives; the peer's reply ends it with no second close");
  done_with();

  /* Close arguments. */
  fresh(0, 0);
  char longr[130];
  memset(longr, 'r', sizeof longr);
  check(mb_ws_close(R.ws, 1005, NULL, 0) == -2 && mb_ws_close(R.ws, 999, NULL, 0) == -2 &&
        mb_ws_close(R.ws, 5000, NULL, 0) == -2 && mb_ws_close(R.ws, 1000, longr, 124) == -2 &&
        mb_ws_close(R.ws, 1000, "\xff", 1) == -2 && mb_ws_close(R.ws, 0, "x", 1) == -2 &&
        R.outcalls == 0,
        "mb_ws_close refuses codes 1005, 999, 5000, a 124-byte or non-UTF-8 reason");
  check(mb_ws_close(R.ws, 4000, longr, 123) == 0 && out_is(OP_CLOSE, 0, 4000) && W.len == 125,
        "mb_ws_close accepts code 4000 with a 123-byte reason");
  done_with();
  free(b.p);
}

/* Feed b to a fresh server and check it fails with `code`. */
static void expect_error(const char *what, const buf_t *b, size_t max, int code, int client)
{
  fresh(client, max);
  int rc = feed(b);
  bool ok = rc == -1 && R.nclosed == 1 && R.code == code && out_is(OP_CLOSE, client, code) &&
            mb_ws_done(R.ws);
  check(ok, "%s -> %d (rc %d, closed %d x%d '%s')", what, code, rc, R.code, R.nclosed, R.reason);
  check(mb_ws_feed(R.ws, b->p, b->n) == -1 && R.nclosed == 1 &&
        mb_ws_send(R.ws, (const uint8_t *)"x", 1, 0) == -1,
        "%s: then feed and send fail, no second closed()", what);
  done_with();
  /* The same, one byte at a time. */
  fresh(client, max);
  int rc1 = 0;
  for (size_t i = 0; i < b->n && rc1 == 0; i++)
    rc1 = mb_ws_feed(R.ws, b->p + i, 1);
  check(rc1 == -1 && R.nclosed == 1 && R.code == code && out_is(OP_CLOSE, client, code),
        "%s, one byte at a time -> %d (%d)", what, code, R.code);
  done_with();
}

static void test_errors(void)
{
  buf_t b = {0};
  raw_frame(&b, 0x81, 0, 0, "hi", 2);
  expect_error("unmasked client frame", &b, 0, 1002, 0);

  b.n = 0;
  raw_frame(&b, 0x83, 1, 0, "hi", 2);
  expect_error("opcode 3", &b, 0, 1002, 0);
  b.n = 0;
  raw_frame(&b, 0x8b, 1, 0, "", 0);
  expect_error("opcode 0xb", &b, 0, 1002, 0);

  b.n = 0;
  raw_frame(&b, 0xc1, 1, 0, "hi", 2);
  expect_error("RSV1 set", &b, 0, 1002, 0);

  b.n = 0;
  raw_frame(&b, OP_PING, 1, 0, "p", 1);
  expect_error("fragmented ping", &b, 0, 1002, 0);

  b.n = 0;
  static uint8_t zeros[200];
  raw_frame(&b, 0x80 | OP_PING, 1, 0, zeros, 126);
  expect_error("126-byte ping", &b, 0, 1002, 0);

  b.n = 0;
  raw_frame(&b, 0x81, 1, 126, "hello", 5);
  expect_error("16-bit length for 5 bytes", &b, 0, 1002, 0);
  b.n = 0;
  raw_frame(&b, 0x81, 1, 127, zeros, 200);
  expect_error("64-bit length for 200 bytes", &b, 0, 1002, 0);
  b.n = 0;
  uint8_t huge[] = {0x82, 0xff, 0x80, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5};
  put(&b, huge, sizeof huge);
  expect_error("length with bit 63 set", &b, 0, 1002, 0);

  b.n = 0;
  raw_frame(&b, 0x80 | OP_CLOSE, 1, 0, "\x03", 1);
  expect_error("close with a 1-byte payload", &b, 0, 1002, 0);
  b.n = 0;
  close_frame(&b, 1, 1005, "");
  expect_error("close with code 1005", &b, 0, 1002, 0);
  b.n = 0;
  close_frame(&b, 1, 1000, "\xc3\x28");
  expect_error("close with a non-UTF-8 reason", &b, 0, 1007, 0);

  b.n = 0;
  frame(&b, 1, OP_CONT, "x", 1);
  expect_error("continuation with nothing to continue", &b, 0, 1002, 0);
  b.n = 0;
  frame(&b, 0, OP_TEXT, "a", 1);
  frame(&b, 1, OP_TEXT, "b", 1);
  expect_error("new text message inside a fragmented one", &b, 0, 1002, 0);

  b.n = 0;
  text(&b, "0123456789a");
  expect_error("11-byte message, max 10", &b, 10, 1009, 0);
  b.n = 0;
  frame(&b, 0, OP_TEXT, "012345", 6);
  frame(&b, 1, OP_CONT, "6789a", 5);
  expect_error("11 bytes in 2 fragments, max 10", &b, 10, 1009, 0);

  b.n = 0;
  text(&b, "ok \xc3\x28");
  expect_error("text with invalid UTF-8", &b, 0, 1007, 0);
  b.n = 0;
  frame(&b, 0, OP_TEXT, "ok", 2);
  frame(&b, 1, OP_CONT, "\xe2\x82", 2);
  expect_error("text ending inside a character", &b, 0, 1007, 0);
  b.n = 0;
  text(&b, "\xed\xa0\x80");
  expect_error("text with a surrogate", &b, 0, 1007, 0);

  b.n = 0;
  frame(&b, 1, OP_TEXT, "hi", 2);
  expect_error("client receiving a masked frame", &b, 0, 1002, 1);

  /* What came before the error is delivered; the reason says what broke. */
  fresh(0, 0);
  b.n = 0;
  text(&b, "before");
  raw_frame(&b, OP_PING, 1, 0, "p", 1);
  text(&b, "after");
  int rc = feed(&b);
  check(rc == -1 && strcmp(R.log, "T:before;") == 0 && R.code == 1002 &&
        strcmp(R.reason, "fragmented control frame") == 0,
        "messages before an error arrive, none after; reason '%s'", R.reason);
  done_with();

  /* Exactly max_message is fine. */
  fresh(0, 10);
  b.n = 0;
  text(&b, "0123456789");
  check(feed(&b) == 0 && R.nmsg == 1 && R.nclosed == 0, "a message of exactly max_message bytes");
  done_with();
  free(b.p);
}

/* A stream with every kind of frame, and what it must produce. */
static void build_stream(buf_t *b)
{
  static uint8_t mid[1000];
  for (size_t i = 0; i < sizeof mid; i++)
    mid[i] = (uint8_t)(i ^ 0x5a);
  b->n = 0;
  text(b, "one");
  frame(b, 0, OP_BIN, mid, 400);
  frame(b, 1, OP_PING, "ping", 4);
  frame(b, 0, OP_CONT, mid + 400, 0);
  frame(b, 1, OP_CONT, mid + 400, 600);
  frame(b, 0, OP_TEXT, "\xe2", 1);
  frame(b, 1, OP_CONT, "\x82\xac", 2);
  frame(b, 1, OP_TEXT, "", 0);
  close_frame(b, 1, 4001, "r\xc3\xa9sum\xc3\xa9 \xe2\x82\xac");
}

static void test_splits(void)
{
  buf_t b = {0};
  build_stream(&b);
  fresh(0, 0);
  int rc = feed(&b);
  char want[sizeof R.log];
  memcpy(want, R.log, sizeof want);
  buf_t wantout = {0};
  put(&wantout, R.out.p, R.out.n);
  check(rc == 0 && R.nmsg == 4 && R.nclosed == 1 && R.code == 4001 && mb_ws_done(R.ws) &&
        strcmp(R.reason, "r\xc3\xa9sum\xc3\xa9 \xe2\x82\xac") == 0,
        "a stream of every kind of frame, whole (%s)", R.log);
  size_t pos = 0;
  bool frames = parse(R.out.p, R.out.n, &pos) && W.op == OP_PONG && parse(R.out.p, R.out.n, &pos) &&
                W.op == OP_CLOSE && pos == R.out.n && R.outcalls == 1;
  check(frames, "its output is a pong then the close reply, in one out() call");
  done_with();

  fresh(0, 0);
  rc = 0;
  for (size_t i = 0; i < b.n && rc == 0; i++)
    rc = mb_ws_feed(R.ws, b.p + i, 1);
  check(rc == 0 && strcmp(R.log, want) == 0 && R.nclosed == 1 && R.code == 4001 &&
        strcmp(R.reason, "r\xc3\xa9sum\xc3\xa9 \xe2\x82\xac") == 0 && R.out.n == wantout.n &&
        memcmp(R.out.p, wantout.p, wantout.n) == 0,
        "the same stream one byte at a time gives the same messages, close and output");
  done_with();

  int bad = 0;
  for (size_t cut = 1; cut < b.n; cut++) {
    fresh(0, 0);
    int r1 = mb_ws_feed(R.ws, b.p, cut);
    int r2 = mb_ws_feed(R.ws, b.p + cut, b.n - cut);
    if (r1 || r2 || strcmp(R.log, want) != 0 || R.nclosed != 1 || R.code != 4001 ||
        R.out.n != wantout.n || memcmp(R.out.p, wantout.p, wantout.n) != 0) {
      if (bad++ < 3)
        printf("     (cut at %zu: rc %d/%d code %d log %s)\n", cut, r1, r2, R.code, R.log);
    }
    done_with();
  }
  check(bad == 0, "the same stream cut in two at each of its %zu offsets", b.n - 1);

  /* A close frame's reason split between reads (wslay alone would refuse it). */
  bad = 0;
  buf_t c = {0};
  close_frame(&c, 1, 1000, "\xc3\xa9\xc3\xa9\xc3\xa9");
  for (size_t cut = 1; cut < c.n; cut++) {
    fresh(0, 0);
    mb_ws_feed(R.ws, c.p, cut);
    mb_ws_feed(R.ws, c.p + cut, c.n - cut);
    if (R.nclosed != 1 || R.code != 1000 || strcmp(R.reason, "\xc3\xa9\xc3\xa9\xc3\xa9") != 0)
      bad++;
    done_with();
  }
  check(bad == 0, "a close frame with a UTF-8 reason, cut at every offset");

  /* A ping followed by a frame that wslay itself refuses (RSV1 set): the
   * pong goes out before the close 1002 wherever the stream is cut. Found
   * by fuzzing (spec/fuzz/ws): fed whole, wslay queued the pong and the
   * close in one call and sent only the close. */
  c.n = 0;
  frame(&c, 1, OP_PING, "p!", 2);
  raw_frame(&c, 0xc1, 1, 0, "hi", 2);
  bad = 0;
  for (size_t cut = 0; cut < c.n; cut++) {
    fresh(0, 0);
    mb_ws_feed(R.ws, c.p, cut);
    mb_ws_feed(R.ws, c.p + cut, c.n - cut);
    size_t pos = 0;
    bool ok = parse(R.out.p, R.out.n, &pos) && W.op == OP_PONG && W.len == 2 &&
              parse(R.out.p, R.out.n, &pos) && W.op == OP_CLOSE && pos == R.out.n &&
              R.nclosed == 1 && R.code == 1002;
    if (!ok && bad++ < 3)
      printf("     (cut at %zu: %zu bytes out, code %d)\n", cut, R.out.n, R.code);
    done_with();
  }
  check(bad == 0, "a ping before a frame wslay refuses is answered, cut at every offset");
  free(c.p);
  free(wantout.p);
  free(b.p);
}

static void test_sending(void)
{
  fresh(0, 0);
  int rc = mb_ws_send(R.ws, (const uint8_t *)"hi \xc3\xa9", 5, 0);
  check(rc == 0 && out_is(OP_TEXT, 0, 0) && W.len == 5 && memcmp(W.payload, "hi \xc3\xa9", 5) == 0 &&
        R.outcalls == 1,
        "server sends an unmasked text frame in one out() call");
  R.out.n = 0;
  static uint8_t big[100000];
  for (size_t i = 0; i < sizeof big; i++)
    big[i] = (uint8_t)(i * 13);
  rc = mb_ws_send(R.ws, big, sizeof big, 1);
  check(rc == 0 && out_is(OP_BIN, 0, 0) && W.len == sizeof big && memcmp(W.payload, big, sizeof big) == 0 &&
        R.outcalls == 2,
        "a 100000-byte binary message goes out in one out() call");
  R.out.n = 0;
  check(mb_ws_send(R.ws, (const uint8_t *)"\xc3\x28", 2, 0) == -2 && R.outcalls == 2,
        "text that is not UTF-8 is refused (-2), nothing sent");
  check(mb_ws_send(R.ws, (const uint8_t *)"\xc3\x28", 2, 1) == 0 && out_is(OP_BIN, 0, 0),
        "the same bytes as binary are sent");
  R.out.n = 0;
  check(mb_ws_ping(R.ws, (const uint8_t *)"are you there", 13) == 0 && out_is(OP_PING, 0, 0) &&
        W.len == 13,
        "mb_ws_ping sends a ping");
  static uint8_t p126[126];
  check(mb_ws_ping(R.ws, p126, 126) == -2, "a 126-byte ping is refused (-2)");
  done_with();

  /* Client mode masks its frames, with a fresh key per frame. */
  fresh(1, 0);
  rc = mb_ws_send(R.ws, (const uint8_t *)"hello", 5, 0);
  bool masked = out_is(OP_TEXT, 1, 0) && W.len == 5 && memcmp(W.payload, "hello", 5) == 0;
  check(rc == 0 && masked, "client sends masked frames that unmask to the message");
  uint8_t key1[4];
  memcpy(key1, R.out.p + 2, 4);
  R.out.n = 0;
  mb_ws_send(R.ws, (const uint8_t *)"hello", 5, 0);
  check(memcmp(key1, R.out.p + 2, 4) != 0, "client uses a new mask key per frame");
  R.out.n = 0;
  rc = mb_ws_send(R.ws, big, sizeof big, 1);
  check(rc == 0 && out_is(OP_BIN, 1, 0) && W.len == sizeof big && memcmp(W.payload, big, sizeof big) == 0 &&
        R.outcalls == 3,
        "client masks a 100000-byte message, still in one out() call");
  buf_t b = {0};
  raw_frame(&b, 0x81, 0, 0, "from server", 11);
  raw_frame(&b, 0x89, 0, 0, "pp", 2);
  R.out.n = 0;
  rc = feed(&b);
  check(rc == 0 && strcmp(R.log, "T:from server;") == 0 && out_is(OP_PONG, 1, 0) && W.len == 2,
        "client takes unmasked frames and answers a ping with a masked pong");
  R.out.n = 0;
  mb_ws_close(R.ws, 1000, "", 0);
  check(out_is(OP_CLOSE, 1, 1000), "client's close is masked");
  b.n = 0;
  close_frame(&b, 0, 1000, "");
  rc = feed(&b);
  check(rc == 0 && R.nclosed == 1 && R.code == 1000 && mb_ws_done(R.ws),
        "client close handshake completes");
  done_with();
  free(b.p);
}

/* What wslay holds of an unfinished message is told, and given back. */
static void test_held(void)
{
  buf_t b = {0};
  static uint8_t part[5000];
  memset(part, 'x', sizeof part);
  fresh(0, 100000);
  frame(&b, 0, OP_BIN, part, sizeof part);
  frame(&b, 0, OP_CONT, part, 1000);
  int rc = feed(&b);
  check(rc == 0 && R.nmsg == 0 && R.held == 6000, "two fragments held: 6000 (%lld)", R.held);
  b.n = 0;
  frame(&b, 1, OP_PING, "p", 1);
  frame(&b, 1, OP_CONT, part, 10);
  frame(&b, 0, OP_TEXT, "ab", 2);
  rc = feed(&b);
  check(rc == 0 && R.nmsg == 1 && R.held == 2,
        "the message done, the next one's start held: 2 (%lld)", R.held);
  done_with();
  check(R.held == 0, "all given back when freed (%lld)", R.held);
  fresh(0, 0);
  b.n = 0;
  text(&b, "whole");
  rc = feed(&b);
  check(rc == 0 && R.nmsg == 1 && R.held == 0, "a whole message: nothing held after (%lld)", R.held);
  done_with();
  free(b.p);
}

static void test_callbacks(void)
{
  buf_t b = {0};
  /* Echo from inside message(): sent when the feed returns, in one call. */
  fresh(0, 0);
  R.echo = 1;
  text(&b, "a");
  frame(&b, 1, OP_PING, "", 0);
  text(&b, "b");
  int rc = feed(&b);
  size_t pos = 0;
  bool ok = rc == 0 && R.send_rc == 0 && R.outcalls == 1;
  /* A ping goes to wslay alone (ws.c, is_whole), so its pong is framed
   * after what was queued before it and before what is queued after it. */
  ok = ok && parse(R.out.p, R.out.n, &pos) && W.op == OP_TEXT && W.len == 1 && W.payload[0] == 'a';
  ok = ok && parse(R.out.p, R.out.n, &pos) && W.op == OP_PONG;
  ok = ok && parse(R.out.p, R.out.n, &pos) && W.op == OP_TEXT && W.payload[0] == 'b' && pos == R.out.n;
  check(ok, "messages sent from message() and the pong go out in stream order, in one out() call");
  done_with();

  /* Closing from inside message(). */
  fresh(0, 0);
  R.close_in_msg = 1;
  b.n = 0;
  text(&b, "stop");
  rc = feed(&b);
  check(rc == 0 && out_is(OP_CLOSE, 0, 1000) && !mb_ws_done(R.ws), "mb_ws_close from message()");
  done_with();

  /* Freeing from inside message(): deferred, nothing after it. */
  fresh(0, 0);
  R.free_in_msg = 1;
  b.n = 0;
  text(&b, "one");
  text(&b, "two");
  close_frame(&b, 1, 1000, "");
  rc = feed(&b);
  check(rc == -1 && R.nmsg == 1 && R.nclosed == 0 && R.outcalls == 0,
        "mb_ws_free from message(): feed returns -1, no more callbacks");
  done_with();

  /* out() failing. */
  fresh(0, 0);
  R.fail_out = 1;
  rc = mb_ws_send(R.ws, (const uint8_t *)"x", 1, 0);
  check(rc == -1 && mb_ws_done(R.ws) && R.nclosed == 0, "out() failing: send -1, done, no closed()");
  b.n = 0;
  text(&b, "x");
  check(mb_ws_feed(R.ws, b.p, b.n) == -1 && R.nmsg == 0, "then feed fails");
  done_with();

  fresh(0, 0);
  R.fail_out = 1;
  b.n = 0;
  close_frame(&b, 1, 1000, "");
  rc = feed(&b);
  check(rc == -1 && R.nclosed == 1 && R.code == 1000 && mb_ws_done(R.ws),
        "out() failing on the close reply: closed(1000) still reported, feed -1");
  done_with();
  mb_ws_free(NULL);
  free(b.p);
}

/* The frames in out(), in order: "T:<text>;" per text frame, "P;" pong,
 * "C:<code>;" close. */
static void out_frames(char *log, size_t cap)
{
  size_t pos = 0, n = 0;
  log[0] = 0;
  while (pos < R.out.n && parse(R.out.p, R.out.n, &pos) && n + 140 < cap) {
    if (W.op == OP_TEXT)
      n += (size_t)snprintf(log + n, cap - n, "T:%.*s;", (int)W.len, (const char *)W.payload);
    else if (W.op == OP_PONG)
      n += (size_t)snprintf(log + n, cap - n, "P;");
    else if (W.op == OP_CLOSE)
      n += (size_t)snprintf(log + n, cap - n, "C:%d;", W.len >= 2 ? W.payload[0] << 8 | W.payload[1] : 0);
    else
      n += (size_t)snprintf(log + n, cap - n, "?%d;", W.op);
  }
}

static void test_send_later(void)
{
  char log[512];
  buf_t b = {0};
  fresh(0, 0);
  check(mb_ws_send_later(R.ws, (const uint8_t *)"one", 3, 0) == 0 &&
        mb_ws_send_later(R.ws, (const uint8_t *)"two", 3, 0) == 0 && R.outcalls == 0,
        "mb_ws_send_later queues without framing");
  check(mb_ws_send_later(R.ws, (const uint8_t *)"\xc3\x28", 2, 0) == -2,
        "mb_ws_send_later refuses text that is not UTF-8 (-2)");
  check(mb_ws_flush(R.ws) == 0 && R.outcalls == 1 && (out_frames(log, sizeof log), 1) &&
        strcmp(log, "T:one;T:two;") == 0,
        "mb_ws_flush frames both in one out() call (%s)", log);
  check(mb_ws_flush(R.ws) == 0 && R.outcalls == 1, "a flush with nothing held writes nothing");
  R.out.n = 0;
  mb_ws_send_later(R.ws, (const uint8_t *)"three", 5, 0);
  check(mb_ws_send(R.ws, (const uint8_t *)"four", 4, 0) == 0 && R.outcalls == 2 &&
        (out_frames(log, sizeof log), 1) && strcmp(log, "T:three;T:four;") == 0,
        "a send frames what is held before it, in the same out() call (%s)", log);
  R.out.n = 0;
  mb_ws_send_later(R.ws, (const uint8_t *)"five", 4, 0);
  frame(&b, 1, OP_PING, "pp", 2);
  check(feed(&b) == 0 && (out_frames(log, sizeof log), 1) && strcmp(log, "T:five;P;") == 0,
        "a feed sends what is held before its pong (%s)", log);
  R.out.n = 0;
  b.n = 0;
  mb_ws_send_later(R.ws, (const uint8_t *)"six", 3, 0);
  close_frame(&b, 1, 1001, "");
  check(feed(&b) == 0 && (out_frames(log, sizeof log), 1) && strcmp(log, "T:six;C:1001;") == 0 &&
        R.nclosed == 1,
        "a feed sends what is held before the close reply (%s)", log);
  done_with();

  fresh(0, 0);
  mb_ws_send_later(R.ws, (const uint8_t *)"seven", 5, 0);
  check(mb_ws_close(R.ws, 4000, "bye", 3) == 0 && (out_frames(log, sizeof log), 1) &&
        strcmp(log, "T:seven;C:4000;") == 0,
        "mb_ws_close sends what is held before its close frame (%s)", log);
  check(mb_ws_send_later(R.ws, (const uint8_t *)"x", 1, 0) == -1 || mb_ws_flush(R.ws) == -1 ||
        (out_frames(log, sizeof log), strcmp(log, "T:seven;C:4000;") == 0),
        "nothing goes out after the close frame");
  done_with();

  fresh(0, 0);
  R.fail_out = 1;
  mb_ws_send_later(R.ws, (const uint8_t *)"eight", 5, 0);
  check(mb_ws_flush(R.ws) == -1 && mb_ws_send_later(R.ws, (const uint8_t *)"x", 1, 0) == -1 &&
        mb_ws_flush(R.ws) == 0,
        "a flush whose out() fails says so; then nothing is held, and nothing more taken");
  done_with();
  free(b.p);
}

int main(void)
{
  test_accept_key();
  test_utf8();
  test_messages();
  test_close();
  test_errors();
  test_splits();
  test_sending();
  test_send_later();
  test_callbacks();
  test_held();
  free(R.out.p);
  return check_summary();
}
