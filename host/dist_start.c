/* dist_start.c: making the host a node (mb_dist_start: the name, the
 * cookie, listening, epmd) and the handshakes of its connections, which ei
 * runs over our socket callbacks: outgoing ones on libuv's thread pool
 * (dist_start_connect), incoming ones on handshake threads. A finished
 * handshake hands its socket to a scheduler's loop (dist_conn_up, dist.c).
 *
 * DESIGN
 * Incoming connections: the acceptor thread only accepts, and hands each
 * new socket to a handshake thread (made on demand, kept until shutdown),
 * so that one slow or silent peer holds off nobody else. At most
 * MB_DIST_HANDSHAKES handshakes are in flight; a connection past that is
 * closed at once and logged. Every handshake, either way, has one deadline,
 * net_setuptime after it starts (setup_ms; MB_DIST_SETUP_MS unless
 * --net-setuptime says otherwise): ei runs a
 * handshake start to end on the calling thread, so that thread's current
 * handshake (hs, thread-local) carries the deadline and the peer's flags,
 * and every socket callback waits at most until the deadline, whatever
 * timeout ei passes. (ei's ctx stays the fd: after a handshake ei keeps the
 * ctx in its socket table, where a pointer would be left dangling.)
 * Shutdown (closer): stopping is set and wake_fd made readable, which every
 * wait of the callbacks polls too, so that handshakes in progress fail at
 * once; then the acceptor and every handshake thread are joined, and the
 * sockets still queued are closed.
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
static int wake_fd[2] = {-1, -1};      /* a pipe: readable once stopping */
static int setup_ms = MB_DIST_SETUP_MS; /* net_setuptime (set before any thread) */
static pthread_t acceptor;
static atomic_int stopping;

/* A handshake in progress on this thread (ei calls our callbacks on the
 * thread that runs it): its deadline (dist_now_ms) and what cb_read saw
 * of the peer's capabilities. NULL on other threads (epmd's calls). */
typedef struct hs {
  uint64_t deadline;
  uint64_t peer_flags;
  int fd;                /* incoming: the socket accepted for it */
} hs_t;
static __thread hs_t *hs;

/* The handshake threads and the sockets handed to them (hs_lock). */
static pthread_mutex_t hs_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t hs_cond = PTHREAD_COND_INITIALIZER;
static pthread_t hs_threads[MB_DIST_HANDSHAKES];
static int hs_nthreads;               /* made so far */
static int hs_busy;                   /* sockets queued or in a handshake */
static int hs_queue[MB_DIST_HANDSHAKES];
static int hs_head, hs_len;           /* a ring of queued sockets */

/* -- Handshakes: ei over our socket callbacks ------------------------------ */

/* ei's socket callbacks (ei_connect_init_ussi), on plain blocking sockets
 * with poll for the timeouts. ctx is the fd itself. Only handshakes go
 * through them: afterwards the socket belongs to libuv. */

/* Wait for ev on fd: at most tmo ms (ei's), and never past the deadline
 * of this thread's handshake; ECANCELED once the host is stopping. */
