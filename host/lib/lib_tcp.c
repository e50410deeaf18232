/* lib_tcp.c: the `moonbeam.tcp` Lua module - TCP sockets as values of a
 * process (the machinery is in sock.c; see sock.h for the design).
 *
 * A socket value is an interned userdata holding the socket's id, like a
 * pid (pid.c): it can be sent to another process, compares with ==, and
 * names nothing once the socket is closed. Only the owner may use it; the
 * others get nil, "not owner". Expected failures (refused, reset, closed,
 * timeout, address in use) return nil plus a message; misuse (a wrong
 * argument type) raises. Calls that wait block only the calling process,
 * and so, like receive, cannot be made inside a C callback: there they
 * raise, a write too when it would have to wait for the queue (else
 * nothing would bound the queue).
 */
#include <string.h>

#include "io.h"
#include "lauxlib.h"
#include "lib.h"
#include "run.h"
#include "scheduler.h"
#include "sock.h"
#include "timer.h"
#include "ws.h"

#define DEFAULT_BACKLOG 511
#define DEFAULT_MAX_MESSAGE (1u << 20)

/* -- Socket values --------------------------------------------------------- */

/* Socket values are interned like pids (pid.h), of the kind sock.c
 * defines; mb_lib_tcp_init gives it its methods (the end of this file). */
static void sock_push(lua_State *L, uint64_t id)
{
  mb_id_push(L, id, &mb_sock_kind);
}

static uint64_t sock_test(lua_State *L, int idx)
{
  return mb_id_test(L, idx, &mb_sock_kind);
}

/* The socket at arg 1 for the calling process p, or NULL after pushing
 * nil, message (closed, not owner). Raises for a non-socket. */
static mb_sock_t *self_sock(lua_State *L, mb_proc_t *p, int *nret)
{
  uint64_t id = sock_test(L, 1);
  if (id == 0) {
    luaL_typerror(L, 1, "socket");
    return NULL;
  }
  /* The socket it used last, kept with a reference (a chat user writes to
   * its one socket twice a message: the look-up in the socket table and the
   * owner's check under the socket's lock were 4 of a delivery's 16 lock
   * acquisitions). Closing it sets its owner to 0. */
  mb_sock_t *s = p->sock_last;
  if (s && s->id == id && atomic_load_explicit(&s->owner, memory_order_acquire) == p->pid) {
    atomic_fetch_add_explicit(&s->refs, 1, memory_order_relaxed);
    return s;
  }
  s = mb_sock_get(id);
  const char *why = NULL;
  if (s == NULL)
    why = "closed";
  else if (atomic_load_explicit(&s->owner, memory_order_acquire) != p->pid)
    why = "not owner";
  if (why) {
    if (s)
      mb_sock_unref(s);
    s = NULL;
  } else {
    if (p->sock_last) {
      mb_sock_uncork(p->sock_last, p->pid);   /* what it corked goes first */
      mb_sock_unref(p->sock_last);
    }
    atomic_fetch_add_explicit(&s->refs, 1, memory_order_relaxed);
    p->sock_last = s;
  }
  if (s == NULL) {
    lua_pushnil(L);
    lua_pushstring(L, why);
    *nret = 2;
  }
  return s;
}

static int fail(lua_State *L, const char *msg)
{
  lua_pushnil(L);
  lua_pushstring(L, msg);
  return 2;
}

static int fail_code(lua_State *L, int code)
{
  return fail(L, mb_sock_strerror(code));
}

/* An optional timeout in ms at idx: -1 for none. */
static double opt_timeout(lua_State *L, int idx)
{
  if (lua_isnoneornil(L, idx))
    return -1;
  double ms = luaL_checknumber(L, idx);
  if (ms < 0 || ms != ms)
    luaL_argerror(L, idx, "timeout must be a number of ms >= 0");
  return ms;
}

static int push_timeout(lua_State *L, uint64_t arg)
{
  (void)arg;
  return fail(L, "timeout");
}

