/* dist_recv.c: what a peer sends - each frame's control message checked,
 * decoded and acted on (dist_handle_frame), and the answer to net_kernel's
 * is_auth, which no process of ours serves (see dist.h). Runs on the loop
 * thread of the connection's scheduler (on_read, dist.c).
 */
#include <string.h>

#include "dist_int.h"
#include "etf.h"
#include "reg.h"
#include "remote.h"
#include "term.h"

/* Decode the message part of a frame at data[*idx]; NULL if it was dropped
 * (logged), and *bad set if the connection must close. */
static mb_msg_t *frame_msg(conn_t *c, const char *data, long len, long *idx, int *bad)
{
  mb_msg_t *m;
  int rc = mb_etf_decode(data, len, idx, 0, &m);
  if (rc == 0 && *idx != len) {       /* bytes after the message */
    mb_msg_free(m);
    rc = MB_ETF_MALFORMED;
  }
  if (rc == MB_ETF_MALFORMED) {
    *bad = 1;
    return NULL;
  }
  if (rc == MB_ETF_UNSUPPORTED)
    dist_log("dropped a message from %s: it holds a fun, a port or a bit string, "
          "which have no Lua value", dist_node_text(c->node));
  else if (rc < 0)
    dist_log("dropped a message from %s: %s", dist_node_text(c->node), mb_strerror(rc));
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
    return dist_reason_msg("unsupported_reason");
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
    return mb_reg_whereis_n(s, n);
  }
  mb_pid_t pid;
  int rc = mb_etf_get_pid(data, i, &pid);
  if (rc == MB_ETF_MALFORMED || (rc < 0 && ei_skip_term(data, i) < 0))
    *bad = 1;   /* (any other error: another node's, which we cannot name) */
  return rc < 0 || mb_id_is_remote(pid) ? 0 : pid;
}

/* The pid at data[*i] (mb_etf_get_pid). One of another node that the host
 * cannot name - the table of remote pids is full (remote.h) - is 0, with
 * *full set: no link, monitor or message of ours refers to it. -1 if it is
 * malformed. */
static int ctl_pid(const char *data, int *i, mb_pid_t *out, int *full)
{
  int at = *i;
  int rc = mb_etf_get_pid(data, i, out);
  if (rc == 0)
    return 0;
  if (rc == MB_ETF_MALFORMED)
    return -1;
  *out = 0;
  *full = 1;
  *i = at;
  return ei_skip_term(data, i) < 0 ? -1 : 0;
}

/* The ref at data[*i], held for the caller if another node's (dist_unhold
 * lets go). When the remote ref table is full, *out is 0: such a ref is
 * none this host holds (no monitor or alias of ours has it), so the caller
 * takes it for an unknown one. -1 if it is malformed. */
static int get_ref(const char *data, int *i, mb_ref_t *out)
{
  int at = *i;
  int rc = mb_etf_get_ref(data, i, out);
  if (rc == MB_ETOOMANY) {
    *out = 0;
    *i = at;
    return ei_skip_term(data, i) < 0 ? -1 : 0;
  }
  return rc < 0 ? -1 : 0;
}

/* A remote monitor of a local process we do not hold: the watcher gets
 * its DOWN at once with reason why (the ref as it sent it, raw, when the
 * ref table is full). One we cannot hold (log: why not) is logged once
 * per connection. */
static void refuse_monitor(conn_t *c, const ctl_t *x, const char *why, const char *log)
{
  mb_msg_t *r = dist_reason_msg(why);
  ctl_t e = *x;
  e.op = OP_MONITOR_P_EXIT;
  e.reason = r;
  dist_send_ctl(c->node, &e, NULL);
  mb_msg_free(r);
  if (log && !c->refusal_logged) {
    c->refusal_logged = 1;
    dist_log("refused a monitor from %s: %s (DOWN %s; further refusals on this "
             "connection are not logged)", dist_node_text(c->node), log, why);
  }
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
  if (dist_put_ctl(NULL, &csize, &x) < 0)
    return;
  /* {Tag, yes}: version, tuple header, the tag's own bytes, the atom. */
  int msize = 0;
  ei_encode_version(NULL, &msize);
  ei_encode_tuple_header(NULL, &msize, 2);
  msize += tag_len;
  ei_encode_atom(NULL, &msize, "yes");
  size_t flen = 1 + (size_t)csize + (size_t)msize;
  frame_t *f = dist_frame_alloc(flen);
  int w = 0;
  dist_put_ctl(f->data + 5, &w, &x);
  char *m = f->data + 5 + csize;
  int j = 0;
  ei_encode_version(m, &j);
  ei_encode_tuple_header(m, &j, 2);
  memcpy(m + j, data + tag, (size_t)tag_len);
  j += tag_len;
  ei_encode_atom(m, &j, "yes");
  (void)len;
  pthread_mutex_lock(&dist_lock);
  dist_queue_locked(c, f);
  pthread_mutex_unlock(&dist_lock);
}

