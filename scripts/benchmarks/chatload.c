/* chatload: load generator for the chat benchmark (scripts/bench chat).
 *
 * Opens n TCP connections to a chat server speaking the line protocol of
 * examples/chat (and of its Erlang twin, chat.erl), at `ramp` connections per
 * second. Connection i sends "/nick u<i>" and "/join r<i / room>", so rooms
 * hold `room` users each, and waits for "* joined r<k>". Once every
 * connection has joined (or failed), each one sends "<i> <send-time-us>" once
 * per second (`rate` per second), the sends of all connections spread evenly
 * over the second; send-time is CLOCK_MONOTONIC in microseconds. Every line
 * "[room] nick: <i> <us>" received is one delivered message and one latency
 * sample (receive time - send time; same machine, same clock). The first
 * `warmup` seconds of sending are not measured; then it measures `duration`
 * seconds, prints one line of key=value figures and exits (the kernel closes
 * the connections).
 *
 * Usage: chatload [key=value...]
 *   host=127.0.0.1 port=7000 n=1000 room=100 duration=10 warmup=2
 *   ramp=2000 (connections opened per second)   rate=1 (messages/s per user)
 *   first=0 (index of the first user; to split a load over several processes)
 *   join_timeout=120 (seconds to wait for every connection to join)
 *   pid=<server pid> (read the server's VmRSS from /proc/<pid>/status before
 *   connecting, once all joined, and at the end)
 *   interval=0 (if > 0: a line on stderr every interval seconds once sending
 *   started, with that interval's delivered/s and latency percentiles)
 *   active=n (only users 0..active-1 send; the others stay connected, in
 *   their rooms, silent: with active a multiple of room, their rooms carry
 *   no traffic at all - the idle users of a big chat)
 *   settle=0 (seconds to wait once all joined, before the settled figures
 *   rss_settled_kb / kb_per_conn_settled are read and sending starts: time
 *   for idle processes to hibernate)
 * Output (one line): chatload connections=<asked> held=<joined and still open
 *   at the end> joined=... join_s=... sent_per_s=... delivered_per_s=...
 *   expected_per_s=... p50_ms= p99_ms= max_ms= errors=<connect, read, write
 *   errors and unexpected closes> skipped=<sends skipped because the socket's
 *   output queue was over 64 KB> rss_before_kb= rss_joined_kb= rss_end_kb=
 *   kb_per_conn=(rss_joined - rss_before) / joined, kb_per_conn_end=...
 *   server_cpu_pct=<server CPU time in the window, % of one core>
 *   server_cpu_us_per_msg=<server CPU time / delivered messages, us>
 *
 * Single-threaded (one libuv loop); needs one file descriptor per connection.
 */
#define _GNU_SOURCE
#include <uv.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

enum { ST_IDLE, ST_CONNECTING, ST_JOINING, ST_JOINED, ST_DEAD };

typedef struct conn {
  uv_tcp_t tcp;
  uv_connect_t creq;
  int idx;   /* user index (u<idx>) */
  int room;  /* room number (r<room>) */
  int state;
  char *carry; /* partial line from the previous read */
  size_t carry_len, carry_cap;
} conn_t;

typedef struct wreq {
  uv_write_t req;
  char data[];
} wreq_t;

/* options */
static const char *o_host = "127.0.0.1";
static int o_port = 7000, o_n = 1000, o_room = 100, o_first = 0, o_pid = 0;
static double o_duration = 10, o_warmup = 2, o_ramp = 2000, o_rate = 1, o_join_timeout = 120;
static int o_active = -1;     /* senders: users 0..active-1 (-1: all) */
static double o_settle = 0;

static uv_loop_t *loop;
static conn_t *conns;
static int *room_alive; /* joined and open members per room */
static int nrooms;
static struct sockaddr_in addr;

static int opened, settled, joined_total;
static int64_t t_start, t_joined, t_send0, t_measure0, t_measure1;
static int measuring, sending;
static uint64_t send_cursor;
static long rss_before = -1, rss_joined = -1, rss_settled = -1, rss_end = -1;
static double cpu_measure0 = -1, cpu_measure1 = -1;

/* counters */
static uint64_t n_sent_win, n_expected_win, n_delivered_win, n_delivered_all;
static uint64_t n_err_connect, n_err_read, n_err_write, n_closed, n_skipped, n_bad_line;

