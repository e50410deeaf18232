/* lock.h: the host's lock for short critical sections - one int.
 *
 * DESIGN
 * The hot paths take a lock at every step: a keep-alive HTTP request takes
 * 17 (a process's lock at each wait and wake-up, its scheduler's run queue,
 * its socket's), a chat delivery 5. A pthread_mutex_t is 40 bytes, and its
 * lock and unlock run ~55 instructions when nobody else holds it (the kind
 * of mutex, owner and user counts, then the atomic): 5% of a request's
 * instructions (callgrind). This one is an int in three states - 0 free,
 * 1 held, 2 held and someone may be asleep on it - after the futex-based
 * mutex in Ulrich Drepper's "Futexes Are Tricky": taking a free lock is one
 * compare-and-swap, giving it back one exchange, and the kernel is called
 * only when a taker found it held (mb_lock_slow) or a giver finds it was
 * marked 2 (mb_lock_wake).
 *
 * A taker that finds it held spins a little first (MB_LOCK_SPINS rounds of
 * a pause: the sections are a few dozen instructions, shorter than a
 * futex call), then marks it 2 and sleeps until woken. Once marked 2 it
 * stays 2 until given back, so a giver may make one futex call with no
 * sleeper left (harmless). Not recursive, no owner check (the process
 * lock's debug builds check it: proc.h), no order among waiters. Acquire
 * on taking and release on giving back order the data it guards, which is
 * also how ThreadSanitizer sees it (a race detector of its own, not a
 * mutex's lock-order checks).
 */
#ifndef MB_LOCK_H
#define MB_LOCK_H

#include <stdatomic.h>

typedef struct {
  atomic_int v;   /* 0 free, 1 held, 2 held with possible sleepers */
} mb_lock_t;

#define MB_LOCK_INIT {0}

static inline void mb_lock_init(mb_lock_t *l)
{
  atomic_init(&l->v, 0);
}

void mb_lock_slow(mb_lock_t *l);
void mb_lock_wake(mb_lock_t *l);

static inline void mb_lock(mb_lock_t *l)
{
  int free_ = 0;
  if (!atomic_compare_exchange_strong_explicit(&l->v, &free_, 1, memory_order_acquire,
                                               memory_order_relaxed))
    mb_lock_slow(l);
}

static inline void mb_unlock(mb_lock_t *l)
{
  if (atomic_exchange_explicit(&l->v, 0, memory_order_release) == 2)
    mb_lock_wake(l);
}

#endif
