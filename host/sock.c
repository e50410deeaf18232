/* sock.c: TCP sockets on the schedulers' loops (see sock.h).
 *
 * Functions named do_* and on_* run on the socket's loop thread; the rest
 * say where they run.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include "idtab.h"
#include "io.h"
#include "scheduler.h"
#include "sock.h"
#include "ws.h"

/* Close a WebSocket or flush a stream for at most this long (ms). */
#define LINGER_MS 5000

/* Socket values (the Lua layer gives them their methods). */
mb_idkind_t mb_sock_kind = {"socket", NULL, NULL, MB_TAG_SOCKET, 0, 0};

/* -- The socket table ------------------------------------------------------ */

static mb_idtab_t tab = MB_IDTAB_INIT;

static void ref_sock(void *obj)
{
  atomic_fetch_add(&((mb_sock_t *)obj)->refs, 1);
}

/* Drop s from the table (its id finds nothing from now on); returns 1 if
 * it was there, and then the caller drops the table's reference. */
static int tab_remove(mb_sock_t *s)
{
  return mb_idtab_remove(&tab, s->id) != NULL;
}

mb_sock_t *mb_sock_get(uint64_t id)
{
  return mb_idtab_get(&tab, id, ref_sock);
}

static void chunks_free(mb_chunk_t *c)
{
  while (c) {
    mb_chunk_t *next = c->next;
    mb_free(c);
    c = next;
  }
}

static void recharge(mb_pid_t *by, long long *charged, mb_pid_t owner, long long now);

void mb_sock_unref(mb_sock_t *s)
{
  if (atomic_fetch_sub(&s->refs, 1) != 1)
    return;
  chunks_free(s->rhead);
  if (s->ws)
    mb_ws_free(s->ws);
  recharge(&s->wq_by, &s->wq_charged, s->wq_by, 0);   /* (the last reference) */
  mb_free(s->ws_reason);
  mb_free(s->cork);
  mb_free(s);
}

/* -- Creating and closing -------------------------------------------------- */

static void close_handles(mb_sock_t *s);
static void got_end(mb_sock_t *s, int code);

/* What a gentle close (close_gently) needs: the shutdown request and the
 * timer that bounds the wait, made only then - an idle connection does not
 * carry them (232 bytes). Freed once both are done: the request's callback
 * ran and the timer's handle closed. Loop thread only. */
typedef struct mb_sock_linger {
  uv_timer_t timer;            /* data NULL: a socket's (close_sock_handle) */
  uv_shutdown_t req;
  mb_sock_t *s;
  int pending;                 /* of the two above, not yet done */
} linger_t;

static void linger_done(linger_t *lg)
{
  if (--lg->pending > 0)
    return;
  if (lg->s->linger == lg)
    lg->s->linger = NULL;
  mb_free(lg);
}

/* Every connection of a big server holds one (sock.h): a byte past 512 puts
 * each in mimalloc's next size class, 640 (19,000 idle chat users held
 * 0.12 KB more each, unnoticed, until this check). */
_Static_assert(sizeof(mb_sock_t) <= 512, "mb_sock_t grew out of its size class");

/* A socket on the calling thread's loop: refs = table + its handle. */
static mb_sock_t *sock_new(mb_sock_kind_t kind)
{
  mb_sched_t *sched = mb_sched_self();
  mb_sock_t *s = mb_calloc(1, sizeof *s);
  s->kind = (uint8_t)kind;
  s->sched = sched;
  atomic_init(&s->refs, 2);
  mb_lock_init(&s->lock);
  s->rtail = &s->rhead;
  s->acc_tail = &s->acc_head;
  uv_tcp_init(mb_sched_loop(sched), &s->tcp);
  if ((s->id = mb_idtab_add(&tab, s)) == 0) {
    /* No id: close the handles at once; their callbacks free s. */
    atomic_fetch_sub(&s->refs, 1);
    close_handles(s);
    return NULL;
  }
  return s;
}

static void on_handle_closed(uv_handle_t *h)
{
  mb_sock_unref((mb_sock_t *)h);
}

static void on_linger_closed(uv_handle_t *h)
{
  linger_t *lg = (linger_t *)h;
  mb_sock_t *s = lg->s;
  linger_done(lg);
  mb_sock_unref(s);
}

static void accepted_close(mb_sock_t *s);

/* Close the handles now (loop thread, or main thread at shutdown). */
static void close_handles(mb_sock_t *s)
{
  if (s->handle_closing)
    return;
  mb_lock(&s->lock);   /* (write_foreign: the descriptor) */
  s->handle_closing = 1;
  /* A stream whose handle closes under its owner (not through
   * mb_sock_close) with no end told: every path that closes one tells the
   * end first (conn_over, ws_closed), and this makes sure no wait outlives
   * the handle whatever the path (at shutdown, on the main thread, no
   * process waits any more). */
  int untold = s->kind == MB_SOCK_STREAM && !s->closed && !s->eof && !s->err
               && mb_sched_self() == s->sched;
  mb_unlock(&s->lock);
  if (untold)
    got_end(s, MB_ECLOSED);
  if (s->linger) {
    uv_timer_stop(&s->linger->timer);
    uv_close((uv_handle_t *)&s->linger->timer, on_linger_closed);
  }
  uv_close((uv_handle_t *)&s->tcp, on_handle_closed);
  mb_lock(&s->lock);
  mb_sock_t *acc = s->acc_head;
  s->acc_head = NULL;
  s->acc_tail = &s->acc_head;
  s->nacc = 0;
  mb_unlock(&s->lock);
  while (acc) {
    mb_sock_t *next = acc->onext;
    accepted_close(acc);
    acc = next;
  }
}

static void do_close_handles(mb_sock_t *s, void *arg)
{
  (void)arg;
  close_handles(s);
}

static int mark_closed(mb_sock_t *s);

/* A connection that was accepted but never handed to a process, closed
 * with its listener (on the listener's loop, or the main thread at
 * shutdown). It may live on another loop (accept_one spreads them): its
 * handle is closed there, as a handle may only be touched on its own
 * loop's thread. */
static void accepted_close(mb_sock_t *c)
{
  mark_closed(c);
  if (mb_sched_self() && c->sched != mb_sched_self())
    mb_sock_run(c, do_close_handles, NULL);
  else
    close_handles(c);
}

static void on_linger(uv_timer_t *t)
{
  close_handles(((linger_t *)t)->s);
}

static void on_shutdown(uv_shutdown_t *req, int status)
{
  linger_t *lg = req->data;
  mb_sock_t *s = lg->s;
  if (s->ws == NULL || mb_ws_done(s->ws) || status < 0)
    close_handles(s);
  /* else: wait for the peer's close frame (or the linger timer) */
  linger_done(lg);
  mb_sock_unref(s);
}

/* Flush what is queued, then close; bounded by the linger timer. The
 * timer and the request each hold a reference to s. A plain stream with
 * nothing queued (an HTTP connection closed after its response) is closed
 * at once: close(2) sends the FIN after what the kernel holds, as the
 * shutdown would, and so saves a system call, the timer and a turn of the
 * loop (with what resolve_name and accepted_nodelay save, a connection per
 * request makes 10 system calls instead of 14, and 4.5% fewer
 * instructions in user space). A WebSocket always lingers: its close
 * handshake is the peer's to finish. */
static void close_gently(mb_sock_t *s)
{
  if (s->handle_closing || s->linger_on)
    return;
  s->linger_on = 1;
  if (s->kind == MB_SOCK_LISTENER ||
      (s->ws == NULL && uv_stream_get_write_queue_size((uv_stream_t *)&s->tcp) == 0)) {
    close_handles(s);
    return;
  }
  linger_t *lg = mb_malloc(sizeof *lg);
  lg->s = s;
  lg->pending = 2;
  uv_timer_init(mb_sched_loop(s->sched), &lg->timer);
  lg->timer.data = NULL;   /* marks it as a socket's (see close_sock_handle) */
  uv_timer_start(&lg->timer, on_linger, LINGER_MS, 0);
  s->linger = lg;
  lg->req.data = lg;
  atomic_fetch_add(&s->refs, 2);
  if (uv_shutdown(&lg->req, (uv_stream_t *)&s->tcp, on_shutdown) < 0) {
    linger_done(lg);
    mb_sock_unref(s);
    close_handles(s);
  }
}

