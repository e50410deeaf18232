/* dist.c: node connections and the distribution protocol (see dist.h):
 * the connection table, frames out (encoding, queueing, batched writes),
 * reading frames off the socket, the hooks through which processes reach
 * remote pids, and the public side. What a frame asks is done in
 * dist_recv.c; the handshakes and start-up are in dist_start.c.
 *
 * Functions named on_* and do_* run on the loop thread of the connection's
 * scheduler; hooks (proc.h) on their caller's thread.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "dist_int.h"
#include "etf.h"
#include "reg.h"
#include "remote.h"
#include "term.h"

/* -- State ------------------------------------------------------------------- */

pthread_mutex_t dist_lock = PTHREAD_MUTEX_INITIALIZER;
unsigned dist_tick_ms = MB_DIST_TICK_MS;
ei_cnode dist_ec;
uint32_t dist_self_atom;
int dist_running;
static conn_t **conns;         /* live connections (not DOWN) */
static int nconns, capconns;
static atomic_uint_fast64_t unlink_ids;

int mb_dist_on(void) { return dist_running; }
uint32_t mb_dist_self(void) { return dist_self_atom; }

void dist_log(const char *fmt, ...)
{
  char line[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(line, sizeof line, fmt, ap);
  va_end(ap);
  fprintf(stderr, "=DIST REPORT==== %s: %s\n", dist_node_text(dist_self_atom), line);
}

const char *dist_node_text(uint32_t atom)
{
  const char *s = mb_atom_name(atom, NULL);
  return s ? s : "?";
}

/* Let go of a hold on ref if it is another node's (remote.h): refs read
 * from control messages are held until dropped here; a remote monitor of
 * ours keeps its watcher's ref held as long as its pair is in mon_in. */
void dist_unhold(mb_ref_t ref)
{
  if (mb_id_is_remote(ref))
    mb_remote_ref_release(ref);
}

/* A connection's pairs are an open-addressed hash table (linear probing),
 * by ref for monitors and by the local/remote pair for links and node
 * monitors (a set uses one way throughout), so that a node holding many
 * links or monitors over one connection pays O(1) for each. Duplicates
 * may be added (a second link of the same pair); a delete takes one. */
static uint32_t pair_hash(mb_pid_t local, mb_pid_t remote, uint64_t ref)
{
  uint64_t k = ref ? ref : (local * 0x9E3779B97F4A7C15ull) ^ remote;
  return (uint32_t)((k * 0x9E3779B97F4A7C15ull) >> 32);
}

static void pairs_put(pairs_t *s, pair_t p)
{
  uint32_t mask = s->cap - 1, i = pair_hash(p.local, p.remote, p.ref) & mask;
  while (dist_pair_used(&s->v[i]))
    i = (i + 1) & mask;
  s->v[i] = p;
}

void dist_pairs_add(pairs_t *s, mb_pid_t local, mb_pid_t remote, uint64_t ref, uint32_t name)
{
  if (4 * (s->n + 1) > 3 * s->cap) {
    pair_t *old = s->v;
    uint32_t oldcap = s->cap;
    s->cap = oldcap ? 2 * oldcap : 8;
    s->v = mb_calloc(s->cap, sizeof *s->v);
    for (uint32_t i = 0; i < oldcap; i++)
      if (dist_pair_used(&old[i]))
        pairs_put(s, old[i]);
    mb_free(old);
  }
  pairs_put(s, (pair_t){local, remote, ref, name});
  s->n++;
}

/* Remove an entry with this ref (ref != 0) or this local/remote pair;
 * copy it to *out if asked. Returns 1 if found. */
int dist_pairs_del(pairs_t *s, mb_pid_t local, mb_pid_t remote, uint64_t ref, pair_t *out)
{
  if (s->n == 0)
    return 0;
  uint32_t mask = s->cap - 1, i = pair_hash(local, remote, ref) & mask;
  for (;; i = (i + 1) & mask) {
    pair_t *p = &s->v[i];
    if (!dist_pair_used(p))
      return 0;
    if (ref ? p->ref == ref : (p->local == local && p->remote == remote))
      break;
  }
  if (out)
    *out = s->v[i];
  /* Backward-shift deletion keeps every probe chain unbroken. */
  for (uint32_t j = i;;) {
    j = (j + 1) & mask;
    pair_t *q = &s->v[j];
    if (!dist_pair_used(q))
      break;
    uint32_t home = pair_hash(q->local, q->remote, q->ref) & mask;
    if (((j - home) & mask) >= ((j - i) & mask)) {
      s->v[i] = *q;
      i = j;
    }
  }
  memset(&s->v[i], 0, sizeof s->v[i]);
  s->n--;
  return 1;
}

void dist_conn_unref(conn_t *c)
{
  if (atomic_fetch_sub(&c->refs, 1) != 1)
    return;
  for (frame_t *f = c->out_head, *next; f; f = next) {
    next = f->next;
    mb_free(f);
  }
  mb_free(c->links.v);
  mb_free(c->mon_out.v);
  mb_free(c->mon_in.v);
  mb_free(c->node_mon.v);
  mb_free(c->rbuf);
  mb_free(c);
}

conn_t *dist_find(uint32_t node)
{
  for (int i = 0; i < nconns; i++)
    if (conns[i]->node == node)
      return conns[i];
  return NULL;
}

conn_t *dist_table_add(uint32_t node, int refs)
{
  conn_t *c = mb_calloc(1, sizeof *c);
  c->node = node;
  c->state = C_CONNECTING;
  c->out_tail = &c->out_head;
  c->fd = -1;
  atomic_init(&c->refs, refs);
  if (nconns == capconns) {
    capconns = capconns ? 2 * capconns : 8;
    conns = mb_realloc(conns, capconns * sizeof *conns);
  }
  conns[nconns++] = c;
  return c;
}

/* The connection of node, created (and connecting) if there is none; lock
 * held. NULL for our own node. */
static conn_t *get(uint32_t node)
{
  if (node == dist_self_atom)
    return NULL;
  conn_t *c = dist_find(node);
  if (c)
    return c;
  c = dist_table_add(node, 2);   /* the table, the connect work */
  mb_sched_post(mb_sched_pick(), dist_start_connect, c);
  return c;
}

static void table_remove(conn_t *c)
{
  for (int i = 0; i < nconns; i++)
    if (conns[i] == c) {
      conns[i] = conns[--nconns];
      return;
    }
}

/* -- Frames ---------------------------------------------------------------------- */

/* The control tuple (versioned) at buf (NULL: count). */
int dist_put_ctl(char *buf, int *idx, const ctl_t *c)
{
  int rc = 0;
  rc |= ei_encode_version(buf, idx);
  switch (c->op) {
  case OP_SEND:
    rc |= ei_encode_tuple_header(buf, idx, 3);
    rc |= ei_encode_long(buf, idx, c->op);
    rc |= ei_encode_atom(buf, idx, "");
    rc |= mb_etf_put_pid(buf, idx, c->to);
    break;
  case OP_REG_SEND:
    rc |= ei_encode_tuple_header(buf, idx, 4);
    rc |= ei_encode_long(buf, idx, c->op);
    rc |= mb_etf_put_pid(buf, idx, c->from);
    rc |= ei_encode_atom(buf, idx, "");
    rc |= mb_etf_put_atom(buf, idx, c->name);
    break;
  case OP_LINK:
    rc |= ei_encode_tuple_header(buf, idx, 3);
    rc |= ei_encode_long(buf, idx, c->op);
    rc |= mb_etf_put_pid(buf, idx, c->from);
    rc |= mb_etf_put_pid(buf, idx, c->to);
    break;
  case OP_UNLINK_ID:
  case OP_UNLINK_ID_ACK:
    rc |= ei_encode_tuple_header(buf, idx, 4);
    rc |= ei_encode_long(buf, idx, c->op);
    rc |= ei_encode_ulonglong(buf, idx, c->id);
    rc |= mb_etf_put_pid(buf, idx, c->from);
    rc |= mb_etf_put_pid(buf, idx, c->to);
    break;
  case OP_MONITOR_P:
  case OP_DEMONITOR_P: {
    /* The target: a pid, or the name of a name's id (remote.h). */
    uint32_t name = mb_remote_name_of(c->to);
    rc |= ei_encode_tuple_header(buf, idx, 4);
    rc |= ei_encode_long(buf, idx, c->op);
    rc |= mb_etf_put_pid(buf, idx, c->from);
    rc |= name ? mb_etf_put_atom(buf, idx, name) : mb_etf_put_pid(buf, idx, c->to);
    rc |= mb_etf_put_ref(buf, idx, c->ref);
    break;
  }
  case OP_ALIAS_SEND:
    rc |= ei_encode_tuple_header(buf, idx, 3);
    rc |= ei_encode_long(buf, idx, c->op);
    rc |= mb_etf_put_pid(buf, idx, c->from);
    rc |= mb_etf_put_ref(buf, idx, c->ref);
    break;
  case OP_EXIT:
  case OP_EXIT2:
  case OP_MONITOR_P_EXIT: {
    int mon = c->op == OP_MONITOR_P_EXIT;
    rc |= ei_encode_tuple_header(buf, idx, mon ? 5 : 4);
    rc |= ei_encode_long(buf, idx, c->op);
    if (mon && c->name)
      rc |= mb_etf_put_atom(buf, idx, c->name);
    else
      rc |= mb_etf_put_pid(buf, idx, c->from);
    rc |= mb_etf_put_pid(buf, idx, c->to);
    if (mon && c->raw_ref) {
      if (buf)
        memcpy(buf + *idx, c->raw_ref, (size_t)c->raw_ref_len);
      *idx += c->raw_ref_len;
    } else if (mon) {
      rc |= mb_etf_put_ref(buf, idx, c->ref);
    }
    long n = mb_etf_size(c->reason, MB_ETF_REASON | MB_ETF_BARE, NULL, 0);
    if (n < 0) {
      /* A reason with no Erlang form (a function...): say so instead. */
      rc |= ei_encode_atom(buf, idx, "unsendable_reason");
    } else {
      if (buf)
        mb_etf_write(c->reason, MB_ETF_REASON | MB_ETF_BARE, buf + *idx);
      *idx += (int)n;
    }
    break;
  }
  default:
    return -1;
  }
  return rc ? -1 : 0;
}

frame_t *dist_frame_alloc(size_t len)
{
  frame_t *f = mb_malloc(sizeof *f + 4 + len);
  f->next = NULL;
  f->len = 4 + len;
  unsigned char *p = (unsigned char *)f->data;
  p[0] = (unsigned char)(len >> 24);
  p[1] = (unsigned char)(len >> 16);
  p[2] = (unsigned char)(len >> 8);
  p[3] = (unsigned char)len;
  p[4] = PASS_THROUGH;
  return f;
}

/* A frame holding the control message and the message m (or none). */
frame_t *dist_frame_new(const ctl_t *c, const mb_msg_t *m)
{
  int csize = 0;
  if (dist_put_ctl(NULL, &csize, c) < 0)
    return NULL;
  long msize = m ? mb_etf_size(m, 0, NULL, 0) : 0;
  if (msize < 0)
    return NULL;
  size_t len = 1 + (size_t)csize + (size_t)msize;
  if (len > MB_DIST_MAX_FRAME)
    return NULL;
  frame_t *f = dist_frame_alloc(len);
  int idx = 0;
  dist_put_ctl(f->data + 5, &idx, c);
  if (m)
    mb_etf_write(m, 0, f->data + 5 + csize);
  return f;
}

static void do_flush(void *arg);
static void do_kill(void *arg);

/* Queue frame f on c (written once up); lock held. Takes f. Past
 * MB_DIST_QUEUE_MAX bytes queued, the connection is dropped: the peer does
 * not read what we send (senders in Lua wait at MB_DIST_BUSY_LIMIT, see
 * mb_dist_busy_wait, so only many of them at once or exit signals get
 * here). */
void dist_queue_locked(conn_t *c, frame_t *f)
{
  if (c->state == C_DOWN) {
    mb_free(f);
    return;
  }
  if (c->pend_bytes > MB_DIST_QUEUE_MAX) {
    mb_free(f);
    if (c->state == C_UP && !c->flush_posted) {
      c->flush_posted = 1;        /* no flush after this: the kill ends it */
      atomic_fetch_add(&c->refs, 1);
      mb_sched_post(c->sched, do_kill, c);
    }
    return;
  }
  if (c->pend_bytes == 0)
    c->progress_ms = dist_now_ms();
  c->pend_bytes += f->len;
  f->next = NULL;
  *c->out_tail = f;
  c->out_tail = &f->next;
  if (c->state == C_UP && !c->flush_posted) {
    c->flush_posted = 1;
    atomic_fetch_add(&c->refs, 1);
    mb_sched_post(c->sched, do_flush, c);
  }
}

/* Build and send a control message (and m) to node. */
void dist_send_ctl(uint32_t node, const ctl_t *ctl, const mb_msg_t *m)
{
  frame_t *f = dist_frame_new(ctl, m);
  if (f == NULL) {
    dist_log("cannot encode a message for %s (dropped)", dist_node_text(node));
    return;
  }
  pthread_mutex_lock(&dist_lock);
  conn_t *c = get(node);
  if (c)
    dist_queue_locked(c, f);
  else
    mb_free(f);
  pthread_mutex_unlock(&dist_lock);
}

/* -- Up and down --------------------------------------------------------------- */

static void on_closed(uv_handle_t *h)
{
  dist_conn_unref(h->data);
}

static void notify_waiters(waiter_t *w, int ok);
static int push_drained(lua_State *L, mb_io_req_t *req);
static void notify(waiter_t *w, int ok, int (*push)(lua_State *, mb_io_req_t *));

mb_msg_t *dist_reason_msg(const char *s)
{
  return mb_must(mb_msg_string(s));
}

/* The connection is gone: close its handles (loop thread, if open) and
 * tell every local end of its links and monitors. */
void dist_conn_down(conn_t *c, const char *why)
{
  pthread_mutex_lock(&dist_lock);
  if (c->state == C_DOWN) {
    pthread_mutex_unlock(&dist_lock);
    return;
  }
  int was_up = c->state == C_UP;
  c->state = C_DOWN;
  table_remove(c);
  pairs_t links = c->links, out = c->mon_out, in = c->mon_in, nm = c->node_mon;
  memset(&c->links, 0, sizeof c->links);
  memset(&c->mon_out, 0, sizeof c->mon_out);
  memset(&c->mon_in, 0, sizeof c->mon_in);
  memset(&c->node_mon, 0, sizeof c->node_mon);
  waiter_t *waiters = c->waiters, *busy = c->busy;
  c->waiters = c->busy = NULL;
  pthread_mutex_unlock(&dist_lock);

  notify(busy, 1, push_drained); /* their sends are lost with the connection */
  if (was_up && why)
    dist_log("connection to %s closed: %s", dist_node_text(c->node), why);
  if (c->open) {
    c->open = 0;
    uv_timer_stop(&c->tick);
    uv_close((uv_handle_t *)&c->tick, on_closed);
    uv_close((uv_handle_t *)&c->tcp, on_closed);
  }
  /* (A process that unlinked meanwhile drops its signal: mb_proc_drain.) */
  for (uint32_t i = 0; i < links.cap; i++)
    if (dist_pair_used(&links.v[i]))
      mb_proc_link_exit(links.v[i].local, links.v[i].remote,
                        dist_reason_msg("noconnection"));
  for (uint32_t i = 0; i < out.cap; i++) {
    if (!dist_pair_used(&out.v[i]))
      continue;
    mb_msg_t *m = dist_reason_msg("noconnection");
    m->kind = MB_MSG_DOWN;
    m->from = out.v[i].remote;
    m->ref = out.v[i].ref;
    mb_proc_send(out.v[i].local, m);
  }
  for (uint32_t i = 0; i < in.cap; i++) {
    if (!dist_pair_used(&in.v[i]))
      continue;
    if (in.v[i].local)
      mb_proc_unwatch_remote(in.v[i].local, in.v[i].ref);
    dist_unhold(in.v[i].ref);
  }
  for (uint32_t i = 0; i < nm.cap; i++) {
    if (!dist_pair_used(&nm.v[i]))
      continue;
    mb_msgb_t b;
    mb_msgb_init(&b, 64);
    mb_msgb_table(&b, 0, 2);
    mb_msgb_cstring(&b, "event");
    mb_msgb_cstring(&b, "nodedown");
    mb_msgb_cstring(&b, "node");
    mb_msgb_cstring(&b, dist_node_text(c->node));
    mb_msg_t *m = mb_must(mb_msgb_finish(&b, 1));
    m->kind = MB_MSG_USER;
    mb_proc_send(nm.v[i].local, m);
  }
  mb_free(links.v);
  mb_free(out.v);
  mb_free(in.v);
  mb_free(nm.v);
  notify_waiters(waiters, 0);
  dist_conn_unref(c);                 /* the table's reference */
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf);
static void on_tick(uv_timer_t *t);

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf)
{
  conn_t *c = h->data;
  if (c->rcap - c->rlen < 65536) {
    c->rcap = c->rcap ? c->rcap * 2 : 65536;
    if (c->rcap - c->rlen < 65536)
      c->rcap = c->rlen + 65536;
    c->rbuf = mb_realloc(c->rbuf, c->rcap);
  }
  buf->base = c->rbuf + c->rlen;
  buf->len = c->rcap - c->rlen;
}

