/* ws.h: WebSocket (RFC 6455) framing over a byte stream, on libwslay.
 *
 * DESIGN
 * An mb_ws_t turns the bytes of one TCP connection, after the HTTP upgrade,
 * into whole messages and back. It knows nothing of sockets, Lua or threads:
 * the socket layer hands it the bytes it reads (mb_ws_feed) and gets the
 * bytes to write through the `out` callback. All calls for one mb_ws_t must
 * come from one thread (the libuv loop thread that owns the socket); the
 * callbacks run on that thread, inside the call that caused them.
 *
 * wslay's event API does the framing: unmasking, reassembly of fragmented
 * messages, UTF-8 checking of text, automatic pongs and close replies. We
 * put a small frame-header tracker in front of it because wslay 1.1.1 gets
 * four things wrong that we must get right:
 *   - frame-level errors (a fragmented or over-long control frame, a length
 *     not in its shortest form) make it send a close frame WITHOUT a status
 *     code and fail the whole receive call; the tracker sees those headers
 *     first, never passes them on, and closes with 1002 itself;
 *   - it checks the UTF-8 of a close frame's reason chunk by chunk, skipping
 *     the first two bytes of every chunk, so a close frame split between two
 *     reads could be refused (1007) or let through unchecked; the tracker
 *     therefore hands wslay each close frame whole, in one piece;
 *   - it takes a close frame with a 1-byte payload as "no status code"; the
 *     tracker closes with 1002 instead;
 *   - it sends a queued close before a queued pong and nothing after it, so
 *     a ping followed, in one receive call, by a frame it refuses went
 *     unanswered, or answered if a read happened to end between the two;
 *     the tracker hands wslay each ping whole and alone too, and the pong
 *     is framed before anything after the ping is parsed.
 * So the frames sent back never depend on where the reads cut the stream.
 * The tracker only reads headers and skips payloads, so it costs a few
 * comparisons per frame; it copies at most one header, close frame or ping
 * (at most 131 bytes) when a read ends inside one.
 *
 * Memory: wslay buffers a whole incoming message (reassembly) and allocates
 * a frame's payload as soon as its header arrives, so max_message bounds the
 * memory one peer can make us take; a header announcing more is refused
 * (1009) before anything is allocated. Outgoing messages are copied once by
 * wslay when queued; the frames produced by one call are gathered and given
 * to `out` in one call. wslay allocates with the C library's malloc, we with
 * mb_malloc. What a peer makes us send (pongs, the close reply) goes to
 * `out` at once; bounding it is the caller's part: the socket layer stops
 * reading, and so feeding us, while its output is over its high-water mark
 * (sock.h), so a peer that pings and never reads is held back by TCP.
 *
 * Close handshake: either side sends a close frame and waits for the other
 * one's. When the peer's close arrives, wslay queues the reply, we send it
 * and report the peer's code through `closed`; when mb_ws_done() then says 1
 * the socket layer closes the TCP connection. A protocol error sends a close
 * with the error's code (1002, 1007, 1009) and ends the connection at once
 * (mb_ws_done() is 1): RFC 6455 says not to wait for the reply then. Timing
 * out a peer that never answers our close is the socket layer's job.
 */
#ifndef MB_WS_H
#define MB_WS_H

#include <stddef.h>
#include <stdint.h>

typedef struct mb_ws mb_ws_t;

/* Received messages larger than this (in bytes) are refused with 1009 when
 * mb_ws_new is given max_message 0: large enough for any chat or RPC use,
 * small enough that a hostile peer cannot make one connection take much. */
#define MB_WS_MAX_MESSAGE_DEFAULT ((size_t)16 << 20)

/* Longest close reason that fits in a control frame (125 - the 2-byte code). */
#define MB_WS_MAX_REASON 123

/* Longest ping payload (control frames carry at most 125 bytes). */
#define MB_WS_MAX_PING 125

typedef struct mb_ws_cb {
  void *ud;   /* passed to every callback */
  /* Bytes for the wire, in order. Must take all len bytes (copy or queue
   * them: data is only valid during the call) and return 0, or return -1 if
   * the connection is gone, which makes the mb_ws_t fatally failed. Called
   * once per mb_ws_feed/send/ping/close at most, with all the frames that
   * call produced. Must not call back into any mb_ws_ function. */
  int (*out)(void *ud, const uint8_t *data, size_t len);
  /* One complete, reassembled message: binary is 1 for a binary message, 0
   * for text (which has been checked to be valid UTF-8). data is valid only
   * during the call (never NULL, even when len is 0). */
  void (*message)(void *ud, const uint8_t *data, size_t len, int binary);
  /* The WebSocket is over, called at most once:
   *   - the peer sent a close frame: its code (1005 if it sent none) and
   *     reason (UTF-8, at most MB_WS_MAX_REASON bytes, not NUL-terminated);
   *     our reply has already gone through out() unless we had sent our own
   *     close first, which was then the start of the handshake;
   *   - the peer broke the protocol: the code of the close frame we sent it
   *     (1002 protocol error, 1007 invalid UTF-8, 1009 message too big), or
   *     of our own earlier close if we had already sent one, with a short
   *     text saying what went wrong as the reason (that text is not sent);
   *     the close frame went to out() just before, even if out() failed;
   *   - wslay ran out of memory: 1011 (sent to the peer), or 1006 (nothing
   *     sent) if it could not frame anything more.
   * It is not called when only out() fails: the socket layer saw that. */
  void (*closed)(void *ud, int code, const char *reason, size_t reason_len);
  /* What libwslay holds of the message being received (its fragments, the
   * payload of a frame so far) went up or down by delta bytes: at most
   * once per mb_ws_feed, and back to 0 when the mb_ws_t is freed. wslay
   * allocates it with malloc, outside the host's accounting, up to
   * max_message a connection. May be NULL. */
  void (*held)(void *ud, long long delta);
} mb_ws_cb_t;

