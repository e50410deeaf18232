/* lib_mb.c: the `moonbeam` Lua module - processes, messages, links,
 * monitors, names and timers as Lua sees them.
 *
 * Functions that block (receive, sleep) or stop the process (exit, halt)
 * yield the body coroutine to the runner with `return mb_run_yield()`;
 * the runner resumes them with their results (the message, or nil on a
 * timeout), so the yield costs a plain C-function yield, not a hook yield.
 * They refuse to block where a yield is impossible (inside table.sort, a
 * gsub callback, a metamethod called from C, a module's top level being
 * required) with an error that says so.
 *
 * The module table starts empty: its __index creates each function on first
 * use, so that an idle process holds only the functions it called.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "codepath.h"
#include "copy.h"
#include "intern.h"
#include "lauxlib.h"
#include "lib.h"
#include "lstate.h"
#include "modcache.h"
#include "reg.h"
#include "run.h"
#include "scheduler.h"
#include "sock.h"
#include "timer.h"

/* -- Helpers -------------------------------------------------------------- */

/* Unwind a process that must die but cannot yield here (inside a C call):
 * the hook, now at every instruction, ends it at the first safe point even
 * if a pcall catches the error. */
static int unwind_exiting(lua_State *L)
{
  mb_lstate_sethook(L, 1);
  return luaL_error(L, "process is exiting");
}

/* The calling process. A process that must die (killed at a point where it
 * could not yield at once) gets no further effect on the world: every call
 * that would have one stops it instead. */
mb_proc_t *mb_lib_self(lua_State *L)
{
  mb_proc_t *p = mb_proc_of(L);
  MB_ASSERT_OWNER(p);
  if (p->exit_reason || p->alloc.oom) {
    if (p->exit_reason == NULL) {
      p->alloc.limit = 0;   /* room to unwind */
      p->exit_reason = mb_must(mb_msg_string("out of memory"));
    }
    unwind_exiting(L);
  }
  return p;
}

/* A destination: a pid, or a registered name that must exist. */
static mb_pid_t check_dest(lua_State *L, int idx, const char *fname)
{
  mb_pid_t pid = mb_pid_test(L, idx);
  if (pid)
    return pid;
  if (lua_type(L, idx) == LUA_TSTRING) {
    const char *name = lua_tostring(L, idx);
    pid = mb_reg_whereis(name);
    if (pid == 0)
      luaL_error(L, "%s: no process is registered as '%s'", fname, name);
    return pid;
  }
  return (mb_pid_t)luaL_error(L,
      "bad argument #%d to '%s' (pid or registered name expected, got %s)",
      idx, fname, luaL_typename(L, idx));
}

/* Encode the value at idx as a one-value message, or raise "fname: err". */
static mb_msg_t *encode_or_raise(lua_State *L, int idx, const char *fname,
                                 const char *root)
{
  char err[512];
  mb_msg_t *m = mb_copy_encode(L, idx, 1, root, NULL, err, sizeof err);
  if (m == NULL)
    luaL_error(L, "%s: %s", fname, err);
  return m;
}

/* Stop the calling process now (its exit_reason is set). */
static int stop_self(lua_State *L, mb_proc_t *p)
{
  if (mb_run_can_yield(p, L))
    return mb_run_yield(L, MB_YIELD_EXIT);
  return unwind_exiting(L);
}

int mb_lib_block_error(lua_State *L, const char *fname)
{
  return luaL_error(L, "%s: cannot block here (called through a C function, such as "
                    "load calling its reader, require running a module, an xpcall "
                    "handler, or a metamethod called from C)",
                    fname);
}

static void must_be_able_to_block(lua_State *L, mb_proc_t *p, const char *fname)
{
  if (!mb_run_can_yield(p, L))
    mb_lib_block_error(L, fname);
}

/* -- Spawning ------------------------------------------------------------- */

typedef struct spawn_opts {
  int link, monitor, essential, graceful;
  const char *name;
  size_t max_memory;
} spawn_opts_t;

/* A process spawned (or woken from hibernation) by module name starts in
 * this function of the host's: it requires the module and goes on in the
 * function the module returned, by a tail call. So the module's top level
 * runs as the process's Lua, preempted and able to wait as any other
 * (see lstate.c's require), not in the boot's C call. */
static const char by_module_src[] =
  "return function(check)\n"
  "  return function(require, name, ...)\n"
  "    return check(name, require(name))(...)\n"
  "  end\n"
  "end\n";
static mb_lstate_chunk_t by_module_chunk = MB_LSTATE_LIBCHUNK(by_module_src, "=spawn");

/* check(name, value) -> value if it is a function; else raise. */
static int by_module_check(lua_State *L)
{
  if (!lua_isfunction(L, 2)) {
    lua_pushfstring(L, "spawn: module '%s' returned %s, not a function",
                    lua_tostring(L, 1), luaL_typename(L, 2));
    return lua_error(L);
  }
  return 1;
}

/* The child's boot (run by its scheduler, protected): rebuild the function
 * (or, for a module, by_module's and require) and the arguments. */
