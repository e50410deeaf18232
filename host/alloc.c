/* alloc.c: per-process counting allocator on mimalloc (see alloc.h). */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <sys/mman.h>
#include <stdatomic.h>
#include <stdint.h>

#include "alloc.h"

/* Sanitizer builds use the C library's allocator, which the sanitizers
 * intercept: they then see every block's life (ASan: use after free; TSan:
 * the hand-over of freed memory between threads). */
#ifdef MB_LIBC_MALLOC
#define mi_malloc malloc
#define mi_calloc calloc
#define mi_realloc realloc
#define mi_free free
#else
#include <mimalloc.h>
#endif

/* Lua's blocks come from heaps of their own on each thread (mimalloc
 * heaps: the allocating thread's, freed from any thread), apart from the
 * host's long-lived blocks (process records, continuations, sockets,
 * messages) in the default heap. Mixed, a page of one size class kept one
 * live record among the blocks of states since closed, and could not go
 * back to the system: 19,000 hibernated chat users held 6.6 KB of RSS each,
 * 5.5 KB with the heaps apart (scripts/bench chatidle).
 *
 * And two Lua heaps, young and old. Most states live briefly or allocate
 * mostly at birth (a spawn, a wake from hibernation: the state, its
 * modules, its session), while a few live long and allocate a little all
 * the time (a registry, an acceptor, a busy room). In one heap, the
 * long-lived one's blocks land among the short-lived ones' and each keeps
 * its 64 KiB page resident after they are gone: in the chat with 5,000
 * users hibernated, one process (860 live blocks, 45 KB) held 296 such
 * pages, 19 MB, and the few other awake ones about as much again. So a
 * state allocates young for its first MB_ALLOC_YOUNG_MS or
 * MB_ALLOC_YOUNG_BYTES, whichever comes first, and old after: the young
 * heap's pages empty out as short-lived states go, and the old one holds
 * the trickle of the long-lived ones, packed together. A state's age is
 * counted in ticks of mb_alloc_trim (the main thread's 100 ms), so the
 * test costs an allocation a load and a compare. */
#define YOUNG_TICKS (MB_ALLOC_YOUNG_MS / 100)   /* mb_alloc_trim runs every 100 ms */
static _Atomic uint32_t tick;

/* A heap's pages go back to the system once all their blocks are free;
 * but mimalloc notices that only as the owning thread allocates (blocks
 * that other threads freed wait in their page until then: a state is
 * often made on one scheduler and closed on another), and once the
 * short-lived states are gone the young heap may not allocate for a long
 * time. So when the host's memory went down, each scheduler thread
 * collects its heaps (mb_alloc_trim says when; mb_alloc_collect does it).
 * Measured on the chat with 5,000 users hibernated: 7.8 KB of RSS per user
 * without the young heap, 8.0 with it but no collection, 3.2 with both
 * (19,000 users: 5.4 KB before, 3.2 after; scripts/bench chatidle). */
#define COLLECT_TICKS 5                /* at most twice a second */
#define COLLECT_DROP (1 << 20)         /* bytes the host must have freed */

#ifndef MB_LIBC_MALLOC
static _Thread_local mi_heap_t *heaps[2];   /* young, old */

/* The pages a collection finds free go back to the system at once: the
 * decommit delay (see mb_alloc_init) is 0 meanwhile. The option is
 * mimalloc's global; another thread freeing a page in this window gives
 * it back at once too, which costs it time, never correctness, and two
 * collections at once (one on the out-of-memory path) both put back the
 * delay read at start-up. */
static long decommit_delay;

void mb_alloc_collect(void)
{
  mi_option_set(mi_option_decommit_delay, 0);
  for (int i = 0; i < 2; i++)
    if (heaps[i])
      mi_heap_collect(heaps[i], false);
  mi_heap_collect(mi_heap_get_default(), false);
  mi_option_set(mi_option_decommit_delay, decommit_delay);
}