/* latency histogram: 10 us buckets below 1 s, then 1 ms buckets to 100 s */
#define FINE_US 10
#define FINE_N 100000
#define COARSE_US 1000
#define COARSE_N 99000
typedef struct hist {
  uint64_t b[FINE_N + COARSE_N + 1];
  uint64_t count;
  int64_t max;
} hist_t;
static hist_t hist;  /* the measured window */
static hist_t ihist; /* the current interval (interval= option) */
static double o_interval = 0;
static uint64_t n_delivered_int;
static uv_timer_t interval_timer;

static uv_timer_t ramp_timer, send_timer, phase_timer;

static int64_t now_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static long read_rss_kb(int pid) {
  if (pid <= 0) return -1;
  char path[64], line[256];
  snprintf(path, sizeof path, "/proc/%d/status", pid);
  FILE *f = fopen(path, "r");
  if (!f) return -1;
  long kb = -1;
  while (fgets(line, sizeof line, f))
    if (strncmp(line, "VmRSS:", 6) == 0) { kb = strtol(line + 6, NULL, 10); break; }
  fclose(f);
  return kb;
}

/* CPU time (user + system, seconds) the process pid has used so far. */
static double read_cpu_s(int pid) {
  if (pid <= 0) return -1;
  char path[64], buf[1024];
  snprintf(path, sizeof path, "/proc/%d/stat", pid);
  FILE *f = fopen(path, "r");
  if (!f) return -1;
  size_t n = fread(buf, 1, sizeof buf - 1, f);
  fclose(f);
  buf[n] = 0;
  char *p = strrchr(buf, ')'); /* the command name may hold spaces */
  if (!p) return -1;
  unsigned long long ut = 0, st = 0;
  /* after ") ": state(3) ... utime is field 14, stime 15 */
  if (sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st) != 2) return -1;
  return (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
}

static void hist_add(hist_t *h, int64_t us) {
  if (us < 0) us = 0;
  size_t b = us < (int64_t)FINE_US * FINE_N ? (size_t)(us / FINE_US)
                                             : FINE_N + (size_t)((us - (int64_t)FINE_US * FINE_N) / COARSE_US);
  if (b > FINE_N + COARSE_N) b = FINE_N + COARSE_N;
  h->b[b]++;
  h->count++;
  if (us > h->max) h->max = us;
}

/* The latency (ms) below which a fraction q of the samples lie (bucket middle). */
static double percentile_ms(const hist_t *h, double q) {
  if (h->count == 0) return -1;
  uint64_t want = (uint64_t)(q * (double)h->count);
  if (want >= h->count) want = h->count - 1;
  uint64_t acc = 0;
  for (size_t b = 0; b <= FINE_N + COARSE_N; b++) {
    acc += h->b[b];
    if (acc > want) {
      double us = b < FINE_N ? (b + 0.5) * FINE_US
                             : (double)FINE_US * FINE_N + (b - FINE_N + 0.5) * COARSE_US;
      return us / 1000.0;
    }
  }
  return h->max / 1000.0;
}

/* interval= option: one line on stderr per interval once sending started. */
static void on_interval(uv_timer_t *t) {
  (void)t;
  static int64_t last;
  int64_t now = now_us();
  double secs = last ? (now - last) / 1e6 : o_interval;
  last = now;
  fprintf(stderr, "chatload interval t=%.1f delivered_per_s=%.1f p50_ms=%.3f p99_ms=%.3f max_ms=%.3f%s\n",
          (now - t_send0) / 1e6, n_delivered_int / secs, percentile_ms(&ihist, 0.5),
          percentile_ms(&ihist, 0.99), ihist.max / 1000.0, measuring ? "" : " (warm-up)");
  memset(&ihist, 0, sizeof ihist);
  n_delivered_int = 0;
}

static void conn_dead(conn_t *c);

static void on_write(uv_write_t *req, int status) {
  conn_t *c = req->handle->data;
  free(req);
  if (status < 0 && status != UV_ECANCELED && c->state != ST_DEAD) {
    n_err_write++;
    conn_dead(c);
  }
}

/* Writes len bytes: directly if the socket takes them, else queued. */
static int conn_write(conn_t *c, const char *data, size_t len) {
  uv_buf_t b = uv_buf_init((char *)data, (unsigned)len);
  int r = uv_try_write((uv_stream_t *)&c->tcp, &b, 1);
  size_t done = 0;
  if (r >= 0) done = (size_t)r;
  else if (r != UV_EAGAIN && r != UV_ENOSYS) return r;
  if (done == len) return 0;
  wreq_t *w = malloc(sizeof *w + (len - done));
  if (!w) return UV_ENOMEM;
  memcpy(w->data, data + done, len - done);
  b = uv_buf_init(w->data, (unsigned)(len - done));
  return uv_write(&w->req, (uv_stream_t *)&c->tcp, &b, 1, on_write);
}