static int boot_spawned(lua_State *L)
{
  mb_proc_t *p = lua_touserdata(L, 1);
  lua_settop(L, 0);
  /* A captured `moonbeam` comes from mb_copy_module, without the package
   * library; a body that captures nothing pays for no module. */
  int n = mb_copy_decode(L, p->boot_msg);
  mb_msg_free(p->boot_msg);
  p->boot_msg = NULL;
  if (lua_type(L, 1) == LUA_TSTRING) {
    static const lua_CFunction fns[] = {by_module_check, NULL};
    mb_lstate_push_lua_fn(L, &by_module_chunk, fns);
    lua_insert(L, 1);
    lua_getfield(L, LUA_GLOBALSINDEX, "require");
    lua_insert(L, 2);
    n += 2;
  }
  return n;
}

/* For crash reports: the module a process was spawned from. (For a
 * function the report finds where it was defined in the crashed coroutine's
 * outermost frame, which spares every spawn a lua_getinfo.) */
static const char *module_origin(lua_State *L, int idx)
{
  size_t n;
  const char *name = lua_tolstring(L, idx, &n);
  return mb_intern(name, n);
}

/* The function (or module name) at fnidx and the arguments above it as
 * the boot message of a process body (spawn, hibernate); raises on a value
 * that cannot be copied, naming it. */
static mb_msg_t *encode_body(lua_State *L, int fnidx, const char *fname)
{
  int t = lua_type(L, fnidx);
  if (t == LUA_TFUNCTION && lua_iscfunction(L, fnidx))
    luaL_error(L, "%s: cannot run a C function as a process body", fname);
  if (t != LUA_TFUNCTION && t != LUA_TSTRING)
    luaL_error(L, "bad argument #%d to '%s' (function or module name "
               "expected, got %s)", fnidx, fname, luaL_typename(L, fnidx));
  int n = lua_gettop(L) - fnidx + 1;
  /* Names for error paths; past the table, values are named arg[i]. */
  static const char *const names[] = {"function", "arg 1", "arg 2", "arg 3",
    "arg 4", "arg 5", "arg 6", "arg 7", "arg 8", "arg 9", "arg 10", "arg 11",
    "arg 12", "arg 13", "arg 14", "arg 15"};
  char err[512];
  mb_msg_t *m = mb_copy_encode(L, fnidx, n, "arg",
                               n <= (int)(sizeof names / sizeof *names) ? names : NULL,
                               err, sizeof err);
  if (m == NULL)
    luaL_error(L, "%s: %s", fname, err);
  return m;
}

/* A registered name: 1 to MB_NAME_MAX bytes without NUL, as an Erlang
 * atom is at most 255 characters (a 50 MB name was printed whole in every
 * report; one with a NUL was registered cut short). */
#define MB_NAME_MAX 255

static int name_ok(lua_State *L, int idx)
{
  size_t n;
  const char *s = lua_tolstring(L, idx, &n);
  return n >= 1 && n <= MB_NAME_MAX && memchr(s, '\0', n) == NULL;
}

/* Bring the caller's package paths up to date (codepath.h) before it
 * spawns or hibernates, or raise when no entry can be made for them. */
static void sync_codepath(lua_State *L, const char *fname)
{
  if (mb_lstate_codepath_sync(L) < 0)
    luaL_error(L, "%s: out of memory for package paths (%d different pairs of "
               "package.path and package.cpath, %d MB in all, at most)", fname,
               MB_CODEPATH_MAX, (int)(MB_CODEPATH_BYTES >> 20));
}

/* Spawn fn at fnidx with the arguments above it; push pid (and ref). */
static int spawn_common(lua_State *L, int fnidx, const spawn_opts_t *o,
                        const char *fname)
{
  mb_proc_t *self = mb_lib_self(L);
  int t = lua_type(L, fnidx);
  /* The caller's own entries: a monitor, and a link (the new process's
   * entry is charged to it). */
  if ((o->monitor || o->link) &&
      mb_proc_room(self, (size_t)(!!o->monitor + !!o->link) * MB_PROC_SET_ENTRY))
    return luaL_error(L, "%s: out of memory", fname);
  sync_codepath(L, fname);   /* the paths the child inherits */
  mb_msg_t *m = encode_body(L, fnidx, fname);
  mb_proc_t *p;
  int rc = mb_proc_new(o->max_memory, &p);
  if (rc < 0) {
    mb_msg_free(m);
    if (rc == MB_ENOMEM)
      return luaL_error(L, "%s: out of memory (the host is over --max-memory)", fname);
    return luaL_error(L, "%s: %s", fname, mb_strerror(rc));
  }
  p->boot = boot_spawned;
  p->boot_msg = m;
  p->codepath = self->codepath;
  mb_codepath_ref(p->codepath);
  if (o->essential) {   /* the killer reads it under the lock */
    mb_proc_lock(p);
    p->essential = 1;
    mb_proc_unlock(p);
  }
  int stop_now = o->graceful && mb_proc_set_graceful(p);
  if (t == LUA_TSTRING)
    atomic_store_explicit(&p->origin, module_origin(L, fnidx), memory_order_relaxed);
  if (o->name) {
    if (mb_reg_register(o->name, p) < 0) {
      mb_proc_exit(p, mb_must(mb_msg_string("normal")));
      return luaL_error(L, "%s: name '%s' is already registered", fname, o->name);
    }
  }
  if (o->link)
    mb_proc_link(self, p->pid);
  mb_ref_t ref = o->monitor ? mb_proc_monitor(self, p->pid) : 0;
  mb_pid_t pid = p->pid;
  mb_sched_enqueue(p);   /* p may run and die at once: no use of p below */
  if (stop_now)          /* the host is stopping already */
    mb_proc_stop_signal(pid);
  mb_id_push_new(L, pid, &mb_pid_kind);
  if (o->monitor) {
    mb_id_push_new(L, ref, &mb_ref_kind);
    return 2;
  }
  return 1;
}