/* Block the caller in the MB_WAIT_IO begun with mb_io_wait_begin. */
static int wait_io(lua_State *L, mb_proc_t *p, double timeout,
                   int (*on_timeout)(lua_State *, uint64_t), uint64_t arg)
{
  if (timeout > 0)
    p->wait_timer = mb_timer_wait(p, timeout);
  p->io_on_timeout = on_timeout;
  p->io_timeout_arg = arg;
  return mb_run_yield(L, MB_YIELD_WAIT);
}

/* -- tcp.listen / tcp.connect ----------------------------------------------- */

static int check_port(lua_State *L, int idx)
{
  lua_Number n = luaL_checknumber(L, idx);
  if (!(n >= 0 && n <= 65535) || n != (int)n)   /* NaN too, before the cast */
    luaL_argerror(L, idx, "port must be an integer in 0..65535");
  return (int)n;
}

/* tcp.listen(host, port[, {backlog = n}]) */
static int l_listen(lua_State *L)
{
  mb_proc_t *p = mb_lib_self(L);
  const char *host = luaL_checkstring(L, 1);
  int port = check_port(L, 2);
  int backlog = DEFAULT_BACKLOG;
  if (!lua_isnoneornil(L, 3)) {
    luaL_checktype(L, 3, LUA_TTABLE);
    lua_getfield(L, 3, "backlog");
    backlog = (int)luaL_optinteger(L, -1, DEFAULT_BACKLOG);
    lua_pop(L, 1);
  }
  char err[160];
  mb_sock_t *s = mb_sock_listen(p, host, port, backlog, err, sizeof err);
  if (s == NULL)
    return fail(L, err);
  sock_push(L, s->id);
  return 1;
}

static int connect_timeout(lua_State *L, uint64_t id)
{
  mb_sock_t *s = mb_sock_get(id);
  if (s) {
    mb_sock_close(s, mb_proc_of(L)->pid, mb_sock_do_close, NULL);
    mb_sock_unref(s);
  }
  return fail(L, "timeout");
}

/* tcp.connect(host, port[, timeout_ms]) */
static int l_connect(lua_State *L)
{
  const char *host = luaL_checkstring(L, 1);
  int port = check_port(L, 2);
  double timeout = opt_timeout(L, 3);
  mb_proc_t *p = mb_lib_self(L);
  if (!mb_run_can_yield(p, L))
    return mb_lib_block_error(L, "connect");
  uint32_t seq = mb_io_wait_begin(p);
  char err[160];
  mb_sock_t *s = mb_sock_connect(p, seq, host, port, err, sizeof err);
  if (s == NULL)
    return fail(L, err);
  return wait_io(L, p, timeout, connect_timeout, s->id);
}

/* -- Listener methods --------------------------------------------------------- */

/* listener:accept([timeout_ms]) */
static int l_accept(lua_State *L)
{
  int n;
  double timeout = opt_timeout(L, 2);
  mb_proc_t *p = mb_lib_self(L);
  mb_sock_t *s = self_sock(L, p, &n);
  if (s == NULL)
    return n;
  if (s->kind != MB_SOCK_LISTENER) {
    mb_sock_unref(s);
    return luaL_argerror(L, 1, "listener expected, got a connected socket");
  }
  mb_lock(&s->lock);
  if (s->active) {
    mb_unlock(&s->lock);
    mb_sock_unref(s);
    return fail(L, "listener is in active mode");
  }
  mb_sock_t *c = s->acc_head;
  if (c) {
    s->acc_head = c->onext;
    if (s->acc_head == NULL)
      s->acc_tail = &s->acc_head;
    s->nacc--;
    c->onext = NULL;
  }
  int resume = s->acc_paused;
  int can = c || timeout == 0 || mb_run_can_yield(p, L);
  if (!c && timeout != 0 && can) {
    s->wait = MB_SW_ACCEPT;
    s->wpid = p->pid;
    s->wseq = mb_io_wait_begin(p);
  }
  mb_unlock(&s->lock);
  if (resume)
    mb_sock_run(s, mb_sock_do_accept, NULL);
  mb_sock_unref(s);
  if (!can)
    return mb_lib_block_error(L, "accept");
  if (c) {
    if (mb_sock_set_owner(c, 0, p) < 0)
      return fail(L, "closed");
    sock_push(L, c->id);
    return 1;
  }
  if (timeout == 0)
    return fail(L, "timeout");
  return wait_io(L, p, timeout, push_timeout, 0);
}