static void on_close(uv_handle_t *h) { (void)h; }

static void all_settled(void);

static void settle_one(void) {
  settled++;
  if (settled == o_n && !sending) all_settled();
}

static void conn_dead(conn_t *c) {
  int was = c->state;
  if (was == ST_DEAD) return;
  c->state = ST_DEAD;
  if (was == ST_JOINED) room_alive[c->room]--;
  if (was == ST_CONNECTING || was == ST_JOINING) settle_one();
  if (!uv_is_closing((uv_handle_t *)&c->tcp)) uv_close((uv_handle_t *)&c->tcp, on_close);
}

static void on_line(conn_t *c, const char *s, size_t len, int64_t now) {
  if (len && s[len - 1] == '\r') len--;
  if (len > 0 && s[0] == '[') {
    /* "[room] nick: <i> <us>" */
    const char *p = memchr(s, ']', len);
    const char *end = s + len;
    if (p) p = memchr(p, ':', (size_t)(end - p));
    if (!p || p + 2 > end) { n_bad_line++; return; }
    p += 2;
    char tmp[64];
    size_t tl = (size_t)(end - p);
    if (tl >= sizeof tmp) { n_bad_line++; return; }
    memcpy(tmp, p, tl);
    tmp[tl] = 0;
    char *q;
    long idx = strtol(tmp, &q, 10);
    long long us = strtoll(q, &q, 10);
    if (q == tmp || idx < 0 || us <= 0) { n_bad_line++; return; }
    n_delivered_all++;
    if (measuring) {
      n_delivered_win++;
      hist_add(&hist, now - us);
    }
    if (o_interval > 0 && sending) {
      n_delivered_int++;
      hist_add(&ihist, now - us);
    }
    return;
  }
  if (len > 0 && s[0] == '*') {
    if (c->state == ST_JOINING && len > 9 && memcmp(s, "* joined ", 9) == 0) {
      c->state = ST_JOINED;
      room_alive[c->room]++;
      joined_total++;
      settle_one();
    }
    return; /* welcome, "you are", others' joined/left notices */
  }
  n_bad_line++;
}

static char rbuf[256 * 1024];

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  (void)h; (void)suggested;
  *buf = uv_buf_init(rbuf, sizeof rbuf);
}

static void carry_append(conn_t *c, const char *p, size_t n) {
  if (c->carry_len + n > c->carry_cap) {
    size_t cap = c->carry_cap ? c->carry_cap : 256;
    while (cap < c->carry_len + n) cap *= 2;
    c->carry = realloc(c->carry, cap);
    if (!c->carry) { fprintf(stderr, "chatload: out of memory\n"); exit(1); }
    c->carry_cap = cap;
  }
  memcpy(c->carry + c->carry_len, p, n);
  c->carry_len += n;
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  conn_t *c = s->data;
  if (nread < 0) {
    if (c->state != ST_DEAD) {
      if (nread == UV_EOF) n_closed++; else n_err_read++;
      conn_dead(c);
    }
    return;
  }
  if (nread == 0 || c->state == ST_DEAD) return;
  int64_t now = now_us();
  const char *p = buf->base, *end = buf->base + nread;
  if (c->carry_len) {
    const char *nl = memchr(p, '\n', (size_t)(end - p));
    if (!nl) { carry_append(c, p, (size_t)(end - p)); return; }
    carry_append(c, p, (size_t)(nl - p));
    on_line(c, c->carry, c->carry_len, now);
    c->carry_len = 0;
    p = nl + 1;
  }
  while (p < end && c->state != ST_DEAD) {
    const char *nl = memchr(p, '\n', (size_t)(end - p));
    if (!nl) { carry_append(c, p, (size_t)(end - p)); break; }
    on_line(c, p, (size_t)(nl - p), now);
    p = nl + 1;
  }
  if (c->carry_len > 65536) { n_bad_line++; conn_dead(c); }
}

static void on_connect(uv_connect_t *req, int status) {
  conn_t *c = req->data;
  if (status < 0) {
    n_err_connect++;
    if (n_err_connect <= 3) fprintf(stderr, "chatload: connect u%d: %s\n", c->idx, uv_strerror(status));
    conn_dead(c);
    return;
  }
  c->state = ST_JOINING;
  uv_tcp_nodelay(&c->tcp, 1);
  uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
  char msg[96];
  int len = snprintf(msg, sizeof msg, "/nick u%d\n/join r%d\n", c->idx, c->room);
  if (conn_write(c, msg, (size_t)len) < 0) { n_err_write++; conn_dead(c); }
}

