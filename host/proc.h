/* proc.h: processes - one isolated lua_State each - and the process table.
 *
 * DESIGN
 * A process is an mb_proc_t plus its own lua_State (own heap, own GC) whose
 * body runs in a coroutine `co` of that state. The struct is shared by all
 * threads; its fields fall in three groups:
 *  - owner-only: touched only by the thread currently running the process
 *    (the scheduler that dequeued it), never by two threads at once because a
 *    process is in at most one run queue and runs on one thread at a time;
 *  - locked: guarded by `lock` - the inbox (the outer, shared half of the
 *    mailbox), the run status, links and monitors-in, and `dead`;
 *  - atomic: counters other threads read for mb.info().
 * This is the BEAM's split: senders only ever append to the inbox under the
 * lock; the owner splices the whole inbox into its private queue in O(1) and
 * works on that without locking.
 *
 * Lifetime: the struct is reference counted. The process table holds one
 * reference while the process is alive; lookups (mb_proc_get) take one more,
 * so a sender can push to a process that is exiting at the same moment: the
 * message is then freed with the struct.
 *
 * Layers: this file is the bottom of the core layer and knows nothing of
 * Lua states, schedulers, timers or sockets. The layers above reach it
 * through the hooks declared here: mb_proc_on_runnable (the scheduler puts
 * a woken process in a run queue), exit hooks (each subsystem releases what
 * a dying process held: its name, socket, timers, Lua state) and
 * mb_proc_on_empty. A process's lua_State, when it has one, is made and
 * closed by the Lua layer (host/lib/lstate.c); a process may have none
 * (not started yet, or hibernated).
 *
 * Debug builds (MB_DEBUG) check the rules above: MB_ASSERT_LOCKED(p) that
 * the caller holds p's lock, MB_ASSERT_OWNER(p) that no other thread runs p.
 *
 * Pids are (generation << MB_PID_SLOT_BITS | slot): the slot indexes the table,
 * the generation makes a pid unique although slots are reused.
 */
#ifndef MB_PROC_H
#define MB_PROC_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#include "alloc.h"
#include "err.h"
#include "hset.h"
#include "lock.h"
#include "lua.h"
#include "msg.h"
#include "pid.h"

#define MB_MAX_PROCS MB_PID_SLOT_MASK        /* 16M processes at most */
#define MB_FNCODES 4                          /* see mb_proc_t.fncodes */

/* Kinds of mb_msg_t in a mailbox. */
enum {
  MB_MSG_USER = 0,  /* a message sent with mb.send */
  MB_MSG_EXIT,      /* exit signal: from = sender, value = reason */
  MB_MSG_KILL,      /* untrappable exit signal: value "kill" (mb.exit(pid,
                       "kill")) ends it with "killed", another value (the
                       host's: "out of memory") with that value */
  MB_MSG_DOWN,      /* monitor fired: from = dead pid, ref, value = reason */
  MB_MSG_TRAPPED,   /* an exit signal the process trapped: an EXIT message */
  MB_MSG_LINK_EXIT  /* to a remote pid only (mb_proc_remote_send): the exit
                       signal of a broken link, which Erlang tells apart
                       from an exit/2 signal (MB_MSG_EXIT, MB_MSG_KILL) */
};

/* Run status, guarded by lock. */
typedef enum {
  MB_PS_RUNNABLE,   /* in a run queue, or running (see `running`) */
  MB_PS_WAITING,    /* blocked: in receive, sleep, or I/O */
  MB_PS_EXITING     /* dead; being torn down */
} mb_pstatus_t;

/* What a blocked process waits for (owner-only, read under lock by wakers). */
typedef enum {
  MB_WAIT_NONE,
  MB_WAIT_RECV,     /* receive: any message or signal wakes it */
  MB_WAIT_SLEEP,    /* sleep: only its timer or an exit signal wakes it */
  MB_WAIT_IO,       /* an operation on the thread pool (io.h) */
  MB_WAIT_CALL      /* not blocked: a C function's continuation runs at its
                       next slice (mb_run_suspend, lib/run.h) */
} mb_wait_t;

