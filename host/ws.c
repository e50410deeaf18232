/* ws.c: WebSocket framing on libwslay, with a frame-header tracker in front
 * of it (see ws.h for the design and for what wslay gets wrong). */
#include <string.h>

#include <openssl/evp.h>
#include <openssl/rand.h>
#include <wslay/wslay.h>

#include "alloc.h"
#include "ws.h"

/* The most the tracker holds back: a whole close or ping frame (2-byte
 * header, mask key, 125 bytes of payload), which is longer than any header
 * (2 + 8 + 4). */
#define HOLD_MAX (2 + 4 + 125)

/* The output buffer is kept between calls up to this size, so that small
 * messages need no allocation; one grown by a large message is freed. */
#define OBUF_KEEP (64 * 1024)

struct mb_ws {
  wslay_event_context_ptr ctx;
  mb_ws_cb_t cb;
  /* What wslay's recv callback reads from during one wslay_event_recv. */
  const uint8_t *src;
  size_t srclen;
  /* The tracker: payload bytes of the current frame still to pass, and the
   * start of a header (or close frame) cut by the end of a read. */
  uint64_t payload_left;
  int in_data;          /* that frame is a data frame: wslay keeps its payload */
  uint64_t held, told;  /* payload wslay holds; what held() was told */
  uint8_t hold[HOLD_MAX];
  size_t holdlen;
  /* Frames produced by one call, given to out() together. */
  uint8_t *obuf;
  size_t olen, ocap;
  /* The peer's close frame. */
  int peer_code;
  size_t peer_reason_len;
  char peer_reason[MB_WS_MAX_REASON];
  const char *why;      /* what broke the protocol, if the tracker saw it */
  unsigned in_feed : 1;      /* callbacks may be running */
  unsigned doomed : 1;       /* mb_ws_free was called from a callback */
  unsigned peer_closed : 1;  /* the peer's close frame arrived */
  unsigned failed : 1;       /* protocol error or out of memory: over */
  unsigned out_failed : 1;   /* out() returned -1: the connection is gone */
  unsigned reported : 1;     /* closed() was called */
  unsigned later : 1;        /* messages queued by mb_ws_send_later, unframed */
};

static const uint8_t empty[1];


/* -- wslay callbacks ------------------------------------------------------ */

static ssize_t on_recv(wslay_event_context_ptr ctx, uint8_t *buf, size_t len,
                       int flags, void *ud)
{
  mb_ws_t *ws = ud;
  if (ws->srclen == 0) {
    wslay_event_set_error(ctx, WSLAY_ERR_WOULDBLOCK);
    return -1;
  }
  size_t n = len < ws->srclen ? len : ws->srclen;
  memcpy(buf, ws->src, n);
  ws->src += n;
  ws->srclen -= n;
  return (ssize_t)n;
}

/* Gather instead of writing: wslay sends a header and its payload (in 4 KB
 * pieces when masking) in separate calls, and one write is cheaper. */
static ssize_t on_send(wslay_event_context_ptr ctx, const uint8_t *data,
                       size_t len, int flags, void *ud)
{
  mb_ws_t *ws = ud;
  if (ws->olen + len > ws->ocap) {
    size_t cap = ws->ocap ? ws->ocap : 256;
    while (cap < ws->olen + len)
      cap *= 2;
    ws->obuf = mb_realloc(ws->obuf, cap);
    ws->ocap = cap;
  }
  memcpy(ws->obuf + ws->olen, data, len);
  ws->olen += len;
  return (ssize_t)len;
}

static int on_genmask(wslay_event_context_ptr ctx, uint8_t *buf, size_t len,
                      void *ud)
{
  return RAND_bytes(buf, (int)len) == 1 ? 0 : -1;
}

/* wslay calls this for pings and pongs too (it answers pings itself), and
 * for a close frame after queueing the reply. */