/* listener:port() */
static int l_port(lua_State *L)
{
  int n;
  mb_sock_t *s = self_sock(L, mb_lib_self(L), &n);
  if (s == NULL)
    return n;
  char host[64];
  int port = mb_sock_name(s, 0, host, sizeof host);
  mb_sock_unref(s);
  lua_pushinteger(L, port);
  return 1;
}

/* -- Stream methods ---------------------------------------------------------- */

/* The stream socket at arg 1 for the caller, or NULL with nil, msg pushed. */
static mb_sock_t *stream_sock(lua_State *L, mb_proc_t *p, int *nret)
{
  mb_sock_t *s = self_sock(L, p, nret);
  if (s && s->kind != MB_SOCK_STREAM) {
    mb_sock_unref(s);
    luaL_argerror(L, 1, "connected socket expected, got a listener");
  }
  return s;
}

/* Take what was read (s->lock held): in WebSocket mode one message, else
 * every chunk. Returns the chunks, detached. */
static mb_chunk_t *take_read(mb_sock_t *s)
{
  mb_chunk_t *c = s->rhead;
  if (c == NULL || c->binary < 0)
    return NULL;
  if (s->ws_mode) {
    s->rhead = c->next;
    c->next = NULL;
    s->rbytes -= c->len;
  } else {
    s->rhead = NULL;
    s->rbytes = 0;
  }
  if (s->rhead == NULL)
    s->rtail = &s->rhead;
  return c;
}

static int push_chunks(lua_State *L, mb_chunk_t *c, int ws)
{
  if (c->next == NULL) {
    lua_pushlstring(L, c->data, c->len);
  } else {
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    for (mb_chunk_t *k = c; k; k = k->next)
      luaL_addlstring(&b, k->data, k->len);
    luaL_pushresult(&b);
  }
  if (ws)
    lua_pushboolean(L, c->binary);
  return ws ? 2 : 1;
}

/* sock:read([timeout_ms]) (also moonbeam.http_parser's read) */
int mb_lib_tcp_read(lua_State *L)
{
  int n;
  double timeout = opt_timeout(L, 2);
  mb_proc_t *p = mb_lib_self(L);
  mb_sock_t *s = stream_sock(L, p, &n);
  if (s == NULL)
    return n;
  mb_lock(&s->lock);
  int ws = s->ws_mode, end = 0, can = 1;
  const char *busy = s->active ? "socket is in active mode" : NULL;
  mb_chunk_t *c = busy ? NULL : take_read(s);
  int resume = c && s->paused && s->rbytes < MB_SOCK_RBUF_MAX;
  if (!busy && c == NULL) {
    if (s->eof || s->err)   /* a read after the peer's FIN: "closed" */
      end = s->eof ? MB_ECLOSED : s->err;
    else if (timeout != 0 && (can = mb_run_can_yield(p, L))) {
      s->wait = MB_SW_READ;
      s->wpid = p->pid;
      s->wseq = mb_io_wait_begin(p);
    }
  }
  mb_unlock(&s->lock);
  if (resume)
    mb_sock_run(s, mb_sock_do_resume, NULL);
  mb_sock_unref(s);
  if (busy)
    return fail(L, busy);
  if (c) {
    /* (A memory error here ends the process and leaks c: accepted.) */
    n = push_chunks(L, c, ws);
    while (c) {
      mb_chunk_t *next = c->next;
      mb_free(c);
      c = next;
    }
    return n;
  }
  if (end)
    return fail_code(L, end);
  if (!can)
    return mb_lib_block_error(L, "read");
  if (timeout == 0)
    return fail(L, "timeout");
  return wait_io(L, p, timeout, push_timeout, 0);
}

