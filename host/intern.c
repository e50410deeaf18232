/* intern.c: interned strings (see intern.h). */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "intern.h"

typedef struct entry {
  struct entry *next;
  size_t n;
  char s[];
} entry_t;

#define NBUCKETS 256
static entry_t *buckets[NBUCKETS];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

const char *mb_intern(const char *s, size_t n)
{
  unsigned h = 5381;
  for (size_t i = 0; i < n; i++)
    h = h * 33 + (unsigned char)s[i];
  pthread_mutex_lock(&lock);
  entry_t *e = buckets[h % NBUCKETS];
  while (e && !(e->n == n && memcmp(e->s, s, n) == 0))
    e = e->next;
  if (e == NULL && (e = malloc(sizeof *e + n + 1)) != NULL) {
    e->n = n;
    memcpy(e->s, s, n);
    e->s[n] = '\0';
    e->next = buckets[h % NBUCKETS];
    buckets[h % NBUCKETS] = e;
  }
  pthread_mutex_unlock(&lock);
  return e ? e->s : NULL;
}