void mb_sock_do_close(mb_sock_t *s, void *arg)
{
  (void)arg;
  /* While the host stops (SIGTERM), a WebSocket closes going away. */
  if (s->ws && !mb_ws_done(s->ws))
    mb_ws_close(s->ws, mb_proc_stopping() ? 1001 : 1000, NULL, 0);   /* close_gently follows */
  close_gently(s);
}

/* Active-mode messages of all listeners not yet received (the sum of their
 * ainflight): while it is 0, mb_sock_received has nothing to look up. */
static atomic_uint ainflight_total;

/* The owner will never receive s's messages out (it died, or s closed):
 * forget them. s->lock held. */
static void drop_inflight(mb_sock_t *s)
{
  if (s->ainflight > 0)
    atomic_fetch_sub(&ainflight_total, (unsigned)s->ainflight);
  s->ainflight = 0;
}

/* Mark s closed and drop it from the table: any thread, s->lock not held. */
static int mark_closed(mb_sock_t *s)
{
  mb_lock(&s->lock);
  int was = s->closed;
  s->closed = 1;
  s->owner = 0;
  s->active = 0;
  drop_inflight(s);
  mb_unlock(&s->lock);
  if (tab_remove(s))
    mb_sock_unref(s);
  return was;
}

/* -- Commands to the loop -------------------------------------------------- */

typedef struct cmd {
  mb_sock_t *s;
  void (*fn)(mb_sock_t *s, void *arg);
  void *arg;
} cmd_t;

static void run_posted(void *arg)
{
  cmd_t *c = arg;
  mb_sock_t *s = c->s;
  c->fn(s, c->arg);
  mb_lock(&s->lock);
  s->posted--;
  mb_unlock(&s->lock);
  mb_sock_unref(s);
  mb_free(c);
}

void mb_sock_run(mb_sock_t *s, void (*fn)(mb_sock_t *s, void *arg), void *arg)
{
  mb_lock(&s->lock);
  int now = mb_sched_self() == s->sched && s->posted == 0;
  if (!now)
    s->posted++;
  mb_unlock(&s->lock);
  if (now) {
    fn(s, arg);
    return;
  }
  cmd_t *c = mb_malloc(sizeof *c);
  c->s = s;
  c->fn = fn;
  c->arg = arg;
  atomic_fetch_add(&s->refs, 1);
  mb_sched_post(s->sched, run_posted, c);
}

/* -- Messages of active mode ----------------------------------------------- */

/* Start {event = event, socket = <id>, ...nmore pairs}. */
static void msg_start(mb_msgb_t *b, size_t room, uint64_t id, const char *event,
                      uint32_t nmore)
{
  mb_msgb_init(b, 48 + room);
  mb_msgb_table(b, 0, 2 + nmore);
  mb_msgb_cstring(b, "event");
  mb_msgb_cstring(b, event);
  mb_msgb_cstring(b, "socket");
  mb_msgb_id(b, &mb_sock_kind, id);
}

/* The message, made the socket's, or NULL when memory runs out. */
static mb_msg_t *msg_end(mb_msgb_t *b, uint64_t id)
{
  mb_msg_t *m = mb_msgb_finish(b, 1);
  if (m) {
    m->kind = MB_MSG_USER;
    m->port = id;
  }
  return m;
}

/* {event = event, socket = s, data = data[, binary = bool]}: binary < 0
 * for a TCP message (no binary field). */
static mb_msg_t *sock_msg(uint64_t id, const char *event, const char *data,
                          size_t len, int binary)
{
  mb_msgb_t b;
  int ws = binary >= 0;
  msg_start(&b, len + 16, id, event, ws ? 2 : 1);
  mb_msgb_cstring(&b, "data");
  mb_msgb_string(&b, data, len);
  if (ws) {
    mb_msgb_cstring(&b, "binary");
    mb_msgb_bool(&b, binary);
  }
  return msg_end(&b, id);
}

/* {event = event, socket = s[, code = code][, reason = reason]}. */
static mb_msg_t *sock_msg_end(uint64_t id, const char *event, int code,
                              const char *reason)
{
  mb_msgb_t b;
  size_t rlen = reason ? strlen(reason) : 0;
  msg_start(&b, rlen + 32, id, event, (code ? 1 : 0) + (reason ? 1 : 0));
  if (code) {
    mb_msgb_cstring(&b, "code");
    mb_msgb_number(&b, code);
  }
  if (reason) {
    mb_msgb_cstring(&b, "reason");
    mb_msgb_string(&b, reason, rlen);
  }
  return msg_end(&b, id);
}

/* The end of the stream as the owner's message. s->lock held. */
static mb_msg_t *end_msg(mb_sock_t *s)
{
  if (s->ws_mode)
    return sock_msg_end(s->id, "ws_closed", s->ws_code ? s->ws_code : 1006,
                              s->ws_reason ? s->ws_reason : "");
  if (s->err && s->err != MB_ECLOSED)
    return sock_msg_end(s->id, "tcp_error", 0, uv_strerror(s->err));
  return sock_msg_end(s->id, "tcp_closed", 0, NULL);
}

/* In active mode, send what was read (and then the end) to the owner.
 * s->lock held; returns 1 if reading should resume (the buffer drained). */
int mb_sock_flush_active(mb_sock_t *s)
{
  while (s->active && s->owner && s->rhead && s->rhead->binary >= 0) {
    mb_chunk_t *c = s->rhead;
    s->rhead = c->next;
    if (s->rhead == NULL)
      s->rtail = &s->rhead;
    s->rbytes -= c->len;
    mb_msg_t *m = mb_must(sock_msg(s->id, s->ws_mode ? "ws" : "tcp", c->data,
                                   c->len, s->ws_mode ? c->binary : -1));
    mb_proc_send(s->owner, m);
    mb_free(c);
    if (s->active == 2)
      s->active = 0;
  }
  if (s->active && s->owner && s->rhead == NULL && (s->eof || s->err)
      && s->eof != 2) {
    mb_proc_send(s->owner, mb_must(end_msg(s)));
    s->eof = 2;   /* the end was told */
    s->active = 0;
  }
  return s->paused && s->rbytes < MB_SOCK_RBUF_MAX;
}

/* -- Handing results to a waiting process ---------------------------------- */

static int push_chunk(lua_State *L, mb_io_req_t *req)
{
  mb_chunk_t *c = req->extra;
  lua_pushlstring(L, c->data, c->len);
  if (req->flags) {
    lua_pushboolean(L, c->binary);
    return 2;
  }
  return 1;
}

static void free_chunk(mb_io_req_t *req)
{
  mb_free(req->extra);
}

const char *mb_sock_strerror(int code)
{
  int closed = code == MB_ECLOSED || code == UV_EPIPE;
  return closed ? "closed" : uv_strerror(code);
}

int mb_sock_push_result(lua_State *L, mb_io_req_t *req)
{
  if (req->err == 0) {
    lua_pushboolean(L, 1);
    return 1;
  }
  lua_pushnil(L);
  lua_pushstring(L, mb_sock_strerror(req->err));
  return 2;
}

/* Give req to the waiter of kind w, if that is what it waits for. s->lock
 * held. Returns 1 if the process took it (req is then its). */
static int give(mb_sock_t *s, mb_sock_wait_t w, mb_io_req_t *req)
{
  if (s->wait != w)
    return 0;
  req->pid = s->wpid;
  req->seq = s->wseq;
  s->wait = MB_SW_NONE;
  return mb_io_deliver(req);
}

/* Tell the waiter of kind w the result err (0: success). s->lock held. */
static void give_result(mb_sock_t *s, mb_sock_wait_t w, int err)
{
  if (s->wait != w)
    return;
  mb_io_req_t *req = mb_io_new(sizeof *req, NULL, mb_sock_push_result);
  req->err = err;
  if (!give(s, w, req))
    mb_io_free(req);
}

/* -- Reading ---------------------------------------------------------------- */