static void open_one(conn_t *c) {
  c->state = ST_CONNECTING;
  uv_tcp_init(loop, &c->tcp);
  c->tcp.data = c;
  c->creq.data = c;
  int r = uv_tcp_connect(&c->creq, &c->tcp, (const struct sockaddr *)&addr, on_connect);
  if (r < 0) {
    n_err_connect++;
    if (n_err_connect <= 3) fprintf(stderr, "chatload: connect u%d: %s\n", c->idx, uv_strerror(r));
    conn_dead(c);
  }
}

static void on_ramp(uv_timer_t *t) {
  double elapsed = (now_us() - t_start) / 1e6;
  int want = (int)(elapsed * o_ramp) + 1;
  if (want > o_n) want = o_n;
  while (opened < want) open_one(&conns[opened++]);
  if (opened == o_n) uv_timer_stop(t);
}

static void on_send(uv_timer_t *t) {
  (void)t;
  int64_t now = now_us();
  int senders = o_active >= 0 && o_active < o_n ? o_active : o_n;
  uint64_t target = (uint64_t)((double)(now - t_send0) * senders * o_rate / 1e6);
  char msg[64];
  while (send_cursor < target) {
    conn_t *c = &conns[send_cursor % (uint64_t)senders];
    send_cursor++;
    if (c->state != ST_JOINED) continue;
    if (uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp) > 65536) { n_skipped++; continue; }
    int len = snprintf(msg, sizeof msg, "%d %lld\n", c->idx, (long long)now);
    if (conn_write(c, msg, (size_t)len) < 0) { n_err_write++; conn_dead(c); continue; }
    if (measuring) {
      n_sent_win++;
      n_expected_win += (uint64_t)(room_alive[c->room] > 0 ? room_alive[c->room] - 1 : 0);
    }
  }
}

static void finish(void) {
  double win = (t_measure1 - t_measure0) / 1e6;
  int held = 0;
  for (int i = 0; i < o_n; i++) held += conns[i].state == ST_JOINED;
  rss_end = read_rss_kb(o_pid);
  cpu_measure1 = read_cpu_s(o_pid);
  double cpu_pct = cpu_measure0 >= 0 && cpu_measure1 >= 0 ? 100.0 * (cpu_measure1 - cpu_measure0) / win : -1;
  uint64_t errors = n_err_connect + n_err_read + n_err_write + n_closed;
  printf("chatload connections=%d held=%d joined=%d join_s=%.2f window_s=%.2f "
         "sent_per_s=%.1f delivered_per_s=%.1f expected_per_s=%.1f "
         "p50_ms=%.3f p99_ms=%.3f max_ms=%.3f samples=%llu "
         "errors=%llu err_connect=%llu err_read=%llu err_write=%llu closed=%llu "
         "skipped=%llu bad_lines=%llu rss_before_kb=%ld rss_joined_kb=%ld rss_end_kb=%ld "
         "kb_per_conn=%.2f kb_per_conn_end=%.2f server_cpu_pct=%.1f server_cpu_us_per_msg=%.2f "
         "rss_settled_kb=%ld kb_per_conn_settled=%.3f\n",
         o_n, held, joined_total, (t_joined - t_start) / 1e6, win,
         n_sent_win / win, n_delivered_win / win, n_expected_win / win,
         percentile_ms(&hist, 0.50), percentile_ms(&hist, 0.99), hist.max / 1000.0,
         (unsigned long long)hist.count, (unsigned long long)errors,
         (unsigned long long)n_err_connect, (unsigned long long)n_err_read,
         (unsigned long long)n_err_write, (unsigned long long)n_closed,
         (unsigned long long)n_skipped, (unsigned long long)n_bad_line,
         rss_before, rss_joined, rss_end,
         joined_total && rss_joined >= 0 ? (double)(rss_joined - rss_before) / joined_total : -1.0,
         joined_total && rss_end >= 0 ? (double)(rss_end - rss_before) / joined_total : -1.0,
         cpu_pct, cpu_pct >= 0 && n_delivered_win ? (cpu_measure1 - cpu_measure0) * 1e6 / n_delivered_win : -1.0,
         rss_settled,
         joined_total && rss_settled >= 0 ? (double)(rss_settled - rss_before) / joined_total : -1.0);
  fflush(stdout);
  _exit(0); /* no orderly close of thousands of sockets; the kernel does it */
}

static void on_phase(uv_timer_t *t) {
  (void)t;
  int64_t now = now_us();
  if (!sending) { /* join timeout */
    fprintf(stderr, "chatload: %d of %d joined after %.0f s; going on with those\n",
            joined_total, o_n, o_join_timeout);
    all_settled();
  } else if (!measuring) {
    measuring = 1;
    t_measure0 = now;
    cpu_measure0 = read_cpu_s(o_pid);
    uv_timer_start(&phase_timer, on_phase, (uint64_t)(o_duration * 1000), 0);
  } else {
    t_measure1 = now;
    measuring = 0;
    finish();
  }
}