/* Why the body coroutine yielded to the scheduler (owner-only). */
typedef enum {
  MB_YIELD_NONE,
  MB_YIELD_PREEMPT, /* budget spent, or mb.yield(): requeue */
  MB_YIELD_WAIT,    /* blocked: see wait */
  MB_YIELD_EXIT,    /* die now with exit_reason (exit, kill, out of memory) */
  MB_YIELD_HIBERNATE /* drop the state; boot + boot_msg are the continuation */
} mb_yield_t;

struct mb_sched;
struct mb_sock;
struct mb_timer;

typedef struct mb_proc {
  mb_alloc_t alloc;          /* first member: lua_getallocf's ud is the proc */
  mb_pid_t pid;
  atomic_int refs;
  atomic_int running;        /* mb.info status without taking the lock */
  lua_State *L;              /* main thread of the state */
  lua_State *co;             /* the body coroutine */
  struct mb_proc *rq_next;   /* run queue link (guarded by the queue's lock) */

  mb_lock_t lock;
  /* -- guarded by lock -- */
  mb_pstatus_t status;
  mb_wait_t wait;
  uint32_t wait_seq;         /* numbers each wait, for its timer or I/O */
  /* Flags in bytes, as in the owner-only part below: the record is kept by
   * every process, hibernated or not (448 bytes in mimalloc's size class,
   * where ints and the holes between fields took 512). */
  uint8_t woken;             /* a timer fired or a signal came while not WAITING */
  uint8_t expired;           /* the current wait's timer fired */
  uint8_t dead;              /* no more links or monitors may be added */
  uint8_t hibernated;        /* no state: the next wake-up rebuilds it from
                                boot + boot_msg (see mb.hibernate) */
  uint8_t mem_killed;        /* its queue went over max_memory: killed */
  uint8_t stop;              /* MB_STOP_* flags: its part in the host's stop */
  /* Owner-only bytes and the ticker's flag, here in the padding before the
   * next pointer (the record stays in the 448-byte size class): */
  uint8_t alone;             /* computes, alone on its scheduler (run.c) */
  atomic_uchar preempt;      /* the ticker asked it to yield (run.c) */
  uint8_t nfncodes, fncode_next;   /* fncodes in use; the next one to replace */
  /* Its send_after timers not yet delivered or cancelled (stays at 255
   * once there), and the scheduler that holds them (id + 1): timer.c. */
  atomic_uchar timers_pending;
  uint16_t timers_sched;
  /* Another process addressed a send_after timer to it, which may be on
   * any scheduler (timer.c): set, under lock and while it lives, by the
   * first such start. */
  atomic_uchar addressed;
  struct mb_io_req *io_done; /* the finished operation of an MB_WAIT_IO */
  mb_msg_t *in_head, **in_tail;
  mb_hset_t links;           /* pids linked to this process: pid -> pid */
  mb_hset_t watchers;        /* monitors on this process: ref -> watcher */
  struct mb_sock *socks;     /* sockets it owns (sock.h) */

  /* -- owner-only -- */
  /* The socket its Lua code used last, with a reference (lib_tcp.c);
   * sock.c lets it go when the process ends. */
  struct mb_sock *sock_last;
  mb_msg_t *q_head, **q_tail;  /* private half of the mailbox */
  mb_msg_t **q_scan;           /* selective receive: next message to test */
  /* The receive mark (Erlang's receive marker): the queue's end when the
   * process last made a ref, and that ref. A message queued before it
   * cannot carry the ref, so a receive whose match takes none of those
   * starts there (mb_proc_marked). */
  mb_msg_t **q_mark;
  mb_ref_t mark_ref;
  mb_msg_t *recv_bad;          /* a message whose rebuilding raised */
  mb_msg_t *recv_testing;      /* the message a match function is looking
                                  at; NULL once taken meanwhile (lib_mb.c) */
  mb_hset_t monitoring;        /* monitors this process holds: ref -> target */
  mb_hset_t aliases;           /* active aliases: ref -> 0 (see mb.alias) */
  mb_yield_t yield;            /* reason of the pending runtime yield */
  mb_wait_t pending_wait;      /* what a MB_YIELD_WAIT waits for */
  lua_State **costack;         /* user coroutines running inside co */
  int con, cocap;
  int budget;                  /* reductions left in a counted slice */
  int recv_match;              /* registry ref of the match function, or 0 */
  int recv_result;             /* what the scheduler's work on its behalf gave:
                                  receive -1/0/1, values pushed by boot or I/O */
  uint32_t wakes;              /* times woken from hibernation */
  uint8_t trap_exit;
  uint8_t timed_out;           /* `expired`, as last seen by mb_proc_drain */
  uint8_t match_hooks;         /* hooks its running match function has seen
                                  past its slice (run.c, MB_MATCH_HOOKS) */
  uint8_t held_hooks;          /* the same for a __gc finalizer or a debug hook
                                  function in this slice (run.c, MB_HELD_HOOKS) */
  uint8_t in_uhook;            /* running its debug hook function (lstate.c) */
  uint8_t host_lua;            /* the host runs Lua on its state (run.c) */
  uint8_t booting;             /* boot is decoding the body (run.c) */
  uint8_t settled;             /* its state had its first full collection */
  uint8_t lstate_tainted;      /* its state may not be reused (lstate.c) */
  uint8_t first;               /* the host's first process */
  uint8_t counted;             /* its slices count instructions (run.c) */
  uint8_t base_opened;         /* it opened the base library (lstate.c) */
  uint8_t essential;           /* the --max-memory killer passes it by while
                                  another can go (spawn_opt; under lock) */
  uint8_t package_opened;      /* its state opened the package library (lstate.c) */
  uint16_t codepath;           /* its package.path and cpath: an entry of
                                  lib/codepath.h, 0 for the host's default */
  struct mb_io_req *io_req;    /* the operation whose results are pushed now */
  /* An MB_WAIT_IO with a timer: pushes the results of a timeout. */
  int (*io_on_timeout)(lua_State *L, uint64_t arg);
  uint64_t io_timeout_arg;
  struct mb_timer *wait_timer; /* timer of the current or last timed wait,
                                  kept for the next (timer.c), or NULL */
  lua_CFunction boot;          /* set until the first run: see run.c */
  /* Functions of the state known to be code objects (the body a boot
   * decoded, the last few it dumped to send; anchored in the registry):
   * sending one again needs no lua_dump (copy.h mb_copy_code_of). Freed
   * with the state. */
  struct mb_fncode {
    const void *fn;
    struct mb_code *code;
    int ref;
  } *fncodes;                  /* MB_FNCODES of them, allocated on first use
                                  (nfncodes, fncode_next above) */

  mb_msg_t *boot_msg;          /* what boot decodes (spawn's function, args) */
  mb_msg_t *exit_reason;       /* set when the process must die */
  /* The module it was spawned from (or hibernated into), for reports, or
   * NULL (a function: reports find it on the stack). An interned string
   * (intern.h): the watchdog reads it while the process runs. */
  _Atomic(const char *) origin;
  /* Its registered name (reg.c): written under the registry's lock, read
   * without it only to see that it has none. */
  _Atomic(char *) name;

  /* -- atomic, read by other threads -- */
  atomic_uint nsignals;        /* exit signals queued and not yet handled */
  atomic_uint mailbox_len;
  atomic_uint_fast64_t reductions;
  atomic_size_t mailbox_bytes; /* bytes of the queued messages */
  atomic_size_t held;          /* bytes held for it outside its state (a
                                  hibernated process's continuation) */
  /* The scheduler whose loop holds this process's socket (sock.c sets it
   * when the process becomes a connection's owner), or NULL: where a
   * wake-up puts it, so that its socket I/O is done on its own thread. */
  _Atomic(struct mb_sched *) home;
#ifdef MB_DEBUG
  atomic_ulong dbg_locker;     /* the thread holding lock, or 0 */
  atomic_ulong dbg_runner;     /* the thread running the process, or 0 */
#endif
} mb_proc_t;