static mb_chunk_t *chunk_new(const void *data, size_t len, int binary)
{
  mb_chunk_t *c = mb_malloc(sizeof *c + len);
  c->next = NULL;
  c->len = len;
  c->binary = binary;
  memcpy(c->data, data, len);
  return c;
}

/* Something was read (raw: bytes off the wire, else a WebSocket message):
 * to the waiter, to the owner, or into the buffer. */
static void got_chunk(mb_sock_t *s, mb_chunk_t *c, int raw)
{
  mb_lock(&s->lock);
  if (s->closed) {
    mb_unlock(&s->lock);
    mb_free(c);
    return;
  }
  /* Raw bytes in WebSocket mode before the framer exists: the switch is on
   * its way; keep them, in order, for it (mb_sock_do_ws feeds them in). */
  if (raw && s->ws_mode)
    c->binary = -1;
  if (s->wait == MB_SW_READ && s->rhead == NULL && c->binary >= 0) {
    mb_io_req_t *req = mb_io_new(sizeof *req, NULL, push_chunk);
    req->extra = c;
    req->flags = s->ws_mode;
    req->free = free_chunk;
    if (give(s, MB_SW_READ, req)) {
      mb_unlock(&s->lock);
      return;
    }
    req->extra = NULL;
    mb_io_free(req);
  }
  *s->rtail = c;
  s->rtail = &c->next;
  s->rbytes += c->len;
  mb_sock_flush_active(s);
  if (s->rbytes >= MB_SOCK_RBUF_MAX && !s->paused && !s->handle_closing) {
    s->paused = 1;
    uv_read_stop((uv_stream_t *)&s->tcp);
  }
  mb_unlock(&s->lock);
}

/* Does the end `code` (MB_ECLOSED or a libuv error) fire the owner's
 * exit_on_close? If so send the signal and disarm. s->lock held. */
static void exit_on_end(mb_sock_t *s, int code)
{
  int mode = s->exit_on_close;
  if (!mode || !s->owner || s->closed)
    return;
  if (code == MB_ECLOSED && mode != MB_SOCK_EXIT_ON_CLOSE)
    return;
  s->exit_on_close = 0;
  const char *why = code == MB_ECLOSED ? "peer closed" : mb_sock_strerror(code);
  mb_proc_exit_signal(s->owner, s->owner, mb_must(mb_msg_string(why)), 0);
}

/* Under s->lock: as mb_sock_set_exit_on_close. */
static void set_exit_on_close(mb_sock_t *s, int mode)
{
  s->exit_on_close = mode;
  if (s->err && s->err != MB_ECLOSED)
    exit_on_end(s, s->err);
  else if (s->eof)
    exit_on_end(s, MB_ECLOSED);
}

void mb_sock_set_exit_on_close(mb_sock_t *s, int mode)
{
  mb_lock(&s->lock);
  set_exit_on_close(s, mode);
  mb_unlock(&s->lock);
}

int mb_sock_guard(mb_sock_t *s, mb_pid_t owner, mb_pid_t heir, int mode)
{
  mb_lock(&s->lock);
  int mine = s->owner == owner && !s->closed;
  if (mine) {
    s->heir = heir;
    if (mode >= 0)
      set_exit_on_close(s, mode);
  }
  mb_unlock(&s->lock);
  return mine;
}

static void resolve_name(mb_sock_t *s, int peer);

/* The stream ended: code is MB_ECLOSED or a libuv error. */
static void got_end(mb_sock_t *s, int code)
{
  mb_lock(&s->lock);
  if (s->peer.family == 0 && s->kind == MB_SOCK_STREAM)
    resolve_name(s, 1);   /* while the kernel still knows it */
  if (code == MB_ECLOSED)
    s->eof = s->eof ? s->eof : 1;
  else if (!s->err)
    s->err = code;
  exit_on_end(s, code);
  if (s->rhead == NULL)
    give_result(s, MB_SW_READ, code);
  give_result(s, MB_SW_WRITE, code);
  mb_sock_flush_active(s);
  mb_unlock(&s->lock);
}

static void on_alloc(uv_handle_t *h, size_t size, uv_buf_t *buf)
{
  /* One buffer per loop thread: what is read is copied out at once. */
  static _Thread_local char rb[MB_SOCK_RBUF_MAX];
  (void)h;
  (void)size;
  buf->base = rb;
  buf->len = sizeof rb;
}

static void ws_feed(mb_sock_t *s, const char *data, size_t len);

/* The connection is over: the peer closed it (code MB_ECLOSED) or it broke
 * (a libuv error, met by a read or by a write). Reading stops, and all
 * that waits on the socket learns it now (got_end): a waiting reader or
 * writer, the owner in active mode (its closed or error message), an owner
 * armed with exit_on_close. A failed write must end the reader's wait
 * too, not only a waiting writer's: the reading side may never learn it by
 * itself, since reading may be stopped - by a full read buffer, or by a
 * WebSocket's output over the mark, the very state a peer that pings and
 * never reads leaves behind - and a WebSocket's framer, once its output
 * failed, is done (mb_ws_done) and its handle closed without another read.
 * A WebSocket is closed at once: there is no handshake left to finish.
 * Loop thread. */
static void conn_over(mb_sock_t *s, int code)
{
  if (!s->handle_closing)
    uv_read_stop((uv_stream_t *)&s->tcp);
  got_end(s, code);
  if (s->ws)
    close_handles(s);
}

static void on_read(uv_stream_t *st, ssize_t n, const uv_buf_t *buf)
{
  mb_sock_t *s = (mb_sock_t *)st;
  if (n == 0)
    return;
  if (n < 0) {
    conn_over(s, n == UV_EOF ? MB_ECLOSED : (int)n);
    return;
  }
  if (s->ws) {
    ws_feed(s, buf->base, (size_t)n);
    /* Its pongs and close reply count against the high-water mark like
     * the owner's writes: over it, stop reading from this peer. */
    mb_lock(&s->lock);
    int stop = s->wq > MB_SOCK_WRITE_HIGH && !s->wpaused && !s->handle_closing;
    if (stop)
      s->wpaused = 1;
    mb_unlock(&s->lock);
    if (stop)
      uv_read_stop(st);
    return;
  }
  got_chunk(s, chunk_new(buf->base, (size_t)n, 0), 1);
}

static void start_reading(mb_sock_t *s)
{
  int rc = uv_read_start((uv_stream_t *)&s->tcp, on_alloc, on_read);
  if (rc < 0)
    got_end(s, rc);
}

void mb_sock_do_nodelay(mb_sock_t *s, void *arg)
{
  if (!s->handle_closing)
    uv_tcp_nodelay(&s->tcp, arg != NULL);
}

void mb_sock_do_resume(mb_sock_t *s, void *arg)
{
  (void)arg;
  mb_lock(&s->lock);
  /* (Not after a failed write ended the connection: conn_over.) */
  int go = s->paused && s->rbytes < MB_SOCK_RBUF_MAX && !s->handle_closing && !s->err;
  if (go)
    s->paused = 0;
  go = go && !s->wpaused;   /* else wq_done restarts it */
  mb_unlock(&s->lock);
  if (go)
    start_reading(s);
}

/* -- Writing ---------------------------------------------------------------- */

/* What a socket holds outside every state - the bytes queued for writing
 * (wq), a WebSocket message being received (ws_rx) - is counted in the
 * host's total (--max-memory) and charged to the socket's owner (its
 * max_memory, where the killer of the process holding the most looks too):
 * a peer that reads nothing holds up to 64 KiB and the write that went over
 * the mark on each socket, 1.3 GB on 20,000 of them, which no limit saw
 * before. Loop thread: it alone moves these charges. */
static void charge(mb_pid_t pid, long long n)
{
  mb_proc_t *p = pid && n ? mb_proc_get(pid) : NULL;
  if (p) {
    atomic_fetch_add_explicit(&p->alloc.charged, (unsigned)n, memory_order_relaxed);
    mb_proc_unref(p);
  }
}

/* Bring a charge (*charged bytes, to *by) to `now` bytes charged to
 * owner; the whole of it moves when the socket changed hands. */
