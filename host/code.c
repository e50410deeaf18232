/* code.c: host-wide interned code objects (see code.h). */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "alloc.h"
#include "bcdump.h"
#include "code.h"

/* The count has a cache line of its own: a spawn refs the body's code
 * object on the parent's scheduler and unrefs it on the child's, and
 * with the count beside them every read of the serial and the bytes (each
 * boot) found the line taken by the other core (mb_code_ref, _unref,
 * _bytes and _serial were 6% of a two-scheduler spawn benchmark's
 * samples). */
struct mb_code {
  atomic_uint refs;
  char pad[64 - sizeof(atomic_uint)];
  struct mb_code *next;    /* hash chain (guarded by lock) */
  uint64_t serial;         /* mb_code_serial */
  uint64_t hash;
  size_t len;
  unsigned char bytes[];
};

/* A code object's block, as allocated: what it counts in the host's total
 * (mb_alloc_count) from its intern to its free, once however many messages,
 * states and continuations refer to it (1,200 functions of 512 KB queued
 * for a process took a host capped at 100 MB to 1.26 GB unseen). */
static size_t block_size(size_t len)
{
  return (sizeof(mb_code_t) + len + 63) & ~(size_t)63;
}

/* Buckets double when the table holds more objects than buckets. */
#define MIN_BUCKETS 64

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static mb_code_t **buckets;
static size_t nbuckets, count, total_bytes;

/* FNV-1a, 64 bits: bytecode is short and hashed once per intern. */
static uint64_t hash_bytes(const unsigned char *p, size_t n)
{
  uint64_t h = 0xcbf29ce484222325ULL;
  for (size_t i = 0; i < n; i++) {
    h ^= p[i];
    h *= 0x100000001b3ULL;
  }
  return h;
}

/* Double the buckets; lock held. Failure keeps the old table (longer
 * chains, still correct). */
static void grow(void)
{
  size_t n = nbuckets ? 2 * nbuckets : MIN_BUCKETS;
  mb_code_t **b = calloc(n, sizeof *b);
  if (b == NULL)
    return;
  for (size_t i = 0; i < nbuckets; i++) {
    mb_code_t *c = buckets[i];
    while (c) {
      mb_code_t *next = c->next;
      c->next = b[c->hash & (n - 1)];
      b[c->hash & (n - 1)] = c;
      c = next;
    }
  }
  free(buckets);
  buckets = b;
  nbuckets = n;
}

/* The code object holding exactly these bytes, with a reference for the
 * caller: the existing one, or a new one. NULL when memory runs out. */
static mb_code_t *intern(const void *bytes, size_t len)
{
  uint64_t h = hash_bytes(bytes, len);
  pthread_mutex_lock(&lock);
  if (count >= nbuckets)
    grow();
  if (buckets == NULL) {
    pthread_mutex_unlock(&lock);
    return NULL;
  }
  mb_code_t **pc = &buckets[h & (nbuckets - 1)];
  for (mb_code_t *c = *pc; c; c = c->next) {
    /* A code object whose count reached 0 is being freed: skip it. */
    if (c->hash == h && c->len == len && memcmp(c->bytes, bytes, len) == 0 &&
        atomic_load_explicit(&c->refs, memory_order_relaxed) > 0) {
      atomic_fetch_add_explicit(&c->refs, 1, memory_order_relaxed);
      pthread_mutex_unlock(&lock);
      return c;
    }
  }
  mb_code_t *c = aligned_alloc(64, block_size(len));
  if (c) {
    mb_alloc_count((long long)block_size(len));
    static uint64_t serials;   /* under the lock */
    atomic_init(&c->refs, 1);
    c->serial = ++serials;
    c->hash = h;
    c->len = len;
    memcpy(c->bytes, bytes, len);
    c->next = *pc;
    *pc = c;
    count++;
    total_bytes += len;
  }
  pthread_mutex_unlock(&lock);
  return c;
}

/* lua_dump writes here; one buffer per thread, kept between dumps and
 * freed when the thread ends (a key's destructor). */
static _Thread_local struct {
  unsigned char *p;
  size_t len, cap;
} scratch;
static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;

static void scratch_free(void *p)
{
  free(p);
}

static void scratch_key_init(void)
{
  pthread_key_create(&scratch_key, scratch_free);
}

static int dump_writer(lua_State *L, const void *p, size_t sz, void *ud)
{
  (void)L;
  (void)ud;
  if (scratch.cap - scratch.len < sz) {
    size_t cap = scratch.cap * 2 > scratch.len + sz ? scratch.cap * 2
                                                    : scratch.len + sz + 256;
    unsigned char *np = realloc(scratch.p, cap);
    if (np == NULL)
      return 1;
    pthread_once(&scratch_once, scratch_key_init);
    pthread_setspecific(scratch_key, np);
    scratch.p = np;
    scratch.cap = cap;
  }
  memcpy(scratch.p + scratch.len, p, sz);
  scratch.len += sz;
  return 0;
}

int mb_code_dump(lua_State *L, mb_code_t **c)
{
  scratch.len = 0;
  *c = NULL;
  int st = lua_dump(L, dump_writer, NULL);
  if (st != 0)
    return st;
  size_t n;
  unsigned char *fixed = mb_bcdump_presize(scratch.p, scratch.len, &n);
  *c = fixed ? intern(fixed, n) : intern(scratch.p, scratch.len);
  free(fixed);
  return 0;
}

uint64_t mb_code_serial(const mb_code_t *c)
{
  return c->serial;
}

void mb_code_ref(mb_code_t *c)
{
  atomic_fetch_add_explicit(&c->refs, 1, memory_order_relaxed);
}

void mb_code_unref(mb_code_t *c)
{
  /* Most unrefs leave others: only the last one takes the lock. The
   * decrement to 0 happens under the lock so that an intern finding the
   * object either sees refs > 0 (and its ref keeps it) or skips it. */
  unsigned r = atomic_load_explicit(&c->refs, memory_order_relaxed);
  while (r > 1) {
    if (atomic_compare_exchange_weak_explicit(&c->refs, &r, r - 1,
                                              memory_order_release,
                                              memory_order_relaxed))
      return;
  }
  pthread_mutex_lock(&lock);
  if (atomic_fetch_sub_explicit(&c->refs, 1, memory_order_acq_rel) != 1) {
    pthread_mutex_unlock(&lock);
    return;
  }
  mb_code_t **pc = &buckets[c->hash & (nbuckets - 1)];
  while (*pc != c)
    pc = &(*pc)->next;
  *pc = c->next;
  count--;
  total_bytes -= c->len;
  pthread_mutex_unlock(&lock);
  mb_alloc_count(-(long long)block_size(c->len));
  free(c);
}

const unsigned char *mb_code_bytes(const mb_code_t *c, size_t *len)
{
  *len = c->len;
  return c->bytes;
}

void mb_code_stats(size_t *n, size_t *bytes)
{
  pthread_mutex_lock(&lock);
  *n = count;
  *bytes = total_bytes;
  pthread_mutex_unlock(&lock);
}