static void on_msg(wslay_event_context_ptr ctx,
                   const struct wslay_event_on_msg_recv_arg *arg, void *ud)
{
  mb_ws_t *ws = ud;
  if (ws->doomed)
    return;
  switch (arg->opcode) {
  case WSLAY_TEXT_FRAME:
  case WSLAY_BINARY_FRAME:
    ws->held = ws->held > arg->msg_length ? ws->held - arg->msg_length : 0;
    ws->cb.message(ws->cb.ud, arg->msg ? arg->msg : empty, arg->msg_length,
                   arg->opcode == WSLAY_BINARY_FRAME);
    if (ws->doomed)
      wslay_event_shutdown_read(ctx);
    break;
  case WSLAY_CONNECTION_CLOSE:
    ws->peer_closed = 1;
    ws->peer_code = arg->status_code ? arg->status_code : WSLAY_CODE_NO_STATUS_RCVD;
    if (arg->msg_length > 2) {
      size_t n = arg->msg_length - 2;
      if (n > MB_WS_MAX_REASON)
        n = MB_WS_MAX_REASON;
      memcpy(ws->peer_reason, arg->msg + 2, n);
      ws->peer_reason_len = n;
    }
    break;
  default:
    break;
  }
}


/* -- The frame-header tracker --------------------------------------------- */

static int opcode(const uint8_t *h) { return h[0] & 0x0f; }
static int len7(const uint8_t *h) { return h[1] & 0x7f; }
static int is_close(const uint8_t *h) { return opcode(h) == WSLAY_CONNECTION_CLOSE; }

/* Frames the tracker passes to wslay whole and alone. A close frame, so that
 * wslay reads its reason as one chunk (see ws.h). A ping, so that its pong
 * is framed (push) before wslay parses anything after it: wslay sends a
 * queued close before a queued pong and nothing after a close, so a ping
 * and a later frame that wslay refuses, parsed in one call, would lose the
 * pong, and whether they were in one call would depend on where the reads
 * cut the stream. */
static int is_whole(const uint8_t *h)
{
  return is_close(h) || opcode(h) == WSLAY_PING;
}

/* What is wrong with a frame, from its first 2 bytes, among what wslay would
 * fail with a code-less close or accept; NULL if nothing. */
static const char *check_start(const uint8_t *h)
{
  if (opcode(h) & 0x8) {
    if (!(h[0] & 0x80))
      return "fragmented control frame";
    if (len7(h) > 125)
      return "control frame over 125 bytes";
    if (is_close(h) && len7(h) == 1)
      return "close frame with a 1-byte payload";
  }
  return NULL;
}

/* The bytes the tracker passes on in one piece: the header, or the whole
 * frame for a close frame or ping. Only for a start that passed
 * check_start (so a whole frame is at most HOLD_MAX bytes). */
static size_t unit_len(const uint8_t *h)
{
  size_t n = 2 + (len7(h) == 126 ? 2 : len7(h) == 127 ? 8 : 0) + (h[1] & 0x80 ? 4 : 0);
  return is_whole(h) ? n + (size_t)len7(h) : n;
}

static uint64_t payload_len(const uint8_t *h)
{
  uint64_t n = (uint64_t)len7(h);
  int ext = n == 126 ? 2 : n == 127 ? 8 : 0;
  if (ext) {
    n = 0;
    for (int i = 0; i < ext; i++)
      n = n << 8 | h[2 + i];
  }
  return n;
}

/* What is wrong with a whole header; NULL if nothing. */
static const char *check_header(const uint8_t *h)
{
  uint64_t n = payload_len(h);
  if (len7(h) == 127 && n >> 63)
    return "frame length over 2^63";
  if ((len7(h) == 126 && n < 126) || (len7(h) == 127 && n < 65536))
    return "frame length not in its shortest form";
  return NULL;
}

/* Let wslay frame what is queued, into obuf (on_send). */
static void frame_queued(mb_ws_t *ws)
{
  if (!ws->out_failed && wslay_event_send(ws->ctx) < 0) {
    ws->failed = 1;   /* out of memory or no random bytes for a mask */
    ws->why = "internal error";
    wslay_event_shutdown_read(ws->ctx);
  }
}

static int reading(mb_ws_t *ws)
{
  return !ws->doomed && wslay_event_get_read_enabled(ws->ctx);
}