static void recharge(mb_pid_t *by, long long *charged, mb_pid_t owner, long long now)
{
  long long delta = now - *charged;
  if (delta == 0 && *by == owner)
    return;
  mb_alloc_count(delta);
  if (*by != owner) {
    charge(*by, -*charged);
    charge(owner, now);
    *by = owner;
  } else {
    charge(owner, delta);
  }
  *charged = now;
}

/* The write queue's charge brought to wq and the owner of the moment. The
 * writer adds to wq on its own thread and the loop takes bytes off, so the
 * charge follows at the loop's next step: when it queues what the kernel
 * did not take (raw_write), when bytes leave (wq_done), when the socket
 * changes hands with bytes queued (mb_sock_set_owner). */
static void wq_sync(mb_sock_t *s)
{
  mb_lock(&s->lock);
  long long wq = (long long)s->wq;
  mb_pid_t owner = atomic_load_explicit(&s->owner, memory_order_relaxed);
  mb_unlock(&s->lock);
  recharge(&s->wq_by, &s->wq_charged, owner, wq);
}

static void do_wq_sync(mb_sock_t *s, void *arg)
{
  (void)arg;
  wq_sync(s);
}

typedef struct wreq {
  uv_write_t req;
  mb_sock_t *s;
  size_t len;
  char data[];
} wreq_t;

/* n bytes left the queue (written or dropped). Reading stopped for the
 * queue (wpaused) resumes once it is under the low mark. */
static void wq_done(mb_sock_t *s, size_t n)
{
  mb_lock(&s->lock);
  s->wq -= n;
  long long wq = (long long)s->wq;
  mb_pid_t owner = atomic_load_explicit(&s->owner, memory_order_relaxed);
  int resume = 0;
  if (s->wq <= MB_SOCK_WRITE_LOW) {
    give_result(s, MB_SW_WRITE, 0);
    if (s->wpaused) {
      s->wpaused = 0;
      resume = !s->paused && !s->handle_closing && !s->err;
    }
  }
  mb_unlock(&s->lock);
  recharge(&s->wq_by, &s->wq_charged, owner, wq);
  if (resume)
    start_reading(s);
}

static void on_written(uv_write_t *req, int status)
{
  wreq_t *w = (wreq_t *)req;
  mb_sock_t *s = w->s;
  if (status < 0 && status != UV_ECANCELED)
    conn_over(s, status);   /* (ECANCELED: the handle closes) */
  wq_done(s, w->len);
  mb_sock_unref(s);
  mb_free(w);
}

/* Write len bytes on the wire; the caller counted them in s->wq. Returns 0
 * or a libuv error (then the bytes are dropped from the count and the
 * connection is over: conn_over). */
static int raw_write(mb_sock_t *s, const char *data, size_t len)
{
  if (s->handle_closing) {
    wq_done(s, len);
    return UV_EPIPE;
  }
  uv_stream_t *st = (uv_stream_t *)&s->tcp;
  size_t done = 0;
  if (uv_stream_get_write_queue_size(st) == 0) {
    uv_buf_t b = uv_buf_init((char *)data, (unsigned)len);
    int r = uv_try_write(st, &b, 1);
    if (r > 0)
      done = (size_t)r;
    else if (r < 0 && r != UV_EAGAIN) {
      wq_done(s, len);
      conn_over(s, r);
      return r;
    }
  }
  if (done == len) {
    wq_done(s, len);
    return 0;
  }
  size_t rest = len - done;
  wreq_t *w = mb_malloc(sizeof *w + rest);
  w->s = s;
  w->len = rest;
  memcpy(w->data, data + done, rest);
  if (done)
    wq_done(s, done);
  uv_buf_t b = uv_buf_init(w->data, (unsigned)rest);
  atomic_fetch_add(&s->refs, 1);
  int rc = uv_write(&w->req, st, &b, 1, on_written);
  if (rc < 0) {
    mb_sock_unref(s);
    mb_free(w);
    wq_done(s, rest);
    conn_over(s, rc);
    return rc;
  }
  if (!done)
    wq_sync(s);   /* (else wq_done did) */
  return 0;
}

/* A WebSocket message the framer refused (it failed: a protocol error or
 * the connection's end, which it has reported or conn_over has): the
 * writer learns it; the rest is as the end left it (a close frame of ours
 * may still be on its way out). */
static void write_refused(mb_sock_t *s, int rc)
{
  mb_lock(&s->lock);
  if (!s->err)
    s->err = rc;
  give_result(s, MB_SW_WRITE, rc);
  mb_unlock(&s->lock);
}

static void do_conn_over(mb_sock_t *s, void *arg)
{
  conn_over(s, (int)(intptr_t)arg);
}

/* Under s->lock: may a write go straight to the kernel? Nothing queued or
 * in flight (so the order of bytes holds), not closing, not framed. */
static int write_idle(const mb_sock_t *s)
{
  return s->posted == 0 && s->wq == 0 && !s->closed && !s->ws_mode && !s->handle_closing;
}

/* A write from another scheduler's thread than the socket's (its owner was
 * moved by stealing: in a chat, a quarter of the writes) goes straight to
 * the kernel too, rather than as a copy posted to the socket's loop, which
 * costs a copy, a post, often a wake of that loop, and a loop iteration.
 * It may not touch the libuv handle (not thread-safe), so it calls
 * sendmsg on the descriptor itself (uv_buf_t is laid out as struct iovec),
 * under the socket's lock: the loop sets handle_closing under that lock
 * before libuv closes the descriptor, so the descriptor is open for the
 * whole call; and with nothing queued or in flight (idle) the loop has no
 * write of its own under way. */