/* sock:write(data, ...[, binary]) -> true, queued: the pieces (strings or
 * numbers, up to the first argument that is neither) go out in order, as
 * one (in WebSocket mode: one message, binary if binary is true). queued:
 * the bytes left queued after it (what sock:queued() would say then; none
 * after a write that had to wait for the queue to drain) */
static int l_write(lua_State *L)
{
  int n, k = 1;
  uv_buf_t b[MB_SOCK_WRITE_PIECES];
  mb_proc_t *p = mb_lib_self(L);
  luaL_checklstring(L, 2, NULL);
  while (lua_isstring(L, 2 + k))
    k++;
  int binary = lua_toboolean(L, 2 + k);
  if (k > MB_SOCK_WRITE_PIECES) {
    lua_settop(L, 1 + k);
    lua_concat(L, k);
    k = 1;
  }
  size_t len = 0;
  for (int i = 0; i < k; i++) {
    b[i].base = (char *)lua_tolstring(L, 2 + i, &b[i].len);
    len += b[i].len;
  }
  mb_sock_t *s = stream_sock(L, p, &n);
  if (s == NULL)
    return n;
  /* More messages wait: a small write is held back to go out with the
   * next one, or when the process stops running (see sock.c's corking). */
  int backlog = atomic_load_explicit(&p->mailbox_len, memory_order_relaxed) > 0;
  if (len > 0 && backlog && mb_sock_cork(s, b, (unsigned)k, len)) {
    lua_pushboolean(L, 1);
    lua_pushinteger(L, (lua_Integer)s->cork_len);
    mb_sock_unref(s);
    return 2;
  }
  /* The common case of a small TCP write: straight to the kernel (never
   * in WebSocket mode: that is framed on the loop). */
  long done = mb_sock_write_now(s, b, (unsigned)k);
  if (done < 0) {
    mb_sock_unref(s);
    return fail_code(L, (int)done);
  }
  if ((size_t)done == len && done > 0) {   /* (an empty write is queued: in
                                             WebSocket mode it is an empty
                                             message) */
    mb_sock_unref(s);
    lua_pushboolean(L, 1);
    lua_pushinteger(L, 0);      /* nothing was queued before it either */
    return 2;
  }
  len -= (size_t)done;
  int took = done > 0;   /* the kernel took part of it (the queue was empty) */
  mb_lock(&s->lock);
  int ws = s->ws_mode;
  mb_unlock(&s->lock);
  mb_sock_out_t *o = mb_malloc(sizeof *o + len);
  o->len = len;
  o->binary = binary;
  /* A WebSocket message is held back as a raw write is corked above (the
   * loop frames it: sock.c's mb_sock_do_write). */
  int later = ws && backlog && len <= MB_SOCK_CORK_MAX;
  o->later = later;
  char *to = o->data;
  for (int i = 0; i < k; i++) {   /* what the kernel did not take */
    size_t skip = (size_t)done < b[i].len ? (size_t)done : b[i].len;
    done -= (long)skip;
    memcpy(to, b[i].base + skip, b[i].len - skip);
    to += b[i].len - skip;
  }
  if (ws && !binary && !mb_ws_utf8_valid((const uint8_t *)o->data, len)) {
    mb_free(o);
    mb_sock_unref(s);
    return fail(L, "a text message must be valid UTF-8 (send binary data with write(data, true))");
  }
  mb_lock(&s->lock);
  int err = s->err && s->err != MB_ECLOSED ? s->err : 0;
  int wait = 0, refuse = 0;
  size_t queued = 0;
  if (!err && s->wq + len > MB_SOCK_WRITE_HIGH) {
    /* Over the mark: wait till it drains, if this is a place to wait.
     * Where it is not (inside a C callback: a string.gsub function, a
     * table.sort comparator), nothing else would bound the queue, so such
     * a write raises, as receive does there, and queues nothing; unless
     * the kernel took part of it already, which it does only with nothing
     * queued: then the queue holds this one write alone. */
    wait = mb_run_can_yield(p, L);
    refuse = !wait && !took;
  }
  if (!err && !refuse) {
    s->wq += len;
    queued = s->wq;
    if (wait) {
      s->wait = MB_SW_WRITE;
      s->wpid = p->pid;
      s->wseq = mb_io_wait_begin(p);
    }
  }
  mb_unlock(&s->lock);
  if (err || refuse) {
    mb_free(o);
    mb_sock_unref(s);
    return err ? fail_code(L, err) : mb_lib_block_error(L, "write");
  }
  mb_sock_run(s, mb_sock_do_write, o);
  if (later)
    s->ws_later = 1;   /* mb_sock_uncork sends the flush */
  mb_sock_unref(s);
  if (wait)
    return wait_io(L, p, -1, NULL, 0);
  lua_pushboolean(L, 1);
  lua_pushnumber(L, (lua_Number)queued);
  return 2;
}

