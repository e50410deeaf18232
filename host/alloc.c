/* alloc.c: per-process counting allocator on mimalloc (see alloc.h). */
#include <stdio.h>
#include <stdlib.h>

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

void *mb_alloc_fn(void *ud, void *ptr, size_t osize, size_t nsize)
{
  mb_alloc_t *a = ud;
  size_t used = atomic_load_explicit(&a->used, memory_order_relaxed);
  if (ptr == NULL)
    osize = 0;  /* Lua passes a type tag in osize for new blocks. */
  if (nsize == 0) {
    mi_free(ptr);
    atomic_store_explicit(&a->used, used - osize, memory_order_relaxed);
    return NULL;
  }
  if (a->limit && nsize > osize && used - osize + nsize > a->limit) {
    a->oom = 1;
    return NULL;
  }
  void *p = mi_realloc(ptr, nsize);
  if (p)
    atomic_store_explicit(&a->used, used - osize + nsize, memory_order_relaxed);
  return p;
}

void *mb_must(void *p)
{
  if (p == NULL) {
    fputs("moonbeam: out of host memory\n", stderr);
    abort();
  }
  return p;
}

void *mb_malloc(size_t n) { return mb_must(mi_malloc(n)); }
void *mb_calloc(size_t n, size_t size) { return mb_must(mi_calloc(n, size)); }
void *mb_realloc(void *p, size_t n) { return mb_must(mi_realloc(p, n)); }
void mb_free(void *p) { mi_free(p); }
