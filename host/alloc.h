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
#include <stdint.h>

typedef struct mb_alloc {
  atomic_size_t used;   /* bytes currently allocated by the state */
  size_t limit;         /* enforced now; 0: no limit (lifted to unwind) */
  size_t max;           /* the process's max_memory (0: none): the limit
                           each new state of the process starts with */
  int oom;              /* set when an allocation was refused for the limit */
  /* Young or old (alloc.c): a state's blocks come from the young heap
   * until it has lived MB_ALLOC_YOUNG_MS or allocated MB_ALLOC_YOUNG_BYTES,
   * then from the old one. Set at the state's first block. */
  uint32_t born;        /* mb_alloc_trim's tick at the state's first block */
  uint32_t young;       /* bytes it may still allocate young; 0: old */
  /* Bytes charged to the limit from outside the state: its process's
   * pending send_after timers and their messages (timer.c adds on the
   * process's thread, takes back on any), its monitors and aliases
   * (proc.c, the owner), and the buffer of a moonbeam.fs call it waits on
   * (io.c: a pool thread adds while it waits). In the struct's tail
   * padding. */
  atomic_uint charged;
} mb_alloc_t;

/* The lua_Alloc function; ud is an mb_alloc_t. Refuses (returns NULL) an
 * allocation that would take `used` + `charged` over `limit`, and sets
 * `oom`. */
void *mb_alloc_fn(void *ud, void *ptr, size_t osize, size_t nsize);

/* Set the allocator up (mimalloc's options). Once, at start-up. */
void mb_alloc_init(void);

/* Serve blocks of exactly `block` bytes (LuaJIT's GG_State, the first
 * block of every state) from an arena of that size, so they cost no
 * allocator rounding. Once, at start-up; without it (or if the address
 * space cannot be had) every block comes from mimalloc. */
void mb_alloc_state_arena(size_t block);
/* Give the pages of closed states back to the system (see alloc.c), and
 * count the tick that ages states. The main thread, every 100 ms. Returns
 * 1 when every scheduler thread should now call mb_alloc_collect (memory
 * was freed since the last time). */
int mb_alloc_trim(void);
/* Give back the free pages of the calling thread's heaps (mimalloc's are
 * per thread; see alloc.c). */
void mb_alloc_collect(void);
/* A state allocates from the young Lua heap for its first
 * MB_ALLOC_YOUNG_MS (in mb_alloc_trim's ticks) or MB_ALLOC_YOUNG_BYTES,
 * whichever ends first, and from the old one after (see alloc.c).
 * mb_alloc_is_old: has a's state come of age? */
#define MB_ALLOC_YOUNG_MS 1000
#define MB_ALLOC_YOUNG_BYTES (256u << 10)
int mb_alloc_is_old(const mb_alloc_t *a);
/* a's state starts a life again (a reused state, host/lib/lstate.c): young
 * from now, as at its first block. */
void mb_alloc_young(mb_alloc_t *a);


/* -- Host-wide accounting and running out of memory -----------------------
 * Every byte a process holds (its Lua heap, the messages queued for it, a
 * hibernated continuation) is counted in per-thread counters, so that the
 * host's total is known without a contended atomic on every allocation:
 * mb_alloc_count(delta) on whatever thread allocated or freed. */
void mb_alloc_count(long long delta);
/* The host's total of counted bytes. Any thread (a sum of the counters). */
long long mb_alloc_host_total(void);
/* Set aside an emergency reserve (bytes) at start-up: the first failed
 * allocation gives it back to the allocator, so that the host can go on to
 * report and end processes, and notes memory pressure. */
void mb_alloc_reserve(size_t bytes);
#define MB_ALLOC_RESERVE (8u << 20)
/* An allocation failed: free the reserve (returns 1 if there was one, so a
 * retry may succeed) and note the pressure. Any thread. */
int mb_alloc_failed(void);
/* Whether the processes held more than the host's cap (--max-memory) at
 * the last check (the main thread's memory watch, every 100 ms, sets it):
 * no new process starts meanwhile. */
void mb_alloc_set_over_cap(int over);
int mb_alloc_over_cap(void);
/* Was there a failed allocation since the last call (which clears it)?
 * The watchdog then ends the process holding the most memory. */
int mb_alloc_take_pressure(void);

/* Plain host allocations (process records, link sets, commands): never
 * return NULL. The host's small bookkeeping cannot go on without them: a
 * failure first spends the emergency reserve and retries; only a host with
 * no memory left at all ends (with a message). Allocations that a process
 * asked for and that may be large (messages, buffers, read data) use malloc
 * and fail that process instead. */
void *mb_malloc(size_t n);
void *mb_calloc(size_t n, size_t size);
void *mb_realloc(void *p, size_t n);
void mb_free(void *p);
/* mb_realloc that may fail: NULL (p untouched) when the allocator has no
 * n bytes. For the large buffers a process asked for that are freed with
 * mb_free (moonbeam.fs's read buffers, io.h): their failure fails that
 * call, never the host, and spends neither the reserve nor the watchdog's
 * attention (the buffer is given up at once). Any thread. */
void *mb_try_realloc(void *p, size_t n);
/* p, or the host's out-of-memory end if p is NULL: for the results of
 * functions that may return NULL where the caller cannot go on without
 * (call mb_alloc_failed() and retry once first). */
void *mb_must(void *p);

#endif