/* Handle one frame (len > 0); returns -1 if the connection must close
 * (malformed), or MB_ETOOMANY if it must because the frame asks for a link,
 * a monitor or an exit signal from another node's process that the host
 * cannot name (ctl_pid): none could be kept, nor refused to the sender. */
int dist_handle_frame(conn_t *c, const char *data, long len)
{
  if ((unsigned char)data[0] != PASS_THROUGH)
    return -1;
  long cend = 1;
  if (mb_etf_check(data, len, &cend) < 0)
    return -1;
  int i = 1, v, arity, bad = 0, full = 0;
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
    } else if (ctl_pid(data, &i, &from, &full) < 0) {
      return -1;
    }
    if (ctl_pid(data, &i, &to, &full) < 0)
      return -1;
    goto deliver;
  case OP_ALIAS_SEND:
  case OP_ALIAS_SEND_TT: {
    /* {33, From, Alias} or {34, From, Alias, Token}: the owner of Alias
     * (ours, else nobody) gets the message through it. */
    if (arity != (op == OP_ALIAS_SEND ? 3 : 4) || ctl_pid(data, &i, &from, &full) < 0 ||
        get_ref(data, &i, &ref) < 0)
      return -1;
    if (mb_id_is_remote(ref)) {
      dist_unhold(ref);               /* not an alias of ours: nobody's */
      ref = 0;
    }
    to = ref ? dist_alias_owner(ref) : 0;
    goto deliver;
  }
  case OP_REG_SEND: {
    if (arity != 4 || ctl_pid(data, &i, &from, &full) < 0 || ei_skip_term(data, &i) < 0)
      return -1;
    int rc = mb_etf_get_atom(data, &i, &name);
    if (rc == MB_ETF_MALFORMED)
      return -1;
    size_t n = 0;
    const char *s = rc == 0 ? mb_atom_name(name, &n) : NULL;
    to = s ? mb_reg_whereis_n(s, n) : 0;
    if (to == 0 && s && n == 10 && memcmp(s, "net_kernel", 10) == 0) {
      long end = idx;
      if (mb_etf_check(data, len, &end) < 0 || end != len)
        return -1;
      answer_net_kernel(c, data, len, idx);
      return 0;
    }
    goto deliver;
  }
  case OP_LINK: {
    if (arity != 3 || ctl_pid(data, &i, &from, &full) < 0 || ctl_pid(data, &i, &to, &full) < 0)
      return -1;
    if (full)   /* a link we can neither hold nor refuse (EXIT to whom?) */
      return MB_ETOOMANY;
    int rc = 0;
    if (mb_id_is_remote(to) || (rc = mb_proc_link_remote(to, from)) < 0) {
      /* (Charged to `to`, which a link too many kills for memory.) */
      ctl_t x = {.op = OP_EXIT, .from = to, .to = from};
      mb_msg_t *r = dist_reason_msg(rc == MB_ENOMEM ? "out of memory" : "noproc");
      x.reason = r;
      dist_send_ctl(c->node, &x, NULL);
      mb_msg_free(r);
    } else {
      pthread_mutex_lock(&dist_lock);
      int added = c->state != C_DOWN;
      if (added)
        dist_pairs_add(&c->links, to, from, 0, 0);
      pthread_mutex_unlock(&dist_lock);
      /* The connection went down meanwhile, telling its links before this
       * one was among them: break it as it would have been. */
      if (!added)
        mb_proc_link_exit(to, from, dist_reason_msg("noconnection"));
    }
    return cend == len ? 0 : -1;
  }
  case OP_UNLINK:
  case OP_UNLINK_ID: {
    unsigned long long id = 0;
    if (arity != (op == OP_UNLINK ? 3 : 4) ||
        (op == OP_UNLINK_ID && ei_decode_ulonglong(data, &i, &id) < 0) ||
        ctl_pid(data, &i, &from, &full) < 0 || ctl_pid(data, &i, &to, &full) < 0)
      return -1;
    if (full)   /* no link of ours names it (nor could its ack) */
      return cend == len ? 0 : -1;
    if (!mb_id_is_remote(to))
      mb_proc_unlink_remote(to, from);
    pthread_mutex_lock(&dist_lock);
    dist_pairs_del(&c->links, to, from, 0, NULL);
    pthread_mutex_unlock(&dist_lock);
    if (op == OP_UNLINK_ID) {
      ctl_t x = {.op = OP_UNLINK_ID_ACK, .id = id, .from = to, .to = from};
      dist_send_ctl(c->node, &x, NULL);
    }
    return cend == len ? 0 : -1;
  }
  case OP_UNLINK_ID_ACK:
    return cend == len ? 0 : -1;
  case OP_EXIT:
  case OP_EXIT2: {
    if (arity != 4 || ctl_pid(data, &i, &from, &full) < 0 || ctl_pid(data, &i, &to, &full) < 0)
      return -1;
    mb_msg_t *r = ctl_reason(data, len, &i, &bad);
    if (bad)
      return -1;
    if (to == 0 || from == 0) {
      /* Another node's process we cannot name: not ours; or a link exit
       * from one, which no link of ours names; or an exit signal from one,
       * which a process that traps exits could not be told the sender of. */
      mb_msg_free(r);
      return to && op == OP_EXIT2 ? MB_ETOOMANY : cend == len ? 0 : -1;
    }
    if (op == OP_EXIT) {
      pthread_mutex_lock(&dist_lock);
      dist_pairs_del(&c->links, to, from, 0, NULL);
      pthread_mutex_unlock(&dist_lock);
      /* A link exit for a link that is gone is ignored, as in Erlang: the
       * process drops it when it takes it (mb_proc_drain). */
      if (mb_id_is_remote(to)) {
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
    if (arity != 4 || ctl_pid(data, &i, &from, &full) < 0)
      return -1;
    to = proc_or_name(data, &i, &name, &bad);
    int ref_at = i;
    if (bad || get_ref(data, &i, &ref) < 0)
      return -1;
    if (full) {   /* a watcher we cannot name: no monitor of ours names it */
      dist_unhold(ref);
      /* and one we can neither hold nor refuse (DOWN to whom?) */
      return op == OP_MONITOR_P ? MB_ETOOMANY : cend == len ? 0 : -1;
    }
    if (op == OP_DEMONITOR_P) {
      pair_t p;
      pthread_mutex_lock(&dist_lock);
      int found = ref && dist_pairs_del(&c->mon_in, 0, 0, ref, &p);
      if (found && p.local == 0)
        c->kernel_mons--;
      pthread_mutex_unlock(&dist_lock);
      if (found && p.local)
        mb_proc_unwatch_remote(p.local, ref);
      if (found)
        dist_unhold(p.ref);           /* the pair's */
      dist_unhold(ref);
      return cend == len ? 0 : -1;
    }
    /* The watcher's ref stays held by the pair (until the monitor ends). */
    int added = 0, rc;
    ctl_t x = {.from = to, .to = from, .ref = ref, .name = name};
    if (ref == 0) {
      /* The ref table is full (remote.h): the monitor cannot be held. */
      x.raw_ref = data + ref_at;
      x.raw_ref_len = i - ref_at;
      refuse_monitor(c, &x, "system_limit", "the remote ref table is full");
    } else if (!mb_id_is_remote(ref)) {
      /* A watcher's ref that names this node: no node sends one. */
    } else if (to == 0 && is_net_kernel(name)) {
      /* gen:call monitors {net_kernel, Node} before asking is_auth (ping);
       * the net_kernel we answer for (answer_net_kernel) never dies, and
       * no process pays for these: a few per connection. */
      pthread_mutex_lock(&dist_lock);
      int room = c->kernel_mons < MB_DIST_KERNEL_MONITORS;
      if ((added = c->state != C_DOWN && room)) {
        dist_pairs_add(&c->mon_in, 0, from, ref, name);
        c->kernel_mons++;
      }
      pthread_mutex_unlock(&dist_lock);
      if (!room)
        refuse_monitor(c, &x, "system_limit", "too many monitors of net_kernel");
    } else if (to && (rc = mb_proc_watch_remote(to, from, ref)) == 0) {
      /* (Charged to `to`, which a monitor too many kills for memory.) */
      pthread_mutex_lock(&dist_lock);
      if ((added = c->state != C_DOWN))
        dist_pairs_add(&c->mon_in, to, from, ref, name);
      pthread_mutex_unlock(&dist_lock);
      if (!added)
        mb_proc_unwatch_remote(to, ref);
    } else if (to && rc == MB_ENOMEM) {
      /* Killed for memory already: its DOWN would say so. */
      refuse_monitor(c, &x, "out of memory", "the process is over its max_memory");
    } else {
      refuse_monitor(c, &x, "noproc", NULL);
    }
    if (!added)
      dist_unhold(ref);
    return cend == len ? 0 : -1;
  }
  case OP_MONITOR_P_EXIT: {
    if (arity != 5)
      return -1;
    proc_or_name(data, &i, &name, &bad);
    if (bad || ctl_pid(data, &i, &to, &full) < 0 || get_ref(data, &i, &ref) < 0)
      return -1;
    mb_msg_t *r = ctl_reason(data, len, &i, &bad);
    if (bad) {
      dist_unhold(ref);               /* held by mb_etf_get_ref */
      return -1;
    }
    pair_t p;
    pthread_mutex_lock(&dist_lock);
    int found = ref && dist_pairs_del(&c->mon_out, 0, 0, ref, &p);
    pthread_mutex_unlock(&dist_lock);
    if (mb_id_is_remote(ref)) {  /* not one of our monitors */
      dist_unhold(ref);
      found = 0;
    }
    if (found && to && !mb_id_is_remote(to)) {
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
    m->ref = op == OP_ALIAS_SEND || op == OP_ALIAS_SEND_TT ? ref : 0;
    mb_proc_send(to, m);
    return 0;
  }
}

