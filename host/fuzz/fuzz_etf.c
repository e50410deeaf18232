/* fuzz_etf.c: fuzz target for what other Erlang nodes send: the external
 * term format decoder (host/etf.c) and the reading of distribution frames
 * (dist_handle_frame, host/dist_recv.c), on arbitrary bytes.
 *
 * DESIGN
 * Input: byte 0 says what the rest is. Bit 2 clear: one ETF term, decoded
 * with flags bits 0-1 (MB_ETF_REASON, MB_ETF_BARE). Bit 2 set: what a
 * connected peer sends, frames of a 2-byte big-endian length and that many
 * bytes (the wire's lengths have 4 bytes; 2 reach any input of a few KB
 * and are easier for the fuzzer to keep right).
 *
 * A term: mb_etf_check and mb_etf_decode agree (what the check refuses
 * does not decode; what decodes ends where the check ends); a decoded
 * message rebuilds in a Lua state as a receiving process's receive does
 * (mb_copy_decode, never an error); that value, encoded again (Lua ->
 * message -> mb_etf_size/mb_etf_write, into a buffer of exactly the size
 * announced), decodes again to an equal value (deep equality; tables as
 * keys compared by contents; a list tail that arrived as an empty table
 * may come back as none, see same_src). Encoding may fail only where
 * README "Terms" says a value has no Erlang form (a map key over 255 bytes
 * or not UTF-8: string keys become atoms). The decoded message is also
 * encoded straight
 * (a message in transit carries another node's refs by their contents)
 * with the same result. Then the getters of control messages
 * (mb_etf_get_pid/ref/atom) on the term and on each element of a tuple or
 * list: each gives an error or an id that mb_etf_put_* writes back to the
 * same id.
 *
 * Frames: this node is FUZZ_NODE (fuzz.h) with one process, registered as
 * FUZZ_PROC_NAME, owning alias FUZZ_ALIAS and trapping exits; it has no
 * Lua state of its own and never runs, and its mailbox is emptied after
 * each input. The frames come from a connection of FUZZ_PEER that has no
 * socket (state connecting: what dist_recv queues for the peer stays
 * queued, and each such frame must be well formed), on which the process
 * monitors the peer's process FUZZ_PEER_PROC (ref FUZZ_MONITOR) and the
 * node itself, as mb.monitor and mb.monitor_node leave it. The frames are
 * handled in order until one makes the connection close, and then it goes
 * down as on a close (dist_conn_down), which ends the links and remote
 * monitors the frames made. After that the process has no link or watcher
 * left, and each message it got rebuilds in Lua as its receive would
 * (mb_lib_push_msg).
 *
 * Tables: another node's refs are counted (remote.h): after each input,
 * once the Lua state is collected, as many are held as before it (neither
 * the target nor the code under test keeps one). Remote pids and atoms are
 * never freed, by design, and bounded (4M, 1M): a long enough campaign
 * fills the atom table, after which terms that need a new atom are refused
 * (MB_ETOOMANY), which the checks allow. Those entries stay reachable, so
 * LeakSanitizer does not count them; the target prints at exit how many
 * there are.
 */
#include <stdint.h>
#include <string.h>

#include "alloc.h"
#include "copy.h"
#include "dist_int.h"
#include "ei.h"
#include "err.h"
#include "etf.h"
#include "fuzz.h"
#include "lauxlib.h"
#include "lib.h"
#include "luajit.h"
#include "lualib.h"
#include "reg.h"
#include "remote.h"
#include "term.h"

static lua_State *L;
/* As in fuzz_copy: far above what a few KB of input can build, so that a
 * runaway decode fails with a memory error instead of OOM-killing the
 * fuzzer. */
static mb_alloc_t heap = {.limit = 512u << 20};
static mb_proc_t *proc;
static uint32_t peer;
static mb_pid_t peer_proc;

/* Deep equality of two decoded values (global `same` of L). A list tail
 * that is an empty table counts as none: {} goes back as [], which ends
 * the list (README "Terms"), so [a | #{k => nil}] arrives with
 * ["$tail"] = {} and comes back without it. */
