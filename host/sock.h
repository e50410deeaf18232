/* sock.h: TCP sockets on the schedulers' libuv loops.
 *
 * DESIGN
 * A socket (listener or stream) is a uv_tcp_t on the loop of one scheduler
 * thread, the one that created it (a stream accepted by a listener lives on
 * the listener's loop). Only that thread ever calls libuv on it. The process
 * that owns the socket may run on any scheduler, so what it asks of the
 * socket is done in one of two ways:
 *  - directly, under the socket's lock, for what needs no libuv call: take
 *    bytes already read, count bytes queued for writing, change the mode;
 *  - by a command posted to the socket's loop (mb_sched_post) for what does:
 *    write, close, resume reading, accept. When the process already runs on
 *    the socket's thread and no command of this socket is still in flight,
 *    the command runs on the spot (order is kept either way).
 * A process that must wait (nothing to read yet, output over the high-water
 * mark, a connect in progress) registers itself as the socket's waiter
 * (pid + wait_seq) and blocks in an MB_WAIT_IO wait (io.h); the loop's
 * callback hands it the result with mb_io_deliver, which refuses a process
 * that has moved on (timed out, died), and the result then stays with the
 * socket: bytes go back to the read buffer, a connection back to the
 * listener's queue. Nothing read is ever dropped.
 *
 * Reading: a stream reads ahead into its buffer up to MB_SOCK_RBUF_MAX
 * bytes and then stops reading until the owner takes some (so a slow owner
 * makes TCP push back on the peer). In active mode what is read goes to the
 * owner as a message instead, built here in C on the loop thread.
 * Writing: bytes queued count against MB_SOCK_WRITE_HIGH; a write that goes
 * over suspends its process until the queue drains under MB_SOCK_WRITE_LOW.
 * A small write made while the owner has messages waiting is held in the
 * socket's cork and goes out with its next write, in one system call, or
 * when the owner stops running (mb_sock_cork; sock.c, "Corking").
 * WebSocket mode (ws.h): frames are parsed and built on the loop thread;
 * the read buffer then holds whole messages, not bytes. What the peer
 * sends can make output of its own (pongs, the close reply), so a peer that
 * sends pings and never reads would grow the write queue without bound:
 * while the queue is over MB_SOCK_WRITE_HIGH the socket stops reading from
 * it, until the queue drains under MB_SOCK_WRITE_LOW (TCP flow control then
 * holds the peer back, as for a slow owner).
 * The end: however the end of a connection is met - a read that finds the
 * peer's FIN or an error, or a write that fails (the peer reset it) - it
 * ends every wait on the socket at once (sock.c, conn_over): a blocked read
 * or write gets its result, the owner in active mode its closed or error
 * message. A failed write must do so too, since the reading side may be
 * stopped (read-ahead full, WebSocket output over the mark) and never learn
 * it; and a handle that closes under its owner tells the end first.
 *
 * Accepting: a listener accepts into its queue (acc_head) up to
 * MB_SOCK_ACCEPT_QUEUE connections and then leaves the next one to libuv,
 * which stops accepting (the kernel's backlog then holds the clients) until
 * the queue has room again. Passive, the owner takes them with accept; in
 * active mode each goes to the owner as a message {event = "tcp_accept",
 * socket = listener, conn = c} (the owner becomes c's owner as it is
 * sent), and an accept error as {event = "tcp_error", ...}. The messages
 * out are bounded too: at most MB_SOCK_ACCEPT_QUEUE not yet received
 * (ainflight; the Lua layer's receive reports each one taken with
 * mb_sock_received), so an owner that does not keep up holds back the
 * queue, then libuv, then the kernel, never its own mailbox.
 *
 * Ownership: a socket belongs to one process (sock->owner) and sits on that
 * process's list (p->socks, under p->lock), so that the owner's death closes
 * it. Lua values name a socket by id (slot + generation, like pids), looked
 * up in the socket table on every use; a closed socket's id finds nothing.
 *
 * Locks: sock->lock, then a process's lock (mb_io_deliver, owner lists);
 * never the other way round. Memory: a socket is freed when its handle is
 * closed and the last reference (table, lookups, posted commands) is gone.
 */
#ifndef MB_SOCK_H
#define MB_SOCK_H

#include <stdatomic.h>
#include <stdint.h>
#include <uv.h>

#include "err.h"
#include "proc.h"