/* mb.spawn(fn | module, ...) -> pid */
static int l_spawn(lua_State *L)
{
  spawn_opts_t o = {0};
  return spawn_common(L, 1, &o, "spawn");
}

/* mb.spawn_link(fn | module, ...) -> pid */
static int l_spawn_link(lua_State *L)
{
  spawn_opts_t o = {.link = 1};
  return spawn_common(L, 1, &o, "spawn_link");
}

/* mb.spawn_monitor(fn | module, ...) -> pid, ref */
static int l_spawn_monitor(lua_State *L)
{
  spawn_opts_t o = {.monitor = 1};
  return spawn_common(L, 1, &o, "spawn_monitor");
}

/* mb.spawn_opt({link=, monitor=, name=, max_memory=, essential=, graceful=},
 *              fn | module, ...) */
static int l_spawn_opt(lua_State *L)
{
  luaL_checktype(L, 1, LUA_TTABLE);
  spawn_opts_t o = {0};
  lua_getfield(L, 1, "link");
  o.link = lua_toboolean(L, -1);
  lua_getfield(L, 1, "monitor");
  o.monitor = lua_toboolean(L, -1);
  lua_getfield(L, 1, "essential");
  o.essential = lua_toboolean(L, -1);
  lua_getfield(L, 1, "graceful");
  o.graceful = lua_toboolean(L, -1);
  lua_pop(L, 2);
  lua_getfield(L, 1, "max_memory");
  if (!lua_isnil(L, -1)) {
    lua_Number mm = lua_tonumber(L, -1);
    if (lua_type(L, -1) != LUA_TNUMBER || !(mm >= 1))   /* NaN too */
      return luaL_error(L, "spawn_opt: opts.max_memory must be a positive number of bytes");
    /* math.huge, or more than a size_t holds: no limit (a cast would be
     * undefined there). */
    o.max_memory = mm < 0x1p63 ? (size_t)mm : 0;
  }
  lua_pop(L, 3);
  lua_getfield(L, 1, "name");
  if (!lua_isnil(L, -1)) {
    if (lua_type(L, -1) != LUA_TSTRING || !name_ok(L, -1))
      return luaL_error(L, "spawn_opt: opts.name must be a string of 1 to %d bytes, without NUL",
                        MB_NAME_MAX);
    o.name = lua_tostring(L, -1);
  }
  lua_insert(L, 2);  /* the name's string stays anchored while we use it */
  /* Stack: opts, name, fn, args... */
  return spawn_common(L, 3, &o, "spawn_opt");
}

/* mb.hibernate(fn | module, ...): never returns. The process drops its
 * whole Lua state and keeps only fn and its arguments (copied now, as for
 * spawn); the next message or signal that would wake it rebuilds a state
 * and runs fn(...) there. */
static int l_hibernate(lua_State *L)
{
  mb_proc_t *p = mb_lib_self(L);
  sync_codepath(L, "hibernate");   /* the paths it wakes with */
  mb_msg_t *m = encode_body(L, 1, "hibernate");
  if (!mb_run_can_yield(p, L)) {
    mb_msg_free(m);
    return mb_lib_block_error(L, "hibernate");
  }
  if (p->boot_msg)
    mb_msg_free(p->boot_msg);
  p->boot_msg = m;
  p->boot = boot_spawned;
  atomic_store_explicit(&p->origin, lua_type(L, 1) == LUA_TSTRING
                        ? module_origin(L, 1) : NULL, memory_order_relaxed);
  return mb_run_yield(L, MB_YIELD_HIBERNATE);
}

/* -- Messages ------------------------------------------------------------- */

/* mb.self() -> pid */
static int l_self(lua_State *L)
{
  mb_pid_push(L, mb_lib_self(L)->pid);
  return 1;
}

/* mb.is_pid(v) -> boolean */
static int l_is_pid(lua_State *L)
{
  lua_pushboolean(L, mb_pid_test(L, 1) != 0);
  return 1;
}

/* mb.is_ref(v) -> boolean */
static int l_is_ref(lua_State *L)
{
  lua_pushboolean(L, mb_ref_test(L, 1) != 0);
  return 1;
}

/* mb.send(dest, msg[, alias]) */
static int l_send(lua_State *L)
{
  mb_proc_t *p = mb_lib_self(L);
  int t1 = lua_type(L, 1);
  /* {name, node}: a process registered on a node (lib_dist.c). */
  if (t1 == LUA_TTABLE) {
    if (lua_isnoneornil(L, 2))
      return luaL_error(L, "send: nil is not a valid message");
    return mb_lib_dist_send_named(L, encode_or_raise(L, 2, "send", "msg"), "send");
  }
  /* A pid, the usual destination, is recognised with one API call less
   * than check_dest's (the type is known here). */
  uint64_t dest;
  if (t1 != LUA_TUSERDATA || mb_id_kind_ud(L, 1, &dest) != &mb_pid_kind)
    dest = check_dest(L, 1, "send");
  if (lua_isnoneornil(L, 2))
    return luaL_error(L, "send: nil is not a valid message");
  mb_ref_t alias = 0;
  if (lua_gettop(L) >= 3 && !lua_isnil(L, 3) && (alias = mb_ref_test(L, 3)) == 0)
    return luaL_error(L, "bad argument #3 to 'send' (alias (a ref) expected, got %s)",
                      luaL_typename(L, 3));
  mb_msg_t *m = encode_or_raise(L, 2, "send", "msg");
  if (mb_id_is_remote(dest))
    mb_lib_dist_check(L, m, "send");
  atomic_store_explicit(&p->reductions,
      atomic_load_explicit(&p->reductions, memory_order_relaxed) + MB_REDS_PER_SEND +
      m->len / MB_COPY_BYTES_PER_RED, memory_order_relaxed);
  m->kind = MB_MSG_USER;
  m->from = p->pid;
  m->ref = alias;
  mb_proc_send(dest, m);
  if (mb_id_is_remote(dest))   /* may wait while the node's output is busy */
    return mb_lib_dist_sent(L, dest);
  return 0;
}