static const char *same_src =
  "local is_tuple = ...\n"
  "local function pairs_(t)\n"
  "  local tail = rawget(t, '$tail')\n"
  "  local skip = type(tail) == 'table' and not is_tuple(tail) and next(tail) == nil\n"
  "  return function(t, k)\n"
  "    local v\n"
  "    repeat k, v = next(t, k) until not (skip and k == '$tail')\n"
  "    return k, v\n"
  "  end, t, nil\n"
  "end\n"
  "local function same(a, b)\n"
  "  if a == b then return true end\n"
  "  if type(a) ~= 'table' or type(b) ~= 'table' or is_tuple(a) ~= is_tuple(b) then\n"
  "    return false\n"
  "  end\n"
  "  local n = 0\n"
  "  for k, v in pairs_(a) do\n"
  "    n = n + 1\n"
  "    if type(k) ~= 'table' then\n"
  "      if not same(v, rawget(b, k)) then return false end\n"
  "    else\n"
  "      local found = false\n"
  "      for k2, v2 in pairs_(b) do\n"
  "        if type(k2) == 'table' and same(k, k2) and same(v, v2) then\n"
  "          found = true\n"
  "          break\n"
  "        end\n"
  "      end\n"
  "      if not found then return false end\n"
  "    end\n"
  "  end\n"
  "  for _ in pairs_(b) do n = n - 1 end\n"
  "  return n == 0\n"
  "end\n"
  "return same\n";

static int l_is_tuple(lua_State *L)
{
  lua_pushboolean(L, mb_tuple_test(L, 1, NULL));
  return 1;
}

/* At exit: how far the host-wide tables grew (README "Fuzzing"). */
static void report(void)
{
  fprintf(stderr, "fuzz_etf: %u atoms, %u remote pids, %u remote refs held\n",
          mb_atom_count(), mb_remote_pid_count(), mb_remote_ref_count());
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
  atexit(report);
  ei_init();
  mb_term_init();
  L = lua_newstate(mb_alloc_fn, &heap);
  FUZZ_CHECK(L != NULL, "lua_newstate");
  luaL_openlibs(L);
  /* As in a process (lstate.c); the JIT's buffers are also kept by biased
   * pointers, which LeakSanitizer would take for leaks. */
  luaJIT_setmode(L, 0, LUAJIT_MODE_ENGINE | LUAJIT_MODE_OFF);
  FUZZ_CHECK(luaL_loadstring(L, same_src) == 0, "same");
  lua_pushcfunction(L, l_is_tuple);
  lua_call(L, 1, 1);
  lua_setglobal(L, "same");

  int64_t self = mb_atom_intern(FUZZ_NODE, strlen(FUZZ_NODE));
  int64_t other = mb_atom_intern(FUZZ_PEER, strlen(FUZZ_PEER));
  FUZZ_CHECK(self > 0 && other > 0, "node atoms");
  mb_etf_set_node((uint32_t)self, FUZZ_CREATION);
  dist_self_atom = (uint32_t)self;
  peer = (uint32_t)other;
  mb_rpid_t rp = {peer, FUZZ_PEER_PROC, 0, FUZZ_PEER_CREATION, 0};
  int64_t id = mb_remote_pid(&rp);
  FUZZ_CHECK(id > 0, "the peer's process");
  peer_proc = (mb_pid_t)id;
  FUZZ_CHECK(mb_proc_new(0, &proc) == 0 && proc->pid == FUZZ_PROC_PID, "the process");
  proc->trap_exit = 1;
  FUZZ_CHECK(mb_reg_register(FUZZ_PROC_NAME, proc) == 0, "its name");
  dist_alias_set(FUZZ_ALIAS, proc->pid);
  return 0;
}

/* -- Lua ------------------------------------------------------------------------ */

static int decode_cf(lua_State *L)
{
  const mb_msg_t *m = lua_touserdata(L, 1);
  lua_pop(L, 1);
  return mb_copy_decode(L, m);
}