/* p's lock; use these, not mb_lock itself, so that debug builds can check who
 * holds it. */
static inline void mb_proc_lock(mb_proc_t *p)
{
  mb_lock(&p->lock);
#ifdef MB_DEBUG
  atomic_store_explicit(&p->dbg_locker, (unsigned long)pthread_self(),
                        memory_order_relaxed);
#endif
}

static inline void mb_proc_unlock(mb_proc_t *p)
{
#ifdef MB_DEBUG
  atomic_store_explicit(&p->dbg_locker, 0, memory_order_relaxed);
#endif
  mb_unlock(&p->lock);
}

#ifdef MB_DEBUG
#define MB_ASSERT_LOCKED(p)                                                  \
  MB_ASSERT(atomic_load_explicit(&(p)->dbg_locker, memory_order_relaxed) ==  \
            (unsigned long)pthread_self())
#define MB_ASSERT_OWNER(p)                                                   \
  MB_ASSERT(mb_proc_dbg_owner_ok(p))
static inline int mb_proc_dbg_owner_ok(mb_proc_t *p)
{
  unsigned long r = atomic_load_explicit(&p->dbg_runner, memory_order_relaxed);
  return r == 0 || r == (unsigned long)pthread_self();
}
/* The scheduler marks the thread that runs p (0: none). */
#define MB_PROC_DBG_RUNNER(p, t)                                             \
  atomic_store_explicit(&(p)->dbg_runner, (t), memory_order_relaxed)
