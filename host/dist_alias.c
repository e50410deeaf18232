/* dist_alias.c: which process owns each active alias, for the messages
 * other nodes send to an alias (ALIAS_SEND carries the alias, not a pid).
 *
 * DESIGN
 * proc.c tells us (mb_proc_remote_alias) of every alias a process activates
 * or drops, and an exit hook drops a dying process's aliases, so the table
 * holds exactly the live aliases of the host: its size is bounded by what
 * processes hold, never by what peers send. Only a distributed host keeps
 * it (the hooks are installed by mb_dist_start). A lookup finds the owner;
 * the owner's receive still checks that the alias is active when the
 * message is taken (proc.h), so a message racing an unalias is dropped as
 * for a local alias.
 * The table is split in MB_ALIAS_SHARDS by the ref's low bits, each an
 * open-addressed hash table under its own mutex, so that the schedulers'
 * calls (each server.call activates and drops one alias) rarely meet.
 * Threads: any.
 */
#include <pthread.h>
#include <stdint.h>

#include "alloc.h"
#include "dist_int.h"

#define MB_ALIAS_SHARDS 16
#define MIN_CAP 16

typedef struct slot {
  mb_ref_t ref;                  /* 0: empty */
  mb_pid_t pid;
} slot_t;

typedef struct shard {
  pthread_mutex_t lock;
  slot_t *v;
  uint32_t n, cap;               /* cap: a power of two, or 0 */
} shard_t;

static shard_t shards[MB_ALIAS_SHARDS];
static pthread_once_t once = PTHREAD_ONCE_INIT;

static void init(void)
{
  for (int i = 0; i < MB_ALIAS_SHARDS; i++)
    pthread_mutex_init(&shards[i].lock, NULL);
}

static uint32_t hash(mb_ref_t ref)
{
  uint64_t h = ref * 0x9E3779B97F4A7C15ull;
  return (uint32_t)(h >> 32);
}

static shard_t *shard_of(mb_ref_t ref)
{
  pthread_once(&once, init);
  return &shards[ref % MB_ALIAS_SHARDS];
}

/* The slot of ref, or the empty one where it would go. */
static slot_t *lookup(shard_t *s, mb_ref_t ref)
{
  uint32_t mask = s->cap - 1;
  for (uint32_t i = hash(ref) & mask;; i = (i + 1) & mask)
    if (s->v[i].ref == ref || s->v[i].ref == 0)
      return &s->v[i];
}

static void grow(shard_t *s, uint32_t cap)
{
  slot_t *old = s->v;
  uint32_t oldcap = s->cap;
  s->v = mb_calloc(cap, sizeof *s->v);
  s->cap = cap;
  for (uint32_t i = 0; i < oldcap; i++)
    if (old[i].ref)
      *lookup(s, old[i].ref) = old[i];
  mb_free(old);
}

void dist_alias_set(mb_ref_t ref, mb_pid_t pid)
{
  shard_t *s = shard_of(ref);
  pthread_mutex_lock(&s->lock);
  if (4 * (s->n + 1) > 3 * s->cap)
    grow(s, s->cap ? 2 * s->cap : MIN_CAP);
  slot_t *e = lookup(s, ref);
  if (e->ref == 0)
    s->n++;
  e->ref = ref;
  e->pid = pid;
  pthread_mutex_unlock(&s->lock);
}

void dist_alias_del(mb_ref_t ref, mb_pid_t pid)
{
  shard_t *s = shard_of(ref);
  pthread_mutex_lock(&s->lock);
  slot_t *e = s->cap ? lookup(s, ref) : NULL;
  if (e && e->ref == ref && e->pid == pid) {
    /* Backward-shift deletion keeps every probe chain unbroken. */
    uint32_t mask = s->cap - 1, i = (uint32_t)(e - s->v), j = i;
    for (;;) {
      j = (j + 1) & mask;
      if (s->v[j].ref == 0)
        break;
      uint32_t home = hash(s->v[j].ref) & mask;
      if (((j - home) & mask) >= ((j - i) & mask)) {
        s->v[i] = s->v[j];
        i = j;
      }
    }
    s->v[i].ref = 0;
    s->n--;
    if (s->n == 0) {             /* an idle host keeps nothing */
      mb_free(s->v);
      s->v = NULL;
      s->cap = 0;
    }
  }
  pthread_mutex_unlock(&s->lock);
}

mb_pid_t dist_alias_owner(mb_ref_t ref)
{
  shard_t *s = shard_of(ref);
  pthread_mutex_lock(&s->lock);
  slot_t *e = s->cap ? lookup(s, ref) : NULL;
  mb_pid_t pid = e && e->ref == ref ? e->pid : 0;
  pthread_mutex_unlock(&s->lock);
  return pid;
}

/* The hooks (proc.h). */
static void on_alias(mb_pid_t self, mb_ref_t ref, int on)
{
  if (on)
    dist_alias_set(ref, self);
  else
    dist_alias_del(ref, self);
}

static void on_exit_(mb_proc_t *p)
{
  for (uint32_t i = 0; i < p->aliases.cap; i++)   /* a hash set by ref (proc.c) */
    if (p->aliases.v[i].ref)
      dist_alias_del(p->aliases.v[i].ref, p->pid);
}

void dist_alias_init(void)
{
  mb_proc_remote_alias = on_alias;
  mb_proc_add_exit_hook(on_exit_);
}