/* Rebuild m on top of L as a receive does; it must not fail. */
static void rebuild(const mb_msg_t *m)
{
  int top = lua_gettop(L);
  lua_pushcfunction(L, decode_cf);
  lua_pushlightuserdata(L, (void *)m);
  int rc = lua_pcall(L, 1, LUA_MULTRET, 0);
  FUZZ_CHECK(rc == 0, "a decoded message does not rebuild: %s", lua_tostring(L, -1));
  FUZZ_CHECK(lua_gettop(L) == top + 1, "a decoded message rebuilds to %d values",
             lua_gettop(L) - top);
}

static int push_cf(lua_State *L)
{
  const mb_msg_t *m = lua_touserdata(L, 1);
  lua_pop(L, 1);
  mb_lib_push_msg(L, m);
  return 1;
}

static int same(int a, int b)
{
  a = a < 0 ? lua_gettop(L) + a + 1 : a;
  b = b < 0 ? lua_gettop(L) + b + 1 : b;
  lua_getglobal(L, "same");
  lua_pushvalue(L, a);
  lua_pushvalue(L, b);
  FUZZ_CHECK(lua_pcall(L, 2, 1, 0) == 0, "same: %s", lua_tostring(L, -1));
  int r = lua_toboolean(L, -1);
  lua_pop(L, 1);
  return r;
}

/* Let go of the state's values, and of the remote refs they hold. */
static void collect(void)
{
  lua_settop(L, 0);
  lua_gc(L, LUA_GCCOLLECT, 0);
}

/* -- Terms ------------------------------------------------------------------------ */

/* Failures of the encoder that README "Terms" documents for values that
 * come from Erlang: string keys become atoms. */
static int documented(const char *err)
{
  return strstr(err, "a table key longer than 255 bytes") != NULL ||
         strstr(err, "a table key that is not valid UTF-8") != NULL;
}

/* Encode message m to ETF (flags) and decode it again onto L; 1 if it was
 * pushed, 0 if it cannot be encoded for a documented reason. */
static int through_etf(const mb_msg_t *m, int flags)
{
  char err[256];
  long size = mb_etf_size(m, flags, err, sizeof err);
  if (size < 0) {
    FUZZ_CHECK(documented(err), "a decoded value does not encode: %s", err);
    return 0;
  }
  char *buf = malloc((size_t)size);    /* exactly: ASan sees a write past it */
  FUZZ_CHECK(buf != NULL, "malloc");
  mb_etf_write(m, flags, buf);
  long idx = 0;
  mb_msg_t *back;
  int rc = mb_etf_decode(buf, size, &idx, flags, &back);
  FUZZ_CHECK(rc == 0 && idx == size, "an encoded value decodes with %d at %ld of %ld",
             rc, idx, size);
  free(buf);
  rebuild(back);
  mb_msg_free(back);
  return 1;
}

/* Lua value at the top of L -> message -> ETF -> message -> L: equal. */
static void round_trip(int flags)
{
  char err[256];
  int v = lua_gettop(L);
  mb_msg_t *m = mb_copy_encode(L, v, 1, "msg", NULL, err, sizeof err);
  FUZZ_CHECK(m != NULL, "a decoded value does not copy: %s", err);
  if (through_etf(m, flags)) {
    FUZZ_CHECK(same(v, -1), "a value changed on its way back through ETF");
    lua_pop(L, 1);
  }
  mb_msg_free(m);
}

/* The getters on the checked term at buf[i]: an error, or an id written
 * back to the same id. */