static void start_sending(void);
static uv_timer_t settle_timer;

static void on_settled(uv_timer_t *t) {
  (void)t;
  start_sending();
}

static void all_settled(void) {
  sending = 1;
  t_joined = now_us();
  rss_joined = read_rss_kb(o_pid);
  uv_timer_stop(&ramp_timer);
  uv_timer_stop(&phase_timer);
  if (o_settle > 0) {
    uv_timer_init(loop, &settle_timer);
    uv_timer_start(&settle_timer, on_settled, (uint64_t)(o_settle * 1000), 0);
  } else {
    start_sending();
  }
}

static void start_sending(void) {
  rss_settled = read_rss_kb(o_pid);
  t_send0 = now_us();
  uv_timer_start(&send_timer, on_send, 1, 1);
  if (o_interval > 0) {
    uv_timer_init(loop, &interval_timer);
    uv_timer_start(&interval_timer, on_interval, (uint64_t)(o_interval * 1000), (uint64_t)(o_interval * 1000));
  }
  if (o_warmup > 0) {
    uv_timer_start(&phase_timer, on_phase, (uint64_t)(o_warmup * 1000), 0);
  } else {
    measuring = 1;
    t_measure0 = t_send0;
    cpu_measure0 = read_cpu_s(o_pid);
    uv_timer_start(&phase_timer, on_phase, (uint64_t)(o_duration * 1000), 0);
  }
}

static void usage(void) {
  fprintf(stderr, "usage: chatload [host=127.0.0.1] [port=7000] [n=1000] [room=100] "
                  "[duration=10] [warmup=2] [ramp=2000] [rate=1] [first=0] "
                  "[join_timeout=120] [pid=<server pid>] [interval=<s>] [active=<n>] "
                  "[settle=<s>]\n");
  exit(2);
}

int main(int argc, char **argv) {
  for (int i = 1; i < argc; i++) {
    char *eq = strchr(argv[i], '=');
    if (!eq) usage();
    *eq = 0;
    const char *k = argv[i], *v = eq + 1;
    if (!strcmp(k, "host")) o_host = v;
    else if (!strcmp(k, "port")) o_port = atoi(v);
    else if (!strcmp(k, "n")) o_n = atoi(v);
    else if (!strcmp(k, "room")) o_room = atoi(v);
    else if (!strcmp(k, "first")) o_first = atoi(v);
    else if (!strcmp(k, "pid")) o_pid = atoi(v);
    else if (!strcmp(k, "duration")) o_duration = atof(v);
    else if (!strcmp(k, "warmup")) o_warmup = atof(v);
    else if (!strcmp(k, "ramp")) o_ramp = atof(v);
    else if (!strcmp(k, "rate")) o_rate = atof(v);
    else if (!strcmp(k, "join_timeout")) o_join_timeout = atof(v);
    else if (!strcmp(k, "interval")) o_interval = atof(v);
    else if (!strcmp(k, "active")) o_active = atoi(v);
    else if (!strcmp(k, "settle")) o_settle = atof(v);
    else usage();
  }
  if (o_n <= 0 || o_room <= 0 || o_duration <= 0 || o_ramp <= 0 || o_rate <= 0) usage();
  if (uv_ip4_addr(o_host, o_port, &addr) != 0) { fprintf(stderr, "chatload: bad host %s\n", o_host); return 2; }

  loop = uv_default_loop();
  conns = calloc((size_t)o_n, sizeof *conns);
  nrooms = (o_first + o_n - 1) / o_room + 1;
  room_alive = calloc((size_t)nrooms, sizeof *room_alive);
  if (!conns || !room_alive) { fprintf(stderr, "chatload: out of memory\n"); return 1; }
  for (int i = 0; i < o_n; i++) {
    conns[i].idx = o_first + i;
    conns[i].room = (o_first + i) / o_room;
  }
  rss_before = read_rss_kb(o_pid);
  t_start = now_us();
  uv_timer_init(loop, &ramp_timer);
  uv_timer_init(loop, &send_timer);
  uv_timer_init(loop, &phase_timer);
  uv_timer_start(&ramp_timer, on_ramp, 0, 5);
  uv_timer_start(&phase_timer, on_phase, (uint64_t)(o_join_timeout * 1000), 0);
  uv_run(loop, UV_RUN_DEFAULT);
  return 0;
}
