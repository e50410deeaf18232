/* dist.h: the host as a node of an Erlang cluster - Erlang's distribution
 * protocol on the schedulers' loops.
 *
 * DESIGN
 * With --sname/--name the host is a node: it listens on its host name's
 * address, registers with epmd (starting `epmd -daemon` when none runs) and
 * connects to other nodes, Erlang ones or Moonbeam hosts alike, through ei
 * (Erlang's C library for C nodes). ei's handshakes block, so they never run
 * on a scheduler thread: outgoing ones on libuv's thread pool, incoming ones
 * each on a handshake thread (dist_start.c), so that a slow peer delays no
 * other; each is bounded by MB_DIST_SETUP_MS in all; the handshake is ei's (cookie challenge both ways,
 * a wrong cookie is refused and logged). After it, the socket is handed to
 * one scheduler's loop (uv_tcp_open), which does all its framed traffic:
 * 4-byte length frames, a 0-length frame is a tick (sent when we have been
 * silent for a third of a tick, MB_DIST_TICK_MS or a quarter of
 * --net-ticktime; a peer silent for 4 ticks is taken for dead),
 * and pass-through ('p') messages holding a control tuple and maybe a
 * message (etf.h translates terms).
 *
 * Capabilities: ei's handshake offers DFLAG_DIST_MONITOR but not
 * DFLAG_DIST_MONITOR_NAME (0x20), and an Erlang node sends MONITOR_P (and
 * so MONITOR_P_EXIT) only to a peer whose flags, as both sides agreed them
 * (the AND of the two offers), hold both: without it, erlang:monitor of one
 * of our processes only watches the connection. Our socket callbacks
 * (ei_connect_init_ussi) add that flag to the handshake's name and
 * challenge packets; we then handle MONITOR_P, DEMONITOR_P and
 * MONITOR_P_EXIT, by pid and by name (ours: mb.monitor({name, node}), with
 * a name's pid-like id, remote.h). They add DFLAG_ALIAS too: a peer that
 * takes it gets our sends made with one of its aliases as ALIAS_SEND, and
 * may send ALIAS_SEND to ours, which dist_alias.c finds the owner of (the
 * reply path of gen_server:call both ways). The socket callbacks also read
 * the peer's offer, kept on the connection.
 *
 * What crosses: sends (SEND, REG_SEND), links (LINK, UNLINK_ID, EXIT),
 * exit signals (EXIT2), monitors. Each connection keeps, under the table's
 * lock, the links and monitors between its node and our processes, so that
 * when it goes down every local end gets its exit signal or DOWN with reason
 * "noconnection", and node monitors (mb.monitor_node) get
 * {event = "nodedown", node = name}. A send to a node that is not connected
 * starts a connection and queues the frame until it is up (as Erlang
 * does); if it cannot be made, the queue is dropped.
 *
 * Untrusted input: a frame over MB_DIST_MAX_FRAME, a frame that is not a
 * pass-through message, or a malformed term closes that connection (and is
 * logged); a well-formed message this host cannot represent (a fun, a port)
 * is dropped and logged; an operation we never negotiated is ignored.
 * Nothing a peer sends can crash the host. Refs that peers send are held
 * only while a process or a remote monitor has them (remote.h), so new
 * refs in every call do not add up. A remote monitor of a local process is
 * charged to that process (MB_PROC_REMOTE_WATCH, proc.h), so its
 * max_memory and the host's --max-memory bound how many a peer can set;
 * one that cannot be held (a full ref table) is refused with a DOWN
 * (system_limit), as are monitors of net_kernel past
 * MB_DIST_KERNEL_MONITORS.
 *
 * Output: frames for a node queue on its connection, and the connection's
 * loop writes all that is queued in one write when it gets to it. See
 * MB_DIST_BUSY_LIMIT for what bounds the queue.
 *
 * Locks: the connection table's lock, then process locks (never the other
 * way: the hooks are called with no process lock held, and nothing calls
 * into proc.c while holding the table's lock).
 */