/* mb.alias([ref]) -> ref: messages sent with it are received until unalias */
static int l_alias(lua_State *L)
{
  mb_proc_t *p = mb_lib_self(L);
  int given = !lua_isnoneornil(L, 1);
  mb_ref_t ref = given ? mb_ref_check(L, 1) : mb_proc_make_ref(p);
  if (!mb_proc_has_alias(p, ref) && mb_proc_room(p, MB_PROC_SET_ENTRY))
    return luaL_error(L, "alias: out of memory");
  mb_proc_alias(p, ref);
  if (given)
    lua_settop(L, 1);   /* the ref it was given: no lookup of its userdata */
  else
    mb_ref_push(L, ref);
  return 1;
}

/* mb.make_ref() -> ref: unique among all refs of the host's run. */
static int l_make_ref(lua_State *L)
{
  mb_ref_push(L, mb_proc_make_ref(mb_lib_self(L)));
  return 1;
}

/* mb.unalias(ref) -> boolean (whether it was active) */
static int l_unalias(lua_State *L)
{
  mb_proc_t *p = mb_lib_self(L);
  lua_pushboolean(L, mb_proc_unalias(p, mb_ref_check(L, 1)));
  return 1;
}

/* DOWN and EXIT messages are built by a Lua function: its table
 * constructor copies a template that holds the keys and the event's name
 * already (LuaJIT's TDUP), where lua_createtable and four lua_setfield
 * interned each key again (the template's nil-valued keys survive the
 * dump: bcdump.h). Its bytecode is made on the host's first such message;
 * each state loads it on its first one and keeps it at
 * MB_REGSLOT_SIGNAL_MSG, across its reuses too (lstate.c): its environment
 * is the registry, not the globals of the process that loaded it, and
 * nothing else of a process reaches it. */
static const char signal_msg_src[] =
  "return function(down, pid, ref, reason)\n"
  "  if down then\n"
  "    return { event = 'DOWN', pid = pid, ref = ref, reason = reason }\n"
  "  end\n"
  "  return { event = 'EXIT', pid = pid, reason = reason }\n"
  "end\n";
static mb_lstate_chunk_t signal_msg_chunk = MB_LSTATE_CHUNK(signal_msg_src, "=signal message");

void mb_lib_push_msg(lua_State *L, const mb_msg_t *m)
{
  if (m->kind == MB_MSG_USER) {
    mb_copy_decode(L, m);
    return;
  }
  mb_run_calls_lua();   /* the builder: a receive's scan calls it per message */
  lua_rawgeti(L, LUA_REGISTRYINDEX, MB_REGSLOT_SIGNAL_MSG);
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    mb_lstate_run_chunk(L, &signal_msg_chunk, LUA_REGISTRYINDEX);
    lua_pushvalue(L, -1);
    lua_rawseti(L, LUA_REGISTRYINDEX, MB_REGSLOT_SIGNAL_MSG);
  }
  lua_pushboolean(L, m->kind == MB_MSG_DOWN);
  mb_pid_push(L, m->from);
  if (m->kind == MB_MSG_DOWN)
    mb_ref_push(L, m->ref);
  else
    lua_pushnil(L);
  mb_copy_decode(L, m);
  lua_call(L, 4, 1);
}

static void unlink_msg(mb_proc_t *p, mb_msg_t **pm)
{
  mb_msg_free(mb_proc_take_msg(p, pm));
}

/* The previous attempt raised while rebuilding this message: drop it, or
 * every receive would fail on it again. */
static void drop_bad(mb_proc_t *p)
{
  for (mb_msg_t **pm = &p->q_head; *pm; pm = &(*pm)->next)
    if (*pm == p->recv_bad) {
      unlink_msg(p, pm);
      break;
    }
  p->recv_bad = NULL;
}

/* Run the match function on the message at the top of L: whether it
 * takes m, -1 if m was taken from the mailbox meanwhile. The function may
 * change the mailbox (mb.demonitor's flush, a socket given away with its
 * messages): the scan then goes on from p->q_scan, which
 * mb_proc_take_msg keeps pointing at m's link, or at what follows once m
 * itself is gone (recv_testing says so). It may not receive (the scan's
 * own state is the receive's): recv_testing refuses that, and is cleared
 * however the call ends. */
static int match(mb_proc_t *p, lua_State *L, mb_msg_t **pm, mb_msg_t *m)
{
  lua_rawgeti(L, LUA_REGISTRYINDEX, p->recv_match);
  lua_pushvalue(L, -2);
  p->q_scan = pm;
  p->recv_testing = m;
  p->match_hooks = 0;
  int rc = lua_pcall(L, 1, 1, 0);
  int gone = p->recv_testing == NULL;
  p->recv_testing = NULL;
  if (rc != 0)
    lua_error(L);
  int ok = lua_toboolean(L, -1);
  lua_pop(L, 1);
  return gone ? -1 : ok;
}