/* The handshake is done and fd is connected to node c->node: run it on
 * scheduler s (the calling thread's). */
void dist_conn_up(conn_t *c, mb_sched_t *s, int fd, uint64_t flags)
{
  pthread_mutex_lock(&dist_lock);
  if (c->state != C_CONNECTING) {
    /* Another connection to the node won (both sides connected at once)
     * or it went down meanwhile. */
    pthread_mutex_unlock(&dist_lock);
    close(fd);
    return;
  }
  uv_loop_t *loop = mb_sched_loop(s);
  uv_tcp_init(loop, &c->tcp);
  uv_timer_init(loop, &c->tick);
  c->tcp.data = c->tick.data = c;
  atomic_fetch_add(&c->refs, 2);  /* the two handles */
  c->open = 1;
  int rc = uv_tcp_open(&c->tcp, fd);
  if (rc == 0) {
    c->state = C_UP;
    c->sched = s;
    c->flags = flags;
  }
  waiter_t *waiters = c->waiters;
  c->waiters = NULL;
  pthread_mutex_unlock(&dist_lock);
  if (rc) {
    close(fd);
    notify_waiters(waiters, 0);
    dist_conn_down(c, uv_strerror(rc));
    return;
  }
  uv_tcp_nodelay(&c->tcp, 1);
  c->last_recv = c->last_send = uv_now(loop);
  uv_timer_start(&c->tick, on_tick, dist_tick_ms / 3, dist_tick_ms / 3);
  uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
  atomic_fetch_add(&c->refs, 1);   /* what queued while connecting */
  pthread_mutex_lock(&dist_lock);
  c->flush_posted = 1;
  pthread_mutex_unlock(&dist_lock);
  do_flush(c);
  notify_waiters(waiters, 1);
}

