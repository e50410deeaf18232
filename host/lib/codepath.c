/* codepath.c: the package paths processes inherit (see codepath.h). */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "alloc.h"
#include "codepath.h"

typedef struct entry {
  struct entry *next;       /* in its hash bucket */
  unsigned refs;
  unsigned id;
  unsigned hash;
  size_t size;              /* counted in the host's memory */
  const char *cpath;        /* in text, after path's NUL */
  char path[];
} entry_t;

#define NBUCKETS 256

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static entry_t *buckets[NBUCKETS];
/* By number, 1..MB_CODEPATH_MAX; the free numbers are chained through
 * free_next (0 ends it), and `top` is the first never used (the arrays'
 * pages are touched only as numbers are used). An entry's slot is written
 * under the lock and read without it by a holder of a reference, which got
 * the number after the write. */
static entry_t *by_id[MB_CODEPATH_MAX + 1];
static unsigned short free_next[MB_CODEPATH_MAX + 1];
static unsigned free_head, top = 1;
static size_t bytes;        /* of the entries in use */

static unsigned hash_pair(const char *path, const char *cpath)
{
  unsigned h = 5381;
  for (const char *s = path; *s; s++)
    h = h * 33 + (unsigned char)*s;
  h = h * 33 + 1;
  for (const char *s = cpath; *s; s++)
    h = h * 33 + (unsigned char)*s;
  return h;
}

int mb_codepath_intern(const char *path, const char *cpath)
{
  unsigned h = hash_pair(path, cpath);
  int id = -1;
  pthread_mutex_lock(&lock);
  for (entry_t *e = buckets[h % NBUCKETS]; e; e = e->next)
    if (e->hash == h && strcmp(e->path, path) == 0 && strcmp(e->cpath, cpath) == 0) {
      e->refs++;
      id = (int)e->id;
      goto done;
    }
  if (free_head == 0 && top > MB_CODEPATH_MAX)
    goto done;
  size_t plen = strlen(path) + 1, clen = strlen(cpath) + 1;
  size_t size = sizeof(entry_t) + plen + clen;
  if (size > MB_CODEPATH_BYTES - bytes)
    goto done;
  entry_t *e = malloc(size);
  if (e == NULL)
    goto done;
  memcpy(e->path, path, plen);
  memcpy(e->path + plen, cpath, clen);
  e->cpath = e->path + plen;
  e->refs = 1;
  e->hash = h;
  e->size = size;
  e->next = buckets[h % NBUCKETS];
  buckets[h % NBUCKETS] = e;
  if (free_head) {
    id = (int)free_head;
    free_head = free_next[id];
  } else {
    id = (int)top++;
  }
  e->id = (unsigned)id;
  by_id[id] = e;
  bytes += size;
  mb_alloc_count((long long)size);
done:
  pthread_mutex_unlock(&lock);
  return id;
}

void mb_codepath_ref(unsigned id)
{
  if (id == 0)
    return;
  pthread_mutex_lock(&lock);
  by_id[id]->refs++;
  pthread_mutex_unlock(&lock);
}

void mb_codepath_unref(unsigned id)
{
  if (id == 0)
    return;
  entry_t *gone = NULL;
  pthread_mutex_lock(&lock);
  entry_t *e = by_id[id];
  if (--e->refs == 0) {
    entry_t **pp = &buckets[e->hash % NBUCKETS];
    while (*pp != e)
      pp = &(*pp)->next;
    *pp = e->next;
    by_id[id] = NULL;
    free_next[id] = (unsigned short)free_head;
    free_head = id;
    bytes -= e->size;
    gone = e;
  }
  pthread_mutex_unlock(&lock);
  if (gone) {
    mb_alloc_count(-(long long)gone->size);
    free(gone);
  }
}

const char *mb_codepath_get(unsigned id, int cpath)
{
  entry_t *e = by_id[id];
  return cpath ? e->cpath : e->path;
}
