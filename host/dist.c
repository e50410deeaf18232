/* dist.c: node connections and the distribution protocol (see dist.h).
 *
 * Functions named on_* and do_* run on the loop thread of the connection's
 * scheduler; hooks (proc.h) on their caller's thread; the acceptor on its
 * own thread; connect_work on the thread pool.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <netdb.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <unistd.h>

#include "dist.h"
#include "ei.h"
#include "etf.h"
#include "reg.h"
#include "remote.h"
#include "scheduler.h"
#include "term.h"

/* Control message operations (erl_dist_protocol). */
enum {
  OP_LINK = 1, OP_SEND = 2, OP_EXIT = 3, OP_UNLINK = 4, OP_REG_SEND = 6,
  OP_EXIT2 = 8, OP_MONITOR_P = 19, OP_DEMONITOR_P = 20, OP_MONITOR_P_EXIT = 21,
  OP_SEND_SENDER = 22, OP_UNLINK_ID = 35, OP_UNLINK_ID_ACK = 36
};
#define PASS_THROUGH 112
#define DFLAG_DIST_MONITOR_NAME 0x20   /* erts dist.h (0x40 is DFLAG_HIDDEN_ATOM_CACHE) */

/* -- State ------------------------------------------------------------------- */

typedef struct pair {
  mb_pid_t local, remote;
  uint64_t ref;          /* monitors: the watcher's ref */
  uint32_t name;         /* monitors in by name: the name (atom) */
} pair_t;

typedef struct pairs {
  pair_t *v;
  uint32_t n, cap;
} pairs_t;

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
  /* -- under lock -- */
  int state;
  mb_sched_t *sched;           /* the loop holding the socket, once up */
  frame_t *pend_head, **pend_tail;
  pairs_t links;               /* local <-> remote links */
  pairs_t mon_out;             /* local watches remote: local, remote, ref */
  pairs_t mon_in;              /* remote watches local: local, remote, ref, name */
  pairs_t node_mon;            /* local pids monitoring the node */
  waiter_t *waiters;           /* mb.connect_node callers */
  /* -- loop thread -- */
  uv_tcp_t tcp;
  uv_timer_t tick;
  int open;                    /* handles initialised */
  char *rbuf;
  size_t rlen, rcap;
  uint64_t last_recv, last_send;
} conn_t;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static conn_t **conns;         /* live connections (not DOWN) */
static int nconns, capconns;
static ei_cnode ec;
static uint32_t self_atom;
static int on;
static int listen_fd = -1, publish_fd = -1;
static pthread_t acceptor;
static atomic_int stopping;
static atomic_uint_fast64_t unlink_ids;

int mb_dist_on(void) { return on; }
uint32_t mb_dist_self(void) { return self_atom; }

