/* http_frame.h: a strict checker of HTTP/1.x message framing, run in front
 * of http-parser by lib_http.c.
 *
 * DESIGN
 * Request smuggling lives where two parsers (a front proxy's and ours)
 * disagree on where a message ends. Debian builds http-parser with
 * HTTP_PARSER_STRICT=0, and even its strict mode lets through a header name
 * with a space before its colon ("Transfer-Encoding : chunked" counts as
 * Transfer-Encoding), obs-fold continuation lines (folded into the value),
 * a bare LF as a line end, any byte where the LF after a CR should be, any
 * two bytes where the CRLF after chunk data should be, and anything, bare LF
 * included, in chunk extensions. This checker reads the same bytes first
 * and refuses, as RFC 9112 allows and nginx and Node do: any line of a head
 * or of trailers not ended by CRLF, any CR not followed by LF, obs-fold,
 * whitespace before the first header line, whitespace in or after a header
 * name, and chunk-size lines that are not `hex [BWS ";" extensions] CRLF`
 * (at most MB_HFRAME_MAX_CHUNK_LINE bytes) or chunk data not followed by
 * CRLF. It does not judge what http-parser already refuses (token
 * characters, methods, URLs, Content-Length values).
 *
 * It follows a message the way the parser does: the start line and the
 * header lines up to the empty line, then the body as the parser framed it
 * (the caller says which after feeding the head: mb_hframe_body), chunk by
 * chunk with the trailers, then the next message. So the caller feeds the
 * parser only bytes the checker passed, a head at a time, and the two never
 * disagree on where a message ends.
 *
 * Cost: a few comparisons per head byte (header values are skipped with
 * memchr), nothing per body byte. State: one small struct, no allocation.
 * Threads: whoever owns the parser.
 */
#ifndef MB_HTTP_FRAME_H
#define MB_HTTP_FRAME_H

#include <stddef.h>
#include <stdint.h>

/* Longest chunk-size line (size, extensions, CRLF): http-parser skips
 * extensions without a bound, which would let a peer trickle one forever. */
#define MB_HFRAME_MAX_CHUNK_LINE 4096

/* What the checker refuses (lib_http.c maps them, in this order, to its
 * error table with their messages and statuses). */
enum {
  MB_HFRAME_OK,
  MB_HFRAME_BARE_LF,             /* a line ended by LF without CR */
  MB_HFRAME_BARE_CR,             /* a CR not followed by LF */
  MB_HFRAME_OBS_FOLD,            /* a header line starting with SP or HT */
  MB_HFRAME_SPACE_BEFORE_HEADER, /* the same, right after the start line */
  MB_HFRAME_SPACE_IN_NAME,       /* SP or HT in or after a header name */
  MB_HFRAME_NO_COLON,            /* a header line without a colon */
  MB_HFRAME_BAD_CHUNK            /* a bad chunk-size line or data end */
};

typedef struct mb_hframe {
  int state;          /* where in the message (http_frame.c) */
  int first;          /* at the first line after the start line */
  uint32_t line;      /* bytes of the chunk-size line so far */
  uint64_t size;      /* the chunk size being read */
  uint64_t left;      /* body or chunk bytes still to pass (UINT64_MAX: to
                         the end of the stream) */
} mb_hframe_t;

/* At the start of a stream, before any message. */
void mb_hframe_init(mb_hframe_t *f);

/* Check data[0..n), the continuation of the stream. Returns how many bytes
 * are checked and may go to the parser now: all of them; or up to and
 * including the last byte of a head or of trailers (mb_hframe_head_done is
 * then 1: the caller feeds them to the parser, then calls mb_hframe_body
 * before checking on); or up to and including the last byte of a
 * Content-Length body (then at the start of the next message:
 * mb_hframe_at_start is 1); or up to, not including, a bad byte, with *err
 * set to its MB_HFRAME_* error (else *err is left alone). */
size_t mb_hframe_check(mb_hframe_t *f, const char *data, size_t n, int *err);

/* 1 when a head (or the trailers of a chunked body) has just ended. */
int mb_hframe_head_done(const mb_hframe_t *f);

/* 1 when between messages, with no byte of the next one (nor a CR of an
 * empty line before it) seen. */
int mb_hframe_at_start(const mb_hframe_t *f);

/* After the parser took a head: the framing it chose. complete: the message
 * is over (no body, a bodiless status, an answer to HEAD, or trailers that
 * ended it); else chunked, or `length` bytes of body (UINT64_MAX: a response
 * read to the end of the stream). */
void mb_hframe_body(mb_hframe_t *f, int complete, int chunked, uint64_t length);

#endif