static int wait_fd(int fd, short ev, unsigned tmo)
{
  struct pollfd p[2] = {{fd, ev, 0}, {wake_fd[0], POLLIN, 0}};
  for (;;) {
    long long ms = tmo == EI_SCLBK_INF_TMO ? -1 : (long long)tmo;
    uint64_t now = dist_now_ms();
    if (hs) {
      if (now >= hs->deadline)
        return ETIMEDOUT;
      if (ms < 0 || (uint64_t)ms > hs->deadline - now)
        ms = (long long)(hs->deadline - now);
    }
    int rc = poll(p, wake_fd[0] >= 0 ? 2 : 1, (int)ms);
    if (rc < 0 && errno == EINTR)
      continue;                       /* (the deadline still holds) */
    if (rc < 0)
      return errno;
    if (rc == 0)
      return ETIMEDOUT;
    if (p[1].revents)
      return ECANCELED;
    return 0;
  }
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

/* The acceptor thread accepted the socket already: ei_accept, run by a
 * handshake thread, gets that one (hs->fd) as the connection. */
static int cb_accept(void **ctx, void *addr, int *len, unsigned tmo)
{
  if (hs == NULL || hs->fd < 0)
    return EINVAL;
  socklen_t l = (socklen_t)*len;
  if (getpeername(hs->fd, addr, &l) < 0)
    return errno;
  *len = (int)l;
  *ctx = (void *)(intptr_t)hs->fd;
  hs->fd = -1;                        /* ei's now: it closes it on failure */
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
  if (hs == NULL)
    return 0;                         /* (epmd's calls) */
  if (n >= 9 && buf[0] == 'N') {
    hs->peer_flags = 0;
    for (int i = 1; i <= 8; i++)
      hs->peer_flags = hs->peer_flags << 8 | u[i];
  } else if (n >= 7 && buf[0] == 'n') {
    hs->peer_flags = (uint64_t)u[3] << 24 | (uint64_t)u[4] << 16 | (uint64_t)u[5] << 8 | u[6];
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

/* EI_SCLBK_FLG_FULL_IMPL: the callbacks do their own waiting (wait_fd);
 * without it ei polls the fd itself first, for as long as the timeout it
 * was given, blind to the handshake's deadline and to stopping. */
static ei_socket_callbacks cbs = {
  EI_SCLBK_FLG_FULL_IMPL, cb_socket, cb_close, cb_listen, cb_accept, cb_connect, NULL, cb_write, cb_read,
  cb_hs_header, cb_hs_done, cb_hs_done, cb_get_fd
};

/* Thread pool: ei_connect with a private copy of the node record, within
 * net_setuptime (setup_ms) in all. */
static void connect_work(uv_work_t *w)
{
  conn_t *c = w->data;
  ei_cnode mine = dist_ec;
  char name[MAXNODELEN + 1];
  snprintf(name, sizeof name, "%s", dist_node_text(c->node));
  hs_t h = {dist_now_ms() + setup_ms, 0, -1};
  hs = &h;
  c->fd = ei_connect_tmo(&mine, name,
                         setup_ms < MB_DIST_CONNECT_MS ? setup_ms : MB_DIST_CONNECT_MS);
  hs = NULL;
  c->peer_flags = h.peer_flags;
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

/* "a.b.c.d:port" of fd's peer, for the log. */
static const char *peer_text(int fd, char *buf, size_t n)
{
  struct sockaddr_in a;
  socklen_t l = sizeof a;
  char ip[INET_ADDRSTRLEN];
  if (getpeername(fd, (struct sockaddr *)&a, &l) < 0 || a.sin_family != AF_INET ||
      inet_ntop(AF_INET, &a.sin_addr, ip, sizeof ip) == NULL)
    snprintf(buf, n, "?");
  else
    snprintf(buf, n, "%s:%u", ip, (unsigned)ntohs(a.sin_port));
  return buf;
}

/* The handshake of the accepted socket fd (a handshake thread), bounded by
 * net_setuptime (setup_ms) in all; a node that passed it goes to a scheduler. */
static void handshake_in(int fd)
{
  char who[64];
  peer_text(fd, who, sizeof who);
  ei_cnode mine = dist_ec;
  ErlConnect conp;
  memset(&conp, 0, sizeof conp);
  hs_t h = {dist_now_ms() + setup_ms, 0, fd};
  hs = &h;
  int cfd = ei_accept_tmo(&mine, listen_fd, &conp, setup_ms);
  int err = erl_errno;
  hs = NULL;
  if (h.fd >= 0)
    close(h.fd);                      /* ei never took it */
  if (atomic_load(&stopping)) {
    if (cfd >= 0)
      close(cfd);
    return;
  }
  if (cfd < 0) {
    const char *from = conp.nodename[0] ? conp.nodename : who;
    if (err == ETIMEDOUT)
      dist_log("dropped a connection from %s: its handshake was not done within %d ms "
               "(net_setuptime)", from, setup_ms);
    else
      dist_log("refused a connection from %s: handshake failed (wrong cookie or not a "
               "node)", from);
    return;
  }
  int64_t node = mb_atom_intern(conp.nodename, strlen(conp.nodename));
  if (node <= 0) {
    close(cfd);
    return;
  }
  pthread_mutex_lock(&dist_lock);
  conn_t *c = dist_find((uint32_t)node);
  if (c && c->state == C_UP) {
    pthread_mutex_unlock(&dist_lock);
    close(cfd);                       /* already connected: keep the one we have */
    return;
  }
  if (c == NULL)
    c = dist_table_add((uint32_t)node, 1);
  atomic_fetch_add(&c->refs, 1);
  pthread_mutex_unlock(&dist_lock);
  adopt_t *a = mb_malloc(sizeof *a);
  a->c = c;
  a->fd = cfd;
  a->flags = h.peer_flags;
  mb_sched_post(mb_sched_pick(), do_adopt, a);
}

/* A handshake thread: takes the sockets the acceptor queues, one at a
 * time, until the host stops (then closes what is still queued). */
static void *handshake_main(void *arg)
{
  pthread_mutex_lock(&hs_lock);
  for (;;) {
    while (hs_len == 0 && !atomic_load(&stopping))
      pthread_cond_wait(&hs_cond, &hs_lock);
    if (hs_len == 0)
      break;
    int fd = hs_queue[hs_head];
    hs_head = (hs_head + 1) % MB_DIST_HANDSHAKES;
    hs_len--;
    pthread_mutex_unlock(&hs_lock);
    if (atomic_load(&stopping))
      close(fd);
    else
      handshake_in(fd);
    pthread_mutex_lock(&hs_lock);
    hs_busy--;
  }
  pthread_mutex_unlock(&hs_lock);
  return NULL;
}

/* Queue fd for a handshake thread, making one if every thread is busy;
 * 0, or -1 if MB_DIST_HANDSHAKES are in flight (fd is the caller's). */
static int handshake_queue(int fd)
{
  pthread_mutex_lock(&hs_lock);
  int full = hs_busy == MB_DIST_HANDSHAKES;
  if (!full && hs_busy == hs_nthreads) {   /* every thread is busy: one more */
    if (pthread_create(&hs_threads[hs_nthreads], NULL, handshake_main, NULL) == 0)
      hs_nthreads++;
    else
      full = hs_nthreads == 0;        /* else the threads there are get to it */
  }
  if (!full) {
    hs_queue[(hs_head + hs_len) % MB_DIST_HANDSHAKES] = fd;
    hs_len++;
    hs_busy++;
    pthread_cond_signal(&hs_cond);
  }
  pthread_mutex_unlock(&hs_lock);
  return full ? -1 : 0;
}

/* The acceptor thread: accepts, and hands each socket to a handshake
 * thread. */
static void *accept_main(void *arg)
{
  struct pollfd p[2] = {{listen_fd, POLLIN, 0}, {wake_fd[0], POLLIN, 0}};
  while (!atomic_load(&stopping)) {
    int rc = poll(p, 2, -1);
    if (rc < 0 && errno != EINTR) {
      dist_log("cannot accept connections: %s", strerror(errno));
      break;
    }
    if (rc <= 0 || atomic_load(&stopping) || !(p[0].revents & POLLIN))
      continue;
    int fd = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EMFILE || errno == ENFILE)
        usleep(100000);               /* out of descriptors: let some close */
      continue;
    }
    if (handshake_queue(fd) < 0) {
      char who[64];
      dist_log("refused a connection from %s: %d handshakes are in progress already",
               peer_text(fd, who, sizeof who), MB_DIST_HANDSHAKES);
      close(fd);
    }
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
    /* Wake the acceptor and every handshake (wait_fd) at once. */
    if (write(wake_fd[1], "x", 1) < 0)
      dist_log("cannot wake the handshake threads: %s", strerror(errno));
    pthread_join(acceptor, NULL);
    pthread_mutex_lock(&hs_lock);
    pthread_cond_broadcast(&hs_cond);
    int n = hs_nthreads;
    pthread_mutex_unlock(&hs_lock);
    for (int i = 0; i < n; i++)
      pthread_join(hs_threads[i], NULL);
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
  /* Non-blocking, so that a connection gone between the acceptor's poll
   * and its accept cannot leave it blocked (and the closer's join with it). */
  fcntl(listen_fd, F_SETFL, fcntl(listen_fd, F_GETFL) | O_NONBLOCK);
  int64_t a = mb_atom_intern(full, strlen(full));
  if (a <= 0) {
    snprintf(err, errlen, "bad node name '%s'", full);
    return -1;
  }
  dist_self_atom = (uint32_t)a;
  mb_etf_set_node(dist_self_atom, creation);
  if (o->ticktime)
    dist_tick_ms = o->ticktime * 1000 / 4;
  if (o->setuptime)
    setup_ms = (int)(o->setuptime < 120 ? o->setuptime : 120) * 1000;   /* erl's cap */
  if (pipe2(wake_fd, O_CLOEXEC) < 0) {
    snprintf(err, errlen, "cannot make a pipe: %s", strerror(errno));
    return -1;
  }
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