/* -- Writing -------------------------------------------------------------------- */

/* One uv_write of every frame queued when the flush ran: under load a
 * write carries many frames (a writev), which is what makes a stream of
 * small messages cheap. */
typedef struct wreq {
  uv_write_t req;
  conn_t *c;
  frame_t *frames;
  size_t bytes;
  uv_buf_t bufs[];
} wreq_t;

static void on_write(uv_write_t *req, int status)
{
  wreq_t *w = (wreq_t *)req;
  conn_t *c = w->c;
  for (frame_t *f = w->frames, *next; f; f = next) {
    next = f->next;
    mb_free(f);
  }
  pthread_mutex_lock(&dist_lock);
  c->pend_bytes -= w->bytes;
  c->progress_ms = dist_now_ms();
  waiter_t *drained = NULL;
  if (c->pend_bytes <= MB_DIST_BUSY_LIMIT / 2) {
    drained = c->busy;
    c->busy = NULL;
  }
  pthread_mutex_unlock(&dist_lock);
  mb_free(w);
  notify(drained, 1, push_drained);
  if (status < 0 && status != UV_ECANCELED)
    dist_conn_down(c, uv_strerror(status));
  dist_conn_unref(c);
}

/* Write what is queued on c (loop thread; holds a reference for it). */
static void do_flush(void *arg)
{
  conn_t *c = arg;
  pthread_mutex_lock(&dist_lock);
  frame_t *list = c->out_head;
  c->out_head = NULL;
  c->out_tail = &c->out_head;
  c->flush_posted = 0;
  pthread_mutex_unlock(&dist_lock);
  if (list == NULL || !c->open) {
    for (frame_t *f = list, *next; f; f = next) {
      next = f->next;
      mb_free(f);
    }
    dist_conn_unref(c);
    return;
  }
  unsigned n = 0;
  for (frame_t *f = list; f; f = f->next)
    n++;
  wreq_t *w = mb_malloc(sizeof *w + n * sizeof(uv_buf_t));
  w->c = c;
  w->frames = list;
  w->bytes = 0;
  n = 0;
  for (frame_t *f = list; f; f = f->next) {
    w->bufs[n++] = uv_buf_init(f->data, (unsigned)f->len);
    w->bytes += f->len;
  }
  c->last_send = uv_now(c->tcp.loop);
  int rc = uv_write(&w->req, (uv_stream_t *)&c->tcp, w->bufs, n, on_write);
  if (rc) {
    on_write(&w->req, rc);       /* frees, and takes the connection down */
    return;
  }
}