#define MB_SOCK_RBUF_MAX (64 * 1024)
#define MB_SOCK_WRITE_HIGH (64 * 1024)
#define MB_SOCK_WRITE_LOW (16 * 1024)
/* The most pieces a write passes to mb_sock_write_now, and the most bytes
 * a cork holds (see mb_sock_cork). */
#define MB_SOCK_WRITE_PIECES 8
#define MB_SOCK_CORK_MAX (16 * 1024)
/* Accepted connections a listener holds before it stops accepting; in
 * active mode also the most messages (tcp_accept, tcp_error) a listener
 * has sent its owner that the owner has not received yet. */
#define MB_SOCK_ACCEPT_QUEUE 64

/* Results are 0 or negative codes: libuv's, or err.h's (MB_ECLOSED: the
 * socket or its peer closed). */

typedef enum { MB_SOCK_STREAM, MB_SOCK_LISTENER } mb_sock_kind_t;
/* What the socket's waiter waits for. */
typedef enum {
  MB_SW_NONE, MB_SW_READ, MB_SW_WRITE, MB_SW_ACCEPT, MB_SW_CONNECT
} mb_sock_wait_t;

/* One read item: raw bytes, or one WebSocket message. */
typedef struct mb_chunk {
  struct mb_chunk *next;
  size_t len;
  int binary;
  char data[];
} mb_chunk_t;

struct mb_ws;
struct mb_sock_linger;

/* One end's address, as mb_sock_name tells it (an IPv6 address's flow
 * label and scope are not kept: uv_ip6_name does not show them). */
typedef struct mb_sock_addr {
  uint8_t family;              /* AF_INET, AF_INET6, or 0: unknown */
  uint16_t port;               /* host order */
  uint8_t ip[16];              /* 4 bytes for AF_INET */
} mb_sock_addr_t;

/* Most sockets of a big server are idle connections, so the struct is kept
 * small (512 bytes at most, one mimalloc size class; sock.c asserts it): what only a gentle
 * close needs (the shutdown request, the linger timer) is allocated then
 * (struct mb_sock_linger), the addresses are kept compact, and the flags
 * are bytes. A byte flag is its own memory location, so a flag guarded by
 * the lock may sit next to one of the loop thread's (no bit-fields). */
typedef struct mb_sock {
  uv_tcp_t tcp;                /* first: handle->data is unused */
  uint64_t id;
  struct mb_sched *sched;      /* the loop that owns the handle */
  atomic_int refs;
  uint8_t kind;                /* mb_sock_kind_t */

  /* -- loop thread only -- */
  uint8_t handle_closing;
  uint8_t linger_on;           /* a gentle close began (close_gently) */
  struct mb_sock_linger *linger; /* its timer and request, until done */
  struct mb_ws *ws;
  long long ws_rx;             /* what ws's libwslay holds (ws_rx_held), */
  mb_pid_t ws_rx_by;           /* charged to this process */
  long long wq_charged;        /* wq as last charged (wq_sync), */
  mb_pid_t wq_by;              /* to this process */
  /* WebSocket payload bytes held back in the framer, still counted in wq
   * (here, in the lock's padding: the struct stays in its size class) */
  uint32_t ws_held;

  mb_lock_t lock;
  /* -- guarded by lock -- */
  _Atomic mb_pid_t owner;      /* 0 while in a listener's queue; written
                                  under lock, read without it by the owner's
                                  check (lib_tcp.c, self_sock) */
  struct mb_sock *onext, *oprev; /* the owner's list (owner's lock too) */
  mb_chunk_t *rhead, **rtail;  /* read and not yet taken */
  size_t rbytes;
  size_t wq;                   /* bytes queued for writing */
  mb_pid_t heir;               /* gets the socket if the owner dies; 0: none */
  mb_pid_t wpid;               /* the waiter (see wait) */
  uint32_t wseq;
  int err;                     /* a sticky error (negative uv code) */
  int posted;                  /* commands in flight to the loop */
  int ws_code;                 /* the close code, once closed */
  char *ws_reason;             /* its reason (malloc'd), or NULL */
  struct mb_sock *acc_head, **acc_tail; /* listener: accepted, not taken */
  uint16_t nacc;               /* listener: in acc_head (<= ACCEPT_QUEUE) */
  uint16_t ainflight;          /* listener: active-mode messages sent to
                                  the owner and not yet received */
  uint8_t wait;                /* mb_sock_wait_t: the owner waits for this */
  uint8_t active;              /* 0 passive, 1 active, 2 once */
  uint8_t closed;              /* close asked (by the owner or its death) */
  uint8_t eof;                 /* the peer closed (after rbuf); 2: told */
  uint8_t ws_mode;             /* read items are WebSocket messages */
  uint8_t paused;              /* reading stopped: rbuf full */
  uint8_t wpaused;             /* reading stopped: WebSocket output over
                                  MB_SOCK_WRITE_HIGH (see sock.c) */
  uint8_t exit_on_close;       /* end the owner when the peer goes (see
                                  mb_sock_set_exit_on_close) */
  uint8_t acc_paused;          /* listener: libuv holds a connection */
  uint8_t nodelay_inherited;   /* listener, loop thread: its connections
                                  get TCP_NODELAY from it (1), or not (2),
                                  or not known yet (0): accepted_nodelay */
  uint8_t ws_later;            /* owner-only: a WebSocket write held back
                                  (mb_sock_out_t.later) waits for a flush */
  mb_sock_addr_t local, peer;  /* family 0 until asked (resolve_name) */

  /* -- owner-only: bytes written and held back (mb_sock_cork) -- */
  char *cork;
  uint32_t cork_len, cork_cap;
} mb_sock_t;

