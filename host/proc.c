/* proc.c: process records, the process table, mailboxes, links, monitors.
 * See proc.h for the design and the locking rules.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "proc.h"

/* -- The process table ---------------------------------------------------- */

/* Slots live in chunks allocated on first use, so the table never moves and
 * a million-process host pays for what it uses. Each slot is guarded by one
 * of MB_STRIPES locks; the shared free slots (an array) by free_lock. */
#define CHUNK_BITS 16
#define CHUNK_SIZE (1u << CHUNK_BITS)
#define NCHUNKS ((MB_MAX_PROCS >> CHUNK_BITS) + 1)
#define MB_STRIPES 64

typedef struct slot {
  mb_proc_t *p;
  uint32_t gen;        /* generation of the next pid in this slot */
} slot_t;

/* A stripe a cache line: packed, 16 stripes shared a line, and every
 * lookup, spawn and exit of either scheduler took that line from the
 * other (a spawn's lock of its new slot was 3% of a two-scheduler spawn
 * benchmark's samples, the lookups of its sends as much again). */
static slot_t *chunks[NCHUNKS];
static struct {
  mb_lock_t l;
  char pad[64 - sizeof(mb_lock_t)];
} stripes[MB_STRIPES] __attribute__((aligned(64)));
/* The free slots not in a thread's cache: an array, not a list through
 * the slots, so that moving a batch is a copy rather than a walk whose
 * every step waits for a slot's line (most were freed on the other
 * scheduler). Grows as needed; under free_lock. */
static mb_lock_t free_lock = MB_LOCK_INIT;
static uint32_t *free_v;
static size_t free_n, free_cap;
/* Slots below next_slot exist: the chunk holding a slot is allocated before
 * next_slot passes it (release), so a reader that loads next_slot (acquire)
 * may index chunks without the lock. */
static atomic_uint next_slot = 1;
static atomic_uint live;
static atomic_uint_fast64_t ref_counter;
static pthread_once_t table_once = PTHREAD_ONCE_INIT;

void (*mb_proc_on_empty)(void);
void (*mb_proc_on_runnable)(mb_proc_t *p);
static void (*exit_hooks[MB_PROC_EXIT_HOOKS])(mb_proc_t *p);
static int nexit_hooks;

void mb_proc_add_exit_hook(void (*fn)(mb_proc_t *p))
{
  MB_ASSERT(nexit_hooks < MB_PROC_EXIT_HOOKS);
  if (nexit_hooks < MB_PROC_EXIT_HOOKS)
    exit_hooks[nexit_hooks++] = fn;
}

static void run_exit_hooks(mb_proc_t *p)
{
  for (int i = 0; i < nexit_hooks; i++)
    exit_hooks[i](p);
}

static void table_init(void)
{
  for (int i = 0; i < MB_STRIPES; i++)
    mb_lock_init(&stripes[i].l);
}

static slot_t *slot_at(uint32_t i)
{
  return &chunks[i >> CHUNK_BITS][i & (CHUNK_SIZE - 1)];
}

static mb_lock_t *stripe_of(uint32_t i)
{
  return &stripes[i % MB_STRIPES].l;
}

/* Free slots pass through a small cache per thread: a process is often
 * made on one scheduler and ends on another, and the two took free_lock in
 * turn for every process (with two schedulers, spawn + exit spent 5.8% of
 * its time in pthread_mutex_lock, most of it here). A thread moves
 * SLOT_BATCH slots between its cache and the shared list at a time. A
 * thread that exits with slots cached loses them (at most SLOT_CACHE: the
 * threads that end processes live as long as the host). */
#define SLOT_CACHE 64
#define SLOT_BATCH 32
static _Thread_local struct {
  int n;
  uint32_t v[SLOT_CACHE];
} slot_cache;

/* Take a free slot; 0 when the table is full. */
static uint32_t slot_alloc(void)
{
  if (slot_cache.n)
    return slot_cache.v[--slot_cache.n];
  uint32_t i = 0;
  mb_lock(&free_lock);
  if (free_n) {
    size_t take = free_n < SLOT_BATCH ? free_n : SLOT_BATCH;
    free_n -= take;
    memcpy(slot_cache.v, free_v + free_n, take * sizeof *free_v);
    slot_cache.n = (int)take;
  }
  if (slot_cache.n) {
    i = slot_cache.v[--slot_cache.n];
  } else if (atomic_load_explicit(&next_slot, memory_order_relaxed) <= MB_MAX_PROCS) {
    i = atomic_load_explicit(&next_slot, memory_order_relaxed);
    if (chunks[i >> CHUNK_BITS] == NULL)
      chunks[i >> CHUNK_BITS] = mb_calloc(CHUNK_SIZE, sizeof(slot_t));
    atomic_store_explicit(&next_slot, i + 1, memory_order_release);
  }
  mb_unlock(&free_lock);
  return i;
}

static void slot_release(uint32_t i)
{
  if (slot_cache.n == SLOT_CACHE) {
    mb_lock(&free_lock);
    if (free_n + SLOT_BATCH > free_cap) {
      free_cap = free_cap ? 2 * free_cap : 1024;
      free_v = mb_realloc(free_v, free_cap * sizeof *free_v);
    }
    slot_cache.n -= SLOT_BATCH;
    memcpy(free_v + free_n, slot_cache.v + slot_cache.n, SLOT_BATCH * sizeof *free_v);
    free_n += SLOT_BATCH;
    mb_unlock(&free_lock);
  }
  slot_cache.v[slot_cache.n++] = i;
}