static mi_heap_t *lheap(int old)
{
  if (heaps[old] == NULL)
    heaps[old] = mi_heap_new();
  return heaps[old] ? heaps[old] : mi_heap_get_default();
}

/* A block of n bytes for ptr (NULL: a new one) from the young or old heap.
 * When that fails, the host is out of memory (or address space), yet the
 * other heap may have room in its pages, and pages that are all free can
 * change heaps once collected: a process that ran out must still be able
 * to report it (a crash report allocates). */
static void *lua_get(int old, void *ptr, size_t n)
{
  void *p = ptr ? mi_heap_realloc(lheap(old), ptr, n) : mi_heap_malloc(lheap(old), n);
  if (__builtin_expect(p == NULL, 0)) {
    mb_alloc_collect();
    p = mi_heap_realloc(lheap(old), ptr, n);
    if (p == NULL)
      p = mi_heap_realloc(lheap(!old), ptr, n);
  }
  return p;
}
#define lua_malloc(old, n) lua_get(old, NULL, n)
#else
#define lua_get(old, p, n) realloc(p, n)
#define lua_malloc(old, n) malloc(n)
void mb_alloc_collect(void) {}
#endif

/* Is a's state old, now that it asks for n more bytes? */
static inline int is_old(mb_alloc_t *a, size_t n)
{
  if (a->young == 0)
    return 1;
  uint32_t now = atomic_load_explicit(&tick, memory_order_relaxed);
  if (n >= a->young || now - a->born >= YOUNG_TICKS) {
    a->young = 0;
    return 1;
  }
  a->young -= (uint32_t)n;
  return 0;
}

int mb_alloc_is_old(const mb_alloc_t *a)
{
  return a->young == 0;
}

/* -- The state-block arena --------------------------------------------------
 * A state's first and largest block is LuaJIT's GG_State (6,240 bytes in
 * this build), which mimalloc would round up to its 7,168-byte size class:
 * 928 bytes, 6% of an idle process, lost per process. Blocks of exactly
 * that size come instead from an arena of exactly sized blocks: one region
 * of address space reserved at start-up (pages count only once touched), a
 * bump pointer and two stacks of free block numbers, under a mutex (a state
 * is made and closed once per spawn or wake, next to ~5 us of other work).
 * An arena block is told from mimalloc's by its address. Any other
 * allocation of the same size (a string, an array) may land in the arena
 * too; that is harmless.
 *
 * Giving memory back: a closed state's block goes on the `hot` stack
 * (taken first: its pages are resident). mb_alloc_trim, run by the main
 * thread every 100 ms, takes the hot blocks, returns the whole pages inside
 * each run of adjacent free blocks to the system (madvise), and moves them
 * to the `cold` stack - so that two million processes that hibernate give
 * their states' memory back, without a system call on the path of a close.
 * The free lists hold block numbers, never links inside the blocks, whose
 * pages may be gone.
 *
 * A page that straddles two blocks goes back too once both are free, even
 * when they were freed in different batches: states close in any order,
 * and with only the pages inside each batch's runs given back, 19,000
 * hibernated chat users left 8 MB of such pages resident (0.4 KB each).
 * `freebit` says which blocks are free (under the lock). The neighbour of a
 * batch may be taken meanwhile, so trim pins it (under the lock) while it
 * gives the shared page back, and arena_alloc waits for a block it took to
 * be unpinned before handing it out (a wait of one madvise, and rare). */
#define ARENA_BYTES ((size_t)16 << 30)
#define ARENA_PAGE ((uintptr_t)4096)

typedef struct {
  uint32_t *v;
  size_t n, cap;
} stack_t_;

static size_t arena_block;              /* 0: no arena */
static size_t arena_nblocks;
static char *arena, *arena_end, *arena_next;
static stack_t_ hot, cold;
static pthread_mutex_t arena_lock = PTHREAD_MUTEX_INITIALIZER;
static uint8_t *freebit;                /* a bit per block: free (lock) */
static _Atomic uint8_t *pins;           /* per block: trims at work on it */