static const char *node_text(uint32_t atom);
static void logf_(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void logf_(const char *fmt, ...)
{
  char line[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(line, sizeof line, fmt, ap);
  va_end(ap);
  fprintf(stderr, "=DIST REPORT==== %s: %s\n", node_text(self_atom), line);
}

static const char *node_text(uint32_t atom)
{
  const char *s = mb_atom_name(atom, NULL);
  return s ? s : "?";
}

static void pairs_add(pairs_t *s, mb_pid_t local, mb_pid_t remote, uint64_t ref, uint32_t name)
{
  if (s->n == s->cap) {
    s->cap = s->cap ? 2 * s->cap : 4;
    s->v = mb_realloc(s->v, s->cap * sizeof *s->v);
  }
  s->v[s->n++] = (pair_t){local, remote, ref, name};
}

/* Remove the first entry with this ref (ref != 0) or this local/remote
 * pair; copy it to *out if asked. Returns 1 if found. */
static int pairs_del(pairs_t *s, mb_pid_t local, mb_pid_t remote, uint64_t ref, pair_t *out)
{
  for (uint32_t i = 0; i < s->n; i++) {
    pair_t *p = &s->v[i];
    if (ref ? p->ref == ref : (p->local == local && p->remote == remote)) {
      if (out)
        *out = *p;
      s->v[i] = s->v[--s->n];
      return 1;
    }
  }
  return 0;
}

static void conn_unref(conn_t *c)
{
  if (atomic_fetch_sub(&c->refs, 1) != 1)
    return;
  for (frame_t *f = c->pend_head, *next; f; f = next) {
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

/* The live connection of node; lock held. */
static conn_t *find(uint32_t node)
{
  for (int i = 0; i < nconns; i++)
    if (conns[i]->node == node)
      return conns[i];
  return NULL;
}

static void start_connect(void *arg);

/* The connection of node, created (and connecting) if there is none; lock
 * held. NULL for our own node. */
static conn_t *get(uint32_t node)
{
  if (node == self_atom)
    return NULL;
  conn_t *c = find(node);
  if (c)
    return c;
  c = mb_calloc(1, sizeof *c);
  c->node = node;
  c->state = C_CONNECTING;
  c->pend_tail = &c->pend_head;
  c->fd = -1;
  atomic_init(&c->refs, 2);      /* the table, the connect work */
  if (nconns == capconns) {
    capconns = capconns ? 2 * capconns : 8;
    conns = mb_realloc(conns, capconns * sizeof *conns);
  }
  conns[nconns++] = c;
  mb_sched_post(mb_sched_pick(), start_connect, c);
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

typedef struct ctl {
  int op;
  mb_pid_t from, to;
  uint32_t name;              /* REG_SEND: the name; MONITOR_P_EXIT: FromProc */
  mb_ref_t ref;
  uint64_t id;                /* UNLINK_ID */
  const mb_msg_t *reason;
} ctl_t;

/* The control tuple (versioned) at buf (NULL: count). */
static int put_ctl(char *buf, int *idx, const ctl_t *c)
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
  case OP_DEMONITOR_P:
    rc |= ei_encode_tuple_header(buf, idx, 4);
    rc |= ei_encode_long(buf, idx, c->op);
    rc |= mb_etf_put_pid(buf, idx, c->from);
    rc |= mb_etf_put_pid(buf, idx, c->to);
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
    if (mon)
      rc |= mb_etf_put_ref(buf, idx, c->ref);
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

/* A frame holding the control message and the message m (or none). */
static frame_t *frame_new(const ctl_t *c, const mb_msg_t *m)
{
  int csize = 0;
  if (put_ctl(NULL, &csize, c) < 0)
    return NULL;
  long msize = m ? mb_etf_size(m, 0, NULL, 0) : 0;
  if (msize < 0)
    return NULL;
  size_t len = 1 + (size_t)csize + (size_t)msize;
  if (len > MB_DIST_MAX_FRAME)
    return NULL;
  frame_t *f = mb_malloc(sizeof *f + 4 + len);
  f->next = NULL;
  f->len = 4 + len;
  unsigned char *p = (unsigned char *)f->data;
  p[0] = (unsigned char)(len >> 24);
  p[1] = (unsigned char)(len >> 16);
  p[2] = (unsigned char)(len >> 8);
  p[3] = (unsigned char)len;
  p[4] = PASS_THROUGH;
  int idx = 0;
  put_ctl(f->data + 5, &idx, c);
  if (m)
    mb_etf_write(m, 0, f->data + 5 + csize);
  return f;
}

static void do_write(void *arg);

typedef struct wcmd {
  conn_t *c;
  frame_t *f;
} wcmd_t;

/* Queue frame f on c; lock held. Takes f. */
static void queue_locked(conn_t *c, frame_t *f)
{
  if (c->state == C_UP) {
    wcmd_t *w = mb_malloc(sizeof *w);
    w->c = c;
    w->f = f;
    atomic_fetch_add(&c->refs, 1);
    mb_sched_post(c->sched, do_write, w);
  } else if (c->state == C_CONNECTING) {
    *c->pend_tail = f;
    c->pend_tail = &f->next;
  } else {
    mb_free(f);
  }
}

/* Build and send a control message (and m) to node. */
static void send_ctl(uint32_t node, const ctl_t *ctl, const mb_msg_t *m)
{
  frame_t *f = frame_new(ctl, m);
  if (f == NULL) {
    logf_("cannot encode a message for %s (dropped)", node_text(node));
    return;
  }
  pthread_mutex_lock(&lock);
  conn_t *c = get(node);
  if (c)
    queue_locked(c, f);
  else
    mb_free(f);
  pthread_mutex_unlock(&lock);
}

/* -- Up and down --------------------------------------------------------------- */

static void on_closed(uv_handle_t *h)
{
  conn_unref(h->data);
}

static void notify_waiters(waiter_t *w, int ok);

static mb_msg_t *reason_msg(const char *s)
{
  return mb_must(mb_msg_string(s));
}

/* The connection is gone: close its handles (loop thread, if open) and
 * tell every local end of its links and monitors. */
static void conn_down(conn_t *c, const char *why)
{
  pthread_mutex_lock(&lock);
  if (c->state == C_DOWN) {
    pthread_mutex_unlock(&lock);
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
  waiter_t *waiters = c->waiters;
  c->waiters = NULL;
  pthread_mutex_unlock(&lock);

  if (was_up && why)
    logf_("connection to %s closed: %s", node_text(c->node), why);
  if (c->open) {
    c->open = 0;
    uv_timer_stop(&c->tick);
    uv_close((uv_handle_t *)&c->tick, on_closed);
    uv_close((uv_handle_t *)&c->tcp, on_closed);
  }
  for (uint32_t i = 0; i < links.n; i++)
    if (mb_proc_unlink_remote(links.v[i].local, links.v[i].remote))
      mb_proc_link_exit(links.v[i].local, links.v[i].remote,
                        reason_msg("noconnection"));
  for (uint32_t i = 0; i < out.n; i++) {
    mb_msg_t *m = reason_msg("noconnection");
    m->kind = MB_MSG_DOWN;
    m->from = out.v[i].remote;
    m->ref = out.v[i].ref;
    mb_proc_send(out.v[i].local, m);
  }
  for (uint32_t i = 0; i < in.n; i++)
    if (in.v[i].local)
      mb_proc_unwatch_remote(in.v[i].local, in.v[i].ref);
  for (uint32_t i = 0; i < nm.n; i++) {
    mb_msgb_t b;
    mb_msgb_init(&b, 64);
    mb_msgb_table(&b, 0, 2);
    mb_msgb_cstring(&b, "event");
    mb_msgb_cstring(&b, "nodedown");
    mb_msgb_cstring(&b, "node");
    mb_msgb_cstring(&b, node_text(c->node));
    mb_msg_t *m = mb_must(mb_msgb_finish(&b, 1));
    m->kind = MB_MSG_USER;
    mb_proc_send(nm.v[i].local, m);
  }
  mb_free(links.v);
  mb_free(out.v);
  mb_free(in.v);
  mb_free(nm.v);
  notify_waiters(waiters, 0);
  conn_unref(c);                 /* the table's reference */
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
static void conn_up(conn_t *c, mb_sched_t *s, int fd)
{
  pthread_mutex_lock(&lock);
  if (c->state != C_CONNECTING) {
    /* Another connection to the node won (both sides connected at once)
     * or it went down meanwhile. */
    pthread_mutex_unlock(&lock);
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
  }
  frame_t *pend = c->pend_head;
  c->pend_head = NULL;
  c->pend_tail = &c->pend_head;
  waiter_t *waiters = c->waiters;
  c->waiters = NULL;
  pthread_mutex_unlock(&lock);
  if (rc) {
    close(fd);
    notify_waiters(waiters, 0);
    conn_down(c, uv_strerror(rc));
    return;
  }
  uv_tcp_nodelay(&c->tcp, 1);
  c->last_recv = c->last_send = uv_now(loop);
  uv_timer_start(&c->tick, on_tick, MB_DIST_TICK_MS / 3, MB_DIST_TICK_MS / 3);
  uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
  while (pend) {
    frame_t *next = pend->next;
    wcmd_t *w = mb_malloc(sizeof *w);
    w->c = c;
    w->f = pend;
    atomic_fetch_add(&c->refs, 1);
    do_write(w);
    pend = next;
  }
  notify_waiters(waiters, 1);
}

/* -- Writing -------------------------------------------------------------------- */

typedef struct wreq {
  uv_write_t req;
  conn_t *c;
  frame_t *f;
} wreq_t;

static void on_write(uv_write_t *req, int status)
{
  wreq_t *w = (wreq_t *)req;
  conn_t *c = w->c;
  mb_free(w->f);
  mb_free(w);
  if (status < 0 && status != UV_ECANCELED)
    conn_down(c, uv_strerror(status));
  conn_unref(c);
}

static void do_write(void *arg)
{
  wcmd_t *cmd = arg;
  conn_t *c = cmd->c;
  frame_t *f = cmd->f;
  mb_free(cmd);
  if (!c->open) {
    mb_free(f);
    conn_unref(c);
    return;
  }
  wreq_t *w = mb_malloc(sizeof *w);
  w->c = c;
  w->f = f;
  uv_buf_t b = uv_buf_init(f->data, (unsigned)f->len);
  c->last_send = uv_now(c->tcp.loop);
  int rc = uv_write(&w->req, (uv_stream_t *)&c->tcp, &b, 1, on_write);
  if (rc) {
    mb_free(f);
    mb_free(w);
    conn_down(c, uv_strerror(rc));
    conn_unref(c);
  }
}

static void on_tick(uv_timer_t *t)
{
  conn_t *c = t->data;
  uint64_t now = uv_now(t->loop);
  if (now - c->last_recv > 4 * (uint64_t)MB_DIST_TICK_MS) {
    conn_down(c, "net tick timeout");
    return;
  }
  if (now - c->last_send >= MB_DIST_TICK_MS / 3) {
    frame_t *f = mb_malloc(sizeof *f + 4);
    f->next = NULL;
    f->len = 4;
    memset(f->data, 0, 4);
    wcmd_t *w = mb_malloc(sizeof *w);
    w->c = c;
    w->f = f;
    atomic_fetch_add(&c->refs, 1);
    do_write(w);
  }
}

/* -- Reading ------------------------------------------------------------------- */

/* Decode the message part of a frame at data[*idx]; NULL if it was dropped
 * (logged), and *bad set if the connection must close. */
static mb_msg_t *frame_msg(conn_t *c, const char *data, long len, long *idx, int *bad)
{
  mb_msg_t *m;
  int rc = mb_etf_decode(data, len, idx, 0, &m);
  if (rc == 0 && *idx != len)
    rc = MB_ETF_MALFORMED;
  if (rc == MB_ETF_MALFORMED) {
    *bad = 1;
    return NULL;
  }
  if (rc == MB_ETF_UNSUPPORTED)
    logf_("dropped a message from %s: it holds a fun, a port or a bit string, "
          "which have no Lua value", node_text(c->node));
  else if (rc < 0)
    logf_("dropped a message from %s: %s", node_text(c->node), mb_strerror(rc));
  if (rc)
    mb_msg_free(m = NULL);
  return m;
}

static mb_msg_t *ctl_reason(const char *data, long len, int *i, int *bad)
{
  long idx = *i;
  mb_msg_t *m;
  int rc = mb_etf_decode(data, len, &idx, MB_ETF_REASON | MB_ETF_BARE, &m);
  *i = (int)idx;
  if (rc == MB_ETF_MALFORMED) {
    *bad = 1;
    return NULL;
  }
  if (rc < 0)
    return reason_msg("unsupported_reason");
  return m;
}

/* A pid or a registered name (atom) at data[*i]: the local pid, or 0. */
static mb_pid_t proc_or_name(const char *data, int *i, uint32_t *name, int *bad)
{
  int type, size;
  *name = 0;
  ei_get_type(data, i, &type, &size);
  if (type == ERL_ATOM_EXT || type == ERL_SMALL_ATOM_EXT || type == ERL_ATOM_UTF8_EXT ||
      type == ERL_SMALL_ATOM_UTF8_EXT) {
    int rc = mb_etf_get_atom(data, i, name);
    if (rc == MB_ETF_MALFORMED)
      *bad = 1;
    if (rc < 0)
      return 0;
    size_t n;
    const char *s = mb_atom_name(*name, &n);
    return mb_reg_whereis(s);
  }
  mb_pid_t pid;
  if (mb_etf_get_pid(data, i, &pid) < 0) {
    *bad = 1;
    return 0;
  }
  return mb_id_is_remote(pid) ? 0 : pid;
}

/* Is atom name "net_kernel"? */
static int is_net_kernel(uint32_t name)
{
  size_t n;
  const char *s = name ? mb_atom_name(name, &n) : NULL;
  return s && strcmp(s, "net_kernel") == 0;
}

/* net_adm:ping(Node) calls net_kernel on Node with {is_auth, Peer}: a
 * connection that exists passed the cookie check, so the answer is yes,
 * which we give here when no process of ours is registered as net_kernel.
 * The message at data[idx] is checked already. */
static void answer_net_kernel(conn_t *c, const char *data, long len, long idx)
{
  int i = (int)idx, v, n;
  char atom[MAXATOMLEN_UTF8];
  mb_pid_t from;
  if (ei_decode_version(data, &i, &v) < 0 || ei_decode_tuple_header(data, &i, &n) < 0 ||
      n != 3 || ei_decode_atom(data, &i, atom) < 0 || strcmp(atom, "$gen_call") != 0 ||
      ei_decode_tuple_header(data, &i, &n) < 0 || n != 2 ||
      mb_etf_get_pid(data, &i, &from) < 0)
    return;
  int tag = i;
  if (ei_skip_term(data, &i) < 0 || ei_decode_tuple_header(data, &i, &n) < 0 || n != 2 ||
      ei_decode_atom(data, &i, atom) < 0 || strcmp(atom, "is_auth") != 0)
    return;
  int tag_len = 0, k = tag;
  ei_skip_term(data, &k);
  tag_len = k - tag;
  ctl_t x = {.op = OP_SEND, .to = from};
  int csize = 0;
  if (put_ctl(NULL, &csize, &x) < 0)
    return;
  /* {Tag, yes}: version, tuple header, the tag's own bytes, the atom. */
  int msize = 0;
  ei_encode_version(NULL, &msize);
  ei_encode_tuple_header(NULL, &msize, 2);
  msize += tag_len;
  ei_encode_atom(NULL, &msize, "yes");
  size_t flen = 1 + (size_t)csize + (size_t)msize;
  frame_t *f = mb_malloc(sizeof *f + 4 + flen);
  f->next = NULL;
  f->len = 4 + flen;
  unsigned char *p = (unsigned char *)f->data;
  p[0] = (unsigned char)(flen >> 24);
  p[1] = (unsigned char)(flen >> 16);
  p[2] = (unsigned char)(flen >> 8);
  p[3] = (unsigned char)flen;
  p[4] = PASS_THROUGH;
  int w = 0;
  put_ctl(f->data + 5, &w, &x);
  char *m = f->data + 5 + csize;
  int j = 0;
  ei_encode_version(m, &j);
  ei_encode_tuple_header(m, &j, 2);
  memcpy(m + j, data + tag, (size_t)tag_len);
  j += tag_len;
  ei_encode_atom(m, &j, "yes");
  (void)len;
  pthread_mutex_lock(&lock);
  queue_locked(c, f);
  pthread_mutex_unlock(&lock);
}

/* Handle one frame (len > 0); returns -1 if the connection must close. */
static int handle_frame(conn_t *c, const char *data, long len)
{
  if ((unsigned char)data[0] != PASS_THROUGH)
    return -1;
  long cend = 1;
  if (mb_etf_check(data, len, &cend) < 0)
    return -1;
  int i = 1, v, arity, bad = 0;
  long op;
  if (ei_decode_version(data, &i, &v) < 0 || ei_decode_tuple_header(data, &i, &arity) < 0 ||
      arity < 1 || ei_decode_long(data, &i, &op) < 0)
    return -1;
  mb_pid_t from = 0, to = 0;
  mb_ref_t ref = 0;
  uint32_t name = 0;
  long idx = cend;

  switch (op) {
  case OP_SEND:
  case OP_SEND_SENDER:
    if (arity != 3)
      return -1;
    if (op == OP_SEND) {
      if (ei_skip_term(data, &i) < 0)
        return -1;
    } else if (mb_etf_get_pid(data, &i, &from) < 0) {
      return -1;
    }
    if (mb_etf_get_pid(data, &i, &to) < 0)
      return -1;
    goto deliver;
  case OP_REG_SEND: {
    if (arity != 4 || mb_etf_get_pid(data, &i, &from) < 0 || ei_skip_term(data, &i) < 0)
      return -1;
    int rc = mb_etf_get_atom(data, &i, &name);
    if (rc == MB_ETF_MALFORMED)
      return -1;
    size_t n;
    to = rc == 0 ? mb_reg_whereis(mb_atom_name(name, &n)) : 0;
    if (to == 0 && rc == 0 && strcmp(mb_atom_name(name, &n), "net_kernel") == 0) {
      long end = idx;
      if (mb_etf_check(data, len, &end) < 0 || end != len)
        return -1;
      answer_net_kernel(c, data, len, idx);
      return 0;
    }
    goto deliver;
  }
  case OP_LINK:
    if (arity != 3 || mb_etf_get_pid(data, &i, &from) < 0 || mb_etf_get_pid(data, &i, &to) < 0)
      return -1;
    if (mb_id_is_remote(to) || mb_proc_link_remote(to, from) < 0) {
      ctl_t x = {.op = OP_EXIT, .from = to, .to = from};
      mb_msg_t *r = reason_msg("noproc");
      x.reason = r;
      send_ctl(c->node, &x, NULL);
      mb_msg_free(r);
    } else {
      pthread_mutex_lock(&lock);
      if (c->state != C_DOWN)
        pairs_add(&c->links, to, from, 0, 0);
      pthread_mutex_unlock(&lock);
    }
    return cend == len ? 0 : -1;
  case OP_UNLINK:
  case OP_UNLINK_ID: {
    unsigned long long id = 0;
    if (arity != (op == OP_UNLINK ? 3 : 4) ||
        (op == OP_UNLINK_ID && ei_decode_ulonglong(data, &i, &id) < 0) ||
        mb_etf_get_pid(data, &i, &from) < 0 || mb_etf_get_pid(data, &i, &to) < 0)
      return -1;
    if (!mb_id_is_remote(to))
      mb_proc_unlink_remote(to, from);
    pthread_mutex_lock(&lock);
    pairs_del(&c->links, to, from, 0, NULL);
    pthread_mutex_unlock(&lock);
    if (op == OP_UNLINK_ID) {
      ctl_t x = {.op = OP_UNLINK_ID_ACK, .id = id, .from = to, .to = from};
      send_ctl(c->node, &x, NULL);
    }
    return cend == len ? 0 : -1;
  }
  case OP_UNLINK_ID_ACK:
    return cend == len ? 0 : -1;
  case OP_EXIT:
  case OP_EXIT2: {
    if (arity != 4 || mb_etf_get_pid(data, &i, &from) < 0 || mb_etf_get_pid(data, &i, &to) < 0)
      return -1;
    mb_msg_t *r = ctl_reason(data, len, &i, &bad);
    if (bad)
      return -1;
    if (op == OP_EXIT) {
      pthread_mutex_lock(&lock);
      pairs_del(&c->links, to, from, 0, NULL);
      pthread_mutex_unlock(&lock);
      /* A link exit for a link that is gone is ignored, as in Erlang. */
      if (mb_id_is_remote(to) || !mb_proc_unlink_remote(to, from)) {
        mb_msg_free(r);
        return cend == len ? 0 : -1;
      }
      mb_proc_link_exit(to, from, r);
    } else if (!mb_id_is_remote(to)) {
      mb_proc_exit_signal(to, from, r, mb_msg_is_kill(r));
    } else {
      mb_msg_free(r);
    }
    return cend == len ? 0 : -1;
  }
  case OP_MONITOR_P:
  case OP_DEMONITOR_P: {
    if (arity != 4 || mb_etf_get_pid(data, &i, &from) < 0)
      return -1;
    to = proc_or_name(data, &i, &name, &bad);
    if (bad || mb_etf_get_ref(data, &i, &ref) < 0)
      return -1;
    if (op == OP_DEMONITOR_P) {
      pair_t p;
      pthread_mutex_lock(&lock);
      int found = pairs_del(&c->mon_in, 0, 0, ref, &p);
      pthread_mutex_unlock(&lock);
      if (found && p.local)
        mb_proc_unwatch_remote(p.local, ref);
      return cend == len ? 0 : -1;
    }
    if (to == 0 && is_net_kernel(name)) {
      /* gen:call monitors {net_kernel, Node} before asking is_auth (ping);
       * the net_kernel we answer for (answer_net_kernel) never dies. */
      pthread_mutex_lock(&lock);
      if (c->state != C_DOWN)
        pairs_add(&c->mon_in, 0, from, ref, name);
      pthread_mutex_unlock(&lock);
    } else if (to && mb_proc_watch_remote(to, from, ref) == 0) {
      pthread_mutex_lock(&lock);
      if (c->state != C_DOWN)
        pairs_add(&c->mon_in, to, from, ref, name);
      pthread_mutex_unlock(&lock);
    } else {
      ctl_t x = {.op = OP_MONITOR_P_EXIT, .from = to, .to = from, .ref = ref, .name = name};
      mb_msg_t *r = reason_msg("noproc");
      x.reason = r;
      send_ctl(c->node, &x, NULL);
      mb_msg_free(r);
    }
    return cend == len ? 0 : -1;
  }
  case OP_MONITOR_P_EXIT: {
    if (arity != 5)
      return -1;
    proc_or_name(data, &i, &name, &bad);
    if (bad || mb_etf_get_pid(data, &i, &to) < 0 || mb_etf_get_ref(data, &i, &ref) < 0)
      return -1;
    mb_msg_t *r = ctl_reason(data, len, &i, &bad);
    if (bad)
      return -1;
    pair_t p;
    pthread_mutex_lock(&lock);
    int found = pairs_del(&c->mon_out, 0, 0, ref, &p);
    pthread_mutex_unlock(&lock);
    if (found && !mb_id_is_remote(to)) {
      r->kind = MB_MSG_DOWN;
      r->from = p.remote;
      r->ref = ref;
      mb_proc_send(to, r);
    } else {
      mb_msg_free(r);
    }
    return cend == len ? 0 : -1;
  }
  default:
    /* Operations we never negotiated: ignored. */
    return 0;
  }
deliver:
  {
    mb_msg_t *m = frame_msg(c, data, len, &idx, &bad);
    if (bad)
      return -1;
    if (m == NULL)
      return 0;
    if (to == 0 || mb_id_is_remote(to)) {
      mb_msg_free(m);
      return 0;
    }
    m->kind = MB_MSG_USER;
    m->from = from;
    mb_proc_send(to, m);
    return 0;
  }
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf)
{
  conn_t *c = s->data;
  if (n < 0) {
    conn_down(c, n == UV_EOF ? "closed by the peer" : uv_strerror((int)n));
    return;
  }
  c->rlen += (size_t)n;
  c->last_recv = uv_now(s->loop);
  size_t at = 0;
  while (c->rlen - at >= 4) {
    const unsigned char *p = (const unsigned char *)c->rbuf + at;
    uint32_t len = (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
    if (len > MB_DIST_MAX_FRAME) {
      logf_("closing the connection to %s: a frame of %u bytes (limit %u)",
            node_text(c->node), len, MB_DIST_MAX_FRAME);
      conn_down(c, NULL);
      return;
    }
    if (c->rlen - at - 4 < len)
      break;
    if (len && handle_frame(c, c->rbuf + at + 4, len) < 0) {
      logf_("closing the connection to %s: malformed message", node_text(c->node));
      conn_down(c, NULL);
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

/* -- Handshakes: ei over our socket callbacks ------------------------------ */

/* ei's socket callbacks (ei_connect_init_ussi), on plain blocking sockets
 * with poll for the timeouts. ctx is the fd itself. Only handshakes go
 * through them: afterwards the socket belongs to libuv. */
static int wait_fd(int fd, short ev, unsigned tmo)
{
  struct pollfd p = {fd, ev, 0};
  int ms = tmo == EI_SCLBK_INF_TMO ? -1 : (int)tmo;
  int rc;
  do
    rc = poll(&p, 1, ms);
  while (rc < 0 && errno == EINTR);
  if (rc == 0)
    return ETIMEDOUT;
  return rc < 0 ? errno : 0;
}

static int cb_socket(void **ctx, void *setup)
{
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0)
    return errno;
  *ctx = (void *)(intptr_t)fd;
  return 0;
}

static int cb_close(void *ctx)
{
  return close((int)(intptr_t)ctx) ? errno : 0;
}

static int cb_listen(void *ctx, void *addr, int *len, int backlog)
{
  int fd = (int)(intptr_t)ctx, one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (bind(fd, addr, (socklen_t)*len) < 0)
    return errno;
  socklen_t l = (socklen_t)*len;
  if (getsockname(fd, addr, &l) < 0 || listen(fd, backlog) < 0)
    return errno;
  *len = (int)l;
  return 0;
}

static int cb_accept(void **ctx, void *addr, int *len, unsigned tmo)
{
  int fd = (int)(intptr_t)*ctx;
  int rc = wait_fd(fd, POLLIN, tmo);
  if (rc)
    return rc;
  socklen_t l = (socklen_t)*len;
  int c = accept4(fd, addr, &l, SOCK_CLOEXEC);
  if (c < 0)
    return errno;
  *len = (int)l;
  *ctx = (void *)(intptr_t)c;
  return 0;
}

static int cb_connect(void *ctx, void *addr, int len, unsigned tmo)
{
  int fd = (int)(intptr_t)ctx;
  int fl = fcntl(fd, F_GETFL);
  fcntl(fd, F_SETFL, fl | O_NONBLOCK);
  int rc = connect(fd, addr, (socklen_t)len) < 0 ? errno : 0;
  if (rc == EINPROGRESS) {
    rc = wait_fd(fd, POLLOUT, tmo);
    if (rc == 0) {
      socklen_t l = sizeof rc;
      getsockopt(fd, SOL_SOCKET, SO_ERROR, &rc, &l);
    }
  }
  fcntl(fd, F_SETFL, fl);
  return rc;
}

static int cb_write(void *ctx, const char *buf, ssize_t *len, unsigned tmo)
{
  int fd = (int)(intptr_t)ctx;
  char patched[64];
  /* The name ('N': 8 flag bytes after the tag; 'n': 2 version bytes, then
   * 4) and challenge packets carry our capability flags: add
   * DFLAG_DIST_MONITOR_NAME (see dist.h). Packets have a 2-byte length. */
  if (*len >= 11 && *len <= (ssize_t)sizeof patched && (buf[2] == 'N' || buf[2] == 'n')) {
    memcpy(patched, buf, (size_t)*len);
    patched[buf[2] == 'N' ? 10 : 8] |= DFLAG_DIST_MONITOR_NAME;
    buf = patched;

  } else if (*len > (ssize_t)sizeof patched && (buf[2] == 'N' || buf[2] == 'n')) {
    char *p = malloc((size_t)*len);
    if (p == NULL)
      return ENOMEM;
    memcpy(p, buf, (size_t)*len);
    p[buf[2] == 'N' ? 10 : 8] |= DFLAG_DIST_MONITOR_NAME;
    int rc = wait_fd(fd, POLLOUT, tmo);
    ssize_t n = rc ? -1 : write(fd, p, (size_t)*len);
    free(p);
    if (rc)
      return rc;
    if (n < 0)
      return errno;
    *len = n;
    return 0;
  }
  int rc = wait_fd(fd, POLLOUT, tmo);
  if (rc)
    return rc;
  ssize_t n = write(fd, buf, (size_t)*len);
  if (n < 0)
    return errno;
  *len = n;
  return 0;
}

static int cb_read(void *ctx, char *buf, ssize_t *len, unsigned tmo)
{
  int fd = (int)(intptr_t)ctx;
  int rc = wait_fd(fd, POLLIN, tmo);
  if (rc)
    return rc;
  ssize_t n = read(fd, buf, (size_t)*len);
  if (n < 0)
    return errno;
  *len = n;
  return 0;
}

static int cb_hs_header(void *ctx, int *sz)
{
  *sz = 2;
  return 0;
}

static int cb_hs_done(void *ctx)
{
  return 0;
}

static int cb_get_fd(void *ctx, int *fd)
{
  *fd = (int)(intptr_t)ctx;
  return 0;
}

static ei_socket_callbacks cbs = {
  0, cb_socket, cb_close, cb_listen, cb_accept, cb_connect, NULL, cb_write, cb_read,
  cb_hs_header, cb_hs_done, cb_hs_done, cb_get_fd
};

/* Thread pool: ei_connect with a private copy of the node record. */
static void connect_work(uv_work_t *w)
{
  conn_t *c = w->data;
  ei_cnode mine = ec;
  char name[MAXNODELEN + 1];
  snprintf(name, sizeof name, "%s", node_text(c->node));
  c->fd = ei_connect_tmo(&mine, name, MB_DIST_CONNECT_MS);
}

static void connect_done(uv_work_t *w, int status)
{
  conn_t *c = w->data;
  if (c->fd >= 0 && status == 0) {
    conn_up(c, mb_sched_self(), c->fd);
  } else {
    if (c->fd >= 0)
      close(c->fd);
    pthread_mutex_lock(&lock);
    int connecting = c->state == C_CONNECTING;
    pthread_mutex_unlock(&lock);
    if (connecting) {
      logf_("cannot connect to %s", node_text(c->node));
      conn_down(c, NULL);
    }
  }
  conn_unref(c);                 /* the work's reference */
}

static void start_connect(void *arg)
{
  conn_t *c = arg;
  c->work.data = c;
  if (uv_queue_work(mb_sched_loop(mb_sched_self()), &c->work, connect_work,
                    connect_done) < 0) {
    conn_down(c, NULL);
    conn_unref(c);
  }
}

typedef struct adopt {
  conn_t *c;
  int fd;
} adopt_t;

static void do_adopt(void *arg)
{
  adopt_t *a = arg;
  conn_up(a->c, mb_sched_self(), a->fd);
  conn_unref(a->c);
  mb_free(a);
}

/* The acceptor thread: ei_accept (the handshake, with the cookie check)
 * one connection at a time, each step bounded by MB_DIST_CONNECT_MS. */
static void *accept_main(void *arg)
{
  ei_cnode mine = ec;
  while (!atomic_load(&stopping)) {
    ErlConnect conp;
    memset(&conp, 0, sizeof conp);
    int fd = ei_accept_tmo(&mine, listen_fd, &conp, 1000);
    if (atomic_load(&stopping)) {
      if (fd >= 0)
        close(fd);
      break;
    }
    if (fd < 0) {
      if (erl_errno == ETIMEDOUT)
        continue;
      if (conp.nodename[0] || erl_errno != EIO)
        logf_("refused a connection%s%s: handshake failed (wrong cookie or "
              "not a node)", conp.nodename[0] ? " from " : "", conp.nodename);
      else
        logf_("refused a connection: handshake failed (wrong cookie or not a node)");
      continue;
    }
    int64_t node = mb_atom_intern(conp.nodename, strlen(conp.nodename));
    if (node <= 0) {
      close(fd);
      continue;
    }
    pthread_mutex_lock(&lock);
    conn_t *c = find((uint32_t)node);
    if (c && c->state == C_UP) {
      pthread_mutex_unlock(&lock);
      close(fd);                 /* already connected: keep the one we have */
      continue;
    }
    if (c == NULL) {
      c = mb_calloc(1, sizeof *c);
      c->node = (uint32_t)node;
      c->state = C_CONNECTING;
      c->pend_tail = &c->pend_head;
      atomic_init(&c->refs, 1);
      if (nconns == capconns) {
        capconns = capconns ? 2 * capconns : 8;
        conns = mb_realloc(conns, capconns * sizeof *conns);
      }
      conns[nconns++] = c;
    }
    atomic_fetch_add(&c->refs, 1);
    pthread_mutex_unlock(&lock);
    adopt_t *a = mb_malloc(sizeof *a);
    a->c = c;
    a->fd = fd;
    mb_sched_post(mb_sched_pick(), do_adopt, a);
  }
  return NULL;
}

/* -- Hooks (proc.h) ------------------------------------------------------------ */

static void hook_send(mb_pid_t to, mb_msg_t *m)
{
  uint32_t node = mb_remote_node(to);
  if (node == 0 || node == self_atom) {
    mb_msg_free(m);
    return;
  }
  ctl_t x = {.from = m->from, .to = to};
  const mb_msg_t *payload = NULL;
  switch (m->kind) {
  case MB_MSG_USER:
    x.op = OP_SEND;
    payload = m;
    break;
  case MB_MSG_EXIT:
  case MB_MSG_KILL:
    x.op = OP_EXIT2;
    x.reason = m;
    break;
  case MB_MSG_LINK_EXIT:
    x.op = OP_EXIT;
    x.reason = m;
    pthread_mutex_lock(&lock);
    conn_t *c = find(node);
    if (c)
      pairs_del(&c->links, m->from, to, 0, NULL);
    pthread_mutex_unlock(&lock);
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
    pthread_mutex_lock(&lock);
    conn_t *c = find(node);
    int found = c && pairs_del(&c->mon_in, 0, 0, m->ref, &p);
    pthread_mutex_unlock(&lock);
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
  send_ctl(node, &x, payload);
  mb_msg_free(m);
}

static void hook_link(mb_pid_t self, mb_pid_t remote, int on)
{
  uint32_t node = mb_remote_node(remote);
  if (node == 0 || node == self_atom) {
    if (on && mb_proc_unlink_remote(self, remote))
      mb_proc_link_exit(self, remote, reason_msg("noproc"));
    return;
  }
  ctl_t x = {.op = on ? OP_LINK : OP_UNLINK_ID, .from = self, .to = remote,
             .id = atomic_fetch_add(&unlink_ids, 1) + 1};
  frame_t *f = frame_new(&x, NULL);
  if (f == NULL)
    return;
  pthread_mutex_lock(&lock);
  conn_t *c = get(node);
  if (on)
    pairs_add(&c->links, self, remote, 0, 0);
  else
    pairs_del(&c->links, self, remote, 0, NULL);
  queue_locked(c, f);
  pthread_mutex_unlock(&lock);
}

static void hook_monitor(mb_pid_t self, mb_pid_t remote, mb_ref_t ref, int on)
{
  uint32_t node = mb_remote_node(remote);
  if (node == 0 || node == self_atom) {
    if (on) {
      mb_msg_t *m = reason_msg("noproc");
      m->kind = MB_MSG_DOWN;
      m->from = remote;
      m->ref = ref;
      mb_proc_send(self, m);
    }
    return;
  }
  ctl_t x = {.op = on ? OP_MONITOR_P : OP_DEMONITOR_P, .from = self, .to = remote, .ref = ref};
  frame_t *f = frame_new(&x, NULL);
  if (f == NULL)
    return;
  pthread_mutex_lock(&lock);
  conn_t *c = on ? get(node) : find(node);
  if (c) {
    if (on)
      pairs_add(&c->mon_out, self, remote, ref, 0);
    else
      pairs_del(&c->mon_out, 0, 0, ref, NULL);
    queue_locked(c, f);
  } else {
    mb_free(f);
  }
  pthread_mutex_unlock(&lock);
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
  pthread_mutex_lock(&lock);
  for (int i = 0; i < nconns; i++)
    if (conns[i]->state == C_UP) {
      if (k < n)
        v[k] = conns[i]->node;
      k++;
    }
  pthread_mutex_unlock(&lock);
  return k;
}

int mb_dist_check_msg(const mb_msg_t *m, char *err, size_t errlen)
{
  return mb_etf_size(m, 0, err, errlen) < 0 ? MB_EBADARG : 0;
}

int mb_dist_send_named(uint32_t node, uint32_t name, mb_pid_t from, mb_msg_t *m,
                       char *err, size_t errlen)
{
  if (!on) {
    mb_msg_free(m);
    return MB_ENOTDIST;
  }
  if (mb_dist_check_msg(m, err, errlen) < 0) {
    mb_msg_free(m);
    return MB_EBADARG;
  }
  if (node == self_atom) {
    size_t n;
    mb_pid_t to = mb_reg_whereis(mb_atom_name(name, &n));
    m->kind = MB_MSG_USER;
    m->from = from;
    if (to)
      mb_proc_send(to, m);
    else
      mb_msg_free(m);
    return 0;
  }
  ctl_t x = {.op = OP_REG_SEND, .from = from, .name = name};
  send_ctl(node, &x, m);
  mb_msg_free(m);
  return 0;
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

static void notify_waiters(waiter_t *w, int ok)
{
  while (w) {
    waiter_t *next = w->next;
    mb_io_req_t *req = mb_io_new(sizeof *req, NULL, mb_dist_push_connect);
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
  if (!on)
    return MB_ENOTDIST;
  uint32_t seq = mb_io_wait_begin(p);
  waiter_t *w = mb_malloc(sizeof *w);
  w->pid = p->pid;
  w->seq = seq;
  w->next = NULL;
  pthread_mutex_lock(&lock);
  conn_t *c = node == self_atom ? NULL : get(node);
  int up = c == NULL || c->state == C_UP;
  if (!up) {
    w->next = c->waiters;
    c->waiters = w;
  }
  pthread_mutex_unlock(&lock);
  if (up)
    notify_waiters(w, 1);
  return 0;
}

int mb_dist_monitor_node(mb_pid_t pid, uint32_t node, int on_)
{
  if (!on)
    return MB_ENOTDIST;
  if (node == self_atom)
    return 0;
  pthread_mutex_lock(&lock);
  conn_t *c = on_ ? get(node) : find(node);
  if (c) {
    if (on_)
      pairs_add(&c->node_mon, pid, 0, 0, 0);
    else
      pairs_del(&c->node_mon, pid, 0, 0, NULL);
  }
  pthread_mutex_unlock(&lock);
  return 0;
}

/* -- Start and stop ------------------------------------------------------------- */

/* Stop the acceptor before the loops close (it posts to them): called by
 * the scheduler for each handle left at shutdown, it claims none. */
static int closer(uv_handle_t *h)
{
  if (on && !atomic_exchange(&stopping, 1)) {
    pthread_join(acceptor, NULL);
    if (publish_fd >= 0)
      close(publish_fd);
    if (listen_fd >= 0)
      close(listen_fd);
  }
  if (h->type == UV_TCP || h->type == UV_TIMER) {
    for (int i = 0; i < nconns; i++) {
      conn_t *c = conns[i];
      if (c->open && (h == (uv_handle_t *)&c->tcp || h == (uv_handle_t *)&c->tick)) {
        conn_down(c, NULL);
        return 1;
      }
    }
  }
  return 0;
}

/* The cookie: ~/.erlang.cookie, created with a random one if missing, as
 * erl does. */
static int read_cookie(char *out, size_t n, char *err, size_t errlen)
{
  const char *home = getenv("HOME");
  char path[1024];
  snprintf(path, sizeof path, "%s/.erlang.cookie", home ? home : ".");
  FILE *f = fopen(path, "r");
  if (f == NULL) {
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0400);
    if (fd >= 0) {
      static const char az[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZ";
      char c[20];
      unsigned seed = (unsigned)uv_hrtime() ^ (unsigned)getpid();
      for (int i = 0; i < 20; i++)
        c[i] = az[rand_r(&seed) % 26];
      if (write(fd, c, 20) != 20) {
        close(fd);
        snprintf(err, errlen, "cannot write %s", path);
        return -1;
      }
      close(fd);
    }
    f = fopen(path, "r");
  }
  if (f == NULL) {
    snprintf(err, errlen, "cannot read the cookie file %s: %s", path, strerror(errno));
    return -1;
  }
  size_t k = fread(out, 1, n - 1, f);
  fclose(f);
  out[k] = '\0';
  while (k && (out[k - 1] == '\n' || out[k - 1] == '\r' || out[k - 1] == ' '))
    out[--k] = '\0';
  if (k == 0) {
    snprintf(err, errlen, "the cookie file %s is empty", path);
    return -1;
  }
  return 0;
}

int mb_dist_start(const mb_dist_opts_t *o, char *err, size_t errlen)
{
  char alive[EI_MAXALIVELEN + 1], host[EI_MAXHOSTNAMELEN + 1], full[MAXNODELEN + 1];
  const char *at = strchr(o->name, '@');
  size_t an = at ? (size_t)(at - o->name) : strlen(o->name);
  if (an == 0 || an >= sizeof alive) {
    snprintf(err, errlen, "bad node name '%s'", o->name);
    return -1;
  }
  memcpy(alive, o->name, an);
  alive[an] = '\0';
  if (at) {
    snprintf(host, sizeof host, "%s", at + 1);
  } else {
    if (gethostname(host, sizeof host) < 0)
      snprintf(host, sizeof host, "localhost");
    host[sizeof host - 1] = '\0';
    if (!o->longnames) {
      char *dot = strchr(host, '.');
      if (dot)
        *dot = '\0';
    }
  }
  if (host[0] == '\0' || (!o->longnames && strchr(host, '.'))) {
    snprintf(err, errlen, "--sname needs a short host name, got '%s' (use --name)", host);
    return -1;
  }
  if (strlen(alive) + 1 + strlen(host) >= sizeof full) {
    snprintf(err, errlen, "the node name %s@%s is too long", alive, host);
    return -1;
  }
  snprintf(full, sizeof full, "%s@%.*s", alive, (int)(sizeof full - 2 - strlen(alive)), host);

  char cookie[EI_MAX_COOKIE_SIZE + 1];
  if (o->cookie)
    snprintf(cookie, sizeof cookie, "%s", o->cookie);
  else if (read_cookie(cookie, sizeof cookie, err, errlen) < 0)
    return -1;

  /* The address of the host name: we listen there only. */
  struct addrinfo hints = {0}, *ai = NULL;
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  if (getaddrinfo(host, NULL, &hints, &ai) != 0 || ai == NULL) {
    snprintf(err, errlen, "cannot resolve the host name '%s'", host);
    return -1;
  }
  struct in_addr addr = ((struct sockaddr_in *)ai->ai_addr)->sin_addr;
  freeaddrinfo(ai);

  ei_init();
  unsigned creation = (unsigned)(uv_hrtime() / 1000 % 0x7FFFFFFF) | 4;
  if (ei_connect_xinit_ussi(&ec, host, alive, full, &addr, cookie, creation, &cbs,
                            sizeof cbs, NULL) < 0) {
    snprintf(err, errlen, "cannot set up the node %s", full);
    return -1;
  }
  int port = 0;
  listen_fd = ei_xlisten(&ec, &addr, &port, 64);
  if (listen_fd < 0) {
    snprintf(err, errlen, "cannot listen on %s: %s", host, strerror(erl_errno));
    return -1;
  }
  /* Register with epmd, starting it first if none runs (as erl does). */
  publish_fd = ei_publish_tmo(&ec, port, 1000);
  if (publish_fd < 0) {
    if (system("epmd -daemon >/dev/null 2>&1") != 0) {
      snprintf(err, errlen, "cannot start epmd (is erlang-base installed?)");
      return -1;
    }
    for (int i = 0; i < 50 && publish_fd < 0; i++) {
      usleep(100000);
      publish_fd = ei_publish_tmo(&ec, port, 1000);
    }
  }
  if (publish_fd < 0) {
    snprintf(err, errlen, "cannot register %s with epmd (is the name taken?)", full);
    return -1;
  }
  fcntl(publish_fd, F_SETFD, FD_CLOEXEC);
  fcntl(listen_fd, F_SETFD, FD_CLOEXEC);
  int64_t a = mb_atom_intern(full, strlen(full));
  if (a <= 0) {
    snprintf(err, errlen, "bad node name '%s'", full);
    return -1;
  }
  self_atom = (uint32_t)a;
  mb_etf_set_node(self_atom, creation);
  mb_proc_remote_send = hook_send;
  mb_proc_remote_link = hook_link;
  mb_proc_remote_monitor = hook_monitor;
  mb_id_format_remote = format_remote;
  mb_sched_add_closer(closer);
  on = 1;
  if (pthread_create(&acceptor, NULL, accept_main, NULL) != 0) {
    snprintf(err, errlen, "cannot start the acceptor thread");
    on = 0;
    return -1;
  }
  return 0;
}