static uint32_t pid_slot(mb_pid_t pid)
{
  return (uint32_t)(pid & MB_MAX_PROCS);
}

/* -- Reasons ---------------------------------------------------------------- */

/* The host's own reasons and copies of a reason for each link and
 * monitor: small, and a process's exit cannot be half done. */
static mb_msg_t *dup_reason(const mb_msg_t *m)
{
  return mb_must(mb_msg_dup(m));
}

static mb_msg_t *host_reason(const char *s)
{
  return mb_must(mb_msg_string(s));
}

/* Remote pids go to the distribution layer's hooks (below). */
static void remote_send(mb_pid_t to, mb_msg_t *m);

/* -- Lifetime ------------------------------------------------------------- */

/* Free queued messages (counted in the host's total while queued). */
static void msgs_free(mb_msg_t *m)
{
  while (m) {
    mb_msg_t *next = m->next;
    mb_alloc_count(-(long long)mb_msg_size(m));
    mb_msg_free(m);
    m = next;
  }
}

/* Process records pass through a cache per thread and a shared pool
 * instead of going back to the allocator: a record is made on one
 * scheduler and often freed on another, and mimalloc gives a page back to
 * the system (madvise, which on two cores means a TLB shootdown on the
 * other) as soon as its last block is free - a batch of short-lived
 * processes emptied and refilled the same pages: 3,128 madvise calls in a
 * spawn benchmark of 200,000 processes, 408 with the pool (spawn + message
 * 1.90 -> 1.81 us). A thread moves REC_BATCH records between its cache and
 * the pool at a time; the pool keeps at most REC_POOL_MAX (~2.5 MB), the
 * rest are freed. Off under ASan, which must see a freed record as freed. */
#if defined(__SANITIZE_ADDRESS__)
static mb_proc_t *rec_alloc(void) { return mb_calloc(1, sizeof(mb_proc_t)); }
static void rec_free(mb_proc_t *p) { mb_free(p); }
#else
#define REC_CACHE 64
#define REC_BATCH 32
#define REC_POOL_MAX 4096
static _Thread_local struct {
  int n;
  mb_proc_t *v[REC_CACHE];
} rec_cache;
/* The pool is an array, so that taking a batch copies pointers instead of
 * walking a list through the records, each step a cache miss on a record
 * the other scheduler freed. Under rec_lock. */
static mb_proc_t *rec_pool[REC_POOL_MAX];
static int rec_pool_n;
static mb_lock_t rec_lock = MB_LOCK_INIT;

static mb_proc_t *rec_alloc(void)
{
  if (rec_cache.n == 0) {
    mb_lock(&rec_lock);
    int take = rec_pool_n < REC_BATCH ? rec_pool_n : REC_BATCH;
    rec_pool_n -= take;
    memcpy(rec_cache.v, rec_pool + rec_pool_n, take * sizeof *rec_pool);
    rec_cache.n = take;
    mb_unlock(&rec_lock);
    if (rec_cache.n == 0)
      return mb_calloc(1, sizeof(mb_proc_t));
  }
  mb_proc_t *r = rec_cache.v[--rec_cache.n];
  memset(r, 0, sizeof *r);
  return r;
}

static void rec_free(mb_proc_t *p)
{
  if (rec_cache.n == REC_CACHE) {
    mb_lock(&rec_lock);
    int keep = REC_POOL_MAX - rec_pool_n < REC_BATCH ? REC_POOL_MAX - rec_pool_n : REC_BATCH;
    rec_cache.n -= REC_BATCH;
    memcpy(rec_pool + rec_pool_n, rec_cache.v + rec_cache.n, keep * sizeof *rec_pool);
    rec_pool_n += keep;
    mb_unlock(&rec_lock);
    for (int i = keep; i < REC_BATCH; i++)
      mb_free(rec_cache.v[rec_cache.n + i]);
  }
  rec_cache.v[rec_cache.n++] = p;
}
#endif

/* Every process keeps its record, hibernated or not: it must stay in
 * mimalloc's 448-byte size class (proc.h). The debug builds' two thread
 * words (the sanitizers' builds, where the allocator is theirs) go past. */
#ifndef MB_DEBUG
_Static_assert(sizeof(mb_proc_t) <= 448, "mb_proc_t grew out of its size class");
#endif

static void proc_free(mb_proc_t *p)
{
  msgs_free(p->in_head);
  msgs_free(p->q_head);
  if (p->exit_reason)
    mb_msg_free(p->exit_reason);
  if (p->boot_msg)
    mb_msg_free(p->boot_msg);
  mb_alloc_count(-(long long)(atomic_load(&p->held) + sizeof *p));
  mb_hset_free(&p->links);
  mb_hset_free(&p->watchers);
  mb_hset_free(&p->monitoring);
  mb_hset_free(&p->aliases);
  rec_free(p);
}

