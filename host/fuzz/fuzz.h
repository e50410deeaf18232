/* fuzz.h: what the fuzz targets share: the check that aborts, a growable
 * byte buffer for recording what a run produced, and the cutting of an
 * input into the pieces a socket might have read.
 *
 * Header-only (static functions) so that each target stays one source file,
 * built once with libFuzzer and once with replay.c.
 */
#ifndef MB_FUZZ_H
#define MB_FUZZ_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A property the target promises does not hold: report it and abort, which
 * libFuzzer records as a crash (with the input) and ctest as a failure. */
#define FUZZ_CHECK(cond, ...)                                           \
  do {                                                                  \
    if (!(cond)) {                                                      \
      fprintf(stderr, "fuzz check failed at %s:%d: %s: ", __FILE__,     \
              __LINE__, #cond);                                         \
      fprintf(stderr, __VA_ARGS__);                                     \
      fputc('\n', stderr);                                              \
      abort();                                                          \
    }                                                                   \
  } while (0)

typedef struct {
  uint8_t *p;
  size_t n, cap;
} fuzz_buf_t;

static inline void fuzz_put(fuzz_buf_t *b, const void *data, size_t n)
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

static inline void fuzz_puts(fuzz_buf_t *b, const char *s) { fuzz_put(b, s, strlen(s)); }

static inline void fuzz_putf(fuzz_buf_t *b, const char *fmt, long long v)
{
  char tmp[64];
  int k = snprintf(tmp, sizeof tmp, fmt, v);
  fuzz_put(b, tmp, (size_t)k);
}

static inline int fuzz_same(const fuzz_buf_t *a, const fuzz_buf_t *b)
{
  return a->n == b->n && (a->n == 0 || memcmp(a->p, b->p, a->n) == 0);
}

/* Print a record to stderr, bytes outside printable ASCII as \xNN. */
static inline void fuzz_dump(const char *label, const fuzz_buf_t *b)
{
  fprintf(stderr, "%s:", label);
  for (size_t i = 0; i < b->n; i++) {
    uint8_t c = b->p[i];
    if (c == '\n' || (c >= 0x20 && c < 0x7f && c != '\\'))
      fputc(c, stderr);
    else
      fprintf(stderr, "\\x%02x", c);
  }
  fputc('\n', stderr);
}

/* Cut n bytes into at most 3 pieces at points chosen by c1 and c2 (each
 * 0-255 of the length): piece i is [cut[i], cut[i+1]). Empty pieces are
 * kept (and fed: an empty read is a case too). */
static inline void fuzz_cuts(size_t n, uint8_t c1, uint8_t c2, size_t cut[4])
{
  size_t a = n * c1 / 255, b = n * c2 / 255;
  if (a > b) {
    size_t t = a;
    a = b;
    b = t;
  }
  cut[0] = 0;
  cut[1] = a;
  cut[2] = b;
  cut[3] = n;
}

/* The distribution world of fuzz_etf, which seeds.c writes frames for:
 * this node, its one process (the first a host makes: slot 1, serial 0),
 * that process's registered name, an alias of it and the ref of its
 * monitor of the peer's process FUZZ_PEER_PROC (refs of this node), and
 * the peer whose frames the input is. */
#define FUZZ_NODE "fuzz@localhost"
#define FUZZ_CREATION 7
#define FUZZ_PEER "peer@localhost"
#define FUZZ_PROC_PID 1
#define FUZZ_PROC_NAME "fuzz"
#define FUZZ_ALIAS 77
#define FUZZ_MONITOR 78
#define FUZZ_PEER_PROC 12
#define FUZZ_PEER_CREATION 3

#endif