#ifndef MB_DIST_H
#define MB_DIST_H

#include <stdint.h>

#include "io.h"
#include "proc.h"

#define MB_DIST_TICK_MS 15000          /* net_ticktime 60 s, as Erlang */
#define MB_DIST_CONNECT_MS 5000        /* bound of a handshake step */
/* A handshake, either way, is done within MB_DIST_SETUP_MS in all or
 * dropped (and logged): Erlang's net_setuptime default (--net-setuptime). */
#define MB_DIST_SETUP_MS 7000
/* Incoming handshakes in flight at once, each on a thread of its own: a
 * connection that finds this many is closed at once (and logged). */
#define MB_DIST_HANDSHAKES 16
#define MB_DIST_MAX_FRAME (64u << 20)
/* Output to a node: over MB_DIST_BUSY_LIMIT bytes queued (Erlang's +zdbbl
 * default), a process that sends to the node waits after its send until
 * the queue is back under half of it, as Erlang suspends a process on a
 * busy distribution port. A frame that finds more than MB_DIST_QUEUE_MAX
 * queued already (only many senders at once, or exit signals, which never
 * wait, get there) drops the connection, as does queued output that has
 * not moved for net_ticktime (the peer does not read). Both are logged. */
#define MB_DIST_BUSY_LIMIT (1u << 20)
#define MB_DIST_QUEUE_MAX (32u << 20)

typedef struct mb_dist_opts {
  const char *name;       /* "alive" or "alive@host" */
  int longnames;          /* --name (else --sname) */
  const char *cookie;     /* NULL: ~/.erlang.cookie */
  unsigned ticktime;      /* net_ticktime in seconds; 0: 60 */
  unsigned setuptime;     /* net_setuptime in seconds; 0: 7 */
} mb_dist_opts_t;

/* Make the host a node (after mb_sched_start, before mb_sched_run).
 * Returns 0, or -1 with a message in err. Main thread. */
int mb_dist_start(const mb_dist_opts_t *o, char *err, size_t errlen);

/* Is the host a node? This node's name as an atom (0 when not). */
int mb_dist_on(void);
uint32_t mb_dist_self(void);

/* The connected nodes (atoms) into v (at most n); returns how many there
 * are. Any thread. */
int mb_dist_nodes(uint32_t *v, int n);

/* Send m (a one-value user message, taken) from `from` to the process
 * registered as name (atom) on node (atom). Returns 0, MB_ENOTDIST, or
 * MB_EBADARG with err when m cannot cross nodes. Any thread. */
int mb_dist_send_named(uint32_t node, uint32_t name, mb_pid_t from, mb_msg_t *m,
                       char *err, size_t errlen);

/* Can m be sent to a remote pid? 0, or MB_EBADARG with err. */
int mb_dist_check_msg(const mb_msg_t *m, char *err, size_t errlen);

/* Connect to node for process p (owner thread), which then waits with
 * MB_YIELD_WAIT: the wait ends with true, or nil and an error, pushed by
 * mb_dist_push_connect. Returns 0, or an error code (nothing to wait for). */
int mb_dist_connect(mb_proc_t *p, uint32_t node);
int mb_dist_push_connect(lua_State *L, mb_io_req_t *req);

/* After p (owner thread) sent to node: 1 if node's output queue is over
 * MB_DIST_BUSY_LIMIT, and then p is to wait (MB_YIELD_WAIT) until it
 * drains or the connection goes; the wait ends with no value. 0: go on. */
int mb_dist_busy_wait(mb_proc_t *p, uint32_t node);

/* Node monitors: pid gets {event = "nodedown", node = name} when node's
 * connection goes down (or cannot be made), once per monitor_node(on);
 * off removes one. Returns 0 or MB_ENOTDIST. */
int mb_dist_monitor_node(mb_pid_t pid, uint32_t node, int on);

#endif
