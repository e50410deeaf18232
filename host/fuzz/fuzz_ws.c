/* fuzz_ws.c: fuzz target for the WebSocket frame reader (host/ws.c, ws.h),
 * without sockets, as host/test/test_ws.c drives it.
 *
 * DESIGN
 * Input: byte 0 chooses the role (bit 0: client, else server) and the
 * max_message limit (bits 1-3, from 1 byte to the 16 MiB default, small
 * ones first so that the limit paths are hit), byte 1 what the callbacks do
 * (bit 0: echo each message back, bit 1: start the close handshake from
 * message(), bit 2: free the endpoint from message(), bit 3: out() fails)
 * and what the program does between pieces (bits 4-5 after the first, 6-7
 * after the second: nothing, send, ping, close), bytes 2 and 3 choose two
 * cut points, the rest are the bytes read from the peer.
 * What must hold:
 *   - no crash, no sanitizer report, no leak;
 *   - message() gives at most max_message bytes, text is valid UTF-8, and
 *     nothing comes after closed(), which comes at most once with a code a
 *     close frame may carry (or 1005/1006) and a reason of at most 123 bytes;
 *   - everything given to out() parses as whole frames, masked exactly when
 *     we are the client, control frames unfragmented and at most 125 bytes,
 *     nothing after a close frame;
 *   - once mb_ws_feed returned -1, mb_ws_done() is 1 and feeding fails;
 *   - when the callbacks do nothing but record and nothing is sent between
 *     pieces, the input fed whole and fed cut in 3 pieces give the same
 *     messages, the same closed() and the same frames out (unmasked).
 */
#include <stdint.h>
#include <string.h>

#include "fuzz.h"
#include "ws.h"

static const size_t max_messages[8] = {1, 2, 10, 125, 126, 1000, 70000, 0};

enum { OP_CLOSE = 8 };

typedef struct {
  mb_ws_t *ws;
  int client;
  size_t max;             /* the effective max_message */
  int echo, close_in_msg, free_in_msg, fail_out;
  int nclosed, code;
  int out_closed;         /* a close frame went out */
  fuzz_buf_t rec;         /* messages and closed(), in order */
  fuzz_buf_t wire;        /* the frames given to out(), unmasked, in order
                           * (apart from rec: out() gets the frames of a
                           * whole feed at its end, after its messages) */
} run_t;

/* Check the frames of one out() call and record them unmasked. */
static void check_out(run_t *r, const uint8_t *b, size_t n)
{
  size_t i = 0;
  while (i < n) {
    FUZZ_CHECK(!r->out_closed, "a frame after our close frame");
    FUZZ_CHECK(n - i >= 2, "a cut frame header");
    int fin = b[i] >> 7, op = b[i] & 0x0f, masked = b[i + 1] >> 7;
    FUZZ_CHECK((b[i] & 0x70) == 0, "RSV bits set");
    FUZZ_CHECK(masked == r->client, "masked %d as client %d", masked, r->client);
    uint64_t len = b[i + 1] & 0x7f;
    i += 2;
    int ext = len == 126 ? 2 : len == 127 ? 8 : 0;
    FUZZ_CHECK(n - i >= (size_t)ext + (masked ? 4 : 0), "a cut frame header");
    if (ext) {
      len = 0;
      for (int k = 0; k < ext; k++)
        len = len << 8 | b[i + k];
      i += ext;
    }
    uint8_t key[4] = {0, 0, 0, 0};
    if (masked) {
      memcpy(key, b + i, 4);
      i += 4;
    }
    FUZZ_CHECK(n - i >= len, "a frame of %llu bytes cut at %zu", (unsigned long long)len, n - i);
    if (op & 8)
      FUZZ_CHECK(fin && len <= 125, "control frame fin %d len %llu", fin, (unsigned long long)len);
    fuzz_putf(&r->wire, "\nO%lld", op | fin << 4);
    fuzz_putf(&r->wire, ":%lld:", (long long)len);
    for (size_t k = 0; k < len; k++) {
      uint8_t c = b[i + k] ^ key[k % 4];
      fuzz_put(&r->wire, &c, 1);
    }
    i += len;
    if (op == OP_CLOSE)
      r->out_closed = 1;
  }
}

static int cb_out(void *ud, const uint8_t *data, size_t len)
{
  run_t *r = ud;
  FUZZ_CHECK(len > 0, "out() with nothing");
  check_out(r, data, len);
  return r->fail_out ? -1 : 0;
}