int mb_proc_new(size_t max_memory, mb_proc_t **out)
{
  pthread_once(&table_once, table_init);
  /* While the processes hold more than --max-memory, no new one starts
   * (a spawn storm of small processes outran the killer of the biggest). */
  if (mb_alloc_over_cap())
    return MB_ENOMEM;
  uint32_t i = slot_alloc();
  if (i == 0)
    return MB_ETOOMANY;
  mb_proc_t *p = rec_alloc();
  /* The record counts in the host's total (not in max_memory: a process
   * cannot shrink it): two million hibernated processes are mostly their
   * records. */
  mb_alloc_count((long long)sizeof *p);
  mb_lock_init(&p->lock);
  atomic_init(&p->refs, 1);
  p->alloc.limit = p->alloc.max = max_memory;
  p->in_tail = &p->in_head;
  p->q_tail = &p->q_head;
  p->q_scan = &p->q_head;
  p->q_mark = &p->q_head;
  p->status = MB_PS_RUNNABLE;
  mb_lock_t *lk = stripe_of(i);
  mb_lock(lk);
  slot_t *s = slot_at(i);
  p->pid = ((mb_pid_t)s->gen << MB_PID_SLOT_BITS) | i;
  s->gen++;
  s->p = p;
  mb_unlock(lk);
  atomic_fetch_add(&live, 1);
  *out = p;
  return 0;
}

mb_proc_t *mb_proc_get(mb_pid_t pid)
{
  uint32_t i = pid_slot(pid);
  if (i == 0 || i >= atomic_load_explicit(&next_slot, memory_order_acquire))
    return NULL;
  mb_lock_t *lk = stripe_of(i);
  mb_lock(lk);
  mb_proc_t *p = slot_at(i)->p;
  if (p && p->pid == pid)
    atomic_fetch_add_explicit(&p->refs, 1, memory_order_relaxed);
  else
    p = NULL;
  mb_unlock(lk);
  return p;
}

void mb_proc_unref(mb_proc_t *p)
{
  if (atomic_fetch_sub_explicit(&p->refs, 1, memory_order_acq_rel) == 1)
    proc_free(p);
}

/* Remove p from the table: lookups fail from now on. */
static void table_remove(mb_proc_t *p)
{
  uint32_t i = pid_slot(p->pid);
  mb_lock_t *lk = stripe_of(i);
  mb_lock(lk);
  slot_at(i)->p = NULL;
  mb_unlock(lk);
  slot_release(i);
}

void mb_proc_foreach(void (*fn)(mb_proc_t *p, void *ud), void *ud)
{
  uint32_t n = atomic_load_explicit(&next_slot, memory_order_acquire);
  for (uint32_t i = 1; i < n; i++) {
    if (chunks[i >> CHUNK_BITS] == NULL)
      continue;
    mb_lock_t *lk = stripe_of(i);
    mb_lock(lk);
    mb_proc_t *p = slot_at(i)->p;
    if (p)
      atomic_fetch_add(&p->refs, 1);
    mb_unlock(lk);
    if (p) {
      fn(p, ud);
      mb_proc_unref(p);
    }
  }
}

mb_ref_t mb_proc_newref(void)
{
  return atomic_fetch_add(&ref_counter, 1) + 1;
}

/* The mark is the private queue's end, without the lock: messages still
 * in the inbox are tested by the marked receive, which drains them, and
 * the marks made after it are past them (draining here instead cost a
 * spawn_monitor 4%). */
mb_ref_t mb_proc_make_ref(mb_proc_t *p)
{
  MB_ASSERT_OWNER(p);
  p->mark_ref = mb_proc_newref();
  p->q_mark = p->q_tail;
  return p->mark_ref;
}

/* -- Mailbox -------------------------------------------------------------- */

static int is_signal(uint32_t kind)
{
  return kind == MB_MSG_EXIT || kind == MB_MSG_KILL;
}

/* If p holds more than its max_memory (heap, charges and queued messages),
 * queue the kill that ends it "out of memory" - once. Lock held; returns 1
 * if it did (the caller wakes p). */
static int mem_kill_locked(mb_proc_t *p)
{
  if (!p->alloc.max || p->mem_killed ||
      atomic_load_explicit(&p->alloc.used, memory_order_relaxed) +
      atomic_load_explicit(&p->alloc.charged, memory_order_relaxed) +
      atomic_load_explicit(&p->mailbox_bytes, memory_order_relaxed) <= p->alloc.max)
    return 0;
  mb_msg_t *kill = mb_msg_string("out of memory");
  if (kill == NULL)
    return 0;
  p->mem_killed = 1;
  kill->kind = MB_MSG_KILL;
  kill->from = p->pid;
  kill->next = NULL;
  *p->in_tail = kill;
  p->in_tail = &kill->next;
  atomic_fetch_add_explicit(&p->mailbox_len, 1, memory_order_relaxed);
  atomic_fetch_add_explicit(&p->mailbox_bytes, mb_msg_size(kill), memory_order_relaxed);
  mb_alloc_count((long long)mb_msg_size(kill));
  atomic_fetch_add(&p->nsignals, 1);
  return 1;
}