/* Hand n bytes to wslay, which parses them all unless it stops reading. */
static void push(mb_ws_t *ws, const uint8_t *p, size_t n)
{
  if (n == 0 || !reading(ws))
    return;
  ws->src = p;
  ws->srclen = n;
  int r = wslay_event_recv(ws->ctx);
  ws->src = NULL;
  ws->srclen = 0;
  if (r < 0 && !ws->failed) {
    /* Out of memory (the tracker keeps wslay's frame-level errors away).
     * wslay has stopped reading; tell the peer if we still can. */
    ws->failed = 1;
    ws->why = "out of memory";
    wslay_event_queue_close(ws->ctx, WSLAY_CODE_INTERNAL_SERVER_ERROR, NULL, 0);
  }
  /* Frame the replies now: wslay sends a queued close before a queued pong
   * and nothing after the close, so a ping followed by a close in the same
   * push would go unanswered. Close frames and pings are pushed alone, so
   * this keeps the output the same however the input was cut. */
  frame_queued(ws);
}

/* Fail the connection for a protocol error the tracker found, unless wslay
 * had already stopped reading (its own error, or the peer's close). */
static void fail(mb_ws_t *ws, const char *why)
{
  if (!reading(ws))
    return;
  ws->why = why;
  /* WSLAY_ERR_NO_MORE_MSG if our own close went first: nothing more to say. */
  wslay_event_queue_close(ws->ctx, WSLAY_CODE_PROTOCOL_ERROR, NULL, 0);
  wslay_event_shutdown_read(ws->ctx);
}

/* Feed data to wslay through the tracker. Bytes pass in place in runs; a
 * run ends before each close frame or ping (which goes alone: is_whole) and
 * before a header, close frame or ping cut by the end of data, which is
 * held back and completed by the next call. */
static void track(mb_ws_t *ws, const uint8_t *data, size_t len)
{
  size_t i = 0, run = 0;
  while (i < len && reading(ws)) {
    if (ws->payload_left) {
      size_t n = ws->payload_left < len - i ? (size_t)ws->payload_left : len - i;
      i += n;
      ws->payload_left -= n;
      if (ws->in_data)
        ws->held += n;
      continue;
    }
    const uint8_t *p = data + i;
    size_t avail = len - i;
    if (ws->holdlen == 0 && avail >= 2 && !check_start(p) && avail >= unit_len(p)) {
      const char *why = check_header(p);
      if (why) {
        push(ws, data + run, i - run);
        fail(ws, why);
        return;
      }
      size_t u = unit_len(p);
      if (is_whole(p)) {
        push(ws, data + run, i - run);
        push(ws, p, u);
        run = i + u;
      } else {
        ws->payload_left = payload_len(p);
        ws->in_data = opcode(p) < 8;
      }
      i += u;
      continue;
    }
    /* Gather the unit in hold; a start already held passed check_start. */
    if (ws->holdlen == 0) {
      push(ws, data + run, i - run);
      if (!reading(ws))
        return;
    }
    size_t want = ws->holdlen < 2 ? 2 : unit_len(ws->hold);
    size_t take = want - ws->holdlen < avail ? want - ws->holdlen : avail;
    memcpy(ws->hold + ws->holdlen, p, take);
    ws->holdlen += take;
    i += take;
    run = i;
    if (ws->holdlen < 2)
      continue;
    const char *why = check_start(ws->hold);
    if (why) {
      fail(ws, why);
      return;
    }
    if (ws->holdlen < unit_len(ws->hold))
      continue;
    why = check_header(ws->hold);
    if (why) {
      fail(ws, why);
      return;
    }
    ws->payload_left = is_whole(ws->hold) ? 0 : payload_len(ws->hold);
    ws->in_data = opcode(ws->hold) < 8;
    size_t n = ws->holdlen;
    ws->holdlen = 0;
    push(ws, ws->hold, n);
  }
  push(ws, data + run, i - run);
}


/* -- Output and the end of the connection --------------------------------- */

/* Frame what is queued and give it to out() in one call. */
static int flush(mb_ws_t *ws)
{
  ws->later = 0;
  if (ws->out_failed)
    return -1;
  frame_queued(ws);
  int rc = ws->failed ? -1 : 0;
  if (ws->olen) {
    size_t n = ws->olen;
    ws->olen = 0;
    if (ws->cb.out(ws->cb.ud, ws->obuf, n) != 0) {
      ws->out_failed = 1;
      rc = -1;
    }
  }
  if (ws->ocap > OBUF_KEEP) {
    mb_free(ws->obuf);
    ws->obuf = NULL;
    ws->ocap = 0;
  }
  return rc;
}