static void cb_message(void *ud, const uint8_t *data, size_t len, int binary)
{
  run_t *r = ud;
  FUZZ_CHECK(r->nclosed == 0, "a message after closed()");
  FUZZ_CHECK(data != NULL && len <= r->max, "message of %zu bytes, max %zu", len, r->max);
  FUZZ_CHECK(binary || mb_ws_utf8_valid(data, len), "text message not valid UTF-8");
  fuzz_putf(&r->rec, "\nM%lld", binary);
  fuzz_putf(&r->rec, ":%lld:", (long long)len);
  fuzz_put(&r->rec, data, len);
  if (r->echo) {
    int rc = mb_ws_send(r->ws, data, len, binary);
    FUZZ_CHECK(rc == 0 || rc == -1, "send from message() gave %d", rc);
  }
  if (r->close_in_msg)
    mb_ws_close(r->ws, 1000, "enough", 6);
  if (r->free_in_msg) {
    mb_ws_free(r->ws);
    r->ws = NULL;
  }
}

static int close_code_ok(int code)
{
  return (code >= 1000 && code <= 1003) || (code >= 1005 && code <= 1011) ||
         (code >= 3000 && code <= 4999);
}

static void cb_closed(void *ud, int code, const char *reason, size_t len)
{
  run_t *r = ud;
  FUZZ_CHECK(r->nclosed == 0, "closed() twice");
  FUZZ_CHECK(close_code_ok(code), "closed(%d)", code);
  FUZZ_CHECK(len <= MB_WS_MAX_REASON && mb_ws_utf8_valid((const uint8_t *)reason, len),
             "reason of %zu bytes", len);
  r->nclosed++;
  r->code = code;
  fuzz_putf(&r->rec, "\nC%lld:", code);
  fuzz_put(&r->rec, reason, len);
}

/* What the program does between pieces: 0 nothing, 1 send, 2 ping, 3 close. */
static void act(run_t *r, int what)
{
  static const uint8_t text[] = "hi \xc3\xa9";
  int rc = 0;
  switch (what) {
  case 1: rc = mb_ws_send(r->ws, text, sizeof text - 1, 0); break;
  case 2: rc = mb_ws_ping(r->ws, text, 2); break;
  case 3: rc = mb_ws_close(r->ws, 1001, "bye", 3); break;
  default: return;
  }
  FUZZ_CHECK(rc == 0 || rc == -1, "call %d gave %d", what, rc);
}

static void run(run_t *r, uint8_t flags, uint8_t cbs, const uint8_t *data, const size_t cut[4])
{
  memset(r, 0, sizeof *r);
  r->client = flags & 1;
  size_t max = max_messages[(flags >> 1) & 7];
  r->max = max ? max : MB_WS_MAX_MESSAGE_DEFAULT;
  r->echo = cbs & 1;
  r->close_in_msg = (cbs >> 1) & 1;
  r->free_in_msg = (cbs >> 2) & 1;
  r->fail_out = (cbs >> 3) & 1;
  mb_ws_cb_t cb = {r, cb_out, cb_message, cb_closed, NULL};
  r->ws = mb_ws_new(r->client, max, &cb);
  FUZZ_CHECK(r->ws != NULL, "mb_ws_new");
  int failed = 0;
  for (int i = 0; i < 3 && r->ws; i++) {
    int rc = mb_ws_feed(r->ws, data + cut[i], cut[i + 1] - cut[i]);
    FUZZ_CHECK(rc == 0 || rc == -1, "feed gave %d", rc);
    if (!r->ws)
      break;   /* freed from message(): feed said -1, ws is gone */
    if (failed)
      FUZZ_CHECK(rc == -1, "feed after a failure gave %d", rc);
    if (rc == -1) {
      failed = 1;
      FUZZ_CHECK(mb_ws_done(r->ws), "feed failed but not done");
    }
    if (i < 2)
      act(r, (cbs >> (4 + 2 * i)) & 3);
  }
  if (r->ws) {
    fuzz_putf(&r->rec, "\nF%lld", failed);
    fuzz_putf(&r->rec, "%lld", mb_ws_done(r->ws));
    mb_ws_free(r->ws);
  }
}

int LLVMFuzzerTestOneInput(const uint8_t *in, size_t size)
{
  uint8_t head[4] = {0, 0, 0, 0};
  memcpy(head, in, size < 4 ? size : 4);
  const uint8_t *data = size > 4 ? in + 4 : in;
  size_t n = size > 4 ? size - 4 : 0;
  size_t cut[4];
  fuzz_cuts(n, head[2], head[3], cut);
  static run_t a, b;
  run(&b, head[0], head[1], data, cut);
  if (head[1] == 0) {
    size_t whole[4] = {0, n, n, n};
    run(&a, head[0], 0, data, whole);
    if (!fuzz_same(&a.rec, &b.rec) || !fuzz_same(&a.wire, &b.wire)) {
      fuzz_dump("whole", &a.rec);
      fuzz_dump("whole, out", &a.wire);
      fprintf(stderr, "--- cut at %zu, %zu\n", cut[1], cut[2]);
      fuzz_dump("cut", &b.rec);
      fuzz_dump("cut, out", &b.wire);
      FUZZ_CHECK(0, "what the peer's bytes do depends on where they were cut");
    }
    free(a.rec.p);
    free(a.wire.p);
  }
  free(b.rec.p);
  free(b.wire.p);
  return 0;
}
