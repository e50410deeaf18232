/* dist_start.c: making the host a node (mb_dist_start: the name, the
 * cookie, listening, epmd) and the handshakes of its connections, which ei
 * runs over our socket callbacks: outgoing ones on libuv's thread pool
 * (dist_start_connect), incoming ones on the acceptor thread. A finished
 * handshake hands its socket to a scheduler's loop (dist_conn_up, dist.c).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
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

#include "dist_int.h"
#include "etf.h"
#include "term.h"

static int listen_fd = -1, publish_fd = -1;
static pthread_t acceptor;
static atomic_int stopping;

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

/* The handshake's name and challenge packets carry each side's capability
 * flags, which the two sides AND together: 'N' packets 8 flag bytes after
 * the tag, 'n' ones (the old handshake) 4 after a 2-byte version. Each
 * packet here has its 2-byte length in front. */
static int flags_packet(const char *buf, ssize_t len)
{
  if (len < 11 || (buf[2] != 'N' && buf[2] != 'n'))
    return 0;
  size_t plen = (size_t)(unsigned char)buf[0] << 8 | (unsigned char)buf[1];
  return plen + 2 == (size_t)len;
}

static int write_some(int fd, const char *buf, ssize_t *len, unsigned tmo)
{
  int rc = wait_fd(fd, POLLOUT, tmo);
  if (rc)
    return rc;
  ssize_t n = write(fd, buf, (size_t)*len);
  if (n < 0)
    return errno;
  *len = n;
  return 0;
}

/* Our offer is ei's plus the flags named in dist.h ("Capabilities"). */
static int cb_write(void *ctx, const char *buf, ssize_t *len, unsigned tmo)
{
  int fd = (int)(intptr_t)ctx;
  if (!flags_packet(buf, *len))
    return write_some(fd, buf, len, tmo);
  char *p = malloc((size_t)*len);
  if (p == NULL)
    return ENOMEM;
  memcpy(p, buf, (size_t)*len);
  if (p[2] == 'N') {
    p[10] |= (char)DFLAG_DIST_MONITOR_NAME;
    p[6] |= (char)(DFLAG_ALIAS >> 32);
  } else {
    p[8] |= (char)DFLAG_DIST_MONITOR_NAME;
  }
  int rc = write_some(fd, p, len, tmo);
  free(p);
  return rc;
}

/* The peer's offer, seen by cb_read during this thread's handshake. */
static __thread uint64_t peer_flags;

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
  /* ei reads a packet's 2-byte length, then its body: a body that is a
   * name or challenge packet starts with its tag. */
  const unsigned char *u = (const unsigned char *)buf;
  if (n >= 9 && buf[0] == 'N') {
    peer_flags = 0;
    for (int i = 1; i <= 8; i++)
      peer_flags = peer_flags << 8 | u[i];
  } else if (n >= 7 && buf[0] == 'n') {
    peer_flags = (uint64_t)u[3] << 24 | (uint64_t)u[4] << 16 | (uint64_t)u[5] << 8 | u[6];
  }
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
  ei_cnode mine = dist_ec;
  char name[MAXNODELEN + 1];
  snprintf(name, sizeof name, "%s", dist_node_text(c->node));
  peer_flags = 0;
  c->fd = ei_connect_tmo(&mine, name, MB_DIST_CONNECT_MS);
  c->peer_flags = peer_flags;
}

static void connect_done(uv_work_t *w, int status)
{
  conn_t *c = w->data;
  if (c->fd >= 0 && status == 0) {
    dist_conn_up(c, mb_sched_self(), c->fd, c->peer_flags);
  } else {
    if (c->fd >= 0)
      close(c->fd);
    pthread_mutex_lock(&dist_lock);
    int connecting = c->state == C_CONNECTING;
    pthread_mutex_unlock(&dist_lock);
    if (connecting) {
      dist_log("cannot connect to %s", dist_node_text(c->node));
      dist_conn_down(c, NULL);
    }
  }
  dist_conn_unref(c);                 /* the work's reference */
}

