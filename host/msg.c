/* msg.c: messages and the C message builder (see msg.h). */
#include <malloc.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "code.h"
#include "copy_format.h"
#include "msg.h"
#include "pid.h"
#include "remote.h"

mb_msg_t *mb_msg_new(size_t len)
{
  if (len > SIZE_MAX - sizeof(mb_msg_t))
    return NULL;
  mb_msg_t *m = calloc(1, sizeof(mb_msg_t) + len);
  if (m)
    m->len = len;
  return m;
}

/* -- Small blocks -----------------------------------------------------------
 * Most messages are a few dozen bytes, sent and freed at a high rate (one
 * malloc and one free a hop of a ring: ~110 instructions with mimalloc, of
 * ~8,000). A thread keeps up to CACHE_MAX freed blocks of exactly
 * MB_MSG_SMALL usable bytes, whoever allocated them (a block is malloc's
 * whatever thread frees it), and hands them out again: a few instructions
 * each way. At most CACHE_MAX * MB_MSG_SMALL bytes a thread (4 KB), freed
 * when the thread ends. Under ASan the cache is off, so that a message
 * used after its free is still caught. */
#define CACHE_MAX 32
#if defined(__SANITIZE_ADDRESS__)
#define CACHE_ON 0
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CACHE_ON 0
#endif
#endif
#ifndef CACHE_ON
#define CACHE_ON 1
#endif

static _Thread_local struct {
  void *blocks[CACHE_MAX];
  int n;
  int keyed;            /* cache_key set on this thread (its destructor) */
} cache;
static pthread_key_t cache_key;
static pthread_once_t cache_once = PTHREAD_ONCE_INIT;

static void cache_drop(void *unused)
{
  (void)unused;
  while (cache.n > 0)
    free(cache.blocks[--cache.n]);
}

static void cache_key_init(void)
{
  pthread_key_create(&cache_key, cache_drop);
}

void *mb_msg_alloc_small(void)
{
  if (CACHE_ON && cache.n > 0)
    return cache.blocks[--cache.n];
  return malloc(MB_MSG_SMALL);
}

void mb_msg_free(mb_msg_t *msg)
{
  if (msg == NULL)
    return;
  for (uint32_t i = 0; i < msg->ncode; i++)
    mb_code_unref(mb_msg_codes(msg)[i]);
  if (CACHE_ON && cache.n < CACHE_MAX && malloc_usable_size(msg) == MB_MSG_SMALL) {
    if (!cache.keyed) {
      /* The destructor runs only for a non-NULL value. */
      pthread_once(&cache_once, cache_key_init);
      pthread_setspecific(cache_key, &cache);
      cache.keyed = 1;
    }
    cache.blocks[cache.n++] = msg;
    return;
  }
  free(msg);
}

mb_msg_t *mb_msg_dup(const mb_msg_t *m)
{
  mb_msg_t *d = malloc(mb_msg_size(m));
  if (d == NULL)
    return NULL;
  /* The header and payload, then the code pointers: m's block may end
   * with its payload (a message made by the builder has no codes, and its
   * block no padding up to where they would start). */
  memcpy(d, m, sizeof *m + m->len);
  if (m->ncode)
    memcpy(mb_msg_codes(d), mb_msg_codes(m), MB_MSG_CODES_LEN(m->ncode));
  d->next = NULL;
  for (uint32_t i = 0; i < d->ncode; i++)
    mb_code_ref(mb_msg_codes(d)[i]);
  return d;
}

/* -- Builder --------------------------------------------------------------- */

void mb_msgb_init(mb_msgb_t *b, size_t hint)
{
  b->len = 0;
  b->cap = hint < 16 ? 16 : hint;
  b->failed = 0;
  b->m = malloc(sizeof(mb_msg_t) + b->cap);
  if (b->m == NULL)
    b->failed = 1;
}

