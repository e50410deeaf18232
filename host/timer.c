/* timer.c: wait timers and send_after timers on libuv (see timer.h). */
#include <stdatomic.h>

#include <uv.h>

#include "alloc.h"
#include "idtab.h"
#include "proc.h"
#include "scheduler.h"
#include "timer.h"

struct mb_timer {
  uv_timer_t handle;       /* first: its data points at the timer itself */
  mb_sched_t *owner;       /* the scheduler whose loop holds the handle */
  atomic_int refs;         /* the loop's (until closed) + the caller's or
                              the id table's (send_after, until fired or
                              cancelled) */
  uint64_t id;             /* send_after: its id in `timers` */
  mb_pid_t pid;            /* wait: the waiting process; send_after: dest */
  uint32_t seq;            /* wait: p->wait_seq when armed */
  mb_msg_t *msg;           /* send_after: the message, until delivered */
  double due;              /* mb_timer_now() when it fires */
  double armed;            /* wait: when the libuv timer fires (<= due) */
};

/* send_after timers by id: whoever removes a timer from here - its firing
 * or a cancel - decides whether it delivers, so a cancelled timer never
 * delivers and a delivered one never cancels. */
static mb_idtab_t timers = MB_IDTAB_INIT;

double mb_timer_now(void)
{
  return (double)uv_hrtime() / 1e6;
}

static void timer_free(mb_timer_t *t)
{
  if (t->msg)
    mb_msg_free(t->msg);
  mb_free(t);
}

static void timer_unref(mb_timer_t *t)
{
  if (atomic_fetch_sub(&t->refs, 1) == 1)
    timer_free(t);
}

static void on_close(uv_handle_t *h)
{
  timer_unref(h->data);
}

/* Stop and close on the owner's thread. */
static void close_now(void *arg)
{
  mb_timer_t *t = arg;
  if (!uv_is_closing((uv_handle_t *)&t->handle)) {
    uv_timer_stop(&t->handle);
    uv_close((uv_handle_t *)&t->handle, on_close);
  }
}

/* The posted command holds a reference of its own. */
static void close_posted(void *arg)
{
  close_now(arg);
  timer_unref(arg);
}

static void close_on_owner(mb_timer_t *t)
{
  if (mb_sched_self() == t->owner) {
    close_now(t);
  } else {
    atomic_fetch_add(&t->refs, 1);
    mb_sched_post(t->owner, close_posted, t);
  }
}

/* A closer (scheduler.h): our timers are the timer handles whose data points
 * at their own mb_timer_t, which starts with the handle. */
static int close_timer(uv_handle_t *h)
{
  if (h->type != UV_TIMER || h->data != (void *)h)
    return 0;
  close_now(h->data);
  return 1;
}

static void release(mb_proc_t *p)
{
  if (p->wait_timer) {
    mb_timer_wait_done(p->wait_timer);
    p->wait_timer = NULL;
  }
}

static void drop_table_ref(void *obj)
{
  timer_unref(obj);
}

/* After the loops closed every timer's handle. */
static void timers_shutdown(void)
{
  mb_idtab_clear(&timers, drop_table_ref);
}

void mb_timer_init(void)
{
  mb_proc_add_exit_hook(release);
  mb_sched_add_closer(close_timer);
  mb_sched_add_after_loops(timers_shutdown);
}

static mb_timer_t *timer_new(double ms, uv_timer_cb cb)
{
  mb_sched_t *s = mb_sched_self();
  mb_timer_t *t = mb_calloc(1, sizeof *t);
  t->owner = s;
  atomic_init(&t->refs, 2);
  t->due = mb_timer_now() + ms;
  uv_loop_t *loop = mb_sched_loop(s);
  uv_timer_init(loop, &t->handle);
  t->handle.data = t;
  uv_update_time(loop);
  uint64_t timeout = ms <= 0 ? 0 : (uint64_t)(ms + 0.999);
  uv_timer_start(&t->handle, cb, timeout, 0);
  return t;
}

/* -- Wait timers ----------------------------------------------------------
 * A process keeps its wait timer between waits (p->wait_timer), and its next
 * wait with a timeout on the same scheduler takes it again: a receive with a
 * timeout that a message ends early (a chat user's receive with its
 * hibernate_after, a socket read's deadline) no longer starts and stops a
 * libuv timer each time - ~1,000 instructions a wait, a tenth of a chat
 * message's delivery, most of it libuv's heap. A wait that ends later than
 * the one the timer is armed for only moves `due`: when the timer fires
 * early it arms itself again for what is left. A timer fires into a wait
 * only if its seq is the process's current wait_seq (end_wait moves it on),
 * so a kept timer never ends a later wait early. */

static void on_wait_timer(uv_timer_t *h)
{
  mb_timer_t *t = h->data;
  double left = t->due - mb_timer_now();
  if (left >= 1) {   /* a later wait took it: arm it again */
    t->armed = t->due;
    uv_timer_start(&t->handle, on_wait_timer, (uint64_t)(left + 0.999), 0);
    return;
  }
  mb_proc_t *p = mb_proc_get(t->pid);
  if (p) {
    int wake = 0;
    mb_proc_lock(p);
    if (p->wait_seq == t->seq) {
      p->expired = 1;
      wake = mb_proc_wake_locked(p);
    }
    mb_proc_unlock(p);
    if (wake)
      mb_proc_on_runnable(p);
    mb_proc_unref(p);
  }
}

mb_timer_t *mb_timer_wait(mb_proc_t *p, double ms)
{
  mb_proc_lock(p);
  uint32_t seq = p->wait_seq;
  mb_proc_unlock(p);
  mb_timer_t *t = p->wait_timer;
  if (t && t->owner == mb_sched_self()) {
    double due = mb_timer_now() + ms;
    t->seq = seq;
    t->due = due;
    if (!uv_is_active((uv_handle_t *)&t->handle) || due < t->armed) {
      t->armed = due;
      uv_update_time(mb_sched_loop(t->owner));
      uv_timer_start(&t->handle, on_wait_timer, ms <= 0 ? 0 : (uint64_t)(ms + 0.999), 0);
    }
    return t;
  }
  if (t)
    mb_timer_wait_done(t);   /* another scheduler's: let it go */
  t = timer_new(ms, on_wait_timer);
  t->pid = p->pid;
  t->seq = seq;
  t->armed = t->due;
  return t;
}

void mb_timer_wait_done(mb_timer_t *t)
{
  close_on_owner(t);
  timer_unref(t);
}

/* -- send_after ----------------------------------------------------------- */

static void on_send_timer(uv_timer_t *h)
{
  mb_timer_t *t = h->data;
  if (mb_idtab_remove(&timers, t->id)) {
    mb_msg_t *m = t->msg;
    t->msg = NULL;
    mb_proc_send(t->pid, m);
    timer_unref(t);
  }
  close_now(t);
}

uint64_t mb_timer_send_after(double ms, mb_pid_t dest, mb_msg_t *msg)
{
  mb_timer_t *t = timer_new(ms, on_send_timer);
  t->pid = dest;
  t->msg = msg;
  t->id = mb_idtab_add(&timers, t);
  if (t->id == 0) {
    /* No id: it never fires (the caller raises); freed with msg. */
    close_now(t);
    timer_unref(t);
  }
  return t->id;
}

int mb_timer_cancel(uint64_t id, double *left_ms)
{
  mb_timer_t *t = mb_idtab_remove(&timers, id);
  if (t == NULL)
    return 0;
  double left = t->due - mb_timer_now();
  *left_ms = left > 0 ? left : 0;
  close_on_owner(t);
  timer_unref(t);
  return 1;
}