void mb_proc_push(mb_proc_t *p, mb_msg_t *msg)
{
  int wake = 0;
  int sig = is_signal(msg->kind);
  msg->next = NULL;
  mb_proc_lock(p);
  if (p->dead || (msg->kind == MB_MSG_USER && msg->ref &&
                  !mb_hset_find(&p->aliases, msg->ref))) {   /* (see Aliases) */
    mb_proc_unlock(p);
    mb_msg_free(msg);
    return;
  }
  *p->in_tail = msg;
  p->in_tail = &msg->next;
  atomic_fetch_add_explicit(&p->mailbox_len, 1, memory_order_relaxed);
  /* Its functions' code counts in p's mailbox but not again in the host's
   * total (msg.h, mb_msg_cost). */
  atomic_fetch_add_explicit(&p->mailbox_bytes, mb_msg_cost(msg), memory_order_relaxed);
  mb_alloc_count((long long)mb_msg_size(msg));
  if (sig)
    atomic_fetch_add(&p->nsignals, 1);
  /* Queued messages count toward max_memory (as Erlang's max_heap_size
   * with messages on the heap), with its heap and its pending timers
   * (alloc.charged): over it, the process is killed with
   * reason "out of memory" - once - and the message stays queued. */
  if (!sig && mem_kill_locked(p))
    sig = 1;
  /* Signals end any wait; messages only a receive. A running owner ends
   * a wait without the lock (end_wait in lib/run.c), so `wait` is read
   * here as the atomic it is written as there; a message needs no wake-up
   * unless WAITING - the way into the next wait looks at the inbox under
   * the lock. */
  if (sig || (p->status == MB_PS_WAITING
              && __atomic_load_n(&p->wait, __ATOMIC_RELAXED) == MB_WAIT_RECV))
    wake = mb_proc_wake_locked(p);
  mb_proc_unlock(p);
  if (wake)
    mb_proc_on_runnable(p);
}

void mb_proc_send(mb_pid_t pid, mb_msg_t *msg)
{
  if (mb_id_is_remote(pid)) {
    remote_send(pid, msg);
    return;
  }
  mb_proc_t *p = mb_proc_get(pid);
  if (p == NULL) {
    mb_msg_free(msg);
    return;
  }
  mb_proc_push(p, msg);
  mb_proc_unref(p);
}

/* -- Sets of links, monitors and aliases ------------------------------------
 *
 * Each is a hash by ref (hset.h): p->monitoring ref -> target,
 * p->watchers ref -> watcher, p->aliases ref -> 0, and p->links pid -> pid
 * (a link's key is the pid).
 * Lists were linear to search: 1,000,000 monitors of one process took its
 * watcher's exit O(n^2) (a scheduler stuck in C for minutes), as did a
 * million aliases their making, and a process linked to 100,000 others
 * (a supervisor's children) paid a scan of all of them for each exit.
 *
 * p->monitoring is a set, not a list, also because every DOWN that reaches
 * the process takes its monitor out (mb_proc_drain), so the set holds only
 * live monitors - a process that monitors many short-lived ones would
 * otherwise keep them all - and a DOWN whose monitor is gone (demonitored
 * while the target was already sending it) is dropped, as Erlang promises:
 * after demonitor returns, no DOWN for its ref comes. */

/* Monitors and aliases count in their process's max_memory and in the
 * host's total (alloc.charged, as pending timers do), MB_PROC_SET_ENTRY
 * bytes each: the slot in the process's own set at its load (a half to an
 * eighth full) and, for a monitor, the target's slot. Without it a process
 * capped at 4 MB held 800 MB of them. Charged by the owner as each is
 * added or taken out, and all at once at exit. */
static void charge(mb_proc_t *p, long long d)
{
  if (d >= 0)
    atomic_fetch_add_explicit(&p->alloc.charged, (unsigned)d, memory_order_relaxed);
  else
    atomic_fetch_sub_explicit(&p->alloc.charged, (unsigned)-d, memory_order_relaxed);
  mb_alloc_count(d);
}

static void set_charge(mb_proc_t *p, long long entries)
{
  charge(p, entries * MB_PROC_SET_ENTRY);
}

int mb_proc_room(const mb_proc_t *p, size_t n)
{
  size_t charged = atomic_load_explicit(&p->alloc.charged, memory_order_relaxed);
  if (p->alloc.max) {
    size_t held = atomic_load_explicit(&p->alloc.used, memory_order_relaxed) + charged +
                  atomic_load_explicit(&p->mailbox_bytes, memory_order_relaxed);
    if (n > p->alloc.max || held > p->alloc.max - n)
      return 1;
  }
  return n > UINT32_MAX - charged ? 2 : 0;
}

/* p->monitoring's entries, counted as they come and go (set_charge). */
static void monitoring_add(mb_proc_t *p, mb_ref_t ref, mb_pid_t target)
{
  mb_hset_add(&p->monitoring, ref, target);
  set_charge(p, 1);
}

static int monitoring_take(mb_proc_t *p, mb_ref_t ref, uint64_t *target)
{
  if (!mb_hset_take(&p->monitoring, ref, target))
    return 0;
  set_charge(p, -1);
  return 1;
}

/* p->links's entries, charged to p as they come and go (proc.h: both ends
 * of a link hold one, and each pays for its own), under p's lock: the other
 * end and the distribution layer add and take entries too, and the exit,
 * which takes the whole set under the lock, gives back exactly the ones it
 * took. */
/* An entry another process (or node) adds to p's sets, which p did not
 * ask for (a link to it, a remote monitor of it) costs it `cost`: MB_ENOPROC
 * when p is dead, MB_ENOMEM over the 4 GiB alloc.charged holds (the entry
 * is not made), else 0. Lock held. */
static int incoming_room(const mb_proc_t *p, size_t cost)
{
  if (p->dead)
    return MB_ENOPROC;
  return mb_proc_room(p, cost) == 2 ? MB_ENOMEM : 0;
}

/* After such an entry: past its max_memory p ends "out of memory", as a
 * queued message makes it. Lock held; returns whether the caller must call
 * mb_proc_on_runnable(p) once it has unlocked p. */