static long write_foreign(mb_sock_t *s, const uv_buf_t *b, unsigned nb)
{
  long r = 0;
  uv_os_fd_t fd;
  mb_lock(&s->lock);
  if (write_idle(s) && uv_fileno((uv_handle_t *)&s->tcp, &fd) == 0) {
    struct msghdr m;
    memset(&m, 0, sizeof m);
    m.msg_iov = (struct iovec *)b;
    m.msg_iovlen = nb;
    ssize_t n;
    do
      n = sendmsg(fd, &m, MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    r = n >= 0 ? (long)n : errno == EAGAIN || errno == EWOULDBLOCK ? 0 : -errno;
  }
  mb_unlock(&s->lock);
  return r;
}

static long write_direct(mb_sock_t *s, const uv_buf_t *b, unsigned nb)
{
  if (mb_sched_self() != s->sched)
    return write_foreign(s, b, nb);
  mb_lock(&s->lock);
  int idle = write_idle(s);
  mb_unlock(&s->lock);
  if (!idle)
    return 0;
  int r = uv_try_write((uv_stream_t *)&s->tcp, b, nb);
  return r == UV_EAGAIN ? 0 : r;
}

/* -- Corking ------------------------------------------------------------------
 * A process that writes while messages wait in its mailbox will most likely
 * write again before it next waits (a chat user with several room lines
 * queued: one write and one system call a line, each of which on loopback
 * also runs the receiver's side of TCP). So mb_sock_cork keeps such a write
 * in s->cork, and the next write takes it along in the same system call;
 * whatever is still corked when the process stops running (it waits, its
 * slice ends, it exits) is written then (run.c calls mb_sock_uncork). A
 * write is held back at most one slice, and only while more work is
 * queued. The cork is owner-only: only the owner writes, and it is empty
 * whenever the owner is not running (run.c flushes after every resume,
 * before a process that ended is let go), so nothing corked is lost to the
 * owner's death; a close or a new owner flushes first. */

/* The cork's bytes that the kernel did not take go to the loop's queue,
 * ahead of anything written after them. */
static void cork_queue(mb_sock_t *s, size_t done)
{
  size_t len = s->cork_len - done;
  mb_sock_out_t *o = mb_malloc(sizeof *o + len);
  o->len = len;
  o->binary = 0;
  o->later = 0;
  memcpy(o->data, s->cork + done, len);
  mb_lock(&s->lock);
  s->wq += len;
  mb_unlock(&s->lock);
  mb_sock_run(s, mb_sock_do_write, o);
}

static void cork_drop(mb_sock_t *s)
{
  mb_free(s->cork);
  s->cork = NULL;
  s->cork_len = s->cork_cap = 0;
}

long mb_sock_write_now(mb_sock_t *s, const uv_buf_t *b, unsigned nb)
{
  if (s->cork_len == 0)
    return write_direct(s, b, nb);
  uv_buf_t all[1 + MB_SOCK_WRITE_PIECES];
  if (nb > MB_SOCK_WRITE_PIECES)
    nb = 0;   /* (no caller passes more) only the cork, then the queue */
  all[0] = uv_buf_init(s->cork, s->cork_len);
  if (nb)
    memcpy(all + 1, b, nb * sizeof *b);
  long n = write_direct(s, all, nb + 1);
  if (n < 0) {
    cork_drop(s);
    return n;
  }
  if ((size_t)n < s->cork_len) {
    cork_queue(s, (size_t)n);
    n = 0;
  } else {
    n -= (long)s->cork_len;
  }
  cork_drop(s);
  return n;
}

int mb_sock_cork(mb_sock_t *s, const uv_buf_t *b, unsigned nb, size_t len)
{
  if (len > MB_SOCK_CORK_MAX - s->cork_len)
    return 0;
  mb_lock(&s->lock);
  int idle = write_idle(s) && !s->err;   /* (a failed flush: the write says so) */
  mb_unlock(&s->lock);
  if (!idle)
    return 0;
  if (s->cork_len + len > s->cork_cap) {
    size_t cap = s->cork_cap ? s->cork_cap : 256;
    while (cap < s->cork_len + len)
      cap *= 2;
    s->cork = mb_realloc(s->cork, cap);
    s->cork_cap = (uint32_t)cap;
  }
  for (unsigned i = 0; i < nb; i++) {
    memcpy(s->cork + s->cork_len, b[i].base, b[i].len);
    s->cork_len += (uint32_t)b[i].len;
  }
  return 1;
}

/* Frame and write the WebSocket messages held back (see below). */
static void ws_flush(mb_sock_t *s, void *arg)
{
  (void)arg;
  if (s->ws && mb_ws_flush(s->ws) < 0)
    write_refused(s, UV_EPIPE);
  wq_done(s, s->ws_held);
  s->ws_held = 0;
}

void mb_sock_uncork(mb_sock_t *s, mb_pid_t by)
{
  /* Only the owner's cork is its own to read (`by` runs, so it stays the
   * owner meanwhile); a socket given away or closed has another's, or none. */
  if (atomic_load_explicit(&s->owner, memory_order_acquire) != by)
    return;
  if (s->ws_later) {
    s->ws_later = 0;
    mb_sock_run(s, ws_flush, NULL);   /* after the writes it held back */
  }
  if (s->cork_len == 0)
    return;
  long n = mb_sock_write_now(s, NULL, 0);
  if (n < 0)   /* nobody to tell but the socket's waits: end them */
    mb_sock_run(s, do_conn_over, (void *)(intptr_t)n);
}

/* In WebSocket mode the framing is the loop's (ws.c), so a write held back
 * is held there: the owner marks it `later` (lib_tcp.c, under the same
 * rule as mb_sock_cork's), the framer queues it unframed, and the next
 * write that is not held, the flush mb_sock_uncork sends when the owner
 * stops running, a close or a read of the peer's frames frame what is
 * queued in one out() call, so one system call. The held payload stays
 * counted in wq (sock:queued() says so) until the flush, and at most
 * MB_SOCK_CORK_MAX bytes are held: a write past that goes out with the
 * rest at once. */
void mb_sock_do_write(mb_sock_t *s, void *arg)
{
  mb_sock_out_t *o = arg;
  int rc;
  if (s->ws) {
    /* The frames count in wq as they are written; the payload no more
     * once framed (or dropped), with what was held before it. */
    int later = o->later && o->len <= MB_SOCK_CORK_MAX - s->ws_held;
    rc = (later ? mb_ws_send_later : mb_ws_send)(s->ws, (const uint8_t *)o->data,
                                                 o->len, o->binary);
    if (later && rc == 0) {
      s->ws_held += (uint32_t)o->len;
    } else {
      wq_done(s, o->len + s->ws_held);
      s->ws_held = 0;
    }
    if (rc < 0)
      write_refused(s, UV_EPIPE);
  } else {
    raw_write(s, o->data, o->len);   /* (a failure: conn_over) */
  }
  mb_free(o);
}

/* -- WebSocket mode ---------------------------------------------------------- */

static int ws_out(void *ud, const uint8_t *data, size_t len)
{
  mb_sock_t *s = ud;
  mb_lock(&s->lock);
  s->wq += len;
  mb_unlock(&s->lock);
  return raw_write(s, (const char *)data, len) < 0 ? -1 : 0;
}

static void ws_message(void *ud, const uint8_t *data, size_t len, int binary)
{
  got_chunk(ud, chunk_new(data, len, binary), 0);
}

static void ws_closed(void *ud, int code, const char *reason, size_t len)
{
  mb_sock_t *s = ud;
  mb_lock(&s->lock);
  s->ws_code = code;
  mb_free(s->ws_reason);
  s->ws_reason = mb_malloc(len + 1);
  memcpy(s->ws_reason, reason, len);
  s->ws_reason[len] = '\0';
  mb_unlock(&s->lock);
  got_end(s, MB_ECLOSED);
}

/* What libwslay holds of a message being received (mb_ws_cb_t's held),
 * charged as the write queue is (see charge, "Writing"). */
static void ws_rx_held(void *ud, long long delta)
{
  mb_sock_t *s = ud;
  recharge(&s->ws_rx_by, &s->ws_rx, atomic_load_explicit(&s->owner, memory_order_relaxed),
           s->ws_rx + delta);
}

static void ws_feed(mb_sock_t *s, const char *data, size_t len)
{
  mb_ws_feed(s->ws, (const uint8_t *)data, len);
  if (mb_ws_done(s->ws)) {
    /* Both close frames went: end the TCP connection (at once if our
     * shutdown is already done and we only waited for the peer's). */
    uv_read_stop((uv_stream_t *)&s->tcp);
    if (s->linger_on)
      close_handles(s);
    else
      close_gently(s);
  }
}

void mb_sock_do_ws(mb_sock_t *s, void *arg)
{
  mb_sock_wsopt_t *o = arg;
  static const mb_ws_cb_t cb0 = {NULL, ws_out, ws_message, ws_closed, ws_rx_held};
  mb_ws_cb_t cb = cb0;
  cb.ud = s;
  if (s->handle_closing || s->ws) {
    mb_free(o);
    return;
  }
  s->ws = mb_ws_new(o->client, o->max_message, &cb);
  if (s->ws == NULL) {
    mb_free(o);
    got_end(s, UV_ENOMEM);
    close_handles(s);
    return;
  }
  /* Raw bytes read since the switch was asked go through the framer after
   * the pending ones, in the order they came. */
  mb_lock(&s->lock);
  mb_chunk_t *raw = s->rhead;
  s->rhead = NULL;
  s->rtail = &s->rhead;
  s->rbytes = 0;
  mb_unlock(&s->lock);
  if (o->len)
    ws_feed(s, o->data, o->len);
  for (mb_chunk_t *c = raw; c && !s->handle_closing; c = c->next)
    ws_feed(s, c->data, c->len);
  chunks_free(raw);
  mb_free(o);
  mb_sock_do_resume(s, NULL);
}

void mb_sock_do_ws_close(mb_sock_t *s, void *arg)
{
  mb_sock_out_t *o = arg;
  if (s->ws && !mb_ws_done(s->ws))
    mb_ws_close(s->ws, o->binary, o->data, o->len);
  mb_free(o);
  close_gently(s);
}

/* -- Owners ----------------------------------------------------------------- */

static void owner_link(mb_sock_t *s, mb_proc_t *p)
{
  MB_ASSERT_LOCKED(p);
  s->oprev = NULL;
  s->onext = p->socks;
  if (p->socks)
    p->socks->oprev = s;
  p->socks = s;
}

static void owner_unlink(mb_sock_t *s, mb_pid_t pid)
{
  mb_proc_t *p = mb_proc_get(pid);
  if (p == NULL)
    return;
  mb_proc_lock(p);
  if (p->socks == s || s->oprev) {
    if (s->oprev)
      s->oprev->onext = s->onext;
    else
      p->socks = s->onext;
    if (s->onext)
      s->onext->oprev = s->oprev;
  }
  s->onext = s->oprev = NULL;
  mb_proc_unlock(p);
  mb_proc_unref(p);
}

int mb_sock_set_owner(mb_sock_t *s, mb_pid_t old, mb_proc_t *p)
{
  if (old)
    mb_sock_uncork(s, old);   /* the owner gives it away: see mb_sock_close */
  mb_lock(&s->lock);
  if (s->owner != old || s->closed) {
    int rc = s->closed ? MB_ECLOSED : MB_ENOTOWNER;
    mb_unlock(&s->lock);
    return rc;
  }
  if (old)
    owner_unlink(s, old);
  /* The old owner's arrangements for its own end are not the new one's. */
  s->exit_on_close = 0;
  s->heir = 0;
  mb_proc_lock(p);
  int dead = p->dead;
  if (!dead)
    owner_link(s, p);
  mb_proc_unlock(p);
  s->owner = dead ? 0 : p->pid;
  if (!dead && s->kind == MB_SOCK_STREAM)
    atomic_store_explicit(&p->home, s->sched, memory_order_relaxed);
  mb_sock_flush_active(s);
  int queued = s->wq > 0;
  mb_unlock(&s->lock);
  if (queued && !dead)
    mb_sock_run(s, do_wq_sync, NULL);   /* the charge moves */
  if (dead) {
    /* Its new owner died meanwhile: the socket dies with it. */
    mark_closed(s);
    mb_sock_run(s, mb_sock_do_close, NULL);
    return MB_ENOPROC;
  }
  return 0;
}

int mb_sock_close(mb_sock_t *s, mb_pid_t by,
                  void (*fn)(mb_sock_t *s, void *arg), void *arg)
{
  mb_sock_uncork(s, by);   /* the owner closes: its corked bytes go first */
  mb_lock(&s->lock);
  if (s->closed || s->owner != by) {
    int was = s->closed;
    mb_unlock(&s->lock);
    mb_free(arg);
    return was ? 0 : MB_ENOTOWNER;
  }
  owner_unlink(s, by);
  mb_unlock(&s->lock);
  mark_closed(s);
  mb_sock_run(s, fn, arg);
  return 0;
}

/* Pass s, whose owner `from` is dying, to its heir. Returns 0, or
 * MB_ENOPROC if the heir is gone (s is then closed, or left for the caller
 * to close). */
static int pass_to_heir(mb_sock_t *s, mb_pid_t from, mb_pid_t heir)
{
  mb_proc_t *h = mb_proc_get(heir);
  if (h == NULL)
    return MB_ENOPROC;
  mb_lock(&s->lock);
  s->active = 0;   /* the heir chooses; nothing goes to it unasked */
  drop_inflight(s);   /* those died with the owner's mailbox */
  mb_unlock(&s->lock);
  int rc = mb_sock_set_owner(s, from, h);
  mb_proc_unref(h);
  if (rc < 0)
    return rc;
  mb_msgb_t b;
  msg_start(&b, 16, s->id, "tcp_heir", 1);
  mb_msgb_cstring(&b, "from");
  mb_msgb_id(&b, &mb_pid_kind, from);
  mb_proc_send(heir, mb_must(msg_end(&b, 0)));
  return 0;
}

static void owner_exit(mb_proc_t *p)
{
  if (p->sock_last) {
    mb_sock_unref(p->sock_last);
    p->sock_last = NULL;
  }
  mb_proc_lock(p);
  mb_sock_t *s = p->socks;
  p->socks = NULL;
  mb_proc_unlock(p);
  while (s) {
    mb_sock_t *next = s->onext;
    s->onext = s->oprev = NULL;
    atomic_fetch_add(&s->refs, 1);
    mb_lock(&s->lock);
    mb_pid_t heir = s->heir;
    s->heir = 0;
    s->exit_on_close = 0;
    mb_unlock(&s->lock);
    if (heir == 0 || heir == p->pid || pass_to_heir(s, p->pid, heir) < 0) {
      if (!mark_closed(s))
        mb_sock_run(s, mb_sock_do_close, NULL);
    }
    mb_sock_unref(s);
    s = next;
  }
}

static void drop_table_ref(void *obj)
{
  mb_sock_unref(obj);   /* the handles' references remain till they close */
}

static void sock_shutdown(void)
{
  mb_idtab_clear(&tab, drop_table_ref);
}

/* A closer (scheduler.h): every TCP handle whose data is NULL is a
 * socket's (the distribution layer's connections set theirs), and so is
 * every timer whose data is NULL (its linger timer), closed with its
 * socket. */
static int close_sock_handle(uv_handle_t *h)
{
  if (h->type == UV_TCP && h->data == NULL) {
    close_handles((mb_sock_t *)h);
    return 1;
  }
  return h->type == UV_TIMER && h->data == NULL;
}

void mb_sock_init(void)
{
  mb_id_register(&mb_sock_kind);
  mb_proc_add_exit_hook(owner_exit);
  mb_sched_add_closer(close_sock_handle);
  mb_sched_add_after_loops(sock_shutdown);
}

/* -- Listeners and accepting ------------------------------------------------ */

/* The compact form of a system address (family 0 if it is neither IPv4
 * nor IPv6). */
static mb_sock_addr_t addr_pack(const struct sockaddr_storage *ss)
{
  mb_sock_addr_t a;
  memset(&a, 0, sizeof a);
  if (ss->ss_family == AF_INET6) {
    const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)ss;
    a.family = AF_INET6;
    a.port = ntohs(in6->sin6_port);
    memcpy(a.ip, &in6->sin6_addr, 16);
  } else if (ss->ss_family == AF_INET) {
    const struct sockaddr_in *in = (const struct sockaddr_in *)ss;
    a.family = AF_INET;
    a.port = ntohs(in->sin_port);
    memcpy(a.ip, &in->sin_addr, 4);
  }
  return a;
}

