/* idtab.c: id tables (see idtab.h). */
#include <string.h>

#include "alloc.h"
#include "idtab.h"
#include "pid.h"

uint64_t mb_idtab_add(mb_idtab_t *t, void *obj)
{
  uint64_t id = 0;
  mb_lock(&t->lock);
  uint32_t slot = 0;
  if (t->nfree) {
    slot = t->free[--t->nfree];
  } else {
    if (t->used >= t->cap) {
      uint32_t cap = t->cap ? t->cap * 2 : 1024;
      if (cap > MB_PID_SLOT_MASK)
        goto out;
      t->obj = mb_realloc(t->obj, cap * sizeof *t->obj);
      t->gen = mb_realloc(t->gen, cap * sizeof *t->gen);
      t->free = mb_realloc(t->free, cap * sizeof *t->free);
      memset(t->gen + t->cap, 0, (cap - t->cap) * sizeof *t->gen);
      t->cap = cap;
    }
    slot = t->used++;
  }
  t->obj[slot] = obj;
  t->gen[slot]++;
  id = ((uint64_t)t->gen[slot] << MB_PID_SLOT_BITS) | slot;
out:
  mb_unlock(&t->lock);
  return id;
}

/* The slot of id if it holds id's object; lock held. */
static uint32_t find(mb_idtab_t *t, uint64_t id)
{
  uint32_t slot = (uint32_t)(id & MB_PID_SLOT_MASK);
  if (slot == 0 || slot >= t->used || t->obj[slot] == NULL ||
      t->gen[slot] != (uint32_t)(id >> MB_PID_SLOT_BITS))
    return 0;
  return slot;
}

void *mb_idtab_get(mb_idtab_t *t, uint64_t id, void (*ref)(void *obj))
{
  mb_lock(&t->lock);
  uint32_t slot = find(t, id);
  void *obj = slot ? t->obj[slot] : NULL;
  if (obj && ref)
    ref(obj);
  mb_unlock(&t->lock);
  return obj;
}

void *mb_idtab_remove(mb_idtab_t *t, uint64_t id)
{
  mb_lock(&t->lock);
  uint32_t slot = find(t, id);
  void *obj = NULL;
  if (slot) {
    obj = t->obj[slot];
    t->obj[slot] = NULL;
    t->free[t->nfree++] = slot;
  }
  mb_unlock(&t->lock);
  return obj;
}

void mb_idtab_clear(mb_idtab_t *t, void (*fn)(void *obj))
{
  mb_lock(&t->lock);
  for (uint32_t i = 1; i < t->used; i++) {
    void *obj = t->obj[i];
    t->obj[i] = NULL;
    if (obj && fn)
      fn(obj);
  }
  mb_free(t->obj);
  mb_free(t->gen);
  mb_free(t->free);
  t->obj = NULL;
  t->gen = t->free = NULL;
  t->cap = t->nfree = 0;
  t->used = 1;
  mb_unlock(&t->lock);
}