static const char *describe(int code)
{
  switch (code) {
  case WSLAY_CODE_INVALID_FRAME_PAYLOAD_DATA: return "invalid UTF-8";
  case WSLAY_CODE_MESSAGE_TOO_BIG: return "message too big";
  default: return "protocol error";
  }
}

/* After parsing: send the replies and queued messages, then report the end
 * of the WebSocket once. */
static void finish(mb_ws_t *ws)
{
  if (ws->doomed)
    return;
  flush(ws);
  if (ws->reported)
    return;
  if (ws->peer_closed) {
    ws->reported = 1;
    ws->cb.closed(ws->cb.ud, ws->peer_code, ws->peer_reason, ws->peer_reason_len);
  } else if (!wslay_event_get_read_enabled(ws->ctx)) {
    /* wslay stops reading only at the peer's close or a protocol error, and
     * has then sent (or had sent before) the close frame whose code this is. */
    ws->failed = 1;
    ws->reported = 1;
    int code = wslay_event_get_status_code_sent(ws->ctx);
    const char *why = ws->why ? ws->why : describe(code);
    ws->cb.closed(ws->cb.ud, code, why, strlen(why));
  }
}

/* Tell held() what wslay holds now. */
static void tell(mb_ws_t *ws, uint64_t held)
{
  if (held != ws->told && ws->cb.held)
    ws->cb.held(ws->cb.ud, (long long)held - (long long)ws->told);
  ws->told = held;
}

static void destroy(mb_ws_t *ws)
{
  tell(ws, 0);
  wslay_event_context_free(ws->ctx);
  mb_free(ws->obuf);
  mb_free(ws);
}


/* -- Public API ----------------------------------------------------------- */

mb_ws_t *mb_ws_new(int client, size_t max_message, const mb_ws_cb_t *cb)
{
  static const struct wslay_event_callbacks wcb = {
    on_recv, on_send, on_genmask, NULL, NULL, NULL, on_msg,
  };
  mb_ws_t *ws = mb_calloc(1, sizeof *ws);
  ws->cb = *cb;
  int r = client ? wslay_event_context_client_init(&ws->ctx, &wcb, ws)
                 : wslay_event_context_server_init(&ws->ctx, &wcb, ws);
  if (r != 0) {
    mb_free(ws);
    return NULL;
  }
  if (max_message == 0)
    max_message = MB_WS_MAX_MESSAGE_DEFAULT;
  wslay_event_config_set_max_recv_msg_length(ws->ctx, max_message);
  return ws;
}

int mb_ws_feed(mb_ws_t *ws, const uint8_t *data, size_t len)
{
  if (ws->failed || ws->out_failed)
    return -1;
  /* Our messages held back go first: a close reply framed ahead of them
   * (wslay sends queued control frames first) would drop them. */
  if (ws->later && flush(ws) != 0)
    return -1;
  ws->in_feed = 1;
  track(ws, data, len);
  finish(ws);
  ws->in_feed = 0;
  tell(ws, ws->held);
  if (ws->doomed) {
    destroy(ws);
    return -1;
  }
  return ws->failed || ws->out_failed ? -1 : 0;
}

/* Queue m and, outside a callback, send it now, or with later leave it
 * for the next call that sends (inside a callback, the feed's end frames
 * it). */
static int queue(mb_ws_t *ws, const struct wslay_event_msg *m, int later)
{
  if (ws->failed || ws->out_failed || ws->doomed)
    return -1;
  if (wslay_event_queue_msg(ws->ctx, m) != 0)
    return -1;
  if (ws->in_feed)
    return 0;
  if (later) {
    ws->later = 1;
    return 0;
  }
  return flush(ws);
}

static int send_msg(mb_ws_t *ws, const uint8_t *data, size_t len, int binary, int later)
{
  if (!binary && !mb_ws_utf8_valid(data, len))
    return -2;
  struct wslay_event_msg m = {binary ? WSLAY_BINARY_FRAME : WSLAY_TEXT_FRAME, data, len};
  return queue(ws, &m, later);
}