int mb_lib_receive_queued(mb_proc_t *p, lua_State *L)
{
  if (p->recv_bad)
    drop_bad(p);
  for (mb_msg_t **pm = p->q_scan; *pm; ) {
    mb_msg_t *m = *pm;
    if (m->kind == MB_MSG_USER && m->ref && !mb_proc_has_alias(p, m->ref)) {
      unlink_msg(p, pm);   /* sent through an alias that is gone */
      continue;
    }
    p->recv_bad = m;
    mb_lib_push_msg(L, m);
    p->recv_bad = NULL;
    if (p->recv_match) {
      int ok = match(p, L, pm, m);
      pm = p->q_scan;   /* (m's link, or what follows m if it went) */
      if (ok <= 0) {
        lua_pop(L, 1);
        if (ok == 0)
          pm = &m->next;
        p->q_scan = pm;
        continue;
      }
    }
    /* A socket's active-mode message: a listener bounds those not yet
     * received (sock.h). */
    uint64_t port = m->kind == MB_MSG_USER ? m->port : 0;
    unlink_msg(p, pm);
    p->q_scan = &p->q_head;
    if (port)
      mb_sock_received(port);
    return 1;
  }
  return 0;
}

int mb_lib_try_receive(mb_proc_t *p, lua_State *L)
{
  /* Nothing queued, in the inbox or here (the count covers both and every
   * signal, and is raised under the lock once a message is linked), and no
   * message that failed to rebuild to drop: no drain, no lock. A
   * receive usually finds nothing (it waits for a reply) and the way into
   * the wait (run.c) looks at the inbox under the lock anyway, so a message
   * that comes meanwhile is not missed. */
  if (atomic_load_explicit(&p->mailbox_len, memory_order_relaxed) == 0 && !p->recv_bad)
    return p->exit_reason != NULL ? -1 : 0;
  if (mb_proc_drain(p))
    return -1;
  return mb_lib_receive_queued(p, L);
}

static void clear_match(mb_proc_t *p, lua_State *L)
{
  if (p->recv_match) {
    luaL_unref(L, LUA_REGISTRYINDEX, p->recv_match);
    p->recv_match = 0;
  }
  p->q_scan = &p->q_head;
}

/* A timeout argument: nil -> -1 (forever), else a number >= 0. */
static double check_timeout(lua_State *L, int idx, const char *fname)
{
  if (lua_isnoneornil(L, idx))
    return -1;
  if (lua_type(L, idx) != LUA_TNUMBER || !(lua_tonumber(L, idx) >= 0))   /* NaN too */
    luaL_error(L, "bad argument #%d to '%s' (timeout in ms (a number >= 0) "
               "expected, got %s)", idx, fname, luaL_typename(L, idx));
  return lua_tonumber(L, idx);
}

/* mb.receive([timeout_ms]) / mb.receive(match, [timeout_ms], [ref]) -> msg | nil
 * With ref, match promises to take no message queued before ref was made
 * (it takes only messages that carry ref - its alias's, its DOWN, one that
 * holds it - or that a process spawned with it sends): if ref is the last
 * the process made, the scan starts at the messages queued after it. This is
 * what keeps a call's wait for its reply from testing every message
 * queued before the call (Erlang's compiler finds the same promise in a
 * receive whose every clause matches a new ref). */
static int l_receive(lua_State *L)
{
  mb_proc_t *p = mb_lib_self(L);
  if (p->recv_testing)
    return luaL_error(L, "receive: not allowed inside a receive's match function");
  /* mb.receive() with no argument, the usual call, asks no type. */
  int has_match = 0;
  double timeout = -1;
  mb_ref_t mark = 0;
  if (lua_gettop(L) > 0) {
    has_match = lua_isfunction(L, 1);
    timeout = check_timeout(L, has_match ? 2 : 1, "receive");
    if (!has_match && !lua_isnoneornil(L, 1) && lua_type(L, 1) != LUA_TNUMBER)
      return luaL_error(L, "bad argument #1 to 'receive' (function or timeout "
                        "expected, got %s)", luaL_typename(L, 1));
    if (!lua_isnoneornil(L, 3)) {
      if (!has_match)
        return luaL_error(L, "bad argument #3 to 'receive' (a ref goes with a match "
                          "function)");
      mark = mb_ref_test(L, 3);
      if (!mark)
        return luaL_error(L, "bad argument #3 to 'receive' (ref expected, got %s)",
                          luaL_typename(L, 3));
    }
  }
  clear_match(p, L);
  if (has_match) {
    lua_pushvalue(L, 1);
    p->recv_match = luaL_ref(L, LUA_REGISTRYINDEX);
    if (mark)
      p->q_scan = mb_proc_marked(p, mark);
  }
  lua_settop(L, 0);
  int r = mb_lib_try_receive(p, L);
  if (r == 1) {
    clear_match(p, L);
    return 1;
  }
  if (r < 0) {
    clear_match(p, L);
    return stop_self(L, p);
  }
  if (timeout == 0) {
    clear_match(p, L);
    lua_pushnil(L);
    return 1;
  }
  if (!mb_run_can_yield(p, L)) {
    clear_match(p, L);
    return mb_lib_block_error(L, "receive");
  }
  if (timeout > 0)
    p->wait_timer = mb_timer_wait(p, timeout);
  p->pending_wait = MB_WAIT_RECV;
  return mb_run_yield(L, MB_YIELD_WAIT);
}

