/* http_guard.c: the lazy guard around an HTTP handler (see http_guard.h). */
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <string.h>

#include <uv.h>

#include "alloc.h"
#include "hset.h"
#include "lock.h"
#include "http_guard.h"
#include "msg.h"
#include "proc.h"
#include "scheduler.h"
#include "timer.h"

/* The state word: the deadline (whole ms of mb_timer_now) shifted left by
 * one, 0 for none, FIRED when the timer acted; the low bit says the timer
 * is armed (or its arm is posted). */
#define ARMED ((uint64_t)1)
#define FIRED (UINT64_MAX >> 1)

struct mb_hguard {
  uv_timer_t handle;        /* first; its data is &guard_tag (the closer's) */
  mb_sched_t *owner;        /* the loop that holds the handle */
  atomic_int refs;          /* the process's (until mb_hguard_free) and the
                               loop's (until the handle is closed) */
  atomic_int closing;       /* free asked: the timer may not act now */
  _Atomic uint64_t word;    /* deadline << 1 | ARMED (see above) */
  atomic_uchar busy;        /* a request is in its handler or its response
                               is going out (mb_hguard_busy) */
  mb_sock_t *sock;          /* referenced; NULL: closed when guarded */
  double ms;                /* < 0: untimed (the handle is never armed) */
  mb_pid_t self, heir;
  char msg[];               /* what heir is told */
};

static char guard_tag;
/* Each process's latest guard, by pid (mb_hguard_busy): under table_lock.
 * A guard leaves it when freed, so a lookup never finds a freed one. */
static mb_lock_t table_lock = MB_LOCK_INIT;
static mb_hset_t by_pid;
static void on_timer(uv_timer_t *h);
static pthread_once_t closer_once = PTHREAD_ONCE_INIT;

static void unref(mb_hguard_t *g)
{
  if (atomic_fetch_sub(&g->refs, 1) == 1) {
    if (g->sock)
      mb_sock_unref(g->sock);
    mb_free(g);
  }
}

static void on_closed(uv_handle_t *h)
{
  unref((mb_hguard_t *)h);
}

/* Arm the handle for deadline d (whole ms); on the owner's thread. The
 * loop's time is a floor of the clock d is read from, so it never fires
 * before d; when it fires it checks anyway (on_timer). */
static void arm(mb_hguard_t *g, uint64_t d)
{
  uint64_t now = uv_now(mb_sched_loop(g->owner));
  uv_timer_start(&g->handle, on_timer, d > now ? d - now : 0, 0);
}

static void on_timer(uv_timer_t *h)
{
  mb_hguard_t *g = (mb_hguard_t *)h;
  uint64_t w = atomic_load(&g->word);
  for (;;) {
    uint64_t d = w >> 1;
    if (d == 0 || d == FIRED || atomic_load(&g->closing)) {
      /* Nothing is timed: idle until the next request arms it. */
      if (atomic_compare_exchange_weak(&g->word, &w, w & ~ARMED))
        return;
      continue;
    }
    if ((double)d > mb_timer_now()) {
      arm(g, d);   /* a later request: what is left of it */
      return;
    }
    if (atomic_compare_exchange_weak(&g->word, &w, FIRED << 1))
      break;
  }
  mb_msg_t *m = mb_msg_string(g->msg);
  if (m == NULL)
    return;   /* out of memory: the handler is not stopped (as send_after) */
  m->kind = MB_MSG_USER;
  m->from = g->self;
  mb_proc_send(g->heir, m);
}

/* A closer (scheduler.h): a guard's handle still open at shutdown. */
static int close_guard(uv_handle_t *h)
{
  if (h->type != UV_TIMER || h->data != &guard_tag)
    return 0;
  mb_hguard_t *g = (mb_hguard_t *)h;
  atomic_store(&g->closing, 1);
  uv_close(h, on_closed);
  return 1;
}

static void add_closer(void)
{
  mb_sched_add_closer(close_guard);
}

