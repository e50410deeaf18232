/* remote.c: the remote pid and ref tables (see remote.h). */
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>

#include "alloc.h"
#include "err.h"
#include "remote.h"

#define CHUNK_BITS 12
#define CHUNK_SIZE (1u << CHUNK_BITS)
#define NCHUNKS (MB_REMOTE_MAX / CHUNK_SIZE)

/* One interning table of fixed-size records (the pid or the ref table).
 * Index 0 is never used, so that no id is MB_ID_REMOTE alone. */
typedef struct rtab {
  size_t size;                       /* bytes of a record */
  pthread_mutex_t lock;
  _Atomic(unsigned char *) chunks[NCHUNKS];
  atomic_uint count;                 /* records 1..count exist */
  uint32_t *next;                    /* hash chains, by index (under lock) */
  uint32_t *buckets;
  uint32_t nbuckets, cap;
} rtab_t;

static rtab_t pids = {.size = sizeof(mb_rpid_t), .lock = PTHREAD_MUTEX_INITIALIZER};
static rtab_t refs = {.size = sizeof(mb_rref_t), .lock = PTHREAD_MUTEX_INITIALIZER};

static uint32_t hash_bytes(const void *p, size_t n)
{
  const unsigned char *s = p;
  uint32_t h = 2166136261u;
  for (size_t i = 0; i < n; i++)
    h = (h ^ s[i]) * 16777619u;
  return h;
}

static unsigned char *rec(rtab_t *t, uint32_t i)
{
  unsigned char *c = atomic_load_explicit(&t->chunks[i >> CHUNK_BITS], memory_order_acquire);
  return c ? c + (size_t)(i & (CHUNK_SIZE - 1)) * t->size : NULL;
}

static void relink(rtab_t *t, uint32_t nb)
{
  mb_free(t->buckets);
  t->buckets = mb_calloc(nb, sizeof *t->buckets);
  t->nbuckets = nb;
  uint32_t n = atomic_load_explicit(&t->count, memory_order_relaxed);
  for (uint32_t i = 1; i <= n; i++) {
    uint32_t b = hash_bytes(rec(t, i), t->size) & (nb - 1);
    t->next[i] = t->buckets[b];
    t->buckets[b] = i;
  }
}

/* The index of the record r (interned), or MB_ETOOMANY. */
static int64_t intern(rtab_t *t, const void *r)
{
  uint32_t h = hash_bytes(r, t->size);
  pthread_mutex_lock(&t->lock);
  if (t->nbuckets) {
    for (uint32_t i = t->buckets[h & (t->nbuckets - 1)]; i; i = t->next[i])
      if (memcmp(rec(t, i), r, t->size) == 0) {
        pthread_mutex_unlock(&t->lock);
        return i;
      }
  }
  uint32_t i = atomic_load_explicit(&t->count, memory_order_relaxed) + 1;
  if (i >= MB_REMOTE_MAX) {
    pthread_mutex_unlock(&t->lock);
    return MB_ETOOMANY;
  }
  if (rec(t, i) == NULL)
    atomic_store_explicit(&t->chunks[i >> CHUNK_BITS],
                          mb_calloc(CHUNK_SIZE, t->size), memory_order_release);
  memcpy(rec(t, i), r, t->size);
  if (i >= t->cap) {
    t->cap = t->cap ? 2 * t->cap : 1024;
    t->next = mb_realloc(t->next, t->cap * sizeof *t->next);
  }
  atomic_store_explicit(&t->count, i, memory_order_release);
  if (i > 2 * t->nbuckets) {
    relink(t, t->nbuckets ? 2 * t->nbuckets : 1024);
  } else {
    uint32_t b = h & (t->nbuckets - 1);
    t->next[i] = t->buckets[b];
    t->buckets[b] = i;
  }
  pthread_mutex_unlock(&t->lock);
  return i;
}

static int get(rtab_t *t, uint64_t id, void *out)
{
  if (!mb_id_is_remote(id))
    return MB_EBADARG;
  uint64_t i = id & ~MB_ID_REMOTE;
  if (i == 0 || i > atomic_load_explicit(&t->count, memory_order_acquire))
    return MB_EBADARG;
  memcpy(out, rec(t, (uint32_t)i), t->size);
  return 0;
}

int64_t mb_remote_pid(const mb_rpid_t *p)
{
  mb_rpid_t k = *p;
  int64_t i = intern(&pids, &k);
  return i < 0 ? i : (int64_t)(MB_ID_REMOTE | (uint64_t)i);
}

int mb_remote_pid_get(mb_pid_t id, mb_rpid_t *out)
{
  return get(&pids, id, out);
}

int64_t mb_remote_name(uint32_t node, uint32_t name)
{
  mb_rpid_t k = {.node = node, .name = name};
  return mb_remote_pid(&k);
}

uint32_t mb_remote_name_of(mb_pid_t id)
{
  mb_rpid_t p;
  return mb_remote_pid_get(id, &p) == 0 ? p.name : 0;
}

int64_t mb_remote_ref(const mb_rref_t *r)
{
  mb_rref_t k;
  memset(&k, 0, sizeof k);           /* unused words compare equal */
  k.node = r->node;
  k.creation = r->creation;
  k.len = r->len > MB_REF_MAX_WORDS ? MB_REF_MAX_WORDS : r->len;
  memcpy(k.n, r->n, k.len * sizeof k.n[0]);
  int64_t i = intern(&refs, &k);
  return i < 0 ? i : (int64_t)(MB_ID_REMOTE | (uint64_t)i);
}

int mb_remote_ref_get(mb_ref_t id, mb_rref_t *out)
{
  return get(&refs, id, out);
}

uint32_t mb_remote_node(uint64_t id)
{
  mb_rpid_t p;
  if (mb_remote_pid_get(id, &p) == 0)
    return p.node;
  return 0;
}