/* -- Time ----------------------------------------------------------------- */

/* mb.sleep(ms) */
static int l_sleep(lua_State *L)
{
  mb_proc_t *p = mb_lib_self(L);
  double ms = check_timeout(L, 1, "sleep");
  if (ms < 0)
    return luaL_argerror(L, 1, "number of ms expected");
  must_be_able_to_block(L, p, "sleep");
  if (ms == 0)
    return mb_run_yield(L, MB_YIELD_PREEMPT);
  p->wait_timer = mb_timer_wait(p, ms);
  p->pending_wait = MB_WAIT_SLEEP;
  return mb_run_yield(L, MB_YIELD_WAIT);
}

/* mb.yield() */
static int l_yield(lua_State *L)
{
  mb_proc_t *p = mb_lib_self(L);
  if (!mb_run_can_yield(p, L))
    return 0;
  return mb_run_yield(L, MB_YIELD_PREEMPT);
}

/* mb.now() -> monotonic ms */
static int l_now(lua_State *L)
{
  lua_pushnumber(L, mb_timer_now());
  return 1;
}

/* Timer values: ids (pid.h) that messages may carry, so that a timer can
 * be handed to another process or kept across hibernation. */
static int timer_tostring(lua_State *L)
{
  uint64_t id = *(uint64_t *)lua_touserdata(L, 1);
  lua_pushfstring(L, "#Timer<%d.%d>", (int)(id & MB_PID_SLOT_MASK),
                  (int)(id >> MB_PID_SLOT_BITS));
  return 1;
}

static mb_idkind_t timer_kind = {"timer", timer_tostring, NULL, MB_TAG_TIMER, 0, 0};

/* mb.send_after(ms, dest, msg) -> timer */
static int l_send_after(lua_State *L)
{
  double ms = check_timeout(L, 1, "send_after");
  if (ms < 0)
    return luaL_argerror(L, 1, "number of ms expected");
  mb_pid_t dest = check_dest(L, 2, "send_after");
  if (lua_isnoneornil(L, 3))
    return luaL_error(L, "send_after: nil is not a valid message");
  mb_msg_t *m = encode_or_raise(L, 3, "send_after", "msg");
  m->kind = MB_MSG_USER;
  mb_proc_t *self = mb_lib_self(L);
  m->from = self->pid;
  uint64_t id;
  int rc = mb_timer_send_after(self, ms, dest, m, &id);
  if (rc == MB_ENOMEM) {
    /* Its timers count in max_memory: over it, it dies "out of memory"
     * as for its heap (not an error a pcall could catch and go on). */
    self->alloc.oom = 1;
    mb_lib_self(L);
  }
  if (rc != 0)
    return luaL_error(L, "send_after: %s", mb_strerror(rc));
  mb_id_push(L, id, &timer_kind);
  return 1;
}

/* The ms left of the timer at 1, as op (mb_timer_cancel, mb_timer_read)
 * gives them, or false. */
static int timer_left(lua_State *L, int (*op)(uint64_t id, double *left_ms))
{
  uint64_t id = mb_id_test(L, 1, &timer_kind);
  if (id == 0)
    return luaL_typerror(L, 1, "timer");
  double left;
  if (op(id, &left))
    lua_pushnumber(L, left);
  else
    lua_pushboolean(L, 0);
  return 1;
}

/* mb.cancel_timer(timer) -> ms left | false */
static int l_cancel_timer(lua_State *L)
{
  return timer_left(L, mb_timer_cancel);
}

/* mb.read_timer(timer) -> ms left | false, without cancelling
 * (erlang:read_timer) */
static int l_read_timer(lua_State *L)
{
  return timer_left(L, mb_timer_read);
}

/* -- Exits, links, monitors ------------------------------------------------ */

/* mb.exit([reason]) ends the caller; mb.exit(pid, reason) signals pid. */
static int l_exit(lua_State *L)
{
  mb_proc_t *p = mb_lib_self(L);
  mb_pid_t target = lua_gettop(L) >= 2 ? check_dest(L, 1, "exit") : 0;
  if (target == 0) {
    mb_msg_t *m = lua_isnoneornil(L, 1) ? mb_must(mb_msg_string("normal"))
                                        : encode_or_raise(L, 1, "exit", "reason");
    if (p->exit_reason)
      mb_msg_free(p->exit_reason);
    p->exit_reason = m;
    return stop_self(L, p);
  }
  if (lua_isnil(L, 2))
    return luaL_error(L, "exit: reason expected");
  mb_msg_t *m = encode_or_raise(L, 2, "exit", "reason");
  int kill = mb_msg_is_kill(m);
  if (target == p->pid && !p->trap_exit && mb_msg_is_normal(m)) {
    /* As in Erlang: exit(self(), normal) ends the caller. */
    if (p->exit_reason)
      mb_msg_free(p->exit_reason);
    p->exit_reason = m;
    return stop_self(L, p);
  }
  mb_proc_exit_signal(target, p->pid, m, kill);
  if (target == p->pid && mb_proc_drain(p))
    return stop_self(L, p);
  return 0;
}