/* The output queue went over MB_DIST_QUEUE_MAX (dist_queue_locked). */
static void do_kill(void *arg)
{
  conn_t *c = arg;
  if (c->open) {
    pthread_mutex_lock(&dist_lock);
    size_t queued = c->pend_bytes;
    pthread_mutex_unlock(&dist_lock);
    dist_log("closing the connection to %s: it does not read what we send "
             "(%zu bytes queued, limit %u)", dist_node_text(c->node), queued,
             (unsigned)MB_DIST_QUEUE_MAX);
    dist_conn_down(c, NULL);
  }
  dist_conn_unref(c);
}

static void on_tick(uv_timer_t *t)
{
  conn_t *c = t->data;
  uint64_t now = uv_now(t->loop);
  if (now - c->last_recv > 4 * (uint64_t)dist_tick_ms) {
    dist_conn_down(c, "net tick timeout");
    return;
  }
  /* Output that has not moved for as long: the peer does not read (it
   * may still send, so its ticks alone do not tell). */
  pthread_mutex_lock(&dist_lock);
  size_t queued = c->pend_bytes;
  uint64_t stuck = queued ? dist_now_ms() - c->progress_ms : 0;
  pthread_mutex_unlock(&dist_lock);
  if (stuck > 4 * (uint64_t)dist_tick_ms) {
    dist_log("closing the connection to %s: it has not read for %llu ms "
             "(%zu bytes queued)", dist_node_text(c->node), (unsigned long long)stuck, queued);
    dist_conn_down(c, NULL);
    return;
  }
  if (now - c->last_send >= dist_tick_ms / 3) {
    frame_t *f = mb_malloc(sizeof *f + 4);
    f->len = 4;
    memset(f->data, 0, 4);
    pthread_mutex_lock(&dist_lock);
    dist_queue_locked(c, f);
    pthread_mutex_unlock(&dist_lock);
  }
}