#else
#define MB_ASSERT_LOCKED(p) ((void)0)
#define MB_ASSERT_OWNER(p) ((void)0)
#define MB_PROC_DBG_RUNNER(p, t) ((void)0)
#endif

/* The process that owns L (any coroutine of its state). */
static inline mb_proc_t *mb_proc_of(lua_State *L)
{
  void *ud;
  lua_getallocf(L, &ud);
  return (mb_proc_t *)ud;
}

/* Create a process record (no Lua state yet) and register it in the
 * table; refs = 1 (the table's). Returns 0 and the process in *out, or
 * MB_ETOOMANY when the table is full. Any thread. The process is not
 * runnable until the scheduler queues it. */
int mb_proc_new(size_t max_memory, mb_proc_t **out);

/* Look up a live process; takes a reference (release with mb_proc_unref).
 * NULL when pid names no live process. Any thread. */
mb_proc_t *mb_proc_get(mb_pid_t pid);
void mb_proc_unref(mb_proc_t *p);

/* Append msg to p's inbox and wake p (mb_proc_on_runnable) if it waits for
 * it. Takes ownership of msg (freed if p is already dead). Any thread. */
void mb_proc_push(mb_proc_t *p, mb_msg_t *msg);
/* p's wait may end (a message, signal, timer or I/O result came): make p
 * RUNNABLE if it is WAITING and return 1 - the caller then calls
 * mb_proc_on_runnable(p) once it has unlocked p - else note that it was
 * woken, so that it does not block on its way into a wait, and return 0.
 * Caller holds p's lock. */
static inline int mb_proc_wake_locked(mb_proc_t *p)
{
  MB_ASSERT_LOCKED(p);
  if (p->status == MB_PS_WAITING) {
    p->status = MB_PS_RUNNABLE;
    return 1;
  }
  p->woken = 1;
  return 0;
}

/* Look up pid and push; msg is freed if pid is dead. Any thread. */
void mb_proc_send(mb_pid_t pid, mb_msg_t *msg);

/* Move the inbox into the private queue and handle exit signals in order:
 * trapped ones become messages, "normal" ones vanish, others set
 * p->exit_reason. Owner thread. Returns 1 if the process must die. */
int mb_proc_drain(mb_proc_t *p);

