/* alloc.h: the per-process Lua allocator.
 *
 * Every process's lua_State allocates through mb_alloc_fn with its own
 * mb_alloc_t as the userdata, so the host knows each process's memory to the
 * byte and can cap it (spawn_opt max_memory). Blocks come from mimalloc, which
 * keeps per-thread heaps (a state migrates between scheduler threads, and
 * mimalloc frees a block on any thread) and has little per-block overhead,
 * which matters with a million small states.
 *
 * Threads: only the thread currently running the process allocates; `used`
 * is atomic so that mb.info() on another thread can read it.
 */
#ifndef MB_ALLOC_H
#define MB_ALLOC_H

#include <stdatomic.h>
#include <stddef.h>

typedef struct mb_alloc {
  atomic_size_t used;   /* bytes currently allocated by the state */
  size_t limit;         /* enforced now; 0: no limit (lifted to unwind) */
  size_t max;           /* the process's max_memory (0: none): the limit
                           each new state of the process starts with */
  int oom;              /* set when an allocation was refused for the limit */
} mb_alloc_t;

/* The lua_Alloc function; ud is an mb_alloc_t. Refuses (returns NULL) an
 * allocation that would take `used` over `limit`, and sets `oom`. */
void *mb_alloc_fn(void *ud, void *ptr, size_t osize, size_t nsize);

/* Serve blocks of exactly `block` bytes (LuaJIT's GG_State, the first
 * block of every state) from an arena of that size, so they cost no
 * allocator rounding. Once, at start-up; without it (or if the address
 * space cannot be had) every block comes from mimalloc. */
void mb_alloc_state_arena(size_t block);

/* Plain host allocations (process records, link sets, commands): never
 * return NULL. The host's small bookkeeping cannot go on without them, so a
 * failure is fatal (see mb_must). Allocations that a process asked for and
 * that may be large (messages, buffers) use malloc and fail that process
 * instead. */
void *mb_malloc(size_t n);
void *mb_calloc(size_t n, size_t size);
void *mb_realloc(void *p, size_t n);
void mb_free(void *p);
/* p, or the host's out-of-memory end if p is NULL: for the results of
 * functions that may return NULL where the caller cannot go on without. */
void *mb_must(void *p);

#endif
