/* http_frame.c: the strict framing checker in front of http-parser (see
 * http_frame.h). */
#include <string.h>

#include "http_frame.h"

/* Where in the message the checker is. */
enum {
  FC_START,        /* before a message: empty lines (CRLF) may come first */
  FC_START_LF,     /* after the CR of such an empty line */
  FC_LINE,         /* in the start line */
  FC_LINE_LF,      /* after the CR of the start line */
  FC_FIELD,        /* at the start of a header (or trailer) line */
  FC_NAME,         /* in a header name */
  FC_VALUE,        /* after the colon */
  FC_VALUE_LF,     /* after the CR of a header line */
  FC_END_LF,       /* after the CR of the empty line that ends the head */
  FC_HEAD_DONE,    /* the head (or trailers) ended: the caller says what's next */
  FC_BODY,         /* `left` bytes of body, by Content-Length or to the end */
  FC_CHUNK_SIZE,   /* in the hex digits of a chunk size */
  FC_CHUNK_BWS,    /* whitespace after them: ';' must follow */
  FC_CHUNK_EXT,    /* in chunk extensions */
  FC_CHUNK_LF,     /* after the CR of the chunk-size line */
  FC_CHUNK_DATA,   /* `left` bytes of chunk data */
  FC_CHUNK_CR,     /* the CR after chunk data */
  FC_DATA_LF       /* the LF after it */
};

void mb_hframe_init(mb_hframe_t *f)
{
  memset(f, 0, sizeof *f);
  f->state = FC_START;
}

int mb_hframe_head_done(const mb_hframe_t *f)
{
  return f->state == FC_HEAD_DONE;
}

int mb_hframe_at_start(const mb_hframe_t *f)
{
  return f->state == FC_START;
}

void mb_hframe_body(mb_hframe_t *f, int complete, int chunked, uint64_t length)
{
  if (complete) {
    f->state = FC_START;
  } else if (chunked) {
    f->state = FC_CHUNK_SIZE;
    f->line = 0;
    f->size = 0;
  } else {
    f->state = FC_BODY;
    f->left = length;
  }
}

/* The index of the first CR or LF in data[i..n), or n: eight bytes at a
 * time (a byte equal to CR or LF is a zero byte of the word xor'ed with
 * it; the lowest flagged byte is always a true one), which costs less
 * than memchr's calls on the short lines of a head and as little on a
 * long one. */
#define ONES 0x0101010101010101ull
#define HIGHS 0x8080808080808080ull
static size_t find_eol(const char *data, size_t i, size_t n)
{
  for (; i + 8 <= n; i += 8) {
    uint64_t w, a, b;
    memcpy(&w, data + i, 8);
    a = w ^ (ONES * '\r');
    b = w ^ (ONES * '\n');
    uint64_t m = (((a - ONES) & ~a) | ((b - ONES) & ~b)) & HIGHS;
    if (m) {
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
      return i + (size_t)(__builtin_ctzll(m) >> 3);
#else
      break;   /* (find it bytewise below) */
#endif
    }
  }
  for (; i < n; i++)
    if (data[i] == '\r' || data[i] == '\n')
      return i;
  return n;
}

/* The bytes that end a header name or make it bad: 1 for ':', SP, HT, CR
 * and LF (the rest is http-parser's to judge). */
static const unsigned char name_stop[256] = {
  ['\t'] = 1, ['\n'] = 1, ['\r'] = 1, [' '] = 1, [':'] = 1,
};

static int is_hex(unsigned char c)
{
  return (c >= '0' && c <= '9') || ((c | 0x20) >= 'a' && (c | 0x20) <= 'f');
}

static int hex_val(unsigned char c)
{
  return c <= '9' ? c - '0' : (c | 0x20) - 'a' + 10;
}

