/* timer.c: wait timers and send_after timers on libuv (see timer.h).
 *
 * DESIGN (send_after; wait timers are described at their section)
 * A send_after timer is not a libuv handle but a 112-byte entry in a
 * duration list: each scheduler keeps, for every whole-ms duration in use,
 * one circular doubly linked list of the entries started on it with that
 * duration, in start order. The clock only goes forward, so start order is
 * due order and the head is always the next due (a start posted from
 * another scheduler, below, is inserted in due order). Each list owns one
 * libuv timer, armed for its head's deadline:
 *  - start appends (O(1)) and arms the list's timer only when it was idle;
 *  - cancel unlinks (O(1)) and never touches the libuv timer, even for the
 *    head: when the timer fires it delivers the entries that are due, from
 *    the head, and arms itself again for the new head, or lets the list go
 *    idle when it is empty.
 * So an HTTP request's guard (started, then cancelled) costs a malloc, an
 * id and two list links instead of a libuv handle's init, heap insert,
 * stop and close; the heap sees one timer per duration, and a list whose
 * entries are all cancelled wakes once per duration at most.
 *
 * Deadlines are absolute whole ms of libuv's loop clock: an entry is due at
 * mb_timer_now() + its duration rounded up to a whole ms, and its list's
 * timer fires once the loop time reaches the ceiling of that (the loop time
 * is a floor of the same monotonic clock, so nothing fires early, and
 * arming needs no clock read). A firing delivers only the entries of the
 * deadline it was armed for, then arms again; an overdue list is then at
 * once due again and libuv runs the timers in deadline order, so when a
 * busy loop comes late, lists of different durations still deliver
 * interleaved in due order. 0 ms (and under 0.001 ms) is its own list,
 * armed with timeout 0, which delivers all its entries at the next loop
 * iteration.
 *
 * A process's timers stay on one scheduler while any of them is pending:
 * it moves between schedulers (a message from a process on another one
 * wakes it there), and two loops fire independently, so two of its timers
 * due in the same whole ms on two schedulers could deliver in either
 * order. The process record counts its pending timers and names the
 * scheduler holding them; a start made elsewhere meanwhile is posted to
 * that scheduler - put in its inbox, with a command (mb_sched_post) to take
 * it - which inserts the entry by due time (the only case where a list is
 * not appended to). A busy scheduler runs its loop late, and then its
 * timers before its commands: so a firing takes the inbox first, and when
 * a posted entry went in already due, delivers every due entry of every
 * list in due order (deliver_late), before lists due later that came due
 * meanwhile. Once the count is back to 0 - it drops after the delivery -
 * the next timer goes on the scheduler it is started on. A start that the
 * owner has not yet linked can be cancelled on the owner's own thread: the
 * entry is then marked and freed by the posted start. A count of 255
 * stays: such a process keeps its timers on one scheduler for good. While
 * that scheduler is stuck (the watchdog reported its slice), a new timer
 * goes where it is started: the old ones wait with the stuck loop, the new
 * one need not.
 *
 * Memory: an entry and its message count in the starter's limit
 * (alloc.charged, which its heap's allocations and its mailbox's check add
 * in) from the start until the delivery or the cancel, which take them
 * back from the starter if it still lives; and in the host's total
 * (mb_alloc_count) until the entry is freed. Only the starter's thread
 * adds to its charge while it runs (a pool thread adds a moonbeam.fs
 * buffer only while the starter waits for it: io.h), so a start checks
 * the limit without a race.
 *
 * A process's end: as Erlang cancels a timer whose destination process
 * dies, a timer is dropped when the process it is addressed to ends,
 * whoever started it, instead of holding its memory (charged to a starter
 * that may live on) until it comes due to be thrown away; the starter's
 * cancel_timer then finds it gone. Timers to other processes outlive their
 * starter, as in Erlang, but not outside every limit: each becomes an
 * orphan, charged to its destination from then on (the message is on its
 * way there). Else a process could start timers up to its limit, end, and
 * do it again in a new process, until the host was over --max-memory for
 * good with no process to blame. So each scheduler's table indexes its
 * entries twice (each index a hash of pids, each the head of a list
 * through the entries): by starter, and by destination when that is
 * another local process. Both are kept with the duration lists on the
 * owner's thread. The exit hook posts process_ended to the scheduler
 * holding the process's timers (timers_sched), after any start posted
 * there before (commands run in order), and to every scheduler if another
 * process ever addressed a timer to it (p->addressed, set by the start
 * under its lock while it lived, so before its end; a start to a process
 * already ended is dropped at once, and a start posted to another
 * scheduler looks again when it is linked there, since the end's
 * process_ended may have run there first).
 * Making an orphan races with a cancel on another thread: the charge moves
 * first, then the id table's lock marks the entry (mark_orphan), or finds
 * it gone, and the charge moves back; the canceller reads the mark after
 * its own removal, under the same lock, and takes the charge from the
 * right process. One that a cancel on another thread removed from
 * `timers` first is that cancel's to free. A timer to another node stays,
 * charged to no process, until it is delivered.
 *
 * Idle lists stay, with their libuv timer stopped (an inactive handle keeps
 * no loop alive), for the next timer of that duration; a scheduler keeps at
 * most MB_TIMER_IDLE_LISTS of them and closes the one idle longest beyond
 * that, so a program using many distinct durations holds memory only for
 * the ones in use. Lists are found by duration in a small chained hash per
 * scheduler.
 *
 * Threads: an entry, its list and its scheduler's table are touched only on
 * the owner scheduler's thread, except through the id table `timers`, the
 * arbiter between firing and cancelling (idtab.h's lock): whoever removes
 * the id first wins, so a cancelled timer never delivers and a delivered
 * one never cancels. A cancel on another thread posts the unlink to the
 * owner (mb_sched_post); a firing that finds the id gone unlinks the entry
 * and leaves it to that posted command, which frees it. Who frees an entry:
 * the firing that delivers it, the canceller (or its posted command), or,
 * at shutdown, the clearing of the id table (the closed lists detach their
 * entries first).
 */
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include <uv.h>