/* sock:queued() -> bytes written with sock:write and not yet taken by the
 * kernel (in WebSocket mode: payload bytes not yet framed and written).
 * This is what the backpressure mark counts: a write that takes it over
 * MB_SOCK_WRITE_HIGH waits. A process that must never wait on its peer (a
 * chat user fed by a room) reads it before writing and decides itself. */
static int l_queued(lua_State *L)
{
  int n;
  mb_sock_t *s = stream_sock(L, mb_lib_self(L), &n);
  if (s == NULL)
    return n;
  mb_lock(&s->lock);
  size_t q = s->wq + s->cork_len;
  mb_unlock(&s->lock);
  mb_sock_unref(s);
  lua_pushnumber(L, (lua_Number)q);
  return 1;
}

/* sock:close([code[, reason]]): code and reason for a WebSocket. */
static int l_close(lua_State *L)
{
  mb_proc_t *p = mb_lib_self(L);
  uint64_t id = sock_test(L, 1);
  if (id == 0)
    return luaL_typerror(L, 1, "socket");
  mb_sock_t *s = mb_sock_get(id);
  if (s == NULL) {
    lua_pushboolean(L, 1);   /* closing twice is fine */
    return 1;
  }
  int rc;
  if (!lua_isnoneornil(L, 2)) {
    int code = (int)luaL_checkinteger(L, 2);
    size_t len = 0;
    const char *reason = luaL_optlstring(L, 3, "", &len);
    if (!((code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1011)
          || (code >= 3000 && code <= 4999))) {
      mb_sock_unref(s);
      return luaL_argerror(L, 2, "a WebSocket close code (1000-1003, 1007-1011, 3000-4999)");
    }
    if (len > 123 || !mb_ws_utf8_valid((const uint8_t *)reason, len)) {
      mb_sock_unref(s);
      return luaL_argerror(L, 3, "a close reason is UTF-8 of at most 123 bytes");
    }
    mb_sock_out_t *o = mb_malloc(sizeof *o + len);
    o->len = len;
    o->binary = code;
    o->later = 0;
    memcpy(o->data, reason, len);
    rc = mb_sock_close(s, p->pid, mb_sock_do_ws_close, o);
  } else {
    rc = mb_sock_close(s, p->pid, mb_sock_do_close, NULL);
  }
  mb_sock_unref(s);
  if (rc < 0)
    return fail(L, "not owner");
  lua_pushboolean(L, 1);
  return 1;
}

static int push_name(lua_State *L, int peer)
{
  int n;
  mb_sock_t *s = self_sock(L, mb_lib_self(L), &n);
  if (s == NULL)
    return n;
  char host[64];
  int port = mb_sock_name(s, peer, host, sizeof host);
  mb_sock_unref(s);
  if (port < 0)
    return fail(L, "not connected");
  lua_pushstring(L, host);
  lua_pushinteger(L, port);
  return 2;
}

/* sock:peername() -> host, port */
static int l_peername(lua_State *L)
{
  return push_name(L, 1);
}