static void set_free(size_t i, int f)
{
  if (f)
    freebit[i >> 3] |= (uint8_t)(1u << (i & 7));
  else
    freebit[i >> 3] &= (uint8_t)~(1u << (i & 7));
}

/* Is block i free: freed, or never handed out? Lock held. */
static int is_free(size_t i)
{
  if (arena + i * arena_block >= arena_next)
    return 1;
  return freebit[i >> 3] >> (i & 7) & 1;
}

void mb_alloc_state_arena(size_t block)
{
#ifndef MB_LIBC_MALLOC   /* the sanitizers must see every block */
  if (block < sizeof(void *) || block % 16 || arena)
    return;
  size_t nblocks = ARENA_BYTES / block;
  void *p = mmap(NULL, ARENA_BYTES, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  void *f = mmap(NULL, nblocks / 8 + 1 + nblocks, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED || f == MAP_FAILED) {
    if (p != MAP_FAILED)
      munmap(p, ARENA_BYTES);
    if (f != MAP_FAILED)
      munmap(f, nblocks / 8 + 1 + nblocks);
    return;
  }
  freebit = f;
  pins = (_Atomic uint8_t *)(freebit + nblocks / 8 + 1);
  arena_nblocks = nblocks;
  arena = arena_next = p;
  arena_end = arena + ARENA_BYTES - ARENA_BYTES % block;
  arena_block = block;
#else
  (void)block;
#endif
}

static int in_arena(const void *p)
{
  return (const char *)p >= arena && (const char *)p < arena_end;
}

/* Push block number i; lock held. Returns 0, or -1 without memory for the
 * stack (the block is then simply lost: a few KB, never a crash). */
static int push(stack_t_ *st, uint32_t i)
{
  if (st->n == st->cap) {
    size_t cap = st->cap ? 2 * st->cap : 1024;
    uint32_t *v = mi_realloc(st->v, cap * sizeof *v);
    if (v == NULL)
      return -1;
    st->v = v;
    st->cap = cap;
  }
  st->v[st->n++] = i;
  return 0;
}

static void *arena_alloc(void)
{
  char *b = NULL;
  pthread_mutex_lock(&arena_lock);
  if (hot.n)
    b = arena + (size_t)hot.v[--hot.n] * arena_block;
  else if (cold.n)
    b = arena + (size_t)cold.v[--cold.n] * arena_block;
  else if (arena_next < arena_end) {
    b = arena_next;
    arena_next += arena_block;
  }
  size_t i = b ? (size_t)(b - arena) / arena_block : 0;
  if (b)
    set_free(i, 0);
  pthread_mutex_unlock(&arena_lock);
  /* A trim may be giving back a page b shares with a free neighbour. */
  while (b && atomic_load_explicit(&pins[i], memory_order_acquire))
    sched_yield();
  return b;
}

static void arena_release(void *b)
{
  size_t i = (size_t)((char *)b - arena) / arena_block;
  pthread_mutex_lock(&arena_lock);
  set_free(i, 1);
  push(&hot, (uint32_t)i);
  pthread_mutex_unlock(&arena_lock);
}

static int cmp_u32(const void *a, const void *b)
{
  uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
  return x < y ? -1 : x > y;
}

/* Should the schedulers collect their heaps? Once the host's counted
 * bytes are COLLECT_DROP under their peak since the last collection. */
static int collect_due(void)
{
  static long long peak;
  static uint32_t last;
  uint32_t now = atomic_fetch_add_explicit(&tick, 1, memory_order_relaxed) + 1;
  long long total = mb_alloc_host_total();
  if (total > peak)
    peak = total;
  if (now - last < COLLECT_TICKS || peak - total < COLLECT_DROP)
    return 0;
  last = now;
  peak = total;
  return 1;
}

static void trim_arena(void)
{
  if (arena == NULL)
    return;
  pthread_mutex_lock(&arena_lock);
  stack_t_ batch = hot;
  hot.v = NULL;
  hot.n = hot.cap = 0;
  pthread_mutex_unlock(&arena_lock);
  if (batch.n == 0) {
    mi_free(batch.v);
    return;
  }
  /* The batch is this thread's alone now: no one can allocate its blocks
   * while their pages go. Runs of adjacent blocks give back every whole
   * page inside them; the page a run shares with a free neighbour goes
   * too, the neighbour pinned meanwhile. */
  qsort(batch.v, batch.n, sizeof *batch.v, cmp_u32);
  for (size_t i = 0; i < batch.n; ) {
    size_t j = i + 1;
    while (j < batch.n && batch.v[j] == batch.v[j - 1] + 1)
      j++;
    uintptr_t lo = (uintptr_t)(arena + (size_t)batch.v[i] * arena_block);
    uintptr_t hi = (uintptr_t)(arena + ((size_t)batch.v[j - 1] + 1) * arena_block);
    lo = (lo + ARENA_PAGE - 1) & ~(ARENA_PAGE - 1);
    hi &= ~(ARENA_PAGE - 1);
    if (hi > lo)
      madvise((void *)lo, hi - lo, MADV_DONTNEED);
    i = j;
  }
  /* The shared pages: a block is longer than a page, so each has one
   * neighbour, looked at (and pinned if free) under the lock. */
  size_t nedges = 0;
  uintptr_t *edges = mi_malloc(2 * batch.n * sizeof *edges);
  uint32_t *pinned = mi_malloc(2 * batch.n * sizeof *pinned);
  pthread_mutex_lock(&arena_lock);
  for (size_t i = 0; edges && pinned && i < batch.n; ) {
    size_t j = i + 1;
    while (j < batch.n && batch.v[j] == batch.v[j - 1] + 1)
      j++;
    size_t first = batch.v[i], last = batch.v[j - 1];
    uintptr_t lo = (uintptr_t)(arena + first * arena_block);
    uintptr_t hi = (uintptr_t)(arena + (last + 1) * arena_block);
    if (lo % ARENA_PAGE && first > 0 && is_free(first - 1)) {
      edges[nedges] = lo & ~(ARENA_PAGE - 1);
      pinned[nedges++] = (uint32_t)(first - 1);
    }
    if (hi % ARENA_PAGE && last + 1 < arena_nblocks && is_free(last + 1)) {
      edges[nedges] = hi & ~(ARENA_PAGE - 1);
      pinned[nedges++] = (uint32_t)(last + 1);
    }
    i = j;
  }
  for (size_t i = 0; i < nedges; i++)
    atomic_fetch_add_explicit(&pins[pinned[i]], 1, memory_order_relaxed);
  pthread_mutex_unlock(&arena_lock);
  for (size_t i = 0; i < nedges; i++) {
    madvise((void *)edges[i], ARENA_PAGE, MADV_DONTNEED);
    atomic_fetch_sub_explicit(&pins[pinned[i]], 1, memory_order_release);
  }
  mi_free(edges);
  mi_free(pinned);
  pthread_mutex_lock(&arena_lock);
  for (size_t i = 0; i < batch.n; i++)
    push(&cold, batch.v[i]);
  pthread_mutex_unlock(&arena_lock);
  mi_free(batch.v);
}

int mb_alloc_trim(void)
{
  int due = collect_due();
  trim_arena();
  return due;
}

/* An arena block grown or shrunk (rare: a block of a state block's size
 * that changes; mb_alloc_fn frees arena blocks itself). */
static void *arena_realloc(void *ptr, size_t osize, size_t nsize, int old)
{
  void *n = lua_malloc(old, nsize);
  if (n) {
    memcpy(n, ptr, osize < nsize ? osize : nsize);
    arena_release(ptr);
  }
  return n;
}

void mb_alloc_init(void)
{
#ifndef MB_LIBC_MALLOC
  /* When pages go back to the system. Debian's mimalloc (2.0.9) gives a
   * free page back (madvise MADV_DONTNEED) after a delay (decommit_delay,
   * 25 ms), and only as a later allocation or free in its segment notices
   * the delay is over: never while a scheduler is idle. Giving each page
   * back at once (the page_reset option and no delay, as here before) is
   * what a busy host cannot afford: the Lua heaps of many small states
   * churn pages (a page of garbage empties as the states collect, a new
   * one fills), and each madvise of a threaded process is a TLB
   * shoot-down on every core, each page used again faults again. Measured
   * on this VM (scripts/bench, one run each, 2026-12-01): ring hop 1,975
   * -> 1,418 ns, spawn + exit 3.97 -> 2.77 us, hibernate + wake 5.52 ->
   * 2.24 us; madvise and page faults were 30% of the ring's samples. So
   * the delay stays, and a collection (mb_alloc_collect, when memory went
   * down and the thread is idle) gives back at once what it finds free:
   * 19,000 chat users 95% hibernated hold 1.8 KB of RSS each (2.2 with
   * every page given back at once; 8.0 with the delay alone). */
  decommit_delay = mi_option_get(mi_option_decommit_delay);
#endif
}

/* -- Accounting ------------------------------------------------------------ */

/* One counter per thread that allocates for processes (schedulers, the
 * main thread, the thread pool), each on its own cache line; threads past
 * MAX_COUNTERS share the last one. Only its thread writes a counter. */
#define MAX_COUNTERS 64
static struct {
  _Atomic long long v;
  char pad[64 - sizeof(long long)];
} counters[MAX_COUNTERS];
static atomic_int ncounters;
static _Thread_local int my_counter = -1;

void mb_alloc_count(long long delta)
{
  if (__builtin_expect(my_counter < 0, 0)) {
    int i = atomic_fetch_add(&ncounters, 1);
    my_counter = i < MAX_COUNTERS - 1 ? i : MAX_COUNTERS - 1;
  }
  /* The last counter is shared: an atomic add; the others have one writer. */
  _Atomic long long *c = &counters[my_counter].v;
  if (my_counter == MAX_COUNTERS - 1)
    atomic_fetch_add_explicit(c, delta, memory_order_relaxed);
  else
    atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) + delta,
                          memory_order_relaxed);
}