/* Take the message at *pm out of p's private queue (owner thread), keeping
 * the tail, the selective receive's position and the count right. */
mb_msg_t *mb_proc_take_msg(mb_proc_t *p, mb_msg_t **pm);

/* Links and monitors, run by the process `self` on its own thread.
 * mb_proc_link returns 0, MB_ENOPROC when pid is dead, or MB_ENOMEM when
 * pid holds the 4 GiB of charges alloc.charged can count (no link made). */
int mb_proc_link(mb_proc_t *self, mb_pid_t pid);
void mb_proc_unlink(mb_proc_t *self, mb_pid_t pid);
/* Returns the new ref; a DOWN "noproc" is queued at once for a dead pid. */
mb_ref_t mb_proc_monitor(mb_proc_t *self, mb_pid_t pid);
/* Returns 1 if ref was an active monitor of self. */
int mb_proc_demonitor(mb_proc_t *self, mb_ref_t ref);
/* Monitors and aliases count MB_PROC_SET_ENTRY bytes each in their
 * process's max_memory (alloc.charged) and the host's total; the Lua
 * bindings refuse to make one ("out of memory") that mb_proc_room does not
 * find room for. So do links, one entry at each end (both hold the other
 * in their links), each charged to the process whose set holds it, from
 * the link until unlink, the other end's exit signal or its own exit: the
 * binding refuses one its caller has no room for, and one that takes the
 * other end past its max_memory (which it did not ask for) ends that one
 * "out of memory", as a queued message does. Without it 3,000 processes
 * capped at 256 KB, each linked to all the others, held 395 MB. */
#define MB_PROC_SET_ENTRY 64
/* A link to a remote pid: its entry in the links (as a local link's) and
 * the connection's pair (dist.c: 32 bytes at a load of 3/8 to 3/4). */
#define MB_PROC_REMOTE_LINK 128
/* What a link to pid costs the process whose links hold it. */
static inline size_t mb_proc_link_cost(mb_pid_t pid)
{
  return mb_id_is_remote(pid) ? MB_PROC_REMOTE_LINK : MB_PROC_SET_ENTRY;
}
/* Whether n more bytes charged to p (alloc.charged) fit: 0; 1 when they
 * would take p over its max_memory (heap, charges and mailbox, as a queued
 * message is checked); 2 over the 4 GiB alloc.charged holds. Any thread;
 * the answer holds while no other thread adds to p's charge (the owner
 * runs, or a pool thread works for it while it waits: io.h). Links and
 * remote monitors that others make to p are charged from their threads:
 * one that lands between the check and the charge may leave p over by an
 * entry, until the next message or entry that comes ends it. */
int mb_proc_room(const mb_proc_t *p, size_t n);

/* Move the messages of port `port` (a socket's active-mode messages,
 * msg->port) from p's mailbox to process `to`, in order (what set_owner
 * does, as Erlang's controlling_process). Owner thread of p. */
void mb_proc_move_port_msgs(mb_proc_t *p, uint64_t port, mb_pid_t to);

/* Send an exit signal from `from` to pid (mb.exit(pid, reason)); kill:
 * untrappable. reason is a one-value message; ownership taken. Any
 * thread. It leaves a link between the two as it is. */
void mb_proc_exit_signal(mb_pid_t pid, mb_pid_t from, mb_msg_t *reason, int kill);
/* The exit signal of a link: `from`, linked to pid, ended with reason
 * (taken); the link is gone for pid too. Any thread. */
void mb_proc_link_exit(mb_pid_t pid, mb_pid_t from, mb_msg_t *reason);
#define MB_EXIT_LINK 1     /* msg->ref of an EXIT that a link sent */

/* Tear down a dead process on its own thread: mark it dead, run the exit
 * hooks, signal links and monitors with reason (taken), drop the table's
 * reference. */
void mb_proc_exit(mb_proc_t *p, mb_msg_t *reason);

/* -- Hooks for the layers above ---------------------------------------------
 * Set once at start-up, before any process runs. */

