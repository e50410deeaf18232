/* timer.h: timers on the schedulers' libuv loops.
 *
 * DESIGN
 * Timers live on the loop of the scheduler thread that created them and are
 * only ever armed, unlinked or closed on that thread; another thread that
 * wants one stopped posts the request there (mb_sched_post). Two kinds:
 *  - wait timers bound a receive, a sleep or an operation: each is a libuv
 *    timer; when one fires it wakes its process if the process is still in
 *    the same wait (wait_seq), so a late timer never disturbs a later wait.
 *    A process keeps its wait timer for its next timed wait on the same
 *    scheduler. Freed in its close callback, as libuv requires, and not
 *    before the waiting process has let it go;
 *  - send_after timers carry a message and have an id (idtab.h), which the
 *    Lua value holds, so a timer can be sent in messages and outlive the
 *    state that made it. They are not libuv handles but entries in
 *    per-scheduler duration lists (timer.c): the timers of one whole-ms
 *    duration in start order, which is due order, with one libuv timer per
 *    list armed for its head, so starting is an append and cancelling an
 *    unlink (an HTTP request's guard costs no libuv call). Firing and
 *    cancelling race through the id table: whoever removes the timer from
 *    it first wins, so a cancelled timer never delivers and a delivered one
 *    never cancels.
 * A send_after duration counts in whole ms, a fraction rounded up (one
 * under 0.001 ms is dropped, so 0 fires at the next loop iteration).
 */
#ifndef MB_TIMER_H
#define MB_TIMER_H

#include <stdint.h>

#include "msg.h"
#include "pid.h"

typedef struct mb_timer mb_timer_t;
struct mb_proc;

/* Set up: a dying process's wait timer is stopped (an exit hook), and the
 * timers left at shutdown are closed. Once, at start-up. */
void mb_timer_init(void);

/* Arm a timer that ends p's current wait (p->wait_seq) after ms: p's kept
 * timer (p->wait_timer) when it is on this scheduler, else a new one (the
 * kept one is let go). The result is p's wait_timer, kept after the wait
 * for the next one (see timer.c). Owner thread of p, which must be a
 * scheduler thread. */
mb_timer_t *mb_timer_wait(struct mb_proc *p, double ms);
/* Stop and release a wait timer (it may have fired). Any thread. */
void mb_timer_wait_done(mb_timer_t *t);

/* Deliver msg (taken) to dest after ms, for p, the calling process: 0 and
 * the timer's id in *id; MB_ENOMEM when the timer and its message would
 * take p over its max_memory (they count in it, with p's heap, until
 * delivered or cancelled; and in the host's total until freed), or p's
 * pending timers over 4 GiB; MB_ETOOMANY when the timer table is full. On
 * an error msg is freed. A process's timers deliver in the order of their
 * deadlines in whole ms, those of one duration in start order; a timer is
 * cancelled when the local process it is addressed to ends (at once if it
 * already has). Scheduler thread. */
int mb_timer_send_after(struct mb_proc *p, double ms, mb_pid_t dest, mb_msg_t *msg,
                        uint64_t *id);
/* Cancel the timer id: returns 1 and the ms that were left if it had not
 * fired yet (its message is freed: at once on the timer's own scheduler,
 * else soon on it), else 0. Any thread. */
int mb_timer_cancel(uint64_t id, double *left_ms);
/* Whether the timer id is pending (delivered, cancelled and dropped ones
 * are not): 1 and the ms left in *left_ms, else 0 (erlang:read_timer). Any
 * thread. */
int mb_timer_read(uint64_t id, double *left_ms);

/* Monotonic milliseconds since an arbitrary start. */
double mb_timer_now(void);

#endif