static void getters(const char *buf, int i)
{
  char out[2048];
  int j = i, k = 0, rc;
  mb_pid_t pid, pid2;
  rc = mb_etf_get_pid(buf, &j, &pid);
  FUZZ_CHECK(rc == 0 || rc == MB_ETF_MALFORMED || rc == MB_ETOOMANY, "get_pid: %d", rc);
  if (rc == 0) {
    FUZZ_CHECK(mb_etf_put_pid(NULL, &k, pid) == 0 && k <= (int)sizeof out, "put_pid size");
    k = 0;
    mb_etf_put_pid(out, &k, pid);
    int n = 0;
    FUZZ_CHECK(mb_etf_get_pid(out, &n, &pid2) == 0 && pid2 == pid && n == k,
               "a pid written back reads as another");
  }
  j = i;
  k = 0;
  mb_ref_t ref, ref2;
  rc = mb_etf_get_ref(buf, &j, &ref);
  FUZZ_CHECK(rc == 0 || rc == MB_ETF_MALFORMED || rc == MB_ETOOMANY, "get_ref: %d", rc);
  if (rc == 0) {
    FUZZ_CHECK(mb_etf_put_ref(NULL, &k, ref) == 0 && k <= (int)sizeof out, "put_ref size");
    k = 0;
    mb_etf_put_ref(out, &k, ref);
    int n = 0;
    FUZZ_CHECK(mb_etf_get_ref(out, &n, &ref2) == 0 && ref2 == ref && n == k,
               "a ref written back reads as another");
    dist_unhold(ref2);                /* each get holds another node's ref */
    dist_unhold(ref);
  }
  j = i;
  k = 0;
  uint32_t atom, atom2;
  rc = mb_etf_get_atom(buf, &j, &atom);
  FUZZ_CHECK(rc == 0 || rc == MB_ETF_MALFORMED || rc == MB_ETF_UNSUPPORTED ||
             rc == MB_ETOOMANY, "get_atom: %d", rc);
  if (rc == 0) {
    FUZZ_CHECK(mb_etf_put_atom(NULL, &k, atom) == 0 && k <= (int)sizeof out, "put_atom size");
    k = 0;
    mb_etf_put_atom(out, &k, atom);
    int n = 0;
    FUZZ_CHECK(mb_etf_get_atom(out, &n, &atom2) == 0 && atom2 == atom && n == k,
               "an atom written back reads as another");
  }
}

static void term(const char *buf, long len, int flags)
{
  long cidx = 0, didx = 0;
  int crc = MB_ETF_MALFORMED;
  if (!(flags & MB_ETF_BARE)) {
    crc = mb_etf_check(buf, len, &cidx);
    FUZZ_CHECK(crc == 0 || crc == MB_ETF_MALFORMED, "check: %d", crc);
    FUZZ_CHECK(crc < 0 || (cidx > 0 && cidx <= len), "check ends at %ld of %ld", cidx, len);
  }
  mb_msg_t *m;
  int rc = mb_etf_decode(buf, len, &didx, flags, &m);
  FUZZ_CHECK(rc == 0 || rc == MB_ETF_MALFORMED || rc == MB_ETF_UNSUPPORTED ||
             rc == MB_ETOOMANY || rc == MB_ENOMEM, "decode: %d", rc);
  FUZZ_CHECK((rc == 0) == (m != NULL), "decode %d with message %p", rc, (void *)m);
  if (!(flags & MB_ETF_BARE)) {
    FUZZ_CHECK(crc == 0 || rc == MB_ETF_MALFORMED, "the check refuses what decodes (%d)", rc);
    FUZZ_CHECK((rc != 0 && rc != MB_ETF_UNSUPPORTED) || didx == cidx,
               "decode ends at %ld, the check at %ld", didx, cidx);
  }
  if (rc == 0) {
    FUZZ_CHECK(didx > 0 && didx <= len && m->nvalues == 1, "decode ends at %ld of %ld", didx, len);
    rebuild(m);
    round_trip(flags & (MB_ETF_REASON | MB_ETF_BARE));
    /* Straight from the decoder: the same value. */
    if (through_etf(m, flags & (MB_ETF_REASON | MB_ETF_BARE)))
      FUZZ_CHECK(same(1, 2), "a decoded message changed on its way back through ETF");
    mb_msg_free(m);
  }
  if (crc == 0) {
    int i = 1, type, n;
    getters(buf, i);
    if (ei_get_type(buf, &i, &type, &n) == 0 &&
        (type == ERL_SMALL_TUPLE_EXT || type == ERL_LARGE_TUPLE_EXT || type == ERL_LIST_EXT)) {
      if (type == ERL_LIST_EXT)
        ei_decode_list_header(buf, &i, &n);
      else
        ei_decode_tuple_header(buf, &i, &n);
      for (int k = 0; k < n; k++) {
        getters(buf, i);
        if (ei_skip_term(buf, &i) < 0)
          break;
      }
    }
  }
}

