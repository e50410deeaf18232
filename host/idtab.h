/* idtab.h: tables that give host objects (sockets, timers) the ids their
 * Lua values carry.
 *
 * DESIGN
 * An id is generation << MB_PID_SLOT_BITS | slot, as for pids: the slot
 * indexes the table and the generation makes an id unique although slots
 * are reused, so an id that outlived its object finds nothing. Slot 0 is
 * never used: id 0 means none. One lock (lock.h) per table; lookups take the
 * object's reference under it, so an object found is alive.
 * Threads: any.
 */
#ifndef MB_IDTAB_H
#define MB_IDTAB_H

#include <stdint.h>

#include "lock.h"

typedef struct mb_idtab {
  mb_lock_t lock;
  void **obj;
  uint32_t *gen;
  uint32_t *free;          /* free slots (a stack) */
  uint32_t cap, used, nfree;
} mb_idtab_t;

#define MB_IDTAB_INIT {MB_LOCK_INIT, NULL, NULL, NULL, 0, 1, 0}

/* Add obj; returns its id, or 0 when the table is full (16M entries). */
uint64_t mb_idtab_add(mb_idtab_t *t, void *obj);
/* The object of id, with ref(obj) called under the lock; NULL if none. */
void *mb_idtab_get(mb_idtab_t *t, uint64_t id, void (*ref)(void *obj));
/* Remove id; returns its object if it was there (the caller then drops
 * the table's reference), else NULL. */
void *mb_idtab_remove(mb_idtab_t *t, uint64_t id);
/* Remove every object, calling fn on each, and free the table. */
void mb_idtab_clear(mb_idtab_t *t, void (*fn)(void *obj));

#endif