size_t mb_hframe_check(mb_hframe_t *f, const char *data, size_t n, int *err)
{
  size_t i = 0;
  while (i < n) {
    unsigned char c = (unsigned char)data[i];
    switch (f->state) {
    case FC_START:
      if (c == '\r')
        f->state = FC_START_LF;
      else if (c == '\n')
        goto bare_lf;
      else
        f->state = FC_LINE;
      break;
    case FC_START_LF:
      if (c != '\n')
        goto bare_cr;
      f->state = FC_START;
      break;
    case FC_LINE:
      /* Run to the end of the line. */
      i = find_eol(data, i, n);
      if (i == n)
        return n;
      if (data[i] == '\n')
        goto bare_lf;
      f->state = FC_LINE_LF;
      break;
    case FC_LINE_LF:
      if (c != '\n')
        goto bare_cr;
      f->state = FC_FIELD;
      f->first = 1;
      break;
    case FC_FIELD:
      if (c == '\r') {
        f->state = FC_END_LF;
      } else if (c == '\n') {
        goto bare_lf;
      } else if (c == ' ' || c == '\t') {
        *err = f->first ? MB_HFRAME_SPACE_BEFORE_HEADER : MB_HFRAME_OBS_FOLD;
        return i;
      } else {
        f->state = FC_NAME;
        f->first = 0;
      }
      break;
    case FC_NAME:
      while (!name_stop[c]) {
        if (++i == n)
          return n;
        c = (unsigned char)data[i];
      }
      if (c == ':') {
        f->state = FC_VALUE;
      } else if (c == ' ' || c == '\t') {
        *err = MB_HFRAME_SPACE_IN_NAME;
        return i;
      } else if (c == '\r' || c == '\n') {
        *err = MB_HFRAME_NO_COLON;
        return i;
      }
      break;
    case FC_VALUE:
      /* The common case: run to the end of the value. */
      i = find_eol(data, i, n);
      if (i == n)
        return n;
      if (data[i] == '\n')
        goto bare_lf;
      f->state = FC_VALUE_LF;
      break;
    case FC_VALUE_LF:
      if (c != '\n')
        goto bare_cr;
      f->state = FC_FIELD;
      break;
    case FC_END_LF:
      if (c != '\n')
        goto bare_cr;
      f->state = FC_HEAD_DONE;
      return i + 1;
    case FC_HEAD_DONE:
      return i;   /* the caller decides what follows */
    case FC_BODY: {
      if (f->left == UINT64_MAX)
        return n;   /* the body runs to the end of the stream */
      uint64_t k = n - i < f->left ? n - i : f->left;
      f->left -= k;
      i += (size_t)k;
      if (f->left == 0) {
        /* The message ends here: stop, so that the caller sees the boundary
         * between it and the next (where parser:next's queue stops parsing
         * ahead, and where the fast path may take the next head). Checking
         * on into the next head hid every boundary after a Content-Length
         * body: pipelined requests with bodies were all parsed at once. */
        f->state = FC_START;
        return i;
      }
      continue;
    }
    case FC_CHUNK_SIZE:
      if (++f->line > MB_HFRAME_MAX_CHUNK_LINE)
        goto bad_chunk;
      if (is_hex(c)) {
        /* Stay below http-parser's own bound, so that it never refuses a
         * size we accepted with a different error. */
        if (f->size >> 56)
          goto bad_chunk;
        f->size = f->size << 4 | (uint64_t)hex_val(c);
        break;
      }
      if (f->line == 1)
        goto bad_chunk;   /* no digit */
      if (c == '\r')
        f->state = FC_CHUNK_LF;
      else if (c == ';')
        f->state = FC_CHUNK_EXT;
      else if (c == ' ' || c == '\t')
        f->state = FC_CHUNK_BWS;
      else
        goto bad_chunk;
      break;
    case FC_CHUNK_BWS:
      if (++f->line > MB_HFRAME_MAX_CHUNK_LINE)
        goto bad_chunk;
      if (c == ';')
        f->state = FC_CHUNK_EXT;
      else if (c != ' ' && c != '\t')
        goto bad_chunk;
      break;
    case FC_CHUNK_EXT:
      if (++f->line > MB_HFRAME_MAX_CHUNK_LINE)
        goto bad_chunk;
      if (c == '\r')
        f->state = FC_CHUNK_LF;
      else if ((c < 0x20 && c != '\t') || c == 0x7f)
        goto bad_chunk;   /* a bare LF among them too */
      break;
    case FC_CHUNK_LF:
      if (c != '\n')
        goto bare_cr;
      if (f->size == 0) {
        f->state = FC_FIELD;   /* the last chunk: trailers follow */
        f->first = 0;
      } else {
        f->state = FC_CHUNK_DATA;
        f->left = f->size;
      }
      break;
    case FC_CHUNK_DATA: {
      uint64_t k = n - i < f->left ? n - i : f->left;
      f->left -= k;
      i += (size_t)k;
      if (f->left == 0)
        f->state = FC_CHUNK_CR;
      continue;
    }
    case FC_CHUNK_CR:
      if (c != '\r')
        goto bad_chunk;
      f->state = FC_DATA_LF;
      break;
    case FC_DATA_LF:
      if (c != '\n')
        goto bare_cr;
      f->state = FC_CHUNK_SIZE;
      f->line = 0;
      f->size = 0;
      break;
    }
    i++;
  }
  return n;
bare_lf:
  *err = MB_HFRAME_BARE_LF;
  return i;
bare_cr:
  *err = MB_HFRAME_BARE_CR;
  return i;
bad_chunk:
  *err = MB_HFRAME_BAD_CHUNK;
  return i;
}
