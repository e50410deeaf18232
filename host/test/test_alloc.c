/* test_alloc.c: the Lua allocator's young and old states, and when the
 * schedulers are told to give their free pages back (alloc.h).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "../alloc.h"
#include "check.h"

#define TICKS_YOUNG (MB_ALLOC_YOUNG_MS / 100)

static void *blk(mb_alloc_t *a, size_t n) { return mb_alloc_fn(a, NULL, 0, n); }
static void drop(mb_alloc_t *a, void *p, size_t n) { mb_alloc_fn(a, p, n, 0); }

/* A state is young at birth and old once it has allocated
 * MB_ALLOC_YOUNG_BYTES; a new state of the same process is young again. */
static void by_bytes(void)
{
  mb_alloc_t a = {0};
  enum { N = 64, SZ = 8192 };
  void *v[N];
  v[0] = blk(&a, 100);
  check(v[0] && !mb_alloc_is_old(&a), "a new state allocates young");
  int n = 1;
  while (n < N && !mb_alloc_is_old(&a))
    v[n++] = blk(&a, SZ);
  check(mb_alloc_is_old(&a) && (size_t)(n - 1) * SZ >= MB_ALLOC_YOUNG_BYTES - SZ,
        "old after MB_ALLOC_YOUNG_BYTES (%d blocks of %d)", n - 1, SZ);
  void *r = mb_alloc_fn(&a, v[1], SZ, 2 * SZ);
  check(r != NULL && mb_alloc_is_old(&a), "a grown block of an old state: still old");
  v[1] = r;
  drop(&a, v[0], 100);
  drop(&a, v[1], 2 * SZ);
  for (int i = 2; i < n; i++)
    drop(&a, v[i], SZ);
  check(atomic_load(&a.used) == 0, "all freed: used 0");
  v[0] = blk(&a, 100);
  check(v[0] && !mb_alloc_is_old(&a), "the next state of the process is young again");
  drop(&a, v[0], 100);
}

/* ... or once it has lived MB_ALLOC_YOUNG_MS (mb_alloc_trim's ticks). */
static void by_age(void)
{
  mb_alloc_t a = {0};
  void *p = blk(&a, 64);
  for (int i = 0; i < TICKS_YOUNG - 1; i++)
    mb_alloc_trim();
  void *q = blk(&a, 64);
  check(q && !mb_alloc_is_old(&a), "young just before MB_ALLOC_YOUNG_MS");
  mb_alloc_trim();
  void *r = blk(&a, 64);
  check(r && mb_alloc_is_old(&a), "old from MB_ALLOC_YOUNG_MS on");
  drop(&a, p, 64);
  drop(&a, q, 64);
  drop(&a, r, 64);
}

/* The schedulers collect once the host's memory went down by a MB or
 * more, at most every few ticks. */
static void collect_due(void)
{
  mb_alloc_t a = {0};
  for (int i = 0; i < 20; i++)
    mb_alloc_trim();             /* whatever was due is done */
  int due = 0;
  for (int i = 0; i < 20; i++)
    due |= mb_alloc_trim();
  check(!due, "nothing freed: no collection");
  size_t n = 4u << 20;
  void *p = blk(&a, n);
  for (int i = 0; i < 20; i++)
    due |= mb_alloc_trim();
  check(p && !due, "memory taken: no collection");
  drop(&a, p, n);
  for (int i = 0; i < 20 && !due; i++)
    due = mb_alloc_trim();
  check(due, "4 MB freed: the schedulers collect");
  due = 0;
  for (int i = 0; i < 20; i++)
    due |= mb_alloc_trim();
  check(!due, "once");
  mb_alloc_collect();            /* the calling thread's heaps: no crash */
  check(true, "mb_alloc_collect on a thread without Lua heaps");
}

#ifndef MB_LIBC_MALLOC
/* Resident pages of [p, p + n). */
static size_t resident(void *p, size_t n)
{
  uintptr_t lo = (uintptr_t)p & ~(uintptr_t)4095;
  uintptr_t hi = ((uintptr_t)p + n + 4095) & ~(uintptr_t)4095;
  size_t np = (hi - lo) / 4096, r = 0;
  unsigned char *v = malloc(np);
  if (v == NULL || mincore((void *)lo, hi - lo, v) != 0) {
    free(v);
    return (size_t)-1;
  }
  for (size_t i = 0; i < np; i++)
    r += v[i] & 1;
  free(v);
  return r;
}

/* The state-block arena gives every page of its freed blocks back, those
 * that two blocks share too when the two are freed in different trims
 * (states close in any order). */
static void arena_pages(void)
{
  enum { B = 6240, N = 64 };
  static mb_alloc_t st[N];
  static char *v[N];
  mb_alloc_state_arena(B);
  for (int i = 0; i < N; i++) {
    v[i] = mb_alloc_fn(&st[i], NULL, 0, B);
    memset(v[i], 0x5a, B);
  }
  int adjacent = 1;
  for (int i = 1; i < N; i++)
    adjacent &= v[i] == v[i - 1] + B;
  if (!check(adjacent, "state blocks come from the arena, side by side"))
    return;
  check(resident(v[0], (size_t)N * B) > 0, "in use: resident");
  for (int i = 0; i < N; i += 2)
    mb_alloc_fn(&st[i], v[i], B, 0);
  mb_alloc_trim();
  check(resident(v[1], B) > 0, "the blocks still in use keep their pages");
  for (int i = 1; i < N; i += 2)
    mb_alloc_fn(&st[i], v[i], B, 0);
  mb_alloc_trim();
  check(resident(v[0], (size_t)N * B) == 0,
        "every page back once all are free, each freed apart from its neighbours (%zu left)",
        resident(v[0], (size_t)N * B));
  /* Taken again: whole and writable. */
  char *w = mb_alloc_fn(&st[0], NULL, 0, B);
  memset(w, 0x33, B);
  check(w[0] == 0x33 && w[B - 1] == 0x33, "a block given back is handed out again, whole");
  mb_alloc_fn(&st[0], w, B, 0);
  mb_alloc_trim();
}
#else
static void arena_pages(void)
{
  check(true, "the arena is off in sanitizer builds");
}
#endif

int main(void)
{
  mb_alloc_init();
  by_bytes();
  by_age();
  collect_due();
  arena_pages();
  return check_summary();
}