/* -- Reading ------------------------------------------------------------------- */

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf)
{
  conn_t *c = s->data;
  if (n < 0) {
    dist_conn_down(c, n == UV_EOF ? "closed by the peer" : uv_strerror((int)n));
    return;
  }
  c->rlen += (size_t)n;
  c->last_recv = uv_now(s->loop);
  size_t at = 0;
  while (c->rlen - at >= 4) {
    const unsigned char *p = (const unsigned char *)c->rbuf + at;
    uint32_t len = (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
    if (len > MB_DIST_MAX_FRAME) {
      dist_log("closing the connection to %s: a frame of %u bytes (limit %u)",
            dist_node_text(c->node), len, MB_DIST_MAX_FRAME);
      dist_conn_down(c, NULL);
      return;
    }
    if (c->rlen - at - 4 < len)
      break;
    int rc = len ? dist_handle_frame(c, c->rbuf + at + 4, len) : 0;
    if (rc < 0) {
      dist_log("closing the connection to %s: %s", dist_node_text(c->node),
               rc == MB_ETOOMANY ? "a link, monitor or exit signal from a process this "
                                   "host cannot name (its table of other nodes' pids is full)"
                                 : "malformed message");
      dist_conn_down(c, NULL);
      return;
    }
    at += 4 + len;
  }
  memmove(c->rbuf, c->rbuf + at, c->rlen - at);
  c->rlen -= at;
  /* Keep the buffer small between large frames. */
  if (c->rlen == 0 && c->rcap > (1u << 20)) {
    mb_free(c->rbuf);
    c->rbuf = NULL;
    c->rcap = 0;
  }
}

/* -- Hooks (proc.h) ------------------------------------------------------------ */

/* Does node's connection (up) take ALIAS_SEND? */
static int takes_alias(uint32_t node)
{
  pthread_mutex_lock(&dist_lock);
  conn_t *c = dist_find(node);
  int yes = c && c->state == C_UP && (c->flags & DFLAG_ALIAS);
  pthread_mutex_unlock(&dist_lock);
  return yes;
}

static void hook_send(mb_pid_t to, mb_msg_t *m)
{
  uint32_t node = mb_remote_node(to), name = mb_remote_name_of(to);
  if (name && m->kind == MB_MSG_USER) {
    /* A name's id (the pid of a DOWN by name): a send to the name. */
    char err[64];
    mb_dist_send_named(node, name, m->from, m, err, sizeof err);
    return;
  }
  if (node == 0 || node == dist_self_atom || name) {
    mb_msg_free(m);
    return;
  }
  ctl_t x = {.from = m->from, .to = to};
  const mb_msg_t *payload = NULL;
  mb_rref_t alias;
  switch (m->kind) {
  case MB_MSG_USER:
    x.op = OP_SEND;
    payload = m;
    /* Sent with an alias of the receiver's node (mb.send's third
     * argument): to the alias, so that the receiver's node drops it once
     * the alias is gone (gen_server's replies). A peer that takes no
     * ALIAS_SEND gets it at the pid. */
    if (m->ref && mb_remote_ref_get(m->ref, &alias) == 0 && alias.node == node &&
        takes_alias(node)) {
      x.op = OP_ALIAS_SEND;
      x.ref = m->ref;
    }
    break;
  case MB_MSG_EXIT:
  case MB_MSG_KILL:
    x.op = OP_EXIT2;
    x.reason = m;
    break;
  case MB_MSG_LINK_EXIT:
    x.op = OP_EXIT;
    x.reason = m;
    pthread_mutex_lock(&dist_lock);
    conn_t *c = dist_find(node);
    if (c)
      dist_pairs_del(&c->links, m->from, to, 0, NULL);
    pthread_mutex_unlock(&dist_lock);
    if (c == NULL) {             /* no connection, no link to tell */
      mb_msg_free(m);
      return;
    }
    break;
  case MB_MSG_DOWN: {
    x.op = OP_MONITOR_P_EXIT;
    x.reason = m;
    x.ref = m->ref;
    pair_t p = {0};
    pthread_mutex_lock(&dist_lock);
    conn_t *c = dist_find(node);
    int found = c && dist_pairs_del(&c->mon_in, 0, 0, m->ref, &p);
    pthread_mutex_unlock(&dist_lock);
    if (!found) {
      mb_msg_free(m);
      return;
    }
    x.name = p.name;
    break;
  }
  default:
    mb_msg_free(m);
    return;
  }
  dist_send_ctl(node, &x, payload);
  if (m->kind == MB_MSG_DOWN)
    dist_unhold(x.ref);               /* the monitor's pair is gone */
  mb_msg_free(m);
}

static void hook_link(mb_pid_t self, mb_pid_t remote, int on)
{
  uint32_t node = mb_remote_node(remote);
  if (node == 0 || node == dist_self_atom || mb_remote_name_of(remote)) {
    if (on)
      mb_proc_link_exit(self, remote, dist_reason_msg("noproc"));
    return;
  }
  ctl_t x = {.op = on ? OP_LINK : OP_UNLINK_ID, .from = self, .to = remote,
             .id = atomic_fetch_add(&unlink_ids, 1) + 1};
  frame_t *f = dist_frame_new(&x, NULL);
  if (f == NULL)
    return;
  pthread_mutex_lock(&dist_lock);
  conn_t *c = get(node);
  if (on)
    dist_pairs_add(&c->links, self, remote, 0, 0);
  else
    dist_pairs_del(&c->links, self, remote, 0, NULL);
  dist_queue_locked(c, f);
  pthread_mutex_unlock(&dist_lock);
}

static void hook_monitor(mb_pid_t self, mb_pid_t remote, mb_ref_t ref, int on)
{
  uint32_t node = mb_remote_node(remote);
  if (node == 0 || node == dist_self_atom) {
    if (on) {
      mb_msg_t *m = dist_reason_msg("noproc");
      m->kind = MB_MSG_DOWN;
      m->from = remote;
      m->ref = ref;
      mb_proc_send(self, m);
    }
    return;
  }
  ctl_t x = {.op = on ? OP_MONITOR_P : OP_DEMONITOR_P, .from = self, .to = remote, .ref = ref};
  frame_t *f = dist_frame_new(&x, NULL);
  if (f == NULL)
    return;
  pthread_mutex_lock(&dist_lock);
  conn_t *c = on ? get(node) : dist_find(node);
  if (c) {
    if (on)
      dist_pairs_add(&c->mon_out, self, remote, ref, 0);
    else
      dist_pairs_del(&c->mon_out, 0, 0, ref, NULL);
    dist_queue_locked(c, f);
  } else {
    mb_free(f);
  }
  pthread_mutex_unlock(&dist_lock);
}

static char *format_remote(char *buf, size_t n, uint64_t id, int is_ref)
{
  if (is_ref) {
    mb_rref_t r;
    if (mb_remote_ref_get(id, &r) == 0) {
      snprintf(buf, n, "#Ref<%u.%u.%u.%u>", r.node, r.n[0], r.len > 1 ? r.n[1] : 0,
               r.len > 2 ? r.n[2] : 0);
      return buf;
    }
  } else {
    mb_rpid_t p;
    if (mb_remote_pid_get(id, &p) == 0 && p.name) {
      snprintf(buf, n, "{%s,%s}", dist_node_text(p.name), dist_node_text(p.node));
      return buf;
    }
    if (mb_remote_pid_get(id, &p) == 0) {
      snprintf(buf, n, "<%u.%u.%u>", p.node, p.num, p.serial);
      return buf;
    }
  }
  snprintf(buf, n, "<?>");
  return buf;
}

/* -- The public side ------------------------------------------------------------- */

int mb_dist_nodes(uint32_t *v, int n)
{
  int k = 0;
  pthread_mutex_lock(&dist_lock);
  for (int i = 0; i < nconns; i++)
    if (conns[i]->state == C_UP) {
      if (k < n)
        v[k] = conns[i]->node;
      k++;
    }
  pthread_mutex_unlock(&dist_lock);
  return k;
}

int mb_dist_check_msg(const mb_msg_t *m, char *err, size_t errlen)
{
  return mb_etf_size(m, 0, err, errlen) < 0 ? MB_EBADARG : 0;
}

int mb_dist_send_named(uint32_t node, uint32_t name, mb_pid_t from, mb_msg_t *m,
                       char *err, size_t errlen)
{
  if (!dist_running) {
    mb_msg_free(m);
    return MB_ENOTDIST;
  }
  if (mb_dist_check_msg(m, err, errlen) < 0) {
    mb_msg_free(m);
    return MB_EBADARG;
  }
  if (node == dist_self_atom) {
    size_t n;
    const char *s = mb_atom_name(name, &n);
    mb_pid_t to = mb_reg_whereis_n(s, n);
    m->kind = MB_MSG_USER;
    m->from = from;
    if (to)
      mb_proc_send(to, m);
    else
      mb_msg_free(m);
    return 0;
  }
  ctl_t x = {.op = OP_REG_SEND, .from = from, .name = name};
  dist_send_ctl(node, &x, m);
  mb_msg_free(m);
  return 0;
}

static void notify_waiters(waiter_t *w, int ok)
{
  notify(w, ok, mb_dist_push_connect);
}

int mb_dist_push_connect(lua_State *L, mb_io_req_t *req)
{
  if (req->err == 0) {
    lua_pushboolean(L, 1);
    return 1;
  }
  lua_pushnil(L);
  lua_pushstring(L, mb_err_name(req->err));
  return 2;
}

/* A busy sender's wait ends with no value (mb.send returns none). */
static int push_drained(lua_State *L, mb_io_req_t *req)
{
  return 0;
}

/* End the waits of w (a list, freed): connect_node's with ok or not, a
 * busy sender's (drained) with nothing. */
static void notify(waiter_t *w, int ok, int (*push)(lua_State *, mb_io_req_t *))
{
  while (w) {
    waiter_t *next = w->next;
    mb_io_req_t *req = mb_io_new(sizeof *req, NULL, push);
    req->pid = w->pid;
    req->seq = w->seq;
    req->err = ok ? 0 : MB_ENOCONN;
    if (!mb_io_deliver(req))
      mb_io_free(req);
    mb_free(w);
    w = next;
  }
}

int mb_dist_connect(mb_proc_t *p, uint32_t node)
{
  if (!dist_running)
    return MB_ENOTDIST;
  uint32_t seq = mb_io_wait_begin(p);
  waiter_t *w = mb_malloc(sizeof *w);
  w->pid = p->pid;
  w->seq = seq;
  w->next = NULL;
  pthread_mutex_lock(&dist_lock);
  conn_t *c = node == dist_self_atom ? NULL : get(node);
  int up = c == NULL || c->state == C_UP;
  if (!up) {
    w->next = c->waiters;
    c->waiters = w;
  }
  pthread_mutex_unlock(&dist_lock);
  if (up)
    notify_waiters(w, 1);
  return 0;
}

int mb_dist_busy_wait(mb_proc_t *p, uint32_t node)
{
  if (!dist_running || node == 0)
    return 0;
  pthread_mutex_lock(&dist_lock);
  conn_t *c = dist_find(node);
  int wait = c && c->state != C_DOWN && c->pend_bytes > MB_DIST_BUSY_LIMIT;
  if (wait) {
    waiter_t *w = mb_malloc(sizeof *w);
    w->pid = p->pid;
    w->seq = mb_io_wait_begin(p);
    w->next = c->busy;
    c->busy = w;
  }
  pthread_mutex_unlock(&dist_lock);
  return wait;
}

int mb_dist_monitor_node(mb_pid_t pid, uint32_t node, int on_)
{
  if (!dist_running)
    return MB_ENOTDIST;
  if (node == dist_self_atom)
    return 0;
  pthread_mutex_lock(&dist_lock);
  conn_t *c = on_ ? get(node) : dist_find(node);
  if (c) {
    if (on_)
      dist_pairs_add(&c->node_mon, pid, 0, 0, 0);
    else
      dist_pairs_del(&c->node_mon, pid, 0, 0, NULL);
  }
  pthread_mutex_unlock(&dist_lock);
  return 0;
}

/* -- Shutdown ------------------------------------------------------------------ */

int dist_close_handle(uv_handle_t *h)
{
  if (h->type != UV_TCP && h->type != UV_TIMER)
    return 0;
  for (int i = 0; i < nconns; i++) {
    conn_t *c = conns[i];
    if (c->open && (h == (uv_handle_t *)&c->tcp || h == (uv_handle_t *)&c->tick)) {
      dist_conn_down(c, NULL);
      return 1;
    }
  }
  return 0;
}

void dist_install_hooks(void)
{
  dist_alias_init();
  mb_proc_remote_send = hook_send;
  mb_proc_remote_link = hook_link;
  mb_proc_remote_monitor = hook_monitor;
  mb_id_format_remote = format_remote;
}