/* sock:sockname() -> host, port */
static int l_sockname(lua_State *L)
{
  return push_name(L, 0);
}

/* sock:set_active(true | "once" | false), on a stream or a listener. A
 * listener's active mode sends each connection as {event = "tcp_accept",
 * socket = listener, conn = c} (see sock.h: at most MB_SOCK_ACCEPT_QUEUE
 * of them not yet received). */
static int l_set_active(lua_State *L)
{
  int n, mode;
  if (lua_type(L, 2) == LUA_TBOOLEAN)
    mode = lua_toboolean(L, 2);
  else if (lua_type(L, 2) == LUA_TSTRING && strcmp(lua_tostring(L, 2), "once") == 0)
    mode = 2;
  else
    return luaL_argerror(L, 2, "true, false or \"once\" expected");
  mb_sock_t *s = self_sock(L, mb_lib_self(L), &n);
  if (s == NULL)
    return n;
  mb_sock_set_active(s, mode);
  mb_sock_unref(s);
  lua_pushboolean(L, 1);
  return 1;
}

/* sock:set_nodelay(on): TCP_NODELAY (on by default: each write goes out
 * at once; off lets the kernel coalesce small writes, Nagle's algorithm). */
static int l_set_nodelay(lua_State *L)
{
  int n;
  luaL_checktype(L, 2, LUA_TBOOLEAN);
  mb_sock_t *s = stream_sock(L, mb_lib_self(L), &n);
  if (s == NULL)
    return n;
  static char on;
  mb_sock_run(s, mb_sock_do_nodelay, lua_toboolean(L, 2) ? &on : NULL);
  mb_sock_unref(s);
  lua_pushboolean(L, 1);
  return 1;
}

/* sock:set_owner(pid) */
static int l_set_owner(lua_State *L)
{
  int n;
  mb_proc_t *p = mb_lib_self(L);
  mb_pid_t to = mb_pid_check(L, 2);
  mb_sock_t *s = self_sock(L, p, &n);
  if (s == NULL)
    return n;
  mb_proc_t *np = mb_proc_get(to);
  int rc = -1;
  if (np) {
    /* Hold active mode while the messages already sent move over, so
     * the new owner gets everything in order. */
    mb_lock(&s->lock);
    int active = s->active;
    s->active = 0;
    mb_unlock(&s->lock);
    mb_proc_move_port_msgs(p, s->id, to);
    rc = mb_sock_set_owner(s, p->pid, np);
    mb_proc_unref(np);
    if (rc == 0)
      mb_sock_set_active(s, active);
  }
  mb_sock_unref(s);
  if (rc < 0)
    return fail(L, np ? "closed" : "noproc");
  lua_pushboolean(L, 1);
  return 1;
}

/* sock:set_exit_on_close(mode): false | "error" | true. With true, when the
 * peer closes (FIN) or the connection fails, the owner gets an exit signal
 * ("peer closed", or the error's message); with "error", only when it
 * fails. For an owner busy elsewhere that must not outlive its peer (see
 * mb_sock_set_exit_on_close). */
static int l_set_exit_on_close(lua_State *L)
{
  int n, mode;
  if (lua_type(L, 2) == LUA_TBOOLEAN)
    mode = lua_toboolean(L, 2) ? MB_SOCK_EXIT_ON_CLOSE : 0;
  else if (lua_type(L, 2) == LUA_TSTRING && strcmp(lua_tostring(L, 2), "error") == 0)
    mode = MB_SOCK_EXIT_ON_ERROR;
  else
    return luaL_argerror(L, 2, "true, false or \"error\" expected");
  mb_sock_t *s = stream_sock(L, mb_lib_self(L), &n);
  if (s == NULL)
    return n;
  mb_sock_set_exit_on_close(s, mode);
  mb_sock_unref(s);
  lua_pushboolean(L, 1);
  return 1;
}

/* sock:set_heir(pid | nil): when the owner dies, the socket passes to pid
 * (if alive) instead of closing, and pid gets {event = "tcp_heir", socket =
 * s, from = the dead owner}; nil: no heir. */