static int incoming_kill(mb_proc_t *p)
{
  return mem_kill_locked(p) && mb_proc_wake_locked(p);
}

/* Add pid to p's links unless there; returns 1 if it was added. */
static int link_add(mb_proc_t *p, mb_pid_t pid)
{
  MB_ASSERT_LOCKED(p);
  if (mb_hset_find(&p->links, pid))
    return 0;
  mb_hset_add(&p->links, pid, pid);
  charge(p, (long long)mb_proc_link_cost(pid));
  return 1;
}

static int link_del(mb_proc_t *p, mb_pid_t pid)
{
  MB_ASSERT_LOCKED(p);
  if (!mb_hset_take(&p->links, pid, NULL))
    return 0;
  charge(p, -(long long)mb_proc_link_cost(pid));
  return 1;
}

/* A link another process (or node) makes to p: charged like p's own (see
 * incoming_room and incoming_kill; *wake as the latter's answer). */
static int link_incoming(mb_proc_t *p, mb_pid_t pid, int *wake)
{
  MB_ASSERT_LOCKED(p);
  *wake = 0;
  if (!p->dead && mb_hset_find(&p->links, pid))
    return 0;
  int rc = incoming_room(p, mb_proc_link_cost(pid));
  if (rc == 0) {
    link_add(p, pid);
    *wake = incoming_kill(p);
  }
  return rc;
}

/* A DOWN for p came out of its inbox: take its monitor out. Returns 0 when
 * it had none (the DOWN must then be dropped). */
static int monitor_fired(mb_proc_t *p, mb_ref_t ref)
{
  return monitoring_take(p, ref, NULL);
}

/* -- Aliases --------------------------------------------------------------
 * Made and dropped by the owner, under its lock: a push (under the lock)
 * drops a message sent through an alias that is gone, as Erlang does on
 * its arrival, so that a late reply to a call that timed out is neither
 * queued nor counted in max_memory, and wakes no one. The owner reads the
 * set without the lock (it alone writes it). */

void mb_proc_alias(mb_proc_t *p, mb_ref_t ref)
{
  MB_ASSERT_OWNER(p);
  if (!mb_hset_find(&p->aliases, ref)) {
    mb_proc_lock(p);
    mb_hset_add(&p->aliases, ref, 0);
    mb_proc_unlock(p);
    set_charge(p, 1);
    if (mb_proc_remote_alias)
      mb_proc_remote_alias(p->pid, ref, 1);
  }
}

int mb_proc_unalias(mb_proc_t *p, mb_ref_t ref)
{
  MB_ASSERT_OWNER(p);
  mb_proc_lock(p);
  int was = mb_hset_take(&p->aliases, ref, NULL);
  mb_proc_unlock(p);
  if (was)
    set_charge(p, -1);
  if (was && mb_proc_remote_alias)
    mb_proc_remote_alias(p->pid, ref, 0);
  return was;
}

int mb_proc_has_alias(const mb_proc_t *p, mb_ref_t ref)
{
  return mb_hset_find(&p->aliases, ref) != NULL;
}

mb_msg_t *mb_proc_take_msg(mb_proc_t *p, mb_msg_t **pm)
{
  MB_ASSERT_OWNER(p);
  mb_msg_t *m = *pm;
  *pm = m->next;
  if (p->q_tail == &m->next)
    p->q_tail = pm;
  if (p->q_scan == &m->next)
    p->q_scan = pm;
  if (p->q_mark == &m->next)
    p->q_mark = pm;
  if (p->recv_testing == m)
    p->recv_testing = NULL;
  atomic_fetch_sub_explicit(&p->mailbox_len, 1, memory_order_relaxed);
  atomic_fetch_sub_explicit(&p->mailbox_bytes, mb_msg_cost(m), memory_order_relaxed);
  mb_alloc_count(-(long long)mb_msg_size(m));
  return m;
}

int mb_proc_drain(mb_proc_t *p)
{
  MB_ASSERT_OWNER(p);
  mb_proc_lock(p);
  mb_msg_t **fresh = p->q_tail;
  if (p->in_head) {
    *p->q_tail = p->in_head;
    p->q_tail = p->in_tail;
    p->in_head = NULL;
    p->in_tail = &p->in_head;
  }
  p->woken = 0;
  p->timed_out = p->expired;
  mb_proc_unlock(p);
  /* The messages just moved: a DOWN takes its monitor out, or is dropped
   * if the monitor is gone (see "The monitors a process holds"). */
  for (mb_msg_t **pm = fresh; *pm; ) {
    mb_msg_t *m = *pm;
    if (m->kind == MB_MSG_DOWN && !monitor_fired(p, m->ref))
      mb_msg_free(mb_proc_take_msg(p, pm));
    else
      pm = &m->next;
  }
  if (atomic_load(&p->nsignals) == 0)
    return p->exit_reason != NULL;
  /* Walk the private queue for signals, in order with the messages. */
  mb_msg_t **pm = &p->q_head;
  while (*pm) {
    mb_msg_t *m = *pm;
    if (!is_signal(m->kind)) {
      pm = &m->next;
      continue;
    }
    atomic_fetch_sub(&p->nsignals, 1);
    if (m->kind == MB_MSG_EXIT && m->ref == MB_EXIT_LINK) {
      /* The linked process died: the link is gone, whatever p does. A
       * link p took away (mb.unlink) while the signal was on its way has
       * no effect any more: the signal is dropped (Erlang's promise). An
       * exit signal sent with mb.exit leaves a link as it was. */
      mb_proc_lock(p);
      int had = link_del(p, m->from);
      mb_proc_unlock(p);
      if (!had) {
        mb_msg_free(mb_proc_take_msg(p, pm));
        continue;
      }
    }
    if (m->kind == MB_MSG_EXIT && p->trap_exit) {
      m->kind = MB_MSG_TRAPPED;  /* stays, and is received as an EXIT message */
      pm = &m->next;
      continue;
    }
    mb_proc_take_msg(p, pm);
    if (m->kind == MB_MSG_EXIT && mb_msg_is_normal(m)) {
      mb_msg_free(m);
      continue;
    }
    if (p->exit_reason == NULL) {
      if (m->kind == MB_MSG_KILL && mb_msg_is_kill(m)) {
        mb_msg_free(m);
        p->exit_reason = host_reason("killed");
      } else {
        /* Other signals, and kills that carry their own reason (the
         * host's, such as "out of memory"), end it with their reason. */
        m->kind = MB_MSG_USER;
        m->next = NULL;
        p->exit_reason = m;
      }
    } else {
      mb_msg_free(m);
    }
  }
  return p->exit_reason != NULL;
}