#include "alloc.h"
#include "err.h"
#include "hset.h"
#include "idtab.h"
#include "proc.h"
#include "scheduler.h"
#include "timer.h"

/* A wait timer (send_after timers are entries of duration lists, below). */
struct mb_timer {
  uv_timer_t handle;       /* first: its data points at the timer itself */
  mb_sched_t *owner;       /* the scheduler whose loop holds the handle */
  atomic_int refs;         /* the loop's (until closed) + the waiting
                              process's */
  mb_pid_t pid;            /* the waiting process */
  uint32_t seq;            /* p->wait_seq when armed */
  double due;              /* mb_timer_now() when it fires */
  double armed;            /* when the libuv timer fires (<= due) */
};

/* send_after timers by id: whoever removes a timer from here - its firing
 * or a cancel - decides whether it delivers (see DESIGN). */
static mb_idtab_t timers = MB_IDTAB_INIT;

double mb_timer_now(void)
{
  return (double)uv_hrtime() / 1e6;
}

/* Durations are capped (~35 years) so that a deadline fits libuv's clock
 * (and math.huge, or anything past 2^64, is no undefined conversion: it
 * was 0, and a wait timer re-armed itself at once for ever). */
#define MB_TIMER_MAX_MS ((uint64_t)1 << 40)

/* ms as libuv's whole ms, rounded up (0.0005 is 0: the next iteration). */
static uint64_t whole_ms(double ms)
{
  return !(ms > 0) ? 0 : ms >= (double)MB_TIMER_MAX_MS ? MB_TIMER_MAX_MS
                                                       : (uint64_t)(ms + 0.999);
}