/* mb.link(pid) */
static int l_link(lua_State *L)
{
  mb_proc_t *p = mb_lib_self(L);
  mb_pid_t pid = mb_pid_check(L, 1);
  /* Its entry in p's links is charged to p (proc.h), the other end's to
   * the other end. */
  if (mb_proc_room(p, mb_proc_link_cost(pid)))
    return luaL_error(L, "link: out of memory");
  int rc = mb_proc_link(p, pid);
  if (rc == 0)
    return 0;
  if (rc == MB_ENOMEM)
    return luaL_error(L, "link: out of memory (the other process holds 4 GiB of charges)");
  if (p->trap_exit) {
    mb_msg_t *m = mb_must(mb_msg_string("noproc"));
    m->kind = MB_MSG_EXIT;
    m->from = pid;
    /* Queued as a trapped exit: it arrives as an EXIT message. */
    mb_proc_push(p, m);
    return 0;
  }
  lua_pushliteral(L, "noproc");
  return lua_error(L);
}

/* mb.unlink(pid) */
static int l_unlink(lua_State *L)
{
  mb_proc_unlink(mb_lib_self(L), mb_pid_check(L, 1));
  return 0;
}

/* mb.monitor(pid or {name, node}) -> ref */
static int l_monitor(lua_State *L)
{
  if (lua_type(L, 1) == LUA_TTABLE)   /* {name, node} (lib_dist.c) */
    return mb_lib_dist_monitor_named(L);
  mb_pid_t pid = mb_pid_check(L, 1);
  mb_proc_t *p = mb_lib_self(L);
  if (mb_proc_room(p, MB_PROC_SET_ENTRY))
    return luaL_error(L, "monitor: out of memory");
  mb_id_push_new(L, mb_proc_monitor(p, pid), &mb_ref_kind);
  return 1;
}

/* Remove DOWN messages for ref from the mailbox. */
static void flush_down(mb_proc_t *p, mb_ref_t ref)
{
  mb_proc_drain(p);
  for (mb_msg_t **pm = mb_proc_marked(p, ref); *pm; ) {
    if ((*pm)->kind == MB_MSG_DOWN && (*pm)->ref == ref) {
      unlink_msg(p, pm);
    } else {
      pm = &(*pm)->next;
    }
  }
}

/* mb.demonitor(ref[, flush]) -> boolean (whether it was active) */
static int l_demonitor(lua_State *L)
{
  mb_proc_t *p = mb_lib_self(L);
  mb_ref_t ref = mb_ref_check(L, 1);
  lua_pushboolean(L, mb_proc_demonitor(p, ref));
  if (lua_toboolean(L, 2))
    flush_down(p, ref);
  return 1;
}

/* mb.trap_exit(on) -> previous setting */
static int l_trap_exit(lua_State *L)
{
  mb_proc_t *p = mb_lib_self(L);
  luaL_checktype(L, 1, LUA_TBOOLEAN);
  lua_pushboolean(L, p->trap_exit);
  p->trap_exit = lua_toboolean(L, 1);
  return 1;
}

/* -- Names ---------------------------------------------------------------- */

static const char *check_name(lua_State *L, int idx, const char *fname)
{
  if (lua_type(L, idx) != LUA_TSTRING)
    luaL_error(L, "bad argument #%d to '%s' (non-empty string expected, got %s)",
               idx, fname, luaL_typename(L, idx));
  if (!name_ok(L, idx))
    luaL_error(L, "bad argument #%d to '%s' (a name is 1 to %d bytes, without NUL)",
               idx, fname, MB_NAME_MAX);
  return lua_tostring(L, idx);
}

/* mb.register(name[, pid]) -> true */
static int l_register(lua_State *L)
{
  const char *name = check_name(L, 1, "register");
  mb_pid_t pid = lua_isnoneornil(L, 2) ? mb_lib_self(L)->pid : mb_pid_check(L, 2);
  mb_proc_t *p = mb_proc_get(pid);
  if (p == NULL)
    return luaL_error(L, "register: the process is not alive");
  int rc = mb_reg_register(name, p);
  mb_proc_unref(p);
  if (rc == MB_ETAKEN)
    return luaL_error(L, "register: the name '%s' is already registered", name);
  if (rc == MB_EHASNAME)
    return luaL_error(L, "register: the process already has a name");
  if (rc == MB_ENOPROC)
    return luaL_error(L, "register: the process is not alive");
  lua_pushboolean(L, 1);
  return 1;
}

/* mb.unregister(name) -> boolean */
static int l_unregister(lua_State *L)
{
  lua_pushboolean(L, mb_reg_unregister(check_name(L, 1, "unregister")));
  return 1;
}

/* mb.whereis(name) -> pid | nil */
static int l_whereis(lua_State *L)
{
  mb_pid_t pid = mb_reg_whereis(check_name(L, 1, "whereis"));
  if (pid)
    mb_pid_push(L, pid);
  else
    lua_pushnil(L);
  return 1;
}

/* -- Introspection and halting -------------------------------------------- */

typedef struct pidlist {
  mb_pid_t *v;
  size_t n, cap;
} pidlist_t;

static void collect(mb_proc_t *p, void *ud)
{
  pidlist_t *l = ud;
  if (l->n == l->cap) {
    l->cap = l->cap ? 2 * l->cap : 64;
    l->v = mb_realloc(l->v, l->cap * sizeof *l->v);
  }
  l->v[l->n++] = p->pid;
}

