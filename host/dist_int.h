/* dist_int.h: what the two halves of the distribution layer share - the
 * connection record and table (dist.c) and the handshakes and start-up
 * (dist_start.c). Internal to them; see dist.h for the design.
 *
 * Locks: dist_lock guards the table and every field of a conn marked
 * "under lock"; it is taken before any process lock, never after.
 */
#ifndef MB_DIST_INT_H
#define MB_DIST_INT_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#include "dist.h"
#include "ei.h"
#include "scheduler.h"

/* Monitors of net_kernel (answered for by dist_recv.c, no process) that
 * one connection may hold at once: gen:call sets one per call (a ping)
 * and takes it off with the answer. More are refused (DOWN system_limit). */
#define MB_DIST_KERNEL_MONITORS 64

/* Capability flags of the handshake (erts dist.h) that we add to ei's
 * offer (see dist.h, "Capabilities"). */
#define DFLAG_DIST_MONITOR 0x08ull
#define DFLAG_DIST_MONITOR_NAME 0x20ull   /* (0x40 is DFLAG_HIDDEN_ATOM_CACHE) */
#define DFLAG_ALIAS (1ull << 35)

typedef struct pair {
  mb_pid_t local, remote;
  uint64_t ref;          /* monitors: the watcher's ref */
  uint32_t name;         /* monitors in by name: the name (atom) */
} pair_t;

/* A hash table of pairs (dist.c): walk v[0..cap), skipping the slots that
 * are not dist_pair_used. */
typedef struct pairs {
  pair_t *v;
  uint32_t n, cap;       /* cap: a power of two, or 0 */
} pairs_t;

static inline int dist_pair_used(const pair_t *p)
{
  return p->ref != 0 || p->local != 0 || p->remote != 0;
}

/* A monotonic clock in ms that any thread may read. */
static inline uint64_t dist_now_ms(void)
{
  return uv_hrtime() / 1000000;
}

typedef struct frame {
  struct frame *next;
  size_t len;
  char data[];
} frame_t;

typedef struct waiter {
  struct waiter *next;
  mb_pid_t pid;
  uint32_t seq;
} waiter_t;

enum { C_CONNECTING, C_UP, C_DOWN };

typedef struct conn {
  uint32_t node;
  atomic_int refs;
  uv_work_t work;
  int fd;                      /* connect_work's result */
  uint64_t peer_flags;         /* the peer's offer, from its handshake */
  /* -- under lock -- */
  int state;
  mb_sched_t *sched;           /* the loop holding the socket, once up */
  uint64_t flags;              /* the peer's capabilities, once up */
  frame_t *out_head, **out_tail;  /* frames not yet handed to libuv */
  size_t pend_bytes;           /* those and the ones being written */
  uint64_t progress_ms;        /* when output last moved (dist_now_ms) */
  int flush_posted;            /* a do_flush is on its way to the loop */
  waiter_t *busy;              /* senders waiting for the output to drain */
  pairs_t links;               /* local <-> remote links */
  pairs_t mon_out;             /* local watches remote: local, remote, ref */
  pairs_t mon_in;              /* remote watches local: local, remote, ref, name */
  uint32_t kernel_mons;        /* those of net_kernel (local 0), which no
                                  process pays for (MB_DIST_KERNEL_MONITORS) */
  pairs_t node_mon;            /* local pids monitoring the node */
  waiter_t *waiters;           /* mb.connect_node callers */
  /* -- loop thread -- */
  uv_tcp_t tcp;
  uv_timer_t tick;
  int open;                    /* handles initialised */
  char *rbuf;
  size_t rlen, rcap;
  int refusal_logged;          /* a monitor of its was refused, and logged */
  uint64_t last_recv, last_send;
} conn_t;

/* -- Frames (dist.c out, dist_recv.c in) -- */

/* Control message operations (erl_dist_protocol). */
enum {
  OP_LINK = 1, OP_SEND = 2, OP_EXIT = 3, OP_UNLINK = 4, OP_REG_SEND = 6,
  OP_EXIT2 = 8, OP_MONITOR_P = 19, OP_DEMONITOR_P = 20, OP_MONITOR_P_EXIT = 21,
  OP_SEND_SENDER = 22, OP_ALIAS_SEND = 33, OP_ALIAS_SEND_TT = 34, OP_UNLINK_ID = 35,
  OP_UNLINK_ID_ACK = 36
};
#define PASS_THROUGH 112