/* -- Frames ----------------------------------------------------------------------- */

/* What dist_recv queued for the peer: well-formed frames. */
static void check_out(conn_t *c)
{
  for (frame_t *f = c->out_head; f; f = f->next) {
    const unsigned char *p = (const unsigned char *)f->data;
    FUZZ_CHECK(f->len > 5, "a frame of %zu bytes", f->len);
    uint32_t n = (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
    FUZZ_CHECK(n == f->len - 4 && p[4] == PASS_THROUGH, "a frame's header");
    long idx = 1, len = (long)n;
    const char *d = f->data + 4;
    FUZZ_CHECK(mb_etf_check(d, len, &idx) == 0, "a frame's control message");
    if (idx < len)
      FUZZ_CHECK(mb_etf_check(d, len, &idx) == 0 && idx == len, "a frame's message");
  }
}

/* Empty the process's mailbox as its receives would, rebuilding each
 * message. */
static void drain(void)
{
  mb_proc_drain(proc);
  if (proc->exit_reason) {              /* a kill: it would die */
    rebuild(proc->exit_reason);
    mb_msg_free(proc->exit_reason);
    proc->exit_reason = NULL;
  }
  while (proc->q_head) {
    mb_msg_t *m = mb_proc_take_msg(proc, &proc->q_head);
    lua_pushcfunction(L, push_cf);
    lua_pushlightuserdata(L, m);
    int rc = lua_pcall(L, 1, 1, 0);
    FUZZ_CHECK(rc == 0, "a delivered message does not rebuild: %s", lua_tostring(L, -1));
    lua_pop(L, 1);
    mb_msg_free(m);
  }
}

static void frames(const uint8_t *in, size_t size)
{
  pthread_mutex_lock(&dist_lock);
  conn_t *c = dist_table_add(peer, 1);
  dist_pairs_add(&c->mon_out, proc->pid, peer_proc, FUZZ_MONITOR, 0);
  dist_pairs_add(&c->node_mon, proc->pid, 0, 0, 0);
  pthread_mutex_unlock(&dist_lock);
  size_t at = 0;
  while (size - at >= 2) {
    size_t n = (size_t)in[at] << 8 | in[at + 1];
    at += 2;
    if (n > size - at)
      break;
    if (n == 0)
      continue;                         /* a tick */
    char *data = malloc(n);            /* exactly: ASan sees a read past it */
    FUZZ_CHECK(data != NULL, "malloc");
    memcpy(data, in + at, n);
    at += n;
    int rc = dist_handle_frame(c, data, (long)n);
    free(data);
    FUZZ_CHECK(rc == 0 || rc == -1, "dist_handle_frame: %d", rc);
    if (rc < 0)
      break;
  }
  pthread_mutex_lock(&dist_lock);
  check_out(c);
  pthread_mutex_unlock(&dist_lock);
  dist_conn_down(c, NULL);
  drain();
  mb_proc_lock(proc);
  uint32_t links = proc->links.n, watchers = proc->watchers.n;
  mb_proc_unlock(proc);
  FUZZ_CHECK(links == 0 && watchers == 0,
             "the connection is down, and the process keeps %u links and %u watchers",
             links, watchers);
}

int LLVMFuzzerTestOneInput(const uint8_t *in, size_t size)
{
  if (!L)
    LLVMFuzzerInitialize(NULL, NULL);
  if (size == 0)
    return 0;
  uint32_t held = mb_remote_ref_count();
  if (in[0] & 4)
    frames(in + 1, size - 1);
  else
    term((const char *)in + 1, (long)size - 1, in[0] & 3);
  collect();
  FUZZ_CHECK(mb_remote_ref_count() == held, "remote refs held: %u before, %u after",
             held, mb_remote_ref_count());
  return 0;
}