/* An end's address, asked of the kernel the first time it is wanted and
 * kept: a connection's two are two system calls that most servers never
 * need. The peer's is also taken when the peer's end comes (got_end), as
 * the kernel forgets it once the connection is gone; so only a connection
 * reset before anyone asked has none. Any thread, s->lock held: the loop
 * sets handle_closing under it before libuv closes the descriptor (as for
 * write_foreign). */
static void resolve_name(mb_sock_t *s, int peer)
{
  uv_os_fd_t fd;
  if (s->handle_closing || uv_fileno((uv_handle_t *)&s->tcp, &fd) != 0)
    return;
  struct sockaddr_storage ss;
  socklen_t len = sizeof ss;
  memset(&ss, 0, sizeof ss);
  if (peer) {
    if (s->kind == MB_SOCK_STREAM && getpeername(fd, (struct sockaddr *)&ss, &len) == 0)
      s->peer = addr_pack(&ss);
  } else if (getsockname(fd, (struct sockaddr *)&ss, &len) == 0) {
    s->local = addr_pack(&ss);
  }
}

int mb_sock_name(mb_sock_t *s, int peer, char *host, size_t hostlen)
{
  mb_lock(&s->lock);
  if ((peer ? s->peer : s->local).family == 0)
    resolve_name(s, peer);
  mb_sock_addr_t a = peer ? s->peer : s->local;
  mb_unlock(&s->lock);
  if ((a.family != AF_INET && a.family != AF_INET6) ||
      uv_inet_ntop(a.family, a.ip, host, hostlen) != 0)
    return -1;
  return a.port;
}

static int parse_addr(const char *host, int port, struct sockaddr_storage *ss)
{
  if (strcmp(host, "localhost") == 0)
    host = "127.0.0.1";
  else if (strcmp(host, "*") == 0)
    host = "0.0.0.0";
  if (uv_ip4_addr(host, port, (struct sockaddr_in *)ss) == 0)
    return 0;
  if (uv_ip6_addr(host, port, (struct sockaddr_in6 *)ss) == 0)
    return 0;
  return UV_EINVAL;
}