/* A control message to encode (dist_put_ctl). */
typedef struct ctl {
  int op;
  mb_pid_t from, to;
  uint32_t name;              /* REG_SEND: the name; MONITOR_P_EXIT: FromProc */
  mb_ref_t ref;
  /* MONITOR_P_EXIT: the watcher's ref as the peer sent it (ETF bytes),
   * used instead of ref when that could not be held (a full table). */
  const char *raw_ref;
  int raw_ref_len;
  uint64_t id;                /* UNLINK_ID */
  const mb_msg_t *reason;
} ctl_t;

/* The control tuple (versioned) at buf (NULL: count); 0 or -1. */
int dist_put_ctl(char *buf, int *idx, const ctl_t *c);
/* A frame of len bytes after its length (the first PASS_THROUGH), to be
 * filled from f->data + 5. */
frame_t *dist_frame_alloc(size_t len);
/* A frame holding c and the message m (or none); NULL if it cannot be
 * encoded or is over MB_DIST_MAX_FRAME. */
frame_t *dist_frame_new(const ctl_t *c, const mb_msg_t *m);
/* Queue frame f on c (dist_lock held; takes f). */
void dist_queue_locked(conn_t *c, frame_t *f);
/* Encode and queue a control message (and m) for node, connecting first
 * if needed (logs a message that cannot be encoded). */
void dist_send_ctl(uint32_t node, const ctl_t *ctl, const mb_msg_t *m);
/* Handle one frame of c (len > 0, loop thread); -1 (malformed) or
 * MB_ETOOMANY (the table of remote pids is full) if the connection must
 * close (dist_recv.c). */
int dist_handle_frame(conn_t *c, const char *data, long len);

/* The links and monitors of a connection (dist_lock held): add one; remove
 * one with this ref (ref != 0) or this local/remote pair, copied to *out if
 * asked; 1 if found. O(1) on average. */
void dist_pairs_add(pairs_t *s, mb_pid_t local, mb_pid_t remote, uint64_t ref, uint32_t name);
int dist_pairs_del(pairs_t *s, mb_pid_t local, mb_pid_t remote, uint64_t ref, pair_t *out);
/* Let go of a hold on ref if it is another node's (remote.h). */
void dist_unhold(mb_ref_t ref);
/* A one-value message holding the string s (a reason). */
mb_msg_t *dist_reason_msg(const char *s);

/* State set once by mb_dist_start (dist_start.c) before any scheduler runs. */
extern pthread_mutex_t dist_lock;
extern ei_cnode dist_ec;
extern uint32_t dist_self_atom;
extern int dist_running;
extern unsigned dist_tick_ms;      /* a quarter of net_ticktime */

/* "=DIST REPORT==== node: ..." on stderr. Any thread. */
void dist_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* The name of a node atom (or "?"). */
const char *dist_node_text(uint32_t atom);

/* dist.c: the table (dist_lock held): the live connection of node or NULL;
 * a new connecting one for node with refs references (the table's among
 * them), not yet connecting. */
conn_t *dist_find(uint32_t node);
conn_t *dist_table_add(uint32_t node, int refs);
/* dist.c: the handshake on fd to c->node is done (flags: the peer's offer):
 * run the connection on scheduler s, the calling thread's. */
void dist_conn_up(conn_t *c, mb_sched_t *s, int fd, uint64_t flags);
/* dist.c: the connection is gone (why: logged if it was up). */
void dist_conn_down(conn_t *c, const char *why);
void dist_conn_unref(conn_t *c);
/* dist.c: at shutdown, close h if it is a connection's handle; 1 if so. */
int dist_close_handle(uv_handle_t *h);
/* dist.c: install the hooks of proc.h and pid.h. */
void dist_install_hooks(void);

/* dist_alias.c: the owners of active aliases (any thread). init installs
 * the hooks that keep the table (at start-up). owner: the pid, or 0. */
void dist_alias_init(void);
void dist_alias_set(mb_ref_t ref, mb_pid_t pid);
void dist_alias_del(mb_ref_t ref, mb_pid_t pid);
mb_pid_t dist_alias_owner(mb_ref_t ref);

/* dist_start.c: start the handshake of connection c (posted to a
 * scheduler's loop: arg is c, holding a reference for the work). */
void dist_start_connect(void *arg);

#endif