/* -- Remote pids (see proc.h; the distribution layer sets the hooks) ------- */

void (*mb_proc_remote_send)(mb_pid_t to, mb_msg_t *m);
void (*mb_proc_remote_link)(mb_pid_t self, mb_pid_t remote, int on);
void (*mb_proc_remote_monitor)(mb_pid_t self, mb_pid_t remote, mb_ref_t ref, int on);
void (*mb_proc_remote_alias)(mb_pid_t self, mb_ref_t ref, int on);

static void remote_send(mb_pid_t to, mb_msg_t *m)
{
  if (mb_proc_remote_send)
    mb_proc_remote_send(to, m);
  else
    mb_msg_free(m);
}

static void remote_link_exit(mb_pid_t to, mb_pid_t from, mb_msg_t *reason)
{
  reason->kind = MB_MSG_LINK_EXIT;
  reason->from = from;
  remote_send(to, reason);
}

/* A link to a remote pid is added on this side at once; the distribution
 * layer tells the other node, and an exit signal "noconnection" comes back
 * if the node cannot be reached (as in Erlang, a remote link never fails). */
static int remote_link(mb_proc_t *self, mb_pid_t pid)
{
  if (mb_proc_remote_link == NULL)
    return MB_ENOPROC;
  mb_proc_lock(self);
  int added = link_add(self, pid);
  mb_proc_unlock(self);
  if (added)
    mb_proc_remote_link(self->pid, pid, 1);
  return 0;
}

static mb_msg_t *down_msg(mb_pid_t from, mb_ref_t ref, mb_msg_t *reason);

static mb_ref_t remote_monitor(mb_proc_t *self, mb_pid_t pid, mb_ref_t ref)
{
  monitoring_add(self, ref, pid);
  if (mb_proc_remote_monitor == NULL) {
    mb_proc_push(self, down_msg(pid, ref, host_reason("noproc")));
    return ref;
  }
  mb_proc_remote_monitor(self->pid, pid, ref, 1);
  return ref;
}

int mb_proc_link_remote(mb_pid_t local, mb_pid_t remote)
{
  mb_proc_t *p = mb_proc_get(local);
  int rc = MB_ENOPROC, wake = 0;
  if (p) {
    mb_proc_lock(p);
    rc = link_incoming(p, remote, &wake);
    mb_proc_unlock(p);
    if (wake)
      mb_proc_on_runnable(p);
    mb_proc_unref(p);
  }
  return rc;
}

int mb_proc_unlink_remote(mb_pid_t local, mb_pid_t remote)
{
  mb_proc_t *p = mb_proc_get(local);
  int was = 0;
  if (p) {
    mb_proc_lock(p);
    was = !p->dead && link_del(p, remote);
    mb_proc_unlock(p);
    mb_proc_unref(p);
  }
  return was;
}

/* A remote watcher is charged to the process it watches (proc.h): added
 * and taken out under p's lock, so that the exit, which takes the whole set
 * under the lock, uncharges exactly the ones it took. */
int mb_proc_watch_remote(mb_pid_t local, mb_pid_t watcher, mb_ref_t ref)
{
  mb_proc_t *p = mb_proc_get(local);
  int rc = MB_ENOPROC, wake = 0;
  if (p) {
    mb_proc_lock(p);
    rc = incoming_room(p, MB_PROC_REMOTE_WATCH);
    if (rc == 0 && p->mem_killed)
      rc = MB_ENOMEM;   /* (its DOWN would say "out of memory") */
    if (rc == 0) {
      mb_hset_add(&p->watchers, ref, watcher);
      charge(p, MB_PROC_REMOTE_WATCH);
      wake = incoming_kill(p);
    }
    mb_proc_unlock(p);
    if (wake)
      mb_proc_on_runnable(p);
    mb_proc_unref(p);
  }
  return rc;
}