int mb_ws_send(mb_ws_t *ws, const uint8_t *data, size_t len, int binary)
{
  return send_msg(ws, data, len, binary, 0);
}

int mb_ws_send_later(mb_ws_t *ws, const uint8_t *data, size_t len, int binary)
{
  return send_msg(ws, data, len, binary, 1);
}

int mb_ws_flush(mb_ws_t *ws)
{
  if (!ws->later)
    return 0;
  if (ws->failed || ws->out_failed)
    return -1;
  return flush(ws);
}

int mb_ws_ping(mb_ws_t *ws, const uint8_t *data, size_t len)
{
  if (len > MB_WS_MAX_PING)
    return -2;
  struct wslay_event_msg m = {WSLAY_PING, data, len};
  return queue(ws, &m, 0);
}

/* The codes a peer accepts in a close frame (wslay's receiving side refuses
 * the others with 1002). */
static int valid_code(int code)
{
  return (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1011) ||
         (code >= 3000 && code <= 4999);
}

int mb_ws_close(mb_ws_t *ws, int code, const char *reason, size_t len)
{
  if (code == 0 ? len != 0 : !valid_code(code))
    return -2;
  if (len > MB_WS_MAX_REASON || !mb_ws_utf8_valid((const uint8_t *)reason, len))
    return -2;
  if (ws->failed || ws->out_failed || ws->doomed)
    return -1;
  /* The messages held back go before the close (see mb_ws_feed). */
  if (ws->later && flush(ws) != 0)
    return -1;
  int r = wslay_event_queue_close(ws->ctx, (uint16_t)code, (const uint8_t *)reason, len);
  if (r == WSLAY_ERR_NO_MORE_MSG)
    return 0;   /* a close was already queued or sent, by us or in reply */
  if (r != 0)
    return -1;
  return ws->in_feed ? 0 : flush(ws);
}

int mb_ws_done(const mb_ws_t *ws)
{
  if (ws->failed || ws->out_failed)
    return 1;
  return wslay_event_get_close_sent(ws->ctx) && wslay_event_get_close_received(ws->ctx);
}

void mb_ws_free(mb_ws_t *ws)
{
  if (!ws)
    return;
  if (ws->in_feed) {
    ws->doomed = 1;
    return;
  }
  destroy(ws);
}


/* -- Handshake and UTF-8 -------------------------------------------------- */

#define WS_GUID "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#define MAX_KEY 256

int mb_ws_accept_key(const char *key, size_t keylen, char out[29])
{
  uint8_t buf[MAX_KEY + sizeof WS_GUID];
  uint8_t md[EVP_MAX_MD_SIZE];
  unsigned mdlen = 0;
  if (keylen > MAX_KEY)
    return -1;
  memcpy(buf, key, keylen);
  memcpy(buf + keylen, WS_GUID, sizeof WS_GUID - 1);
  if (!EVP_Digest(buf, keylen + sizeof WS_GUID - 1, md, &mdlen, EVP_sha1(), NULL) || mdlen != 20)
    return -1;
  /* 20 bytes are 28 base64 characters; EVP_EncodeBlock adds the NUL. */
  return EVP_EncodeBlock((unsigned char *)out, md, 20) == 28 ? 0 : -1;
}

int mb_ws_utf8_valid(const uint8_t *s, size_t n)
{
  size_t i = 0;
  while (i < n) {
    uint8_t c = s[i];
    if (c < 0x80) {
      i++;
      continue;
    }
    size_t k;
    uint32_t cp, min;
    if ((c & 0xe0) == 0xc0) {
      k = 1, cp = c & 0x1f, min = 0x80;
    } else if ((c & 0xf0) == 0xe0) {
      k = 2, cp = c & 0x0f, min = 0x800;
    } else if ((c & 0xf8) == 0xf0) {
      k = 3, cp = c & 0x07, min = 0x10000;
    } else {
      return 0;   /* a continuation byte first, or 0xf8-0xff */
    }
    if (n - i <= k)
      return 0;
    for (size_t j = 1; j <= k; j++) {
      if ((s[i + j] & 0xc0) != 0x80)
        return 0;
      cp = cp << 6 | (s[i + j] & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
      return 0;
    i += k + 1;
  }
  return 1;
}