/* Socket values: an id kind (pid.h) whose methods the Lua layer sets. */
extern mb_idkind_t mb_sock_kind;

/* Set up: register the socket values with the codec; close a dying
 * process's sockets (an exit hook); close the handles and the table at
 * shutdown. Once, at start-up. */
void mb_sock_init(void);

/* Look up a live socket by id; takes a reference. Any thread. */
mb_sock_t *mb_sock_get(uint64_t id);
void mb_sock_unref(mb_sock_t *s);

/* Create a listener on the calling scheduler's loop. Returns NULL with a
 * message in err. Scheduler thread. */
mb_sock_t *mb_sock_listen(mb_proc_t *owner, const char *host, int port,
                          int backlog, char *err, size_t errlen);
/* Start connecting on the calling scheduler's loop for owner, which then
 * waits (MB_SW_CONNECT, seq) for the result. Returns the socket (a
 * reference for the caller) or NULL with err. Scheduler thread. */
mb_sock_t *mb_sock_connect(mb_proc_t *owner, uint32_t seq, const char *host,
                           int port, char *err, size_t errlen);

/* Make p the owner (p must be alive); the socket must have no owner or be
 * taken from old. Returns 0, MB_ENOPROC when p is dead (the socket is then
 * closed), MB_ENOTOWNER when old is not the owner, MB_ECLOSED. */
int mb_sock_set_owner(mb_sock_t *s, mb_pid_t old, mb_proc_t *p);

/* Run fn(s) on the socket's loop, now if that is the calling thread and
 * nothing is in flight, else posted (holding a reference meanwhile). */
void mb_sock_run(mb_sock_t *s, void (*fn)(mb_sock_t *s, void *arg), void *arg);

/* Write what the socket takes at once of the nb buffers b, in order and in
 * one system call, without copying, when nothing is queued or in flight (so
 * the order of bytes holds), from any scheduler thread (the caller is the
 * owner, the only writer): returns the bytes written (0: none, or not
 * possible now) or a libuv error. Raw TCP only. */
long mb_sock_write_now(mb_sock_t *s, const uv_buf_t *b, unsigned nb);

/* Corking (sock.c explains when): hold the nb buffers b (len bytes in all)
 * back, to go out with the socket's next write or flush, if nothing is
 * queued or in flight and the cork has room; returns 1 if it did, else 0
 * (write them now). mb_sock_write_now writes what is corked first, in the
 * same system call. mb_sock_uncork(s, by) writes what is corked now if `by`
 * (the caller, running) owns s, else does nothing (what the kernel does
 * not take is queued; a failure becomes the socket's sticky error); the
 * owner calls it before it stops running, and mb_sock_close and
 * mb_sock_set_owner call it for the owner. Raw TCP; mb_sock_cork and
 * mb_sock_write_now only by the owner. */
int mb_sock_cork(mb_sock_t *s, const uv_buf_t *b, unsigned nb, size_t len);
void mb_sock_uncork(mb_sock_t *s, mb_pid_t by);