/* p became runnable (a message or signal woke it; its status is already
 * MB_PS_RUNNABLE): put it in a run queue. Any thread. */
extern void (*mb_proc_on_runnable)(mb_proc_t *p);

/* Add fn to the functions run when a process ends (mb_proc_exit, and for
 * every process left at shutdown), in the order added, on the process's
 * own thread, after p->dead is set and before links and monitors are told.
 * Each releases what its subsystem holds for p. At most MB_PROC_EXIT_HOOKS. */
#define MB_PROC_EXIT_HOOKS 8
void mb_proc_add_exit_hook(void (*fn)(mb_proc_t *p));

/* Aliases, owner thread only: a user message sent with an alias (its ref
 * field) is received only while the alias is active; once the receiver
 * drops the alias, such messages are discarded unseen, whenever they came.
 * This is what lets a call that timed out never see a late reply. */
void mb_proc_alias(mb_proc_t *p, mb_ref_t ref);
int mb_proc_unalias(mb_proc_t *p, mb_ref_t ref);
int mb_proc_has_alias(const mb_proc_t *p, mb_ref_t ref);

/* A new unique ref. Any thread. */
mb_ref_t mb_proc_newref(void);
/* A new ref made by p for its own use (a monitor, an alias, mb.make_ref):
 * marks the end of p's queue for it. Owner thread. */
mb_ref_t mb_proc_make_ref(mb_proc_t *p);
/* Where a receive that takes no message queued before ref was made may
 * start: past those if ref is p's latest, else at the head. */
static inline mb_msg_t **mb_proc_marked(mb_proc_t *p, mb_ref_t ref)
{
  return p->mark_ref == ref ? p->q_mark : &p->q_head;
}

/* Call fn for every live process (with a reference held during the call). */
void mb_proc_foreach(void (*fn)(mb_proc_t *p, void *ud), void *ud);
/* Free every remaining process; only when all schedulers have stopped. */
void mb_proc_shutdown(void);
/* Free the table itself: after the loops are closed (a thread-pool
 * completion may still look a pid up while they close). */
void mb_proc_table_free(void);

/* Called when the last process has died (set by the scheduler). */
extern void (*mb_proc_on_empty)(void);

/* -- The host's stop (SIGTERM; Erlang's init:stop) ----------------------------
 * mb_proc_stop sends the exit signal "shutdown" to the first process and to
 * every process spawned graceful (spawn_opt), and from then on waits for
 * them: each is *waited for* (MB_STOP_WAITED) until it ends. One that ends
 * with a reason other than "normal" passes the wait on to the local
 * processes linked to it, which its exit signal reaches (a supervisor
 * linked to the first process, then its children, stop in their order
 * before the host ends). When the last waited-for process has ended,
 * mb_proc_on_stopped is called (on that thread); the host then halts, and
 * the halt ends every process left. A process spawned graceful while the
 * host stops gets "shutdown" at once. */
enum {
  MB_STOP_GRACEFUL = 1,   /* spawned graceful */
  MB_STOP_WAITED = 2      /* the stop waits for it */
};
/* Start the stop (once; later calls do nothing). mb_proc_on_stopped may
 * be called before this returns (nothing to wait for). Any thread. */
void mb_proc_stop(void);
/* Has mb_proc_stop been called? */
int mb_proc_stopping(void);
/* Processes the stop still waits for. */
long mb_proc_stop_left(void);
/* Make p graceful, before it is first queued. Returns 1 when the host is
 * stopping already: the caller then sends it "shutdown"
 * (mb_proc_stop_signal) once p is queued. */
int mb_proc_set_graceful(mb_proc_t *p);
/* Send pid the exit signal "shutdown" from itself, as the stop does. */
void mb_proc_stop_signal(mb_pid_t pid);
extern void (*mb_proc_on_stopped)(void);

