/* hset.c: a hash of nonzero 64-bit keys to 64-bit values (see hset.h). */
#include "alloc.h"
#include "hset.h"

static uint32_t home(uint64_t key, uint32_t mask)
{
  return (uint32_t)((key * 0x9E3779B97F4A7C15ull) >> 32) & mask;
}

static void put(mb_hset_t *s, uint64_t key, uint64_t val)
{
  uint32_t mask = s->cap - 1, i = home(key, mask);
  while (s->v[i].key)
    i = (i + 1) & mask;
  s->v[i].key = key;
  s->v[i].val = val;
  s->n++;
}

static void resize(mb_hset_t *s, uint32_t cap)
{
  mb_hset_t old = *s;
  s->v = mb_calloc(cap, sizeof *s->v);
  s->cap = cap;
  s->n = 0;
  for (uint32_t i = 0; i < old.cap; i++)
    if (old.v[i].key)
      put(s, old.v[i].key, old.v[i].val);
  mb_free(old.v);
}

void mb_hset_add(mb_hset_t *s, uint64_t key, uint64_t val)
{
  if (2 * (s->n + 1) > s->cap)
    resize(s, s->cap ? 2 * s->cap : 4);
  put(s, key, val);
}

mb_hslot_t *mb_hset_find(const mb_hset_t *s, uint64_t key)
{
  if (s->n == 0)
    return NULL;
  uint32_t mask = s->cap - 1;
  for (uint32_t i = home(key, mask); s->v[i].key; i = (i + 1) & mask)
    if (s->v[i].key == key)
      return &s->v[i];
  return NULL;
}

int mb_hset_take(mb_hset_t *s, uint64_t key, uint64_t *val)
{
  mb_hslot_t *e = mb_hset_find(s, key);
  if (e == NULL)
    return 0;
  if (val)
    *val = e->val;
  uint32_t mask = s->cap - 1, i = (uint32_t)(e - s->v);
  for (uint32_t j = i;;) {
    j = (j + 1) & mask;
    if (s->v[j].key == 0)
      break;
    uint32_t k = home(s->v[j].key, mask);
    /* j stays if its home is cyclically in (i, j] */
    if (i <= j ? (i < k && k <= j) : (i < k || k <= j))
      continue;
    s->v[i] = s->v[j];
    i = j;
  }
  s->v[i].key = 0;
  s->v[i].val = 0;
  s->n--;
  if (s->cap > 16 && 8 * s->n < s->cap)
    resize(s, s->cap / 2);
  return 1;
}

void mb_hset_free(mb_hset_t *s)
{
  mb_free(s->v);
  s->v = NULL;
  s->n = s->cap = 0;
}