/* mb_alloc_count inline for a thread with a counter of its own. */
static inline void count(long long delta)
{
  int i = my_counter;
  if (__builtin_expect(i >= 0 && i < MAX_COUNTERS - 1, 1)) {
    _Atomic long long *c = &counters[i].v;
    atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) + delta,
                          memory_order_relaxed);
  } else {
    mb_alloc_count(delta);
  }
}

long long mb_alloc_host_total(void)
{
  long long t = 0;
  for (int i = 0; i < MAX_COUNTERS; i++)
    t += atomic_load_explicit(&counters[i].v, memory_order_relaxed);
  return t;
}

/* The reserve: pages of its own, really taken from the system (populated
 * by mmap in one call: touched a page at a time, its 2,048 faults were
 * ~20 ms of every start in a VM, half of a script's run), and given back
 * to it whole. */
static void *_Atomic reserve;
static atomic_size_t reserve_size;   /* the same at every call */
static atomic_int pressure;

static void reserve_free(void *r)
{
  if (r)
    munmap(r, atomic_load_explicit(&reserve_size, memory_order_relaxed));
}

void mb_alloc_reserve(size_t bytes)
{
  atomic_store_explicit(&reserve_size, bytes, memory_order_relaxed);
  void *r = mmap(NULL, bytes, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  reserve_free(atomic_exchange(&reserve, r == MAP_FAILED ? NULL : r));
}

int mb_alloc_failed(void)
{
  atomic_store(&pressure, 1);
  void *r = atomic_exchange(&reserve, NULL);
  reserve_free(r);
  return r != NULL;
}

int mb_alloc_take_pressure(void)
{
  return atomic_exchange(&pressure, 0);
}

static atomic_int over_cap;

void mb_alloc_set_over_cap(int over)
{
  atomic_store_explicit(&over_cap, over, memory_order_relaxed);
}

int mb_alloc_over_cap(void)
{
  return atomic_load_explicit(&over_cap, memory_order_relaxed);
}

/* -- The per-process allocator ------------------------------------------- */

void mb_alloc_young(mb_alloc_t *a)
{
  a->born = atomic_load_explicit(&tick, memory_order_relaxed);
  a->young = MB_ALLOC_YOUNG_BYTES;
}

/* The rare cases of mb_alloc_fn, out of its way: a state block (the first
 * block of a state, from the arena), a block that is one, and a refused
 * allocation (the accounting taken back). */
static __attribute__((noinline)) void *alloc_arena(void *ptr, size_t osize, size_t nsize,
                                                   int old)
{
  if (ptr != NULL)
    return in_arena(ptr) ? arena_realloc(ptr, osize, nsize, old) : lua_get(old, ptr, nsize);
  void *p = arena_alloc();
  return p ? p : lua_malloc(old, nsize);
}

static __attribute__((noinline)) void *alloc_failed(mb_alloc_t *a, size_t osize, size_t nsize)
{
  atomic_store_explicit(&a->used,
      atomic_load_explicit(&a->used, memory_order_relaxed) - nsize + osize,
      memory_order_relaxed);
  count((long long)osize - (long long)nsize);
  mb_alloc_failed();   /* the host, not the process's limit, is short */
  return NULL;
}

/* Every block of every process goes through here (~50 calls a spawn, ~900
 * an HTTP connection): the counts are taken before the allocation (and
 * taken back in the rare case it fails), so that little stays live across
 * the call into mimalloc, and the rare cases are functions of their own. */
void *mb_alloc_fn(void *ud, void *ptr, size_t osize, size_t nsize)
{
  mb_alloc_t *a = ud;
  size_t used = atomic_load_explicit(&a->used, memory_order_relaxed);
  if (ptr == NULL)
    osize = 0;  /* Lua passes a type tag in osize for new blocks. */
  if (nsize == 0) {
    atomic_store_explicit(&a->used, used - osize, memory_order_relaxed);
    count(-(long long)osize);
    if (__builtin_expect(in_arena(ptr), 0))
      arena_release(ptr);
    else
      mi_free(ptr);
    return NULL;
  }
  if (a->limit && nsize > osize &&
      used - osize + nsize + atomic_load_explicit(&a->charged, memory_order_relaxed) > a->limit) {
    a->oom = 1;
    return NULL;
  }
  if (used == 0 && ptr == NULL)     /* a new state's first block */
    mb_alloc_young(a);
  int old = nsize > osize ? is_old(a, nsize - osize) : a->young == 0;
  atomic_store_explicit(&a->used, used - osize + nsize, memory_order_relaxed);
  count((long long)nsize - (long long)osize);
  void *p;
  if (__builtin_expect(nsize == arena_block || in_arena(ptr), 0))
    p = alloc_arena(ptr, osize, nsize, old);
  else
    p = lua_get(old, ptr, nsize);
  return __builtin_expect(p != NULL, 1) ? p : alloc_failed(a, osize, nsize);
}

void *mb_must(void *p)
{
  if (p == NULL) {
    fputs("moonbeam: out of host memory\n", stderr);
    abort();
  }
  return p;
}

void *mb_malloc(size_t n)
{
  void *p = mi_malloc(n);
  if (p == NULL && mb_alloc_failed())
    p = mi_malloc(n);
  return mb_must(p);
}

void *mb_calloc(size_t n, size_t size)
{
  void *p = mi_calloc(n, size);
  if (p == NULL && mb_alloc_failed())
    p = mi_calloc(n, size);
  return mb_must(p);
}

void *mb_realloc(void *ptr, size_t n)
{
  void *p = mi_realloc(ptr, n);
  if (p == NULL && mb_alloc_failed())
    p = mi_realloc(ptr, n);
  return mb_must(p);
}
void mb_free(void *p) { mi_free(p); }

void *mb_try_realloc(void *p, size_t n)
{
  return mi_realloc(p, n);
}