int mb_proc_unwatch_remote(mb_pid_t local, mb_ref_t ref)
{
  mb_proc_t *p = mb_proc_get(local);
  int was = 0;
  if (p) {
    mb_proc_lock(p);
    /* Only a remote watcher's entry: a local one of the same ref is its
     * watcher's to take (mb_proc_demonitor), and charged there. */
    mb_hslot_t *s = mb_hset_find(&p->watchers, ref);
    if (s && mb_id_is_remote(s->val)) {
      was = mb_hset_take(&p->watchers, ref, NULL);
      charge(p, -MB_PROC_REMOTE_WATCH);
    }
    mb_proc_unlock(p);
    mb_proc_unref(p);
  }
  return was;
}

/* -- Links and monitors --------------------------------------------------- */

int mb_proc_link(mb_proc_t *self, mb_pid_t pid)
{
  MB_ASSERT_OWNER(self);
  if (pid == self->pid)
    return 0;
  if (mb_id_is_remote(pid))
    return remote_link(self, pid);
  mb_proc_t *t = mb_proc_get(pid);
  int rc = MB_ENOPROC, wake = 0;
  if (t) {
    mb_proc_lock(t);
    rc = link_incoming(t, self->pid, &wake);
    mb_proc_unlock(t);
    if (wake)
      mb_proc_on_runnable(t);
    mb_proc_unref(t);
  }
  if (rc < 0)
    return rc;
  mb_proc_lock(self);
  link_add(self, pid);
  mb_proc_unlock(self);
  return 0;
}

void mb_proc_unlink(mb_proc_t *self, mb_pid_t pid)
{
  MB_ASSERT_OWNER(self);
  mb_proc_lock(self);
  int was = link_del(self, pid);
  mb_proc_unlock(self);
  if (mb_id_is_remote(pid)) {
    if (was && mb_proc_remote_link)
      mb_proc_remote_link(self->pid, pid, 0);
    return;
  }
  mb_proc_t *t = mb_proc_get(pid);
  if (t) {
    mb_proc_lock(t);
    link_del(t, self->pid);
    mb_proc_unlock(t);
    mb_proc_unref(t);
  }
}

static mb_msg_t *down_msg(mb_pid_t from, mb_ref_t ref, mb_msg_t *reason)
{
  reason->kind = MB_MSG_DOWN;
  reason->from = from;
  reason->ref = ref;
  return reason;
}

mb_ref_t mb_proc_monitor(mb_proc_t *self, mb_pid_t pid)
{
  MB_ASSERT_OWNER(self);
  mb_ref_t ref = mb_proc_make_ref(self);
  if (mb_id_is_remote(pid))
    return remote_monitor(self, pid, ref);
  mb_proc_t *t = mb_proc_get(pid);
  int ok = 0;
  if (t) {
    mb_proc_lock(t);
    if (!t->dead) {
      mb_hset_add(&t->watchers, ref, self->pid);
      ok = 1;
    }
    mb_proc_unlock(t);
    mb_proc_unref(t);
  }
  monitoring_add(self, ref, pid);
  if (!ok)
    mb_proc_push(self, down_msg(pid, ref, host_reason("noproc")));
  return ref;
}

int mb_proc_demonitor(mb_proc_t *self, mb_ref_t ref)
{
  MB_ASSERT_OWNER(self);
  mb_pid_t target;
  if (!monitoring_take(self, ref, &target))
    return 0;
  if (mb_id_is_remote(target)) {
    if (mb_proc_remote_monitor)
      mb_proc_remote_monitor(self->pid, target, ref, 0);
    return 1;
  }
  mb_proc_t *t = mb_proc_get(target);
  if (t) {
    mb_proc_lock(t);
    mb_hset_take(&t->watchers, ref, NULL);
    mb_proc_unlock(t);
    mb_proc_unref(t);
  }
  return 1;
}

void mb_proc_move_port_msgs(mb_proc_t *p, uint64_t port, mb_pid_t to)
{
  MB_ASSERT_OWNER(p);
  mb_proc_drain(p);
  for (mb_msg_t **pm = &p->q_head; *pm; ) {
    mb_msg_t *m = *pm;
    if (m->kind != MB_MSG_USER || m->port != port) {
      pm = &m->next;
      continue;
    }
    mb_proc_send(to, mb_proc_take_msg(p, pm));
  }
}

void mb_proc_exit_signal(mb_pid_t pid, mb_pid_t from, mb_msg_t *reason, int kill)
{
  reason->kind = kill ? MB_MSG_KILL : MB_MSG_EXIT;
  reason->from = from;
  reason->ref = 0;
  mb_proc_send(pid, reason);
}

void mb_proc_link_exit(mb_pid_t pid, mb_pid_t from, mb_msg_t *reason)
{
  reason->kind = MB_MSG_EXIT;
  reason->from = from;
  reason->ref = MB_EXIT_LINK;
  mb_proc_send(pid, reason);
}

/* -- The host's stop (proc.h) ---------------------------------------------- */

static atomic_int stopping;
/* The processes the stop waits for, plus one that mb_proc_stop holds while
 * it looks for them, so that the count cannot reach 0 before it has found
 * them all. */
static atomic_long stop_left;
void (*mb_proc_on_stopped)(void);

int mb_proc_stopping(void)
{
  return atomic_load(&stopping);
}

long mb_proc_stop_left(void)
{
  return atomic_load(&stop_left);
}

static void stop_done(void)
{
  if (atomic_fetch_sub(&stop_left, 1) == 1 && mb_proc_on_stopped)
    mb_proc_on_stopped();
}

/* Under p's lock: wait for p, unless it ended or is waited for already.
 * Returns 1 if it is newly waited for. */
