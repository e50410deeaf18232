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
/* An id: MB_ID_REMOTE | generation << INDEX_BITS | index. */
#define INDEX_BITS 22
#define INDEX_MASK ((1u << INDEX_BITS) - 1)
#define GEN_MASK ((1u << 30) - 1)      /* bits 22..51 */

_Static_assert(MB_REMOTE_MAX <= (1u << INDEX_BITS), "an index fits its bits");

/* One interning table of fixed-size records (the pid or the ref table).
 * Index 0 is never used, so that no id is MB_ID_REMOTE alone. A counted
 * table (refs) frees an entry when its count drops to 0: the index goes on
 * a free list (linked through next) and its generation moves on. */
typedef struct rtab {
  size_t size;                       /* bytes of a record */
  int counted;
  pthread_mutex_t lock;
  _Atomic(unsigned char *) chunks[NCHUNKS];
  atomic_uint count;                 /* records 1..count exist */
  uint32_t *next;                    /* hash chains / free list, by index (under lock) */
  uint32_t *rc, *gen;                /* counted tables: holds and generation */
  uint32_t *buckets;
  uint32_t nbuckets, cap;
  uint32_t free_head, live;
} rtab_t;

static rtab_t pids = {.size = sizeof(mb_rpid_t), .lock = PTHREAD_MUTEX_INITIALIZER};
static rtab_t refs = {.size = sizeof(mb_rref_t), .counted = 1,
                      .lock = PTHREAD_MUTEX_INITIALIZER};

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

static int is_live(rtab_t *t, uint32_t i)
{
  return !t->counted || t->rc[i] > 0;
}

static void relink(rtab_t *t, uint32_t nb)
{
  mb_free(t->buckets);
  t->buckets = mb_calloc(nb, sizeof *t->buckets);
  t->nbuckets = nb;
  uint32_t n = atomic_load_explicit(&t->count, memory_order_relaxed);
  for (uint32_t i = 1; i <= n; i++) {
    if (!is_live(t, i))
      continue;
    uint32_t b = hash_bytes(rec(t, i), t->size) & (nb - 1);
    t->next[i] = t->buckets[b];
    t->buckets[b] = i;
  }
}

static uint64_t make_id(rtab_t *t, uint32_t i)
{
  uint64_t gen = t->counted ? t->gen[i] : 0;
  return MB_ID_REMOTE | gen << INDEX_BITS | i;
}

/* The index that id names in t if it is live, else 0; lock held for a
 * counted table. */
static uint32_t index_of(rtab_t *t, uint64_t id)
{
  if (!mb_id_is_remote(id))
    return 0;
  uint32_t i = (uint32_t)(id & INDEX_MASK);
  uint32_t gen = (uint32_t)((id >> INDEX_BITS) & GEN_MASK);
  if (i == 0 || i > atomic_load_explicit(&t->count, memory_order_acquire))
    return 0;
  if (t->counted ? (t->rc[i] == 0 || t->gen[i] != gen) : gen != 0)
    return 0;
  return i;
}

/* The id of the record r (interned; in a counted table, held once more),
 * or MB_ETOOMANY. */
static int64_t intern(rtab_t *t, const void *r)
{
  uint32_t h = hash_bytes(r, t->size);
  pthread_mutex_lock(&t->lock);
  if (t->nbuckets) {
    for (uint32_t i = t->buckets[h & (t->nbuckets - 1)]; i; i = t->next[i])
      if (memcmp(rec(t, i), r, t->size) == 0) {
        if (t->counted)
          t->rc[i]++;
        int64_t id = (int64_t)make_id(t, i);
        pthread_mutex_unlock(&t->lock);
        return id;
      }
  }
  uint32_t i;
  if (t->free_head) {
    i = t->free_head;
    t->free_head = t->next[i];
  } else {
    i = atomic_load_explicit(&t->count, memory_order_relaxed) + 1;
    if (i >= MB_REMOTE_MAX) {
      pthread_mutex_unlock(&t->lock);
      return MB_ETOOMANY;
    }
    if (rec(t, i) == NULL)
      atomic_store_explicit(&t->chunks[i >> CHUNK_BITS],
                            mb_calloc(CHUNK_SIZE, t->size), memory_order_release);
    if (i >= t->cap) {
      t->cap = t->cap ? 2 * t->cap : 1024;
      t->next = mb_realloc(t->next, t->cap * sizeof *t->next);
      if (t->counted) {
        t->rc = mb_realloc(t->rc, t->cap * sizeof *t->rc);
        t->gen = mb_realloc(t->gen, t->cap * sizeof *t->gen);
      }
    }
    if (t->counted)
      t->gen[i] = 0;
    atomic_store_explicit(&t->count, i, memory_order_release);
  }
  memcpy(rec(t, i), r, t->size);
  if (t->counted)
    t->rc[i] = 1;
  t->live++;
  if (t->live > 2 * t->nbuckets) {
    relink(t, t->nbuckets ? 2 * t->nbuckets : 1024);
  } else {
    uint32_t b = h & (t->nbuckets - 1);
    t->next[i] = t->buckets[b];
    t->buckets[b] = i;
  }
  int64_t id = (int64_t)make_id(t, i);
  pthread_mutex_unlock(&t->lock);
  return id;
}

static int get(rtab_t *t, uint64_t id, void *out)
{
  if (t->counted)
    pthread_mutex_lock(&t->lock);
  uint32_t i = index_of(t, id);
  if (i)
    memcpy(out, rec(t, i), t->size);
  if (t->counted)
    pthread_mutex_unlock(&t->lock);
  return i ? 0 : MB_EBADARG;
}

int64_t mb_remote_pid(const mb_rpid_t *p)
{
  mb_rpid_t k = *p;
  return intern(&pids, &k);
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
  return intern(&refs, &k);
}

int mb_remote_ref_get(mb_ref_t id, mb_rref_t *out)
{
  return get(&refs, id, out);
}

void mb_remote_ref_retain(mb_ref_t id)
{
  pthread_mutex_lock(&refs.lock);
  uint32_t i = index_of(&refs, id);
  if (i)
    refs.rc[i]++;
  pthread_mutex_unlock(&refs.lock);
}

void mb_remote_ref_release(mb_ref_t id)
{
  rtab_t *t = &refs;
  pthread_mutex_lock(&t->lock);
  uint32_t i = index_of(t, id);
  if (i && --t->rc[i] == 0) {
    /* Out of its hash chain, onto the free list, under a new generation. */
    uint32_t *pp = &t->buckets[hash_bytes(rec(t, i), t->size) & (t->nbuckets - 1)];
    while (*pp != i)
      pp = &t->next[*pp];
    *pp = t->next[i];
    t->gen[i] = (t->gen[i] + 1) & GEN_MASK;
    t->next[i] = t->free_head;
    t->free_head = i;
    t->live--;
  }
  pthread_mutex_unlock(&t->lock);
}

uint32_t mb_remote_ref_count(void)
{
  pthread_mutex_lock(&refs.lock);
  uint32_t n = refs.live;
  pthread_mutex_unlock(&refs.lock);
  return n;
}

uint32_t mb_remote_pid_count(void)
{
  return atomic_load(&pids.count);
}

uint32_t mb_remote_node(uint64_t id)
{
  mb_rpid_t p;
  if (mb_remote_pid_get(id, &p) == 0)
    return p.node;
  return 0;
}