static void timer_unref(mb_timer_t *t)
{
  if (atomic_fetch_sub(&t->refs, 1) == 1)
    mb_free(t);
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

static void process_ended(void *arg);   /* (send_after, below) */

static void release(mb_proc_t *p)
{
  if (p->wait_timer) {
    mb_timer_wait_done(p->wait_timer);
    p->wait_timer = NULL;
  }
  /* Its timers, and the orphans charged to it, are seen to (at shutdown
   * every entry is freed). Timers others addressed to it may be on any
   * scheduler; p->addressed was set, if ever, before p->dead (see
   * mb_timer_send_after). */
  if (mb_sched_halting())
    return;
  int timers = atomic_load_explicit(&p->timers_pending, memory_order_acquire) != 0 &&
               p->timers_sched != 0;
  if (atomic_load_explicit(&p->addressed, memory_order_relaxed)) {
    for (int i = 0; i < mb_sched_opts.schedulers; i++)
      mb_sched_post(mb_sched_by_id(i), process_ended, (void *)(uintptr_t)p->pid);
  } else if (timers) {
    mb_sched_post(mb_sched_by_id(p->timers_sched - 1), process_ended,
                  (void *)(uintptr_t)p->pid);
  }
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
  uv_timer_start(&t->handle, cb, whole_ms(ms), 0);
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
    uv_timer_start(&t->handle, on_wait_timer, whole_ms(left), 0);
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
      uv_timer_start(&t->handle, on_wait_timer, whole_ms(ms), 0);
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


/* -- send_after: duration lists (see DESIGN) ------------------------------ */

/* A scheduler keeps at most this many idle duration lists (each ~150 bytes
 * with its libuv timer) for durations that come again; past it, the one
 * idle longest is closed. A server uses a handful of durations. */
#define MB_TIMER_IDLE_LISTS 16
/* A scheduler keeps up to this many freed entries for its next timers: an
 * HTTP request's guard, started and cancelled, then costs no malloc and no
 * free (mimalloc's free of the only block in use on a page retires the
 * page: ~90 instructions). */
#define MB_TIMER_SPARE 64
typedef struct link {
  struct link *prev, *next;        /* next == NULL: not in a list */
} link_t;

typedef struct send_timer {
  link_t link;             /* first: in its duration list, due order */
  mb_sched_t *owner;       /* the scheduler whose list holds it */
  uint64_t id;             /* its id in `timers` */
  mb_pid_t dest;
  mb_pid_t from;           /* the process that started it */
  mb_msg_t *msg;           /* taken by the delivery */
  double due;              /* mb_timer_now() when it is due */
  uint64_t ms;             /* its duration, whole ms: its list */
  uint8_t posted;          /* POSTED: its start is in the owner's command
                              queue; CANCELLED_POSTED: and it was cancelled
                              on the owner's thread meanwhile */
  uint8_t indexed[2];      /* in its table's index BY_FROM, BY_DEST */
  uint8_t orphan;          /* charged to dest, its starter gone: set under
                              the id table's lock (orphan) */
  uint32_t charged;        /* its bytes and its message's, counted in the
                              host's total and the starter's alloc.charged
                              (or dest's, once an orphan) */
  struct send_timer *inext[2], *iprev[2];   /* the other timers of its key
                                               in each index, on this
                                               scheduler */
} send_timer_t;

/* The indexes (see DESIGN): by starter, by destination (another local
 * process than the starter). */
enum { BY_FROM, BY_DEST };

enum { POSTED = 1, CANCELLED_POSTED = 2 };

typedef struct send_table send_table_t;

typedef struct send_list {
  uv_timer_t handle;       /* its data is &list_tag (the closer's mark) */
  link_t entries;          /* the list's head: a circular list */
  link_t idle;             /* in table->idle while idle, else unlinked */
  struct send_list *hnext; /* hash chain */
  send_table_t *table;
  uint64_t ms;             /* the duration, whole ms */
  uint64_t deadline;       /* loop time the handle is armed for */
} send_list_t;

/* A scheduler's lists; created by its first send_after, freed at
 * shutdown. */
struct send_table {
  send_list_t **bucket;    /* by duration; nbucket is a power of two */
  uint32_t nbucket, count;
  link_t idle;             /* idle lists, the one idle longest first */
  uint32_t nidle;
  struct send_timer *spare; /* freed entries (a stack through link.next) */
  uint32_t nspare;
  int late;                /* a posted start went in already due (take_posted) */
  mb_hset_t index[2];      /* BY_FROM, BY_DEST: pid -> the first of the
                              entries its end concerns (see DESIGN) */
  send_table_t *next;      /* every table, for shutdown */
};

/* The starts posted to a scheduler (see DESIGN), oldest first, chained
 * through link.prev (link.next stays NULL: in no list). */
typedef struct inbox {
  mb_lock_t lock;
  struct send_timer *head, *tail;
} inbox_t;

static inbox_t *inboxes;   /* one per scheduler, by id (mb_timer_init) */

static char list_tag;      /* a list's handle->data */
static _Thread_local send_table_t *mine;
static send_table_t *tables;
static pthread_mutex_t tables_lock = PTHREAD_MUTEX_INITIALIZER;

static void link_remove(link_t *l)
{
  l->prev->next = l->next;
  l->next->prev = l->prev;
  l->next = l->prev = NULL;
}

static void link_append(link_t *head, link_t *l)
{
  l->prev = head->prev;
  l->next = head;
  head->prev->next = l;
  head->prev = l;
}

static int link_empty(const link_t *head)
{
  return head->next == head;
}

/* -- The index of timers by the process whose end concerns them ------------ */

/* e's key in index i. */
static mb_pid_t index_key(const send_timer_t *e, int i)
{
  return i == BY_DEST ? e->dest : e->from;
}

/* Whether e goes in the index by destination: a timer to another process
 * of this host. */
static int to_other(mb_pid_t dest, mb_pid_t from)
{
  return dest != from && !mb_id_is_remote(dest);
}

static void index_add(send_table_t *t, send_timer_t *e, int i)
{
  mb_pid_t key = index_key(e, i);
  mb_hslot_t *sl = mb_hset_find(&t->index[i], key);
  e->iprev[i] = NULL;
  e->inext[i] = sl ? (send_timer_t *)(uintptr_t)sl->val : NULL;
  if (e->inext[i])
    e->inext[i]->iprev[i] = e;
  if (sl)
    sl->val = (uintptr_t)e;
  else
    mb_hset_add(&t->index[i], key, (uintptr_t)e);
  e->indexed[i] = 1;
}

static void index_remove(send_table_t *t, send_timer_t *e, int i)
{
  e->indexed[i] = 0;
  if (e->inext[i])
    e->inext[i]->iprev[i] = e->iprev[i];
  if (e->iprev[i])
    e->iprev[i]->inext[i] = e->inext[i];
  else if (e->inext[i])   /* e was the first */
    mb_hset_find(&t->index[i], index_key(e, i))->val = (uintptr_t)e->inext[i];
  else                    /* and the last */
    mb_hset_take(&t->index[i], index_key(e, i), NULL);
}

/* Take e out of its duration list (and the indexes); e's owner's thread. */
static void entry_unlink(send_timer_t *e)
{
  link_remove(&e->link);
  for (int i = BY_FROM; i <= BY_DEST; i++)
    if (e->indexed[i])
      index_remove(mine, e, i);
}

static uint64_t ceil_ms(double t)
{
  uint64_t u = (uint64_t)t;
  return u + ((double)u < t);
}

static uint32_t hash_ms(uint64_t ms, uint32_t nbucket)
{
  return (uint32_t)((ms * 0x9E3779B97F4A7C15ull) >> 32) & (nbucket - 1);
}

/* On e's owner thread (its `mine` is e's table), or at shutdown. */
static void send_timer_free(send_timer_t *e)
{
  if (e->msg)
    mb_msg_free(e->msg);
  if (e->charged) {
    mb_alloc_count(-(long long)e->charged);
    e->charged = 0;
  }
  send_table_t *t = mine;
  if (t && t->nspare < MB_TIMER_SPARE) {
    e->link.next = (link_t *)t->spare;
    t->spare = e;
    t->nspare++;
  } else {
    mb_free(e);
  }
}

static void pending_done(send_timer_t *e);

/* Drop e, one of the timers a process's end concerns, unless a cancel on
 * another thread won (its posted command frees e then). pending: e's
 * charge goes back to whoever carries it, who may live on (a timer to the
 * process that ended, started by another). */
static void drop(send_timer_t *e, int pending)
{
  if (mb_idtab_remove(&timers, e->id)) {
    if (pending)
      pending_done(e);
    if (e->link.next)        /* not detached by a shutdown */
      entry_unlink(e);
    send_timer_free(e);
  }
}

static void mark_orphan(void *obj)
{
  ((send_timer_t *)obj)->orphan = 1;
}

/* e's starter has ended and e goes to another process: charge e to that
 * one (see DESIGN, "A process's end"), or drop e if it is dead too. A
 * timer to another node stays, charged to no process. */
static void orphan(send_timer_t *e)
{
  index_remove(mine, e, BY_FROM);
  if (mb_id_is_remote(e->dest))
    return;
  /* e stays in the index by destination, whose end drops it. */
  mb_proc_t *d = mb_proc_get(e->dest);
  int alive = 0;
  if (d) {
    mb_proc_lock(d);
    alive = !d->dead;
    mb_proc_unlock(d);
  }
  if (!alive) {
    if (d)
      mb_proc_unref(d);
    drop(e, 0);
    return;
  }
  /* Charged before a cancel or the delivery can see the mark and take it
   * back; taken back here if a cancel won meanwhile (e stays as it was:
   * the cancel's command unlinks it). */
  atomic_fetch_add_explicit(&d->alloc.charged, e->charged, memory_order_relaxed);
  if (!mb_idtab_get(&timers, e->id, mark_orphan))
    atomic_fetch_sub_explicit(&d->alloc.charged, e->charged, memory_order_relaxed);
  mb_proc_unref(d);
}

/* On a scheduler holding timers that process pid's end concerns (see
 * DESIGN, "A process's end"): those addressed to it are dropped, whoever
 * started them; those it addressed to others are charged to them. */
static void process_ended(void *arg)
{
  mb_pid_t pid = (mb_pid_t)(uintptr_t)arg;
  if (mine == NULL)
    return;
  mb_hslot_t *sl = mb_hset_find(&mine->index[BY_FROM], pid);
  for (send_timer_t *e = sl ? (send_timer_t *)(uintptr_t)sl->val : NULL, *next; e; e = next) {
    next = e->inext[BY_FROM];
    if (e->dest == pid)
      drop(e, 0);
    else
      orphan(e);
  }
  sl = mb_hset_find(&mine->index[BY_DEST], pid);
  for (send_timer_t *e = sl ? (send_timer_t *)(uintptr_t)sl->val : NULL, *next; e; e = next) {
    next = e->inext[BY_DEST];
    drop(e, 1);
  }
}

static void list_free(uv_handle_t *h)
{
  mb_free((char *)h - offsetof(send_list_t, handle));
}

static void hash_remove(send_table_t *t, send_list_t *l)
{
  send_list_t **pp = &t->bucket[hash_ms(l->ms, t->nbucket)];
  while (*pp != l)
    pp = &(*pp)->hnext;
  *pp = l->hnext;
  t->count--;
}

/* The list's timer went quiet with nothing in it. */
static void list_idle(send_list_t *l)
{
  send_table_t *t = l->table;
  link_append(&t->idle, &l->idle);
  if (++t->nidle > MB_TIMER_IDLE_LISTS) {
    send_list_t *old = (send_list_t *)((char *)t->idle.next - offsetof(send_list_t, idle));
    link_remove(&old->idle);
    t->nidle--;
    hash_remove(t, old);
    uv_close((uv_handle_t *)&old->handle, list_free);
  }
}

static void on_list_timer(uv_timer_t *h);

/* Arm l's timer for e's deadline (never before the loop's now). */
static void list_arm(send_list_t *l, send_timer_t *e)
{
  uint64_t now = uv_now(l->handle.loop);
  uint64_t deadline = l->ms == 0 ? now : ceil_ms(e->due);
  l->deadline = deadline > now ? deadline : now;
  uv_timer_start(&l->handle, on_list_timer, l->deadline - now, 0);
}

/* e, one of its starter's timers, was delivered or cancelled: its bytes
 * no longer count in the starter's limit (the host's total keeps them
 * until e is freed). Once none is left, the starter's next timer may go
 * on any scheduler: the count drops after the delivery. */
static void pending_done(send_timer_t *e)
{
  if (e->orphan) {   /* charged to dest (see orphan) */
    mb_proc_t *d = mb_proc_get(e->dest);
    if (d) {
      atomic_fetch_sub_explicit(&d->alloc.charged, e->charged, memory_order_relaxed);
      mb_proc_unref(d);
    }
    return;
  }
  mb_proc_t *p = mb_proc_get(e->from);
  if (p == NULL)
    return;
  atomic_fetch_sub_explicit(&p->alloc.charged, e->charged, memory_order_relaxed);
  unsigned char n = atomic_load_explicit(&p->timers_pending, memory_order_relaxed);
  while (n != 0 && n != UCHAR_MAX &&
         !atomic_compare_exchange_weak_explicit(&p->timers_pending, &n, n - 1,
                                                memory_order_release,
                                                memory_order_relaxed))
    ;
  mb_proc_unref(p);
}

/* Take e, the head of its list, out and deliver it. */
static void deliver(send_timer_t *e)
{
  entry_unlink(e);
  if (mb_idtab_remove(&timers, e->id)) {
    mb_msg_t *m = e->msg;
    e->msg = NULL;
    mb_proc_send(e->dest, m);
    pending_done(e);
    send_timer_free(e);
  }
  /* Else a cancel on another thread won: its posted command frees e. */
}

static void take_posted(void *arg);

/* After a posted start went in already due: its list's timer is armed for
 * now, after lists due later whose timers came due meanwhile. So deliver
 * every entry due by now, of every list, in due order (a merge of the
 * lists' heads; only in this case, so the scan of the lists is rare). */
static void deliver_late(send_table_t *t, uint64_t now)
{
  t->late = 0;
  for (;;) {
    send_timer_t *first = NULL;
    for (uint32_t i = 0; i < t->nbucket; i++)
      for (send_list_t *l = t->bucket[i]; l; l = l->hnext)
        if (!link_empty(&l->entries)) {
          send_timer_t *e = (send_timer_t *)l->entries.next;
          if (first == NULL || e->due < first->due)
            first = e;
        }
    if (first == NULL || ceil_ms(first->due) > now)
      return;
    deliver(first);
  }
}

static void on_list_timer(uv_timer_t *h)
{
  send_list_t *l = (send_list_t *)((char *)h - offsetof(send_list_t, handle));
  /* Starts posted here first: one that waited in the command queue while
   * this loop was busy may be due before this list's entries. */
  take_posted(&inboxes[mb_sched_id(mb_sched_self())]);
  if (l->table->late)
    deliver_late(l->table, uv_now(h->loop));
  while (!link_empty(&l->entries)) {
    send_timer_t *e = (send_timer_t *)l->entries.next;
    if (l->ms != 0 && ceil_ms(e->due) > l->deadline) {
      list_arm(l, e);
      return;
    }
    deliver(e);
  }
  uv_timer_stop(h);   /* a posted start may have armed it again */
  list_idle(l);
}

static send_table_t *table_new(void)
{
  send_table_t *t = mb_calloc(1, sizeof *t);
  t->nbucket = 16;
  t->bucket = mb_calloc(t->nbucket, sizeof *t->bucket);
  t->idle.next = t->idle.prev = &t->idle;
  pthread_mutex_lock(&tables_lock);
  t->next = tables;
  tables = t;
  pthread_mutex_unlock(&tables_lock);
  return t;
}

static void table_grow(send_table_t *t)
{
  uint32_t n = t->nbucket * 2;
  send_list_t **b = mb_calloc(n, sizeof *b);
  for (uint32_t i = 0; i < t->nbucket; i++)
    for (send_list_t *l = t->bucket[i], *next; l; l = next) {
      next = l->hnext;
      uint32_t j = hash_ms(l->ms, n);
      l->hnext = b[j];
      b[j] = l;
    }
  mb_free(t->bucket);
  t->bucket = b;
  t->nbucket = n;
}

/* The list for ms in t, the calling scheduler's table; made if need be. */
static send_list_t *list_for(send_table_t *t, mb_sched_t *s, uint64_t ms)
{
  for (send_list_t *l = t->bucket[hash_ms(ms, t->nbucket)]; l; l = l->hnext)
    if (l->ms == ms)
      return l;
  if (t->count >= t->nbucket)
    table_grow(t);
  send_list_t *l = mb_calloc(1, sizeof *l);
  uv_timer_init(mb_sched_loop(s), &l->handle);
  l->handle.data = &list_tag;
  l->entries.next = l->entries.prev = &l->entries;
  l->table = t;
  l->ms = ms;
  uint32_t i = hash_ms(ms, t->nbucket);
  l->hnext = t->bucket[i];
  t->bucket[i] = l;
  t->count++;
  return l;
}

/* Put e in its duration list; on its owner's thread (`mine` is the
 * owner's table). */
static void list_insert(send_timer_t *e)
{
  send_list_t *l = list_for(mine, e->owner, e->ms);
  if (l->idle.next) {
    link_remove(&l->idle);
    l->table->nidle--;
  }
  /* A timer started here is due last; one whose start was posted here
   * (see DESIGN) may be due before some. */
  link_t *at = &l->entries;
  while (at->prev != &l->entries && ((send_timer_t *)at->prev)->due > e->due)
    at = at->prev;
  link_append(at, &e->link);
  index_add(l->table, e, BY_FROM);
  if (to_other(e->dest, e->from))
    index_add(l->table, e, BY_DEST);
  /* A list with entries is armed; one whose entries were all cancelled
   * may still be armed for an earlier deadline, and fires then. A posted
   * start may have become the head, due before the armed deadline. */
  if (!uv_is_active((uv_handle_t *)&l->handle) ||
      (l->entries.next == &e->link && l->ms != 0 && ceil_ms(e->due) < l->deadline))
    list_arm(l, e);
}

/* Post e to its owner, another scheduler (see DESIGN). Once in the
 * inbox, e is the owner's: a firing there may take and free it. */
static void inbox_push(inbox_t *in, send_timer_t *e)
{
  mb_sched_t *owner = e->owner;
  e->link.next = e->link.prev = NULL;
  mb_lock(&in->lock);
  if (in->tail)
    in->tail->link.prev = &e->link;
  else
    in->head = e;
  in->tail = e;
  mb_unlock(&in->lock);
  mb_sched_post(owner, take_posted, in);
}

/* Whether process pid lives; for a start to it, marks it addressed
 * (see DESIGN), under its lock, so before its end. */
static int alive_addressed(mb_pid_t pid, int mark)
{
  mb_proc_t *d = mb_proc_get(pid);
  if (d == NULL)
    return 0;
  mb_proc_lock(d);
  int alive = !d->dead;
  if (alive && mark)
    atomic_store_explicit(&d->addressed, 1, memory_order_relaxed);
  mb_proc_unlock(d);
  mb_proc_unref(d);
  return alive;
}

/* On the owner's thread: the starts made on other schedulers (see
 * DESIGN), taken from this scheduler's inbox in the order posted, by the
 * command each post sends or by a firing before it. At shutdown this runs
 * on the main thread, which has no table: the cancelled entries are freed,
 * the others stay in `timers`, which frees them. */
static void take_posted(void *arg)
{
  inbox_t *in = arg;
  mb_lock(&in->lock);
  send_timer_t *e = in->head;
  in->head = in->tail = NULL;
  mb_unlock(&in->lock);
  while (e) {
    send_timer_t *next = (send_timer_t *)e->link.prev;
    e->link.prev = NULL;
    int cancelled = e->posted == CANCELLED_POSTED;
    e->posted = 0;
    if (cancelled) {
      send_timer_free(e);
    } else if (mine && to_other(e->dest, e->from) && !alive_addressed(e->dest, 0)) {
      /* Its destination ended since the start: that end's process_ended
       * may have run here already (see DESIGN). */
      drop(e, 1);
    } else if (mine) {
      list_insert(e);
      if (ceil_ms(e->due) <= uv_now(mb_sched_loop(e->owner)))
        mine->late = 1;
    }
    e = next;
  }
}

int mb_timer_send_after(mb_proc_t *p, double ms, mb_pid_t dest, mb_msg_t *msg,
                        uint64_t *id_out)
{
  mb_sched_t *s = mb_sched_self();
  MB_ASSERT(s != NULL);
  /* Its bytes count in p's limit while it is pending, and in the host's
   * total until freed (only p's thread adds to p's charge, so the check
   * holds: other threads only take away). */
  size_t size = sizeof(send_timer_t) + mb_msg_size(msg);
  size_t charged = atomic_load_explicit(&p->alloc.charged, memory_order_relaxed);
  if (size > UINT32_MAX - charged ||
      (p->alloc.max && atomic_load_explicit(&p->alloc.used, memory_order_relaxed) +
                       charged + size > p->alloc.max)) {
    mb_msg_free(msg);
    return MB_ENOMEM;
  }
  uint64_t whole = whole_ms(ms);
  send_table_t *t = mine;
  if (t == NULL)
    t = mine = table_new();
  send_timer_t *e = t->spare;
  if (e) {
    t->spare = (send_timer_t *)e->link.next;
    t->nspare--;
  } else {
    e = mb_malloc(sizeof *e);
  }
  /* p's timers stay on one scheduler while any is pending (see DESIGN). */
  mb_sched_t *owner = s;
  unsigned char n = atomic_load_explicit(&p->timers_pending, memory_order_acquire);
  if (n == 0) {
    int id = mb_sched_id(s);
    p->timers_sched = id < UINT16_MAX ? (uint16_t)(id + 1) : 0;
  } else if (p->timers_sched != 0) {
    owner = mb_sched_by_id(p->timers_sched - 1);
    if (mb_sched_stuck(owner))   /* its loop waits for it: not the new one */
      owner = s;
  }
  e->owner = owner;
  e->dest = dest;
  e->from = p->pid;
  e->msg = msg;
  e->due = mb_timer_now() + (double)whole;
  e->ms = whole;
  e->posted = owner != s ? POSTED : 0;
  /* No other thread knows the id before we return, so it may be
   * published before the entry is linked. */
  e->charged = 0;
  e->indexed[BY_FROM] = e->indexed[BY_DEST] = e->orphan = 0;
  e->id = mb_idtab_add(&timers, e);
  if (e->id == 0) {
    send_timer_free(e);
    return MB_ETOOMANY;
  }
  if (to_other(dest, p->pid) && !alive_addressed(dest, 1)) {
    /* To a process that has ended: cancelled at once, as Erlang does (a
     * timer and its id, which cancel_timer finds gone). */
    mb_idtab_remove(&timers, e->id);
    *id_out = e->id;
    send_timer_free(e);
    return 0;
  }
  e->charged = (uint32_t)size;
  atomic_fetch_add_explicit(&p->alloc.charged, (unsigned)size, memory_order_relaxed);
  mb_alloc_count((long long)size);
  /* Counted before it can fire (only p's thread adds; a firing or a
   * cancel of an earlier one may take one away meanwhile). */
  while (n != UCHAR_MAX &&
         !atomic_compare_exchange_weak_explicit(&p->timers_pending, &n, n + 1,
                                                memory_order_relaxed,
                                                memory_order_relaxed))
    ;
  *id_out = e->id;   /* e may be freed once posted (inbox_push) */
  if (owner == s)
    list_insert(e);
  else
    inbox_push(&inboxes[mb_sched_id(owner)], e);
  return 0;
}

/* On the owner's thread, after a cancel on another thread won. */
static void unlink_posted(void *arg)
{
  send_timer_t *e = arg;
  if (e->link.next)
    entry_unlink(e);
  send_timer_free(e);
}

int mb_timer_cancel(uint64_t id, double *left_ms)
{
  send_timer_t *e = mb_idtab_remove(&timers, id);
  if (e == NULL)
    return 0;
  double left = e->due - mb_timer_now();
  *left_ms = left > 0 ? left : 0;
  pending_done(e);
  if (mb_sched_self() == e->owner) {
    if (e->posted) {         /* take_posted comes later, and frees it */
      e->posted = CANCELLED_POSTED;
      return 1;
    }
    if (e->link.next)        /* not detached by a shutdown */
      entry_unlink(e);
    send_timer_free(e);
  } else {
    mb_sched_post(e->owner, unlink_posted, e);
  }
  return 1;
}

/* mb_timer_read's look at an entry, under the id table's lock (the entry
 * may be freed once it is released). */
static _Thread_local double read_due;

static void note_due(void *obj)
{
  read_due = ((send_timer_t *)obj)->due;
}

int mb_timer_read(uint64_t id, double *left_ms)
{
  if (mb_idtab_get(&timers, id, note_due) == NULL)
    return 0;
  double left = read_due - mb_timer_now();
  *left_ms = left > 0 ? left : 0;
  return 1;
}

/* -- Shutdown --------------------------------------------------------------- */

/* A closer (scheduler.h): wait timers are the timer handles whose data
 * points at their own mb_timer_t, which starts with the handle; duration
 * lists' handles point at list_tag. A closed list detaches its entries,
 * which the id table still holds (timers_shutdown frees them). */
static int close_timer(uv_handle_t *h)
{
  if (h->type != UV_TIMER)
    return 0;
  if (h->data == &list_tag) {
    send_list_t *l = (send_list_t *)((char *)h - offsetof(send_list_t, handle));
    while (!link_empty(&l->entries))
      link_remove(l->entries.next);
    uv_close(h, list_free);
    return 1;
  }
  if (h->data != (void *)h)
    return 0;
  close_now(h->data);
  return 1;
}

static void drop_table_ref(void *obj)
{
  send_timer_free(obj);
}

/* After the loops closed every handle (and so freed every list). */
static void timers_shutdown(void)
{
  mb_idtab_clear(&timers, drop_table_ref);
  pthread_mutex_lock(&tables_lock);
  while (tables) {
    send_table_t *t = tables;
    tables = t->next;
    while (t->spare) {
      send_timer_t *e = t->spare;
      t->spare = (send_timer_t *)e->link.next;
      mb_free(e);
    }
    mb_free(t->bucket);
    mb_hset_free(&t->index[BY_FROM]);
    mb_hset_free(&t->index[BY_DEST]);
    mb_free(t);
  }
  pthread_mutex_unlock(&tables_lock);
}

void mb_timer_init(void)
{
  inboxes = mb_calloc((size_t)mb_sched_opts.schedulers, sizeof *inboxes);
  for (int i = 0; i < mb_sched_opts.schedulers; i++)
    mb_lock_init(&inboxes[i].lock);
  mb_proc_add_exit_hook(release);
  mb_sched_add_closer(close_timer);
  mb_sched_add_after_loops(timers_shutdown);
}