void dist_start_connect(void *arg)
{
  conn_t *c = arg;
  c->work.data = c;
  if (uv_queue_work(mb_sched_loop(mb_sched_self()), &c->work, connect_work,
                    connect_done) < 0) {
    dist_conn_down(c, NULL);
    dist_conn_unref(c);
  }
}

typedef struct adopt {
  conn_t *c;
  int fd;
  uint64_t flags;
} adopt_t;

static void do_adopt(void *arg)
{
  adopt_t *a = arg;
  dist_conn_up(a->c, mb_sched_self(), a->fd, a->flags);
  dist_conn_unref(a->c);
  mb_free(a);
}

/* The acceptor thread: ei_accept (the handshake, with the cookie check)
 * one connection at a time, each step bounded by MB_DIST_CONNECT_MS. */
static void *accept_main(void *arg)
{
  ei_cnode mine = dist_ec;
  while (!atomic_load(&stopping)) {
    ErlConnect conp;
    memset(&conp, 0, sizeof conp);
    peer_flags = 0;
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
        dist_log("refused a connection%s%s: handshake failed (wrong cookie or "
              "not a node)", conp.nodename[0] ? " from " : "", conp.nodename);
      else
        dist_log("refused a connection: handshake failed (wrong cookie or not a node)");
      continue;
    }
    int64_t node = mb_atom_intern(conp.nodename, strlen(conp.nodename));
    if (node <= 0) {
      close(fd);
      continue;
    }
    pthread_mutex_lock(&dist_lock);
    conn_t *c = dist_find((uint32_t)node);
    if (c && c->state == C_UP) {
      pthread_mutex_unlock(&dist_lock);
      close(fd);                 /* already connected: keep the one we have */
      continue;
    }
    if (c == NULL)
      c = dist_table_add((uint32_t)node, 1);
    atomic_fetch_add(&c->refs, 1);
    pthread_mutex_unlock(&dist_lock);
    adopt_t *a = mb_malloc(sizeof *a);
    a->c = c;
    a->fd = fd;
    a->flags = peer_flags;
    mb_sched_post(mb_sched_pick(), do_adopt, a);
  }
  return NULL;
}

/* -- Start and stop ------------------------------------------------------------- */

/* Stop the acceptor before the loops close (it posts to them): called by
 * the scheduler for each handle left at shutdown, it claims only the
 * connections' handles. */
static int closer(uv_handle_t *h)
{
  if (dist_running && !atomic_exchange(&stopping, 1)) {
    pthread_join(acceptor, NULL);
    if (publish_fd >= 0)
      close(publish_fd);
    if (listen_fd >= 0)
      close(listen_fd);
  }
  return dist_close_handle(h);
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
  if (ei_connect_xinit_ussi(&dist_ec, host, alive, full, &addr, cookie, creation, &cbs,
                            sizeof cbs, NULL) < 0) {
    snprintf(err, errlen, "cannot set up the node %s", full);
    return -1;
  }
  int port = 0;
  listen_fd = ei_xlisten(&dist_ec, &addr, &port, 64);
  if (listen_fd < 0) {
    snprintf(err, errlen, "cannot listen on %s: %s", host, strerror(erl_errno));
    return -1;
  }
  /* Register with epmd, starting it first if none runs (as erl does). */
  publish_fd = ei_publish_tmo(&dist_ec, port, 1000);
  if (publish_fd < 0) {
    if (system("epmd -daemon >/dev/null 2>&1") != 0) {
      snprintf(err, errlen, "cannot start epmd (is erlang-base installed?)");
      return -1;
    }
    for (int i = 0; i < 50 && publish_fd < 0; i++) {
      usleep(100000);
      publish_fd = ei_publish_tmo(&dist_ec, port, 1000);
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
  dist_self_atom = (uint32_t)a;
  mb_etf_set_node(dist_self_atom, creation);
  if (o->ticktime)
    dist_tick_ms = o->ticktime * 1000 / 4;
  dist_install_hooks();
  mb_sched_add_closer(closer);
  dist_running = 1;
  if (pthread_create(&acceptor, NULL, accept_main, NULL) != 0) {
    snprintf(err, errlen, "cannot start the acceptor thread");
    dist_running = 0;
    return -1;
  }
  return 0;
}
