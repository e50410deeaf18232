/* hset.h: a hash of nonzero 64-bit keys to 64-bit values - a process's
 * links, monitors and aliases (proc.c), the owners of aliases that other
 * nodes address (dist_alias.c), the self-addressed timers of each starter
 * on a scheduler (timer.c).
 *
 * DESIGN
 * Open addressing with linear probing over a power-of-two array of
 * {key, val} slots, key 0 marking an empty one; a deletion moves back the
 * slots after it that probed past it (no tombstones), so a lookup stops at
 * the first empty slot. The array doubles when half full and halves when
 * under an eighth full (above 16 slots): a set that grew for a burst gives
 * the memory back, one that only ever holds a few stays at 4-16 slots and
 * costs no allocation as entries come and go (a call's monitor and alias).
 * A zeroed mb_hset_t is an empty set. Not thread-safe: the owner locks.
 * A key may be added more than once (each take removes one).
 * Walk a set with: for (i < s->cap) if (s->v[i].key) ...
 */
#ifndef MB_HSET_H
#define MB_HSET_H

#include <stdint.h>

typedef struct mb_hslot {
  uint64_t key;      /* 0: empty */
  uint64_t val;
} mb_hslot_t;

typedef struct mb_hset {
  mb_hslot_t *v;
  uint32_t n, cap;   /* cap: a power of two, or 0 */
} mb_hset_t;

/* Add key (nonzero) with val. */
void mb_hset_add(mb_hset_t *s, uint64_t key, uint64_t val);
/* The slot of key, or NULL; valid until the set next changes. */
mb_hslot_t *mb_hset_find(const mb_hset_t *s, uint64_t key);
/* Take one entry of key out: 1 and its value in *val (unless NULL), or 0
 * if there is none. */
int mb_hset_take(mb_hset_t *s, uint64_t key, uint64_t *val);
/* Free the slots: the set is empty again. */
void mb_hset_free(mb_hset_t *s);

#endif