static int l_set_heir(lua_State *L)
{
  int n;
  mb_pid_t heir = lua_isnoneornil(L, 2) ? 0 : mb_pid_check(L, 2);
  mb_sock_t *s = self_sock(L, mb_lib_self(L), &n);
  if (s == NULL)
    return n;
  mb_lock(&s->lock);
  s->heir = heir;
  mb_unlock(&s->lock);
  mb_sock_unref(s);
  lua_pushboolean(L, 1);
  return 1;
}

/* sock:websocket{client = bool, max_message = n, pending = "bytes"} */
static int l_websocket(lua_State *L)
{
  int n;
  mb_proc_t *p = mb_lib_self(L);
  int client = 0;
  size_t max = DEFAULT_MAX_MESSAGE, plen = 0;
  const char *pending = "";
  if (!lua_isnoneornil(L, 2)) {
    luaL_checktype(L, 2, LUA_TTABLE);
    lua_getfield(L, 2, "client");
    client = lua_toboolean(L, -1);
    lua_getfield(L, 2, "max_message");
    lua_Number m = luaL_optnumber(L, -1, (lua_Number)DEFAULT_MAX_MESSAGE);
    if (!(m >= 1))   /* NaN too */
      return luaL_argerror(L, 2, "max_message must be >= 1");
    max = m < 0x1p62 ? (size_t)m : (size_t)1 << 62;   /* math.huge: no cast */
    lua_getfield(L, 2, "pending");
    pending = luaL_optlstring(L, -1, "", &plen);
  }
  mb_sock_t *s = stream_sock(L, p, &n);
  if (s == NULL)
    return n;
  mb_sock_uncork(s, p->pid);   /* raw bytes corked before the switch go out raw */
  mb_lock(&s->lock);
  int already = s->ws_mode;
  if (!already) {
    /* Bytes read ahead and not taken are raw: the framer takes them. */
    s->ws_mode = 1;
    for (mb_chunk_t *c = s->rhead; c; c = c->next)
      c->binary = -1;
  }
  mb_unlock(&s->lock);
  if (already) {
    mb_sock_unref(s);
    return luaL_error(L, "websocket: the socket is already in WebSocket mode");
  }
  mb_sock_wsopt_t *o = mb_malloc(sizeof *o + plen);
  o->client = client;
  o->max_message = max;
  o->len = plen;
  memcpy(o->data, pending, plen);
  mb_sock_run(s, mb_sock_do_ws, o);
  mb_sock_unref(s);
  lua_settop(L, 1);
  return 1;
}

/* tostring(sock) -> "#Socket<slot.generation>" */
static int l_tostring(lua_State *L)
{
  uint64_t id = *(uint64_t *)lua_touserdata(L, 1);
  lua_pushfstring(L, "#Socket<%d.%d>", (int)(id & MB_PID_SLOT_MASK),
                  (int)(id >> MB_PID_SLOT_BITS));
  return 1;
}

static const luaL_Reg methods[] = {
  {"accept", l_accept},
  {"port", l_port},
  {"read", mb_lib_tcp_read},
  {"write", l_write},
  {"queued", l_queued},
  {"close", l_close},
  {"peername", l_peername},
  {"sockname", l_sockname},
  {"set_active", l_set_active},
  {"set_owner", l_set_owner},
  {"set_nodelay", l_set_nodelay},
  {"set_exit_on_close", l_set_exit_on_close},
  {"set_heir", l_set_heir},
  {"websocket", l_websocket},
  {NULL, NULL}
};

void mb_lib_tcp_init(void)
{
  mb_sock_kind.tostring = l_tostring;
  mb_sock_kind.methods = methods;
}

static const luaL_Reg funcs[] = {
  {"listen", l_listen},
  {"connect", l_connect},
  {NULL, NULL}
};

int mb_lib_tcp_open(lua_State *L)
{
  lua_createtable(L, 0, 2);
  luaL_register(L, NULL, funcs);
  return 1;
}
