/* reg.c: process names; a chained hash table under one mutex (see reg.h). */
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
static pthread_mutex_t reg_lock = PTHREAD_MUTEX_INITIALIZER;

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
  pthread_mutex_lock(&reg_lock);
  entry_t **pe = find(name);
  mb_proc_lock(p);
  int dead = p->dead;
  mb_proc_unlock(p);
  if (*pe)
    rc = MB_ETAKEN;
  else if (p->name)
    rc = MB_EHASNAME;
  else if (dead)
    rc = MB_ENOPROC;
  else {
    size_t n = strlen(name);
    entry_t *e = mb_malloc(sizeof *e + n + 1);
    memcpy(e->name, name, n + 1);
    e->p = p;
    e->pid = p->pid;
    e->next = NULL;
    *pe = e;
    p->name = e->name;
  }
  pthread_mutex_unlock(&reg_lock);
  return rc;
}

static void unlink_entry(entry_t **pe)
{
  entry_t *e = *pe;
  *pe = e->next;
  e->p->name = NULL;
  mb_free(e);
}

int mb_reg_unregister(const char *name)
{
  pthread_mutex_lock(&reg_lock);
  entry_t **pe = find(name);
  int found = *pe != NULL;
  if (found)
    unlink_entry(pe);
  pthread_mutex_unlock(&reg_lock);
  return found;
}

mb_pid_t mb_reg_whereis(const char *name)
{
  pthread_mutex_lock(&reg_lock);
  entry_t *e = *find(name);
  mb_pid_t pid = e ? e->pid : 0;
  pthread_mutex_unlock(&reg_lock);
  return pid;
}

mb_pid_t mb_reg_whereis_n(const char *name, size_t n)
{
  return memchr(name, 0, n) ? 0 : mb_reg_whereis(name);
}

int mb_reg_name_of(mb_proc_t *p, char *buf, size_t n)
{
  pthread_mutex_lock(&reg_lock);
  int has = p->name != NULL;
  if (has)
    snprintf(buf, n, "%s", p->name);
  pthread_mutex_unlock(&reg_lock);
  return has;
}

static void remove_proc(mb_proc_t *p)
{
  pthread_mutex_lock(&reg_lock);
  if (p->name)
    unlink_entry(find(p->name));
  pthread_mutex_unlock(&reg_lock);
}

static void reg_shutdown(void)
{
  pthread_mutex_lock(&reg_lock);
  for (int i = 0; i < NBUCKETS; i++)
    while (buckets[i])
      unlink_entry(&buckets[i]);
  pthread_mutex_unlock(&reg_lock);
}

void mb_reg_init(void)
{
  mb_proc_add_exit_hook(remove_proc);
  mb_sched_add_after_loops(reg_shutdown);
}