static void hand_over(mb_sock_t *s, mb_sock_t *c);

/* A connection's new socket on this loop, reading at once, handed to the
 * listener l; or closed. */
static void adopt(mb_sock_t *l, uv_os_fd_t fd)
{
  mb_sock_t *c = sock_new(MB_SOCK_STREAM);
  if (c == NULL) {
    close(fd);
    return;
  }
  if (uv_tcp_open(&c->tcp, fd) < 0) {
    close(fd);
    accepted_close(c);
    return;
  }
  start_reading(c);
  hand_over(l, c);
}

typedef struct adoption {
  mb_sock_t *l;
  uv_os_fd_t fd;
} adoption_t;

static void do_adopt(void *arg)
{
  adoption_t *a = arg;
  adopt(a->l, a->fd);
  mb_sock_unref(a->l);
  mb_free(a);
}

/* dup(2), in a function of its own so that scripts/tsan.supp can name it:
 * libuv closes descriptors with a raw close syscall that TSan does not see,
 * so a number freed on one loop thread and returned by dup on another looks
 * to TSan like two threads racing on one descriptor. */
__attribute__((noinline)) static int sock_dup_fd(int fd)
{
  return dup(fd);
}

static void free_handle(uv_handle_t *h)
{
  mb_free(h);
}

/* TCP_NODELAY on an accepted connection (on by default: README): Linux
 * copies it from the listener (mb_sock_listen sets it there), so the first
 * connection is checked (one getsockopt) and the others are not set one by
 * one (a system call each) unless that one had not inherited it. The
 * listener's loop thread. */
static void accepted_nodelay(mb_sock_t *l, uv_os_fd_t fd)
{
  int on = 0;
  socklen_t len = sizeof on;
  if (l->nodelay_inherited == 0)
    l->nodelay_inherited = getsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, &len) == 0 && on ? 1 : 2;
  on = 1;
  if (l->nodelay_inherited == 2)
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);
}

/* Accept one connection into a new socket, reading at once. Connections
 * are spread over the schedulers' loops in turn, so that the I/O of many
 * connections is shared by the threads and each connection's process runs
 * where its socket's events wake it: one taken for another loop is accepted
 * here, its descriptor duplicated and opened there (libuv handles cannot
 * move between loops), and it is handed over from there. Returns the socket
 * if it stays on this loop, else NULL. */
static mb_sock_t *accept_one(mb_sock_t *s)
{
  mb_sched_t *to = mb_sched_pick();
  if (to != s->sched) {
    uv_tcp_t *tmp = mb_malloc(sizeof *tmp);
    uv_tcp_init(mb_sched_loop(s->sched), tmp);
    uv_os_fd_t fd = -1;
    if (uv_accept((uv_stream_t *)&s->tcp, (uv_stream_t *)tmp) == 0
        && uv_fileno((uv_handle_t *)tmp, &fd) == 0) {
      accepted_nodelay(s, fd);
      fd = sock_dup_fd(fd);
    }
    uv_close((uv_handle_t *)tmp, free_handle);
    if (fd >= 0) {
      adoption_t *a = mb_malloc(sizeof *a);
      a->l = s;
      a->fd = fd;
      atomic_fetch_add(&s->refs, 1);
      mb_sched_post(to, do_adopt, a);
    }
    return NULL;
  }
  mb_sock_t *c = sock_new(MB_SOCK_STREAM);
  if (c == NULL)
    return NULL;
  uv_os_fd_t fd;
  if (uv_accept((uv_stream_t *)&s->tcp, (uv_stream_t *)&c->tcp) < 0) {
    accepted_close(c);
    return NULL;
  }
  if (uv_fileno((uv_handle_t *)&c->tcp, &fd) == 0)
    accepted_nodelay(s, fd);
  start_reading(c);
  return c;
}

/* -- Listeners in active mode ------------------------------------------------ */

/* One more message out to the owner. s->lock held. */
static void count_out(mb_sock_t *s)
{
  s->ainflight++;
  atomic_fetch_add(&ainflight_total, 1);
  if (s->active == 2)
    s->active = 0;
}

/* Take from the queue the connections that go to the owner now (active,
 * and fewer than MB_SOCK_ACCEPT_QUEUE messages out), linked by onext, and
 * the owner they go to. s->lock held; send them with send_accepted once it
 * is released (that takes the connections' and the owner's locks). */
static mb_sock_t *take_due(mb_sock_t *s, mb_pid_t *owner)
{
  mb_sock_t *due = NULL, **tail = &due;
  while (s->active && s->owner && s->acc_head
         && s->ainflight < MB_SOCK_ACCEPT_QUEUE) {
    mb_sock_t *c = s->acc_head;
    s->acc_head = c->onext;
    if (s->acc_head == NULL)
      s->acc_tail = &s->acc_head;
    s->nacc--;
    c->onext = NULL;
    *tail = c;
    tail = &c->onext;
    count_out(s);
  }
  *owner = s->owner;
  return due;
}

/* Give each connection of `due` to owner and tell it with a tcp_accept
 * message of listener s (a port message of s, so that set_owner moves it
 * and receiving it frees its slot). A connection whose owner has died is
 * closed, and its slot freed. No lock held. */
static void send_accepted(mb_sock_t *s, mb_sock_t *due, mb_pid_t owner)
{
  if (due == NULL)
    return;
  mb_proc_t *p = mb_proc_get(owner);
  while (due) {
    mb_sock_t *c = due;
    due = c->onext;
    c->onext = NULL;
    if (p == NULL) {
      mark_closed(c);
      mb_sock_run(c, mb_sock_do_close, NULL);
    }
    if (p == NULL || mb_sock_set_owner(c, 0, p) < 0) {
      mb_lock(&s->lock);
      if (s->ainflight > 0) {
        s->ainflight--;
        atomic_fetch_sub(&ainflight_total, 1);
      }
      mb_unlock(&s->lock);
      continue;
    }
    mb_msgb_t b;
    msg_start(&b, 16, s->id, "tcp_accept", 1);
    mb_msgb_cstring(&b, "conn");
    mb_msgb_id(&b, &mb_sock_kind, c->id);
    mb_proc_send(owner, mb_must(msg_end(&b, s->id)));
  }
  if (p)
    mb_proc_unref(p);
}

/* After the queue shrank: if libuv holds a connection back for want of
 * room, accept it (on the loop). s->lock held; returns whether to. */
static int accept_room(mb_sock_t *s)
{
  return s->acc_paused && s->nacc < MB_SOCK_ACCEPT_QUEUE;
}

/* A listener's queue may go on: hand the due connections to the owner and
 * accept what libuv holds back. Called with s->lock held; releases it. */
static void hand_over_unlock(mb_sock_t *s)
{
  mb_pid_t owner;
  mb_sock_t *due = take_due(s, &owner);
  int room = accept_room(s);
  mb_unlock(&s->lock);
  send_accepted(s, due, owner);
  if (room)
    mb_sock_run(s, mb_sock_do_accept, NULL);
}

void mb_sock_set_active(mb_sock_t *s, int mode)
{
  mb_lock(&s->lock);
  s->active = mode;
  if (s->kind == MB_SOCK_STREAM) {
    int resume = mb_sock_flush_active(s);
    mb_unlock(&s->lock);
    if (resume)
      mb_sock_run(s, mb_sock_do_resume, NULL);
    return;
  }
  hand_over_unlock(s);
}

void mb_sock_received(uint64_t port)
{
  if (atomic_load_explicit(&ainflight_total, memory_order_relaxed) == 0)
    return;
  mb_sock_t *s = mb_sock_get(port);
  if (s == NULL)
    return;
  if (s->kind == MB_SOCK_LISTENER) {
    mb_lock(&s->lock);
    if (s->ainflight > 0) {
      s->ainflight--;
      atomic_fetch_sub(&ainflight_total, 1);
    }
    hand_over_unlock(s);
  }
  mb_sock_unref(s);
}

/* -- Handing connections over ------------------------------------------------ */

static int push_accepted(lua_State *L, mb_io_req_t *req);