mb_hguard_t *mb_hguard_new(mb_sock_t *s, mb_pid_t self, mb_pid_t heir, double ms,
                           const char *msg)
{
  pthread_once(&closer_once, add_closer);
  size_t n = msg ? strlen(msg) + 1 : 1;
  mb_hguard_t *g = mb_calloc(1, sizeof *g + n);
  if (g == NULL)
    return NULL;
  g->owner = mb_sched_self();
  uv_timer_init(mb_sched_loop(g->owner), &g->handle);
  g->handle.data = &guard_tag;
  atomic_init(&g->refs, 2);
  atomic_init(&g->closing, 0);
  atomic_init(&g->word, 0);
  atomic_init(&g->busy, 0);
  g->sock = s;
  g->ms = ms;
  g->self = self;
  g->heir = heir;
  if (msg)
    memcpy(g->msg, msg, n);
  mb_lock(&table_lock);
  mb_hslot_t *slot = mb_hset_find(&by_pid, self);
  if (slot)
    slot->val = (uintptr_t)g;
  else
    mb_hset_add(&by_pid, self, (uintptr_t)g);
  mb_unlock(&table_lock);
  return g;
}

int mb_hguard_busy(mb_pid_t pid)
{
  mb_lock(&table_lock);
  mb_hslot_t *slot = mb_hset_find(&by_pid, pid);
  int busy = slot && atomic_load_explicit(&((mb_hguard_t *)(uintptr_t)slot->val)->busy,
                                          memory_order_relaxed);
  mb_unlock(&table_lock);
  return busy;
}

void mb_hguard_done(mb_hguard_t *g)
{
  atomic_store_explicit(&g->busy, 0, memory_order_relaxed);
}

static void arm_posted(void *arg)
{
  mb_hguard_t *g = arg;
  if (!atomic_load(&g->closing))
    arm(g, atomic_load(&g->word) >> 1);
  unref(g);
}

/* The socket, if open and self's, with its heir set to heir and, with
 * mode >= 0, its exit on close set to mode, under one lock (mb_sock_guard). */
static mb_sock_t *owned(mb_hguard_t *g, mb_pid_t heir, int mode)
{
  mb_sock_t *s = g->sock;
  return s && mb_sock_guard(s, g->self, heir, mode) ? s : NULL;
}

void mb_hguard_start(mb_hguard_t *g, int mode)
{
  atomic_store_explicit(&g->busy, 1, memory_order_relaxed);
  owned(g, g->heir, mode);
  if (g->ms < 0)
    return;
  uint64_t d = (uint64_t)ceil(mb_timer_now() + g->ms);
  if (d == 0)
    d = 1;
  uint64_t w = atomic_load(&g->word);
  while (!atomic_compare_exchange_weak(&g->word, &w, d << 1 | ARMED))
    ;
  if (w & ARMED)
    return;   /* the timer will see the new deadline when it fires */
  if (mb_sched_self() == g->owner) {
    arm(g, d);
  } else {
    atomic_fetch_add(&g->refs, 1);
    mb_sched_post(g->owner, arm_posted, g);
  }
}

int mb_hguard_stop(mb_hguard_t *g)
{
  uint64_t w = atomic_load(&g->word);
  for (;;) {
    if (w >> 1 == FIRED)
      return 0;
    if (atomic_compare_exchange_weak(&g->word, &w, w & ARMED))
      return 1;
  }
}

mb_sock_t *mb_hguard_sock(mb_hguard_t *g)
{
  return owned(g, 0, -1);
}

static void close_posted(void *arg)
{
  mb_hguard_t *g = arg;
  if (!uv_is_closing((uv_handle_t *)&g->handle))
    uv_close((uv_handle_t *)&g->handle, on_closed);
  unref(g);
}

void mb_hguard_free(mb_hguard_t *g)
{
  mb_lock(&table_lock);
  mb_hslot_t *slot = mb_hset_find(&by_pid, g->self);
  if (slot && slot->val == (uintptr_t)g)
    mb_hset_take(&by_pid, g->self, NULL);
  mb_unlock(&table_lock);
  if (!atomic_exchange(&g->closing, 1)) {
    if (mb_sched_self() == g->owner) {
      uv_close((uv_handle_t *)&g->handle, on_closed);
    } else {
      atomic_fetch_add(&g->refs, 1);
      mb_sched_post(g->owner, close_posted, g);
    }
  }
  unref(g);
}