/* -- Remote pids (dist.h) ----------------------------------------------------
 * A pid with MB_ID_REMOTE set (pid.h) is a process of another node. What
 * this file would do to a local process it hands to the hooks below, which
 * the distribution layer sets at start-up; unset (the host is not a node),
 * remote pids behave as dead ones. The hooks are called with no process
 * lock held, on the caller's thread, and must not block.
 *
 * mb_proc_remote_send: a message (MB_MSG_USER), exit signal (MB_MSG_EXIT,
 * MB_MSG_KILL, MB_MSG_LINK_EXIT) or monitor notice (MB_MSG_DOWN, m->ref the
 * watcher's ref) for remote pid `to`; takes ownership of m. Called by
 * mb_proc_send, so mb_proc_exit's links and watchers reach remote pids too.
 * mb_proc_remote_link: local process `self` linked (on) or unlinked (off)
 * remote pid `remote` (self's side is already done).
 * mb_proc_remote_monitor: `self` started (on) or stopped (off) monitor ref
 * on remote pid `remote`; also off for each remote monitor a dying process
 * held. */
extern void (*mb_proc_remote_send)(mb_pid_t to, mb_msg_t *m);
extern void (*mb_proc_remote_link)(mb_pid_t self, mb_pid_t remote, int on);
extern void (*mb_proc_remote_monitor)(mb_pid_t self, mb_pid_t remote,
                                      mb_ref_t ref, int on);
/* mb_proc_remote_alias: `self` activated (on) or dropped (off) alias ref
 * (owner thread), so that the distribution layer can find the process of
 * an alias that another node sends to (ALIAS_SEND names no pid). A dying
 * process's aliases are the distribution layer's to drop (exit hook). */
extern void (*mb_proc_remote_alias)(mb_pid_t self, mb_ref_t ref, int on);

/* The other side, for the distribution layer (any thread): a remote pid
 * links to / unlinks from local process `local`, or monitors it (ref: the
 * remote watcher's ref) / stops. The link and watch functions return 0, or
 * MB_ENOPROC when `local` is not alive (the caller answers noproc), or
 * MB_ENOMEM (below; a link: charged as a local one, MB_PROC_REMOTE_LINK, and
 * refused only over the 4 GiB alloc.charged holds); unlink
 * and unwatch return 1 if the link or monitor existed. A link exit signal
 * (mb_proc_link_exit) for a link the process no longer has is dropped when
 * the process takes it (mb_proc_drain). */
int mb_proc_link_remote(mb_pid_t local, mb_pid_t remote);
int mb_proc_unlink_remote(mb_pid_t local, mb_pid_t remote);
/* A remote watcher's monitor counts MB_PROC_REMOTE_WATCH bytes in the
 * max_memory (alloc.charged) of the process it watches and in the host's
 * total, from watch until unwatch, the DOWN at exit or the process's end -
 * as Erlang counts a monitor in the memory of both its ends. A watch that
 * takes the process over its max_memory kills it "out of memory" (as a
 * queued message does); one that finds it killed so already, or over the
 * 4 GiB alloc.charged holds, is refused with MB_ENOMEM. */
int mb_proc_watch_remote(mb_pid_t local, mb_pid_t watcher, mb_ref_t ref);
int mb_proc_unwatch_remote(mb_pid_t local, mb_ref_t ref);
/* What one remote watcher holds: its slot in the process's watchers
 * (16 bytes at a load of a half to an eighth) and what the distribution
 * layer keeps for it (its connection's pair, 32 bytes at a load of 3/8 to
 * 3/4, and the watcher's ref in remote.h's table, ~50 bytes): about 150
 * bytes, as measured (4.1M remote monitors took a host to 596 MB). */
#define MB_PROC_REMOTE_WATCH 160

/* Is m the one-value message "normal" / "kill"? */
static inline int mb_msg_is_normal(const mb_msg_t *m)
{
  return mb_msg_is_string(m, "normal");
}
static inline int mb_msg_is_kill(const mb_msg_t *m)
{
  return mb_msg_is_string(m, "kill");
}
static inline int mb_msg_is_shutdown(const mb_msg_t *m)
{
  return mb_msg_is_string(m, "shutdown");
}

#endif