static void free_accepted(mb_io_req_t *req)
{
  mb_sock_t *c = req->extra;
  if (c) {
    /* Its process died before it could take it. */
    mark_closed(c);
    mb_sock_run(c, mb_sock_do_close, NULL);
  }
}

/* A new connection: to the waiting acceptor, or into the queue. */
static void hand_over(mb_sock_t *s, mb_sock_t *c)
{
  mb_lock(&s->lock);
  if (s->closed) {
    mb_unlock(&s->lock);
    accepted_close(c);
    return;
  }
  if (s->wait == MB_SW_ACCEPT) {
    mb_io_req_t *req = mb_io_new(sizeof *req, NULL, push_accepted);
    req->extra = c;
    req->free = free_accepted;
    if (give(s, MB_SW_ACCEPT, req)) {
      mb_unlock(&s->lock);
      return;
    }
    req->extra = NULL;
    mb_io_free(req);
  }
  c->onext = NULL;
  *s->acc_tail = c;
  s->acc_tail = &c->onext;
  s->nacc++;
  mb_pid_t owner;
  mb_sock_t *due = take_due(s, &owner);
  mb_unlock(&s->lock);
  send_accepted(s, due, owner);
}

static void on_connection(uv_stream_t *server, int status)
{
  mb_sock_t *s = (mb_sock_t *)server;
  if (status < 0) {
    /* Out of descriptors, say: to the waiter, or in active mode to the
     * owner (a message that counts like a connection's). */
    mb_lock(&s->lock);
    mb_pid_t to = 0;
    if (s->wait == MB_SW_ACCEPT) {
      give_result(s, MB_SW_ACCEPT, status);
    } else if (s->active && s->owner && s->ainflight < MB_SOCK_ACCEPT_QUEUE) {
      to = s->owner;
      count_out(s);
    }
    mb_unlock(&s->lock);
    if (to)
      mb_proc_send(to, mb_must(sock_msg_end(s->id, "tcp_error", 0,
                                            uv_strerror(status))));
    return;
  }
  mb_lock(&s->lock);
  int full = s->nacc >= MB_SOCK_ACCEPT_QUEUE && s->wait != MB_SW_ACCEPT;
  if (full)
    s->acc_paused = 1;   /* libuv keeps the connection and stops accepting */
  mb_unlock(&s->lock);
  if (full)
    return;
  mb_sock_t *c = accept_one(s);
  if (c)
    hand_over(s, c);
}

void mb_sock_do_accept(mb_sock_t *s, void *arg)
{
  (void)arg;
  mb_lock(&s->lock);
  int go = s->acc_paused && !s->handle_closing;
  s->acc_paused = 0;
  mb_unlock(&s->lock);
  if (go) {
    mb_sock_t *c = accept_one(s);
    if (c)
      hand_over(s, c);
  }
}

mb_sock_t *mb_sock_listen(mb_proc_t *owner, const char *host, int port,
                          int backlog, char *err, size_t errlen)
{
  struct sockaddr_storage ss;
  if (parse_addr(host, port, &ss) < 0) {
    snprintf(err, errlen, "bad address '%s' (numeric IPv4/IPv6, localhost or *)", host);
    return NULL;
  }
  mb_sock_t *s = sock_new(MB_SOCK_LISTENER);
  if (s == NULL) {
    snprintf(err, errlen, "too many sockets");
    return NULL;
  }
  int rc = uv_tcp_bind(&s->tcp, (struct sockaddr *)&ss, 0);
  if (rc == 0) {
    uv_tcp_nodelay(&s->tcp, 1);   /* for its connections (accepted_nodelay) */
    rc = uv_listen((uv_stream_t *)&s->tcp, backlog, on_connection);
  }
  if (rc < 0) {
    snprintf(err, errlen, "%s", uv_strerror(rc));
    mark_closed(s);
    close_handles(s);
    return NULL;
  }
  mb_sock_set_owner(s, 0, owner);
  return s;
}

/* -- Connecting --------------------------------------------------------------- */


/* The connect's result, on the process's thread: the socket, or nil and
 * the error (the socket is then closed). */
static int push_connected(lua_State *L, mb_io_req_t *req)
{
  mb_sock_t *s = req->extra;
  if (req->err == 0) {
    mb_id_push(L, s->id, &mb_sock_kind);
    return 1;
  }
  mb_sock_close(s, mb_proc_of(L)->pid, mb_sock_do_close, NULL);
  return mb_sock_push_result(L, req);
}

static void free_connected(mb_io_req_t *req)
{
  mb_sock_unref(req->extra);
}

typedef struct conn {
  uv_connect_t req;
  uv_getaddrinfo_t gai;
  mb_sock_t *s;
  int port;
} conn_t;

static void on_connect(uv_connect_t *req, int status)
{
  conn_t *cn = (conn_t *)req;
  mb_sock_t *s = cn->s;
  if (status == 0 && !s->handle_closing) {
    uv_tcp_nodelay(&s->tcp, 1);
    start_reading(s);
  }
  mb_lock(&s->lock);
  if (s->wait == MB_SW_CONNECT) {
    mb_io_req_t *r = mb_io_new(sizeof *r, NULL, push_connected);
    r->err = status == UV_ECANCELED ? UV_ETIMEDOUT : status;
    r->extra = s;
    r->free = free_connected;
    atomic_fetch_add(&s->refs, 1);
    if (!give(s, MB_SW_CONNECT, r))
      mb_io_free(r);
  }
  mb_unlock(&s->lock);
  mb_sock_unref(s);
  mb_free(cn);
}

static void connect_to(conn_t *cn, const struct sockaddr *sa)
{
  mb_sock_t *s = cn->s;
  int rc = s->handle_closing ? UV_ECANCELED
                             : uv_tcp_connect(&cn->req, &s->tcp, sa, on_connect);
  if (rc < 0)
    on_connect(&cn->req, rc);
}

static void on_resolved(uv_getaddrinfo_t *gai, int status, struct addrinfo *ai)
{
  conn_t *cn = (conn_t *)((char *)gai - offsetof(conn_t, gai));
  if (status < 0) {
    on_connect(&cn->req, status);
    return;
  }
  struct sockaddr_storage ss;
  memcpy(&ss, ai->ai_addr, ai->ai_addrlen);
  ((struct sockaddr_in *)&ss)->sin_port = htons((uint16_t)cn->port);
  uv_freeaddrinfo(ai);
  connect_to(cn, (struct sockaddr *)&ss);
}

mb_sock_t *mb_sock_connect(mb_proc_t *owner, uint32_t seq, const char *host,
                           int port, char *err, size_t errlen)
{
  mb_sock_t *s = sock_new(MB_SOCK_STREAM);
  if (s == NULL) {
    snprintf(err, errlen, "too many sockets");
    return NULL;
  }
  mb_sock_set_owner(s, 0, owner);
  mb_lock(&s->lock);
  s->wait = MB_SW_CONNECT;
  s->wpid = owner->pid;
  s->wseq = seq;
  mb_unlock(&s->lock);
  conn_t *cn = mb_calloc(1, sizeof *cn);
  cn->s = s;
  cn->port = port;
  atomic_fetch_add(&s->refs, 1);   /* the request's */
  struct sockaddr_storage ss;
  if (parse_addr(host, port, &ss) == 0) {
    connect_to(cn, (struct sockaddr *)&ss);
  } else {
    struct addrinfo hints;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_INET;
    hints.ai_socktype = SOCK_STREAM;
    int rc = uv_getaddrinfo(mb_sched_loop(s->sched), &cn->gai, on_resolved,
                            host, NULL, &hints);
    if (rc < 0)
      on_connect(&cn->req, rc);
  }
  return s;
}

/* -- Accept, on the process side: push the connection it was handed. ------- */

static int push_accepted(lua_State *L, mb_io_req_t *req)
{
  mb_sock_t *c = req->extra;
  req->extra = NULL;
  if (mb_sock_set_owner(c, 0, mb_proc_of(L)) < 0) {
    lua_pushnil(L);
    lua_pushliteral(L, "closed");
    return 2;
  }
  mb_id_push(L, c->id, &mb_sock_kind);
  return 1;
}