/* Loop-side commands for mb_sock_run. */
void mb_sock_do_close(mb_sock_t *s, void *arg);      /* arg: NULL */
void mb_sock_do_resume(mb_sock_t *s, void *arg);     /* restart reading */
void mb_sock_do_write(mb_sock_t *s, void *arg);      /* arg: mb_sock_out_t */
void mb_sock_do_accept(mb_sock_t *s, void *arg);     /* accept what waits */
void mb_sock_do_ws(mb_sock_t *s, void *arg);         /* arg: mb_sock_wsopt_t */
void mb_sock_do_ws_close(mb_sock_t *s, void *arg);   /* arg: mb_sock_out_t */
void mb_sock_do_nodelay(mb_sock_t *s, void *arg);    /* arg: non-NULL = on */

/* Bytes to write (or a WebSocket close: code in `binary`). */
typedef struct mb_sock_out {
  size_t len;
  int binary;
  int later;     /* WebSocket: framed with the next write or the flush that
                    mb_sock_uncork sends after it (sock.c, "Corking") */
  char data[];
} mb_sock_out_t;

typedef struct mb_sock_wsopt {
  int client;
  size_t max_message;
  size_t len;                  /* pending bytes read past the handshake */
  char data[];
} mb_sock_wsopt_t;

/* Close s for its owner `by`: drop it from the table and the owner's list
 * and run fn(s, arg) on its loop (mb_sock_do_close, or mb_sock_do_ws_close
 * with its close frame). Returns 0, or MB_ENOTOWNER if `by` is not the
 * owner (arg is then freed). Closing twice is not an error. Any thread. */
int mb_sock_close(mb_sock_t *s, mb_pid_t by,
                  void (*fn)(mb_sock_t *s, void *arg), void *arg);

/* The address of one end (peer or local) into host; returns the port, or
 * -1 when unknown. Any thread. */
int mb_sock_name(mb_sock_t *s, int peer, char *host, size_t hostlen);

/* In active mode, send what was read, then the end, to the owner. s->lock
 * held. Returns 1 when reading should resume (mb_sock_do_resume). */
int mb_sock_flush_active(mb_sock_t *s);

/* Set the active mode (0 passive, 1 active, 2 once) and send the owner
 * what is due at once: a stream's bytes read ahead, a listener's queued
 * connections. Any thread, s->lock not held. */
void mb_sock_set_active(mb_sock_t *s, int mode);

/* The owner received a message of socket `port` (msg->port): the Lua
 * layer's receive calls this for every such message it takes. A listener
 * sends its owner at most MB_SOCK_ACCEPT_QUEUE messages not yet received
 * (more connections wait in its queue, then in the kernel's backlog), so
 * an owner that does not keep up never gets an unbounded mailbox; this
 * frees a slot. Cheap when no listener has messages out. Any thread. */
void mb_sock_received(uint64_t port);

/* The message of a result code (MB_ECLOSED or a libuv error); writing
 * to a connection the peer closed (EPIPE) is "closed", as for a read. */
const char *mb_sock_strerror(int code);

/* The result of a wait that ends in success (true) or an error (nil, msg):
 * an mb_io_push_fn. */
struct mb_io_req;
int mb_sock_push_result(lua_State *L, struct mb_io_req *req);

/* Watching the peer for an owner that is busy elsewhere (a process serving
 * a request does not read its socket meanwhile, yet must not run on for a
 * client that has gone). mode MB_SOCK_EXIT_ON_ERROR: when reading or a
 * write queued on the loop fails (the peer reset the connection), the owner gets an exit signal whose
 * reason is the error's message ("connection reset by peer"); mode
 * MB_SOCK_EXIT_ON_CLOSE: also when the peer's FIN arrives (reason "peer
 * closed"); 0: off. It fires once, then is off; armed after the peer has
 * already gone, it fires at once. The signal comes from the owner itself,
 * so an owner that traps exits gets {event = "EXIT", pid = self, ...}.
 * A peer whose data fills the read buffer is not read further, so its FIN
 * is not seen until the owner reads. Any thread. */
#define MB_SOCK_EXIT_ON_ERROR 1
#define MB_SOCK_EXIT_ON_CLOSE 2
void mb_sock_set_exit_on_close(mb_sock_t *s, int mode);

/* Under one lock: if s is open and owner's, make heir its heir (0: none)
 * and, with mode >= 0, set its exit on close as mb_sock_set_exit_on_close
 * does; returns whether it was. Any thread. */
int mb_sock_guard(mb_sock_t *s, mb_pid_t owner, mb_pid_t heir, int mode);

#endif
