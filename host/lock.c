/* lock.c: the contended half of mb_lock_t (see lock.h). */
#define _GNU_SOURCE
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "lock.h"

/* Rounds of a pause before sleeping: ~2-4 us on this machine, longer than
 * any section under these locks, shorter than a futex wait and wake. */
#define MB_LOCK_SPINS 100

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

void mb_lock_slow(mb_lock_t *l)
{
  for (int i = 0; i < MB_LOCK_SPINS; i++) {
    cpu_relax();
    int free_ = 0;
    if (atomic_load_explicit(&l->v, memory_order_relaxed) == 0 &&
        atomic_compare_exchange_weak_explicit(&l->v, &free_, 1, memory_order_acquire,
                                              memory_order_relaxed))
      return;
  }
  /* Mark it as having a sleeper; whoever gives it back wakes one. Taken
   * this way it stays marked 2 until given back (one waker call too many
   * at worst). */
  while (atomic_exchange_explicit(&l->v, 2, memory_order_acquire) != 0)
    syscall(SYS_futex, &l->v, FUTEX_WAIT_PRIVATE, 2, NULL, NULL, 0);
}

void mb_lock_wake(mb_lock_t *l)
{
  syscall(SYS_futex, &l->v, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
}
