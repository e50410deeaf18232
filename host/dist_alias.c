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
 * The table is split in MB_ALIAS_SHARDS by the ref's low bits, each a
 * hash (hset.h) under its own mutex, so that the schedulers'
 * calls (each server.call activates and drops one alias) rarely meet.
 * Threads: any.
 */
#include <pthread.h>
#include <stdint.h>

#include "dist_int.h"
#include "hset.h"

#define MB_ALIAS_SHARDS 16

typedef struct shard {
  pthread_mutex_t lock;
  mb_hset_t owners;              /* ref -> pid */
} shard_t;

static shard_t shards[MB_ALIAS_SHARDS];
static pthread_once_t once = PTHREAD_ONCE_INIT;

static void init(void)
{
  for (int i = 0; i < MB_ALIAS_SHARDS; i++)
    pthread_mutex_init(&shards[i].lock, NULL);
}

static shard_t *shard_of(mb_ref_t ref)
{
  pthread_once(&once, init);
  return &shards[ref % MB_ALIAS_SHARDS];
}

void dist_alias_set(mb_ref_t ref, mb_pid_t pid)
{
  shard_t *s = shard_of(ref);
  pthread_mutex_lock(&s->lock);
  mb_hslot_t *e = mb_hset_find(&s->owners, ref);
  if (e)
    e->val = pid;
  else
    mb_hset_add(&s->owners, ref, pid);
  pthread_mutex_unlock(&s->lock);
}

void dist_alias_del(mb_ref_t ref, mb_pid_t pid)
{
  shard_t *s = shard_of(ref);
  pthread_mutex_lock(&s->lock);
  mb_hslot_t *e = mb_hset_find(&s->owners, ref);
  if (e && e->val == pid)
    mb_hset_take(&s->owners, ref, NULL);
  pthread_mutex_unlock(&s->lock);
}

mb_pid_t dist_alias_owner(mb_ref_t ref)
{
  shard_t *s = shard_of(ref);
  pthread_mutex_lock(&s->lock);
  mb_hslot_t *e = mb_hset_find(&s->owners, ref);
  mb_pid_t pid = e ? e->val : 0;
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
  for (uint32_t i = 0; i < p->aliases.cap; i++)   /* a hash by ref (proc.c) */
    if (p->aliases.v[i].key)
      dist_alias_del(p->aliases.v[i].key, p->pid);
}

void dist_alias_init(void)
{
  mb_proc_remote_alias = on_alias;
  mb_proc_add_exit_hook(on_exit_);
}