static int stop_wait_locked(mb_proc_t *p)
{
  if (p->dead || (p->stop & MB_STOP_WAITED))
    return 0;
  p->stop |= MB_STOP_WAITED;
  atomic_fetch_add(&stop_left, 1);
  return 1;
}

static void stop_wait_for(mb_pid_t pid)
{
  mb_proc_t *t = mb_proc_get(pid);
  if (t == NULL)
    return;
  mb_proc_lock(t);
  stop_wait_locked(t);
  mb_proc_unlock(t);
  mb_proc_unref(t);
}

void mb_proc_stop_signal(mb_pid_t pid)
{
  mb_proc_exit_signal(pid, pid, host_reason("shutdown"), 0);
}

static void stop_one(mb_proc_t *p, void *ud)
{
  (void)ud;
  mb_proc_lock(p);
  int now = (p->first || (p->stop & MB_STOP_GRACEFUL)) && stop_wait_locked(p);
  mb_proc_unlock(p);
  if (now)
    mb_proc_stop_signal(p->pid);
}

void mb_proc_stop(void)
{
  if (atomic_exchange(&stopping, 1))
    return;
  atomic_fetch_add(&stop_left, 1);   /* held while looking */
  mb_proc_foreach(stop_one, NULL);
  stop_done();
}

int mb_proc_set_graceful(mb_proc_t *p)
{
  mb_proc_lock(p);
  p->stop |= MB_STOP_GRACEFUL;
  int now = atomic_load(&stopping) && stop_wait_locked(p);
  mb_proc_unlock(p);
  return now;
}

/* -- Exit ------------------------------------------------------------------ */

void mb_proc_exit(mb_proc_t *p, mb_msg_t *reason)
{
  MB_ASSERT_OWNER(p);
  mb_proc_lock(p);
  p->dead = 1;
  p->status = MB_PS_EXITING;
  /* While the host stops, the wait for p passes on to the processes its
   * end takes down with it (mb_proc_stop). */
  int waited = (p->stop & MB_STOP_WAITED) != 0;
  int pass_on = waited && !mb_msg_is_normal(reason);
  mb_hset_t links = p->links, watchers = p->watchers;
  memset(&p->links, 0, sizeof p->links);
  memset(&p->watchers, 0, sizeof p->watchers);
  mb_proc_unlock(p);

  run_exit_hooks(p);
  table_remove(p);
  long long linked = 0;   /* what its links were charged (link_add) */
  for (uint32_t i = 0; i < links.cap; i++) {
    if (links.v[i].key == 0)
      continue;
    linked += (long long)mb_proc_link_cost(links.v[i].val);
    if (mb_id_is_remote(links.v[i].val)) {
      remote_link_exit(links.v[i].val, p->pid, dup_reason(reason));
    } else {
      if (pass_on)
        stop_wait_for(links.v[i].val);
      mb_proc_link_exit(links.v[i].val, p->pid, dup_reason(reason));
    }
  }
  long long remote_watchers = 0;
  for (uint32_t i = 0; i < watchers.cap; i++) {
    if (watchers.v[i].key == 0)
      continue;
    remote_watchers += mb_id_is_remote(watchers.v[i].val);
    mb_proc_send(watchers.v[i].val, down_msg(p->pid, watchers.v[i].key, dup_reason(reason)));
  }
  charge(p, -remote_watchers * MB_PROC_REMOTE_WATCH - linked);
  /* Monitors this process held die with it. */
  for (uint32_t i = 0; i < p->monitoring.cap; i++) {
    if (p->monitoring.v[i].key == 0)
      continue;
    if (mb_id_is_remote(p->monitoring.v[i].val)) {
      if (mb_proc_remote_monitor)
        mb_proc_remote_monitor(p->pid, p->monitoring.v[i].val,
                               p->monitoring.v[i].key, 0);
      continue;
    }
    mb_proc_t *t = mb_proc_get(p->monitoring.v[i].val);
    if (t) {
      mb_proc_lock(t);
      mb_hset_take(&t->watchers, p->monitoring.v[i].key, NULL);
      mb_proc_unlock(t);
      mb_proc_unref(t);
    }
  }
  mb_hset_free(&links);
  mb_hset_free(&watchers);
  mb_msg_free(reason);
  /* Its monitors and aliases are gone as far as anyone can tell (the sets
   * themselves go with the record). */
  set_charge(p, -(long long)(p->monitoring.n + p->aliases.n));

  if (waited)
    stop_done();
  unsigned left = atomic_fetch_sub(&live, 1) - 1;
  mb_proc_unref(p);
  if (left == 0 && mb_proc_on_empty)
    mb_proc_on_empty();
}

static void shutdown_one(mb_proc_t *p, void *ud)
{
  (void)ud;
  MB_PROC_DBG_RUNNER(p, 0);   /* the schedulers have stopped */
  mb_proc_lock(p);
  p->dead = 1;
  mb_proc_unlock(p);
  table_remove(p);
  run_exit_hooks(p);
  atomic_fetch_sub(&live, 1);
  mb_proc_unref(p);   /* the table's reference; foreach holds another */
}

void mb_proc_shutdown(void)
{
  mb_proc_foreach(shutdown_one, NULL);
}

void mb_proc_table_free(void)
{
  atomic_store(&next_slot, 1);   /* every lookup fails from now on */
  for (uint32_t c = 0; c < NCHUNKS; c++) {
    mb_free(chunks[c]);
    chunks[c] = NULL;
  }
}