/* Room for n more bytes, or NULL (and failed) when memory runs out. */
static unsigned char *room(mb_msgb_t *b, size_t n)
{
  if (b->failed)
    return NULL;
  if (b->cap - b->len < n) {
    size_t cap = b->cap * 2 > b->len + n ? b->cap * 2 : b->len + n;
    mb_msg_t *m = realloc(b->m, sizeof(mb_msg_t) + cap);
    if (m == NULL) {
      b->failed = 1;
      return NULL;
    }
    b->m = m;
    b->cap = cap;
  }
  unsigned char *p = b->m->data + b->len;
  b->len += n;
  return p;
}

static void put(mb_msgb_t *b, const void *src, size_t n)
{
  unsigned char *p = room(b, n);
  if (p)
    memcpy(p, src, n);
}

static void put_tag(mb_msgb_t *b, unsigned char tag)
{
  put(b, &tag, 1);
}

static void put_varint(mb_msgb_t *b, uint32_t v)
{
  unsigned char buf[5];
  size_t k = 0;
  while (v >= 0x80) {
    buf[k++] = (unsigned char)(v | 0x80);
    v >>= 7;
  }
  buf[k++] = (unsigned char)v;
  put(b, buf, k);
}

void mb_msgb_nil(mb_msgb_t *b) { put_tag(b, T_NIL); }
void mb_msgb_bool(mb_msgb_t *b, int v) { put_tag(b, v ? T_TRUE : T_FALSE); }

void mb_msgb_number(mb_msgb_t *b, double v)
{
  put_tag(b, T_NUMBER);
  put(b, &v, 8);
}

void mb_msgb_string(mb_msgb_t *b, const char *s, size_t n)
{
  if (n <= SHORTSTR_MAX) {
    put_tag(b, (unsigned char)(T_SHORTSTR | n));
  } else {
    put_tag(b, T_STRING);
    put_varint(b, (uint32_t)n);
  }
  put(b, s, n);
}

void mb_msgb_cstring(mb_msgb_t *b, const char *s)
{
  mb_msgb_string(b, s, strlen(s));
}

void mb_msgb_remote_ref(mb_msgb_t *b, uint32_t node, uint32_t creation, uint32_t n,
                        const uint32_t *words)
{
  unsigned char len = (unsigned char)n;
  put_tag(b, T_RREF);
  put(b, &node, 4);
  put(b, &creation, 4);
  put(b, &len, 1);
  put(b, words, 4 * (size_t)n);
}

void mb_msgb_id(mb_msgb_t *b, const mb_idkind_t *kind, uint64_t id)
{
  mb_rref_t r;
  if (kind == &mb_ref_kind && mb_id_is_remote(id) && mb_remote_ref_get(id, &r) == 0) {
    mb_msgb_remote_ref(b, r.node, r.creation, r.len, r.n);
    return;
  }
  put_tag(b, kind->tag);
  put(b, &id, 8);
}

void mb_msgb_table(mb_msgb_t *b, uint32_t narr, uint32_t nhash)
{
  put_tag(b, T_TABLE);
  put_varint(b, narr);
  put(b, &nhash, 4);
}

void mb_msgb_tuple(mb_msgb_t *b, uint32_t n)
{
  put_tag(b, T_TUPLE);
  put_varint(b, n);
}

mb_msg_t *mb_msgb_finish(mb_msgb_t *b, uint32_t nvalues)
{
  if (b->failed) {
    free(b->m);
    b->m = NULL;
    return NULL;
  }
  mb_msg_t *m = b->m;
  b->m = NULL;
  memset(m, 0, offsetof(mb_msg_t, data));
  m->nvalues = nvalues;
  m->len = b->len;
  return m;
}

/* -- Strings ---------------------------------------------------------------- */

mb_msg_t *mb_msg_string(const char *s)
{
  mb_msgb_t b;
  size_t n = strlen(s);
  mb_msgb_init(&b, n + 6);
  mb_msgb_string(&b, s, n);
  return mb_msgb_finish(&b, 1);
}

int mb_msg_is_string(const mb_msg_t *m, const char *s)
{
  size_t n = strlen(s);
  return n <= SHORTSTR_MAX && m->nvalues == 1 && m->len == n + 1 &&
         m->data[0] == (T_SHORTSTR | n) && memcmp(m->data + 1, s, n) == 0;
}