/* mb.processes() -> {pid, ...} */
static int l_processes(lua_State *L)
{
  pidlist_t l = {0};
  mb_proc_foreach(collect, &l);
  lua_createtable(L, (int)l.n, 0);
  for (size_t i = 0; i < l.n; i++) {
    mb_pid_push(L, l.v[i]);
    lua_rawseti(L, -2, (int)i + 1);
  }
  mb_free(l.v);
  return 1;
}

/* mb.info(pid) -> {memory, reductions, mailbox, status, name} | nil */
static int l_info(lua_State *L)
{
  mb_proc_t *p = mb_proc_get(mb_pid_check(L, 1));
  if (p == NULL) {
    lua_pushnil(L);
    return 1;
  }
  mb_proc_lock(p);
  mb_pstatus_t st = p->status;
  int dead = p->dead, hibernated = p->hibernated;
  mb_proc_unlock(p);
  int running = atomic_load_explicit(&p->running, memory_order_relaxed);
  lua_createtable(L, 0, 5);
  /* What the process holds: its state, its queued messages, its pending
   * timers, what the host keeps for it (a continuation) and its record. */
  lua_pushnumber(L, (lua_Number)(atomic_load(&p->alloc.used) +
                                 atomic_load(&p->mailbox_bytes) +
                                 atomic_load(&p->alloc.charged) +
                                 atomic_load(&p->held) + sizeof *p));
  lua_setfield(L, -2, "memory");
  lua_pushnumber(L, (lua_Number)atomic_load(&p->reductions));
  lua_setfield(L, -2, "reductions");
  lua_pushnumber(L, atomic_load(&p->mailbox_len));
  lua_setfield(L, -2, "mailbox");
  lua_pushstring(L, dead ? "exiting" : running ? "running"
                 : hibernated ? "hibernated"
                 : st == MB_PS_WAITING ? "waiting" : "runnable");
  lua_setfield(L, -2, "status");
  char name[256];
  if (mb_reg_name_of(p, name, sizeof name))
    lua_pushstring(L, name);
  else
    lua_pushnil(L);
  mb_proc_unref(p);
  lua_setfield(L, -2, "name");
  return 1;
}

int mb_lib_halt(lua_State *L, int code)
{
  mb_proc_t *p = mb_lib_self(L);
  fflush(stdout);
  mb_sched_halt(code);
  if (mb_run_can_yield(p, L))
    return mb_run_yield(L, MB_YIELD_PREEMPT);
  return luaL_error(L, "the host is halting");
}

/* mb.halt([code]) */
static int l_halt(lua_State *L)
{
  return mb_lib_halt(L, (int)luaL_optinteger(L, 1, 0));
}

/* mb.stopping() -> true once SIGTERM began the host's stop (proc.h) */
static int l_stopping(lua_State *L)
{
  lua_pushboolean(L, mb_proc_stopping());
  return 1;
}

/* -- The module ----------------------------------------------------------- */

static const luaL_Reg funcs[] = {
  {"spawn", l_spawn},
  {"spawn_link", l_spawn_link},
  {"spawn_monitor", l_spawn_monitor},
  {"spawn_opt", l_spawn_opt},
  {"hibernate", l_hibernate},
  {"self", l_self},
  {"is_pid", l_is_pid},
  {"is_ref", l_is_ref},
  {"send", l_send},
  {"alias", l_alias},
  {"unalias", l_unalias},
  {"make_ref", l_make_ref},
  {"receive", l_receive},
  {"sleep", l_sleep},
  {"yield", l_yield},
  {"now", l_now},
  {"send_after", l_send_after},
  {"cancel_timer", l_cancel_timer},
  {"read_timer", l_read_timer},
  {"exit", l_exit},
  {"link", l_link},
  {"unlink", l_unlink},
  {"monitor", l_monitor},
  {"demonitor", l_demonitor},
  {"trap_exit", l_trap_exit},
  {"register", l_register},
  {"unregister", l_unregister},
  {"whereis", l_whereis},
  {"processes", l_processes},
  {"info", l_info},
  {"halt", l_halt},
  {"stopping", l_stopping},
  {NULL, NULL}
};

/* The module's __index(t, k): create the function k on first use. */
static int module_index(lua_State *L)
{
  const char *k = lua_tostring(L, 2);
  if (k == NULL || lua_type(L, 2) != LUA_TSTRING)
    return 0;
  /* Our functions, then the distribution ones (lib_dist.c). */
  for (int t = 0; t < 2; t++)
    for (const luaL_Reg *r = t ? mb_lib_dist_funcs : funcs; r->name; r++)
      if (strcmp(r->name, k) == 0) {
        lua_pushcfunction(L, r->func);
        lua_pushvalue(L, 2);
        lua_pushvalue(L, -2);
        lua_rawset(L, 1);
        return 1;
      }
  return 0;
}

/* The module is its own metatable, its __index making each function on
 * first use: a metatable of its own cost every process that captures the
 * module 112 bytes (a table and its slot). */
int mb_lib_open(lua_State *L)
{
  lua_createtable(L, 0, 1);
  lua_pushcfunction(L, module_index);
  lua_setfield(L, -2, "__index");
  lua_pushvalue(L, -1);
  lua_setmetatable(L, -2);
  return 1;
}

void mb_lib_init(void)
{
  mb_run_init();
  mb_id_register(&timer_kind);
  mb_lib_tcp_init();
  mb_sched_add_after_loops(mb_modcache_clear);
}
