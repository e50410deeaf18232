/* reg.c: process names; a chained hash table under one lock (see reg.h). */
#include <stdio.h>
#include <string.h>

#include "reg.h"
#include "scheduler.h"

typedef struct entry {
  struct entry *next;
  mb_proc_t *p;        /* a weak pointer: cleared by the process's exit */
  mb_pid_t pid;
  char name[];
} entry_t;

#define NBUCKETS 1024
static entry_t *buckets[NBUCKETS];
static mb_lock_t reg_lock = MB_LOCK_INIT;

static unsigned hash(const char *s)
{
  unsigned h = 5381;
  while (*s)
    h = h * 33 + (unsigned char)*s++;
  return h % NBUCKETS;
}

static entry_t **find(const char *name)
{
  entry_t **pe = &buckets[hash(name)];
  while (*pe && strcmp((*pe)->name, name) != 0)
    pe = &(*pe)->next;
  return pe;
}

int mb_reg_register(const char *name, mb_proc_t *p)
{
  int rc = 0;
  mb_lock(&reg_lock);
  entry_t **pe = find(name);
  if (*pe) {
    rc = MB_ETAKEN;
  } else if (atomic_load_explicit(&p->name, memory_order_relaxed)) {
    rc = MB_EHASNAME;
  } else {
    /* Named under p's lock only if not dead: once its exit has set dead
     * (under that lock), no name can come, and remove_proc may look
     * without the registry's lock. */
    size_t n = strlen(name);
    entry_t *e = mb_malloc(sizeof *e + n + 1);
    mb_proc_lock(p);
    if (p->dead) {
      rc = MB_ENOPROC;
    } else {
      memcpy(e->name, name, n + 1);
      e->p = p;
      e->pid = p->pid;
      e->next = NULL;
      *pe = e;
      atomic_store_explicit(&p->name, e->name, memory_order_relaxed);
    }
    mb_proc_unlock(p);
    if (rc)
      mb_free(e);
  }
  mb_unlock(&reg_lock);
  return rc;
}

static void unlink_entry(entry_t **pe)
{
  entry_t *e = *pe;
  *pe = e->next;
  atomic_store_explicit(&e->p->name, NULL, memory_order_relaxed);
  mb_free(e);
}

int mb_reg_unregister(const char *name)
{
  mb_lock(&reg_lock);
  entry_t **pe = find(name);
  int found = *pe != NULL;
  if (found)
    unlink_entry(pe);
  mb_unlock(&reg_lock);
  return found;
}

mb_pid_t mb_reg_whereis(const char *name)
{
  mb_lock(&reg_lock);
  entry_t *e = *find(name);
  mb_pid_t pid = e ? e->pid : 0;
  mb_unlock(&reg_lock);
  return pid;
}

mb_pid_t mb_reg_whereis_n(const char *name, size_t n)
{
  return memchr(name, 0, n) ? 0 : mb_reg_whereis(name);
}

int mb_reg_name_of(mb_proc_t *p, char *buf, size_t n)
{
  mb_lock(&reg_lock);
  char *name = atomic_load_explicit(&p->name, memory_order_relaxed);
  if (name)
    snprintf(buf, n, "%s", name);
  mb_unlock(&reg_lock);
  return name != NULL;
}

/* An exit hook: p is dead (see mb_reg_register), so a name it has not now
 * it never will; one it has may be taken off meanwhile (unregister). Most
 * processes have none, and their exits do not take the registry's lock. */
static void remove_proc(mb_proc_t *p)
{
  if (atomic_load_explicit(&p->name, memory_order_relaxed) == NULL)
    return;
  mb_lock(&reg_lock);
  char *name = atomic_load_explicit(&p->name, memory_order_relaxed);
  if (name)
    unlink_entry(find(name));
  mb_unlock(&reg_lock);
}

static void reg_shutdown(void)
{
  mb_lock(&reg_lock);
  for (int i = 0; i < NBUCKETS; i++)
    while (buckets[i])
      unlink_entry(&buckets[i]);
  mb_unlock(&reg_lock);
}

void mb_reg_init(void)
{
  mb_proc_add_exit_hook(remove_proc);
  mb_sched_add_after_loops(reg_shutdown);
}