/* A new WebSocket endpoint: a client (client = 1: masks what it sends,
 * expects unmasked frames) or a server (client = 0: the reverse). Messages
 * over max_message bytes are refused with 1009 (0: the default above); wslay
 * applies the limit to pings and close frames too, so below 125 it limits
 * those. cb is copied. Returns NULL on out of memory. */
mb_ws_t *mb_ws_new(int client, size_t max_message, const mb_ws_cb_t *cb);

/* Parse len bytes read from the peer. Calls message() for each complete
 * message, out() for pongs and close replies, and closed() as described
 * above. Bytes after the peer's close frame, and any bytes fed once the
 * connection is over, are ignored. Returns 0, or -1 when the connection has
 * failed (a protocol error, after closed() was called with the code sent to
 * the peer; out() failed; wslay ran out of memory; or mb_ws_free was called
 * from a callback, after which ws is gone). Must not be called from a
 * callback. */
int mb_ws_feed(mb_ws_t *ws, const uint8_t *data, size_t len);

/* Send one message (binary = 1) or text message (binary = 0), unfragmented:
 * frames it and hands the bytes to out() before returning (from inside a
 * callback, when the mb_ws_feed that called it returns). data is copied.
 * Returns 0; -1 if the connection is closing or over (a close was sent or
 * received) or out() failed; -2 if a text message is not valid UTF-8 (a peer
 * would have to fail the connection on it), in which case nothing is sent. */
int mb_ws_send(mb_ws_t *ws, const uint8_t *data, size_t len, int binary);

/* Queue a message as mb_ws_send does, but leave its framing to the next
 * call that sends: mb_ws_flush, another send, a ping, a close, or a feed
 * (which frames it before anything it parses, so that a close reply never
 * goes ahead of it). The frames of the messages queued so go to out()
 * together, in one call: a writer with several messages to send pays one
 * write for them (the socket layer's corking, sock.c). Returns 0, -1 or -2
 * like mb_ws_send (-1 only if the connection is already over). */
int mb_ws_send_later(mb_ws_t *ws, const uint8_t *data, size_t len, int binary);

/* Frame the messages queued by mb_ws_send_later and hand them to out(), in
 * one call. Returns 0, or -1 if out() failed or the connection had failed
 * (the messages are then dropped, as a send's would be). */
int mb_ws_flush(mb_ws_t *ws);

/* Send a ping with len <= MB_WS_MAX_PING bytes of payload; the peer's pong
 * is consumed silently. Returns 0, -1 like mb_ws_send, -2 if len is too big. */
int mb_ws_ping(mb_ws_t *ws, const uint8_t *data, size_t len);

/* Start the close handshake: send a close frame with code (0: no code, and
 * then no reason) and reason (len <= MB_WS_MAX_REASON bytes of UTF-8).
 * Messages still arrive until the peer's close, which is reported through
 * closed() and makes mb_ws_done() 1. Calling it again, or after the peer's
 * close, does nothing and returns 0. Returns -1 if out() failed or the
 * connection had failed, -2 for a code a peer must refuse (valid: 1000-1003,
 * 1007-1011, 3000-4999), a reason too long or not valid UTF-8. */
int mb_ws_close(mb_ws_t *ws, int code, const char *reason, size_t len);

/* 1 when the TCP connection should now be closed: close frames were both
 * sent and received, or the connection failed (protocol error, out()
 * failure, out of memory). 0 otherwise. */
int mb_ws_done(const mb_ws_t *ws);

/* Free ws and everything it holds; NULL is allowed. Calls no callback.
 * From inside a callback the free is deferred until mb_ws_feed returns. */
void mb_ws_free(mb_ws_t *ws);

/* The Sec-WebSocket-Accept value for a Sec-WebSocket-Key header:
 * base64(SHA-1(key + the RFC 6455 GUID)), 28 characters and a NUL in out.
 * Returns 0, or -1 if keylen is over 256 (no valid key is; the caller should
 * answer 400). Any thread. */
int mb_ws_accept_key(const char *key, size_t keylen, char out[29]);

/* 1 if data[0..len) is valid UTF-8 (RFC 3629: no overlong forms, no
 * surrogates, nothing above U+10FFFF), else 0. Any thread. */
int mb_ws_utf8_valid(const uint8_t *data, size_t len);

#endif
