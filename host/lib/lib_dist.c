/* lib_dist.c: the distribution functions of the `moonbeam` module - nodes,
 * atoms and tuples (see dist.h, term.h, etf.h), and sends to {name, node}.
 *
 * lib_mb.c's module table finds these through mb_lib_dist_funcs; its send
 * hands a {name, node} destination to mb_lib_dist_send_named and checks a
 * message for a remote pid with mb_lib_dist_check.
 */
#include <string.h>

#include "copy.h"
#include "dist.h"
#include "lauxlib.h"
#include "lib.h"
#include "reg.h"
#include "remote.h"
#include "run.h"
#include "term.h"

/* The atom of the string or atom at idx, interned; raises on misuse,
 * naming argument argn. */
static uint32_t check_atom_arg(lua_State *L, int idx, int argn, const char *fname,
                               const char *what)
{
  uint64_t id = mb_id_test(L, idx, &mb_atom_kind);
  if (id)
    return (uint32_t)id;
  size_t n;
  const char *s = lua_type(L, idx) == LUA_TSTRING ? lua_tolstring(L, idx, &n) : NULL;
  if (s == NULL)
    luaL_error(L, "bad argument #%d to '%s' (%s (a string or atom) expected, got %s)",
               argn, fname, what, luaL_typename(L, idx));
  int64_t a = mb_atom_intern(s, n);
  if (a == MB_ETOOMANY)
    luaL_error(L, "%s: the atom table is full (%d atoms)", fname, (int)MB_ATOM_MAX);
  if (a < 0)
    luaL_error(L, "bad argument #%d to '%s' (%s must be 1 to %d bytes)", argn, fname,
               what, (int)MB_ATOM_MAX_LEN);
  return (uint32_t)a;
}

static uint32_t check_atom(lua_State *L, int idx, const char *fname, const char *what)
{
  return check_atom_arg(L, idx, idx, fname, what);
}

/* A node name: a string (or atom) with an @. */
static uint32_t check_node_arg(lua_State *L, int idx, int argn, const char *fname)
{
  uint32_t a = check_atom_arg(L, idx, argn, fname, "node name");
  size_t n;
  const char *s = mb_atom_name(a, &n);
  if (strchr(s, '@') == NULL)
    luaL_error(L, "bad argument #%d to '%s' (node name name@host expected, got '%s')",
               argn, fname, s);
  return a;
}

static uint32_t check_node(lua_State *L, int idx, const char *fname)
{
  return check_node_arg(L, idx, idx, fname);
}

static void push_atom_text(lua_State *L, uint32_t a)
{
  size_t n;
  const char *s = mb_atom_name(a, &n);
  lua_pushlstring(L, s, n);
}

/* mb.node([pid or ref]) -> this node's name ("nonode@nohost" when not
 * distributed), or the name of the node of pid or ref, as Erlang's node/1 */
static int l_node(lua_State *L)
{
  if (!lua_isnoneornil(L, 1)) {
    uint64_t id;
    const mb_idkind_t *k = mb_id_kind(L, 1, &id);
    if (k != &mb_pid_kind && k != &mb_ref_kind)
      return luaL_error(L, "bad argument #1 to 'node' (pid or ref expected, got %s)",
                        luaL_typename(L, 1));
    uint32_t node = 0;
    if (mb_id_is_remote(id)) {
      mb_rref_t r;
      node = k == &mb_pid_kind ? mb_remote_node(id)
                               : (mb_remote_ref_get(id, &r) == 0 ? r.node : 0);
    }
    if (node) {
      push_atom_text(L, node);
      return 1;
    }
  }
  if (mb_dist_on())
    push_atom_text(L, mb_dist_self());
  else
    lua_pushliteral(L, "nonode@nohost");
  return 1;
}

/* mb.nodes() -> {name, ...}: the connected nodes */
static int l_nodes(lua_State *L)
{
  uint32_t v[256];
  int n = mb_dist_nodes(v, 256);
  if (n > 256)
    n = 256;
  lua_createtable(L, n, 0);
  for (int i = 0; i < n; i++) {
    push_atom_text(L, v[i]);
    lua_rawseti(L, -2, i + 1);
  }
  return 1;
}

/* mb.connect_node(name) -> true | nil, err */
static int l_connect_node(lua_State *L)
{
  mb_proc_t *p = mb_lib_self(L);
  uint32_t node = check_node(L, 1, "connect_node");
  if (!mb_dist_on()) {
    lua_pushnil(L);
    lua_pushstring(L, mb_err_name(MB_ENOTDIST));
    return 2;
  }
  if (!mb_run_can_yield(p, L))
    return mb_lib_block_error(L, "connect_node");
  int rc = mb_dist_connect(p, node);
  if (rc < 0) {
    lua_pushnil(L);
    lua_pushstring(L, mb_err_name(rc));
    return 2;
  }
  return mb_run_yield(L, MB_YIELD_WAIT);
}

/* mb.monitor_node(name[, on]) -> true: {event = "nodedown", node = name}
 * when the node's connection goes down (or cannot be made) */
static int l_monitor_node(lua_State *L)
{
  mb_proc_t *p = mb_lib_self(L);
  uint32_t node = check_node(L, 1, "monitor_node");
  int on = lua_isnoneornil(L, 2) ? 1 : lua_toboolean(L, 2);
  int rc = mb_dist_monitor_node(p->pid, node, on);
  if (rc < 0)
    return luaL_error(L, "monitor_node: %s", mb_strerror(rc));
  lua_pushboolean(L, 1);
  return 1;
}

/* mb.node_info() -> {atoms = n, remote_pids = n, remote_refs = n}: the
 * host-wide tables of term.h and remote.h (what they hold now) */
static int l_node_info(lua_State *L)
{
  lua_createtable(L, 0, 3);
  lua_pushnumber(L, mb_atom_count());
  lua_setfield(L, -2, "atoms");
  lua_pushnumber(L, mb_remote_pid_count());
  lua_setfield(L, -2, "remote_pids");
  lua_pushnumber(L, mb_remote_ref_count());
  lua_setfield(L, -2, "remote_refs");
  return 1;
}

/* mb.atom(name) -> atom */
static int l_atom(lua_State *L)
{
  mb_id_push(L, check_atom(L, 1, "atom", "name"), &mb_atom_kind);
  return 1;
}

/* mb.is_atom(v) -> boolean */
static int l_is_atom(lua_State *L)
{
  lua_pushboolean(L, mb_id_test(L, 1, &mb_atom_kind) != 0);
  return 1;
}

/* mb.tuple(...) -> tuple */
static int l_tuple(lua_State *L)
{
  int n = lua_gettop(L);
  lua_createtable(L, n, 1);
  for (int i = 1; i <= n; i++) {
    lua_pushvalue(L, i);
    lua_rawseti(L, -2, i);
  }
  mb_tuple_make(L, -1, (uint32_t)n);
  return 1;
}

/* mb.is_tuple(v) -> boolean */
static int l_is_tuple(lua_State *L)
{
  lua_pushboolean(L, mb_tuple_test(L, 1, NULL));
  return 1;
}

const luaL_Reg mb_lib_dist_funcs[] = {
  {"node", l_node},
  {"nodes", l_nodes},
  {"connect_node", l_connect_node},
  {"monitor_node", l_monitor_node},
  {"node_info", l_node_info},
  {"atom", l_atom},
  {"is_atom", l_is_atom},
  {"tuple", l_tuple},
  {"is_tuple", l_is_tuple},
  {NULL, NULL}
};

/* After a send to node: a sender whose message went on a connection with
 * more than MB_DIST_BUSY_LIMIT bytes queued waits until it drains (dist.h).
 * Returns the binding's result count (yields if it must wait; never from
 * where a yield is impossible, a C callback). */
static int after_send(lua_State *L, uint32_t node)
{
  mb_proc_t *p = mb_lib_self(L);
  if (!mb_run_can_yield(p, L) || !mb_dist_busy_wait(p, node))
    return 0;
  return mb_run_yield(L, MB_YIELD_WAIT);
}

int mb_lib_dist_sent(lua_State *L, mb_pid_t dest)
{
  return after_send(L, mb_remote_node(dest));
}

/* The atoms of a {name, node} destination's two values (name, node,
 * fname on the stack): pushes them as numbers; raises on misuse. Called
 * protected, so that the caller can free what it holds first. */
static int dest_atoms(lua_State *L)
{
  const char *fname = lua_tostring(L, 3);
  if (lua_isnil(L, 1) || lua_isnil(L, 2))
    return luaL_error(L, "bad argument #1 to '%s' ({name, node} expected)", fname);
  lua_pushnumber(L, check_atom_arg(L, 1, 1, fname, "name"));
  lua_pushnumber(L, check_node_arg(L, 2, 1, fname));
  return 2;
}

int mb_lib_dist_send_named(lua_State *L, mb_msg_t *m, const char *fname)
{
  mb_proc_t *p = mb_lib_self(L);
  lua_pushcfunction(L, dest_atoms);
  lua_rawgeti(L, 1, 1);
  lua_rawgeti(L, 1, 2);
  lua_pushstring(L, fname);
  if (lua_pcall(L, 3, 2, 0) != 0) {
    mb_msg_free(m);              /* encoded already: not leaked by the error */
    return lua_error(L);
  }
  uint32_t name = (uint32_t)lua_tonumber(L, -2);
  uint32_t node = (uint32_t)lua_tonumber(L, -1);
  lua_pop(L, 2);
  char err[256];
  int rc = mb_dist_send_named(node, name, p->pid, m, err, sizeof err);
  if (rc == MB_ENOTDIST)
    return luaL_error(L, "%s: this host is not a node (start it with --sname or --name)", fname);
  if (rc < 0)
    return luaL_error(L, "%s: %s", fname, err);
  return after_send(L, node);
}

/* mb.monitor({name, node}) -> ref: lib_mb.c's monitor hands a table here.
 * As Erlang's monitor of {Name, Node}: the DOWN comes when the process
 * registered as name on node exits ("noproc" at once if there is none;
 * "noconnection" if the node goes away), and its pid field is the name's
 * id (remote.h), which prints as {name,node}. */
int mb_lib_dist_monitor_named(lua_State *L)
{
  mb_proc_t *p = mb_lib_self(L);
  lua_rawgeti(L, 1, 1);
  lua_rawgeti(L, 1, 2);
  int top = lua_gettop(L);
  if (lua_isnil(L, top - 1) || lua_isnil(L, top))
    return luaL_error(L, "bad argument #1 to 'monitor' (pid or {name, node} expected)");
  uint32_t name = check_atom_arg(L, top - 1, 1, "monitor", "name");
  uint32_t node = check_node_arg(L, top, 1, "monitor");
  if (!mb_dist_on())
    return luaL_error(L, "monitor: this host is not a node (start it with --sname or --name)");
  mb_pid_t target = 0;
  if (node == mb_dist_self()) {
    size_t n;
    const char *s = mb_atom_name(name, &n);
    target = mb_reg_whereis_n(s, n);
  }
  if (target == 0) {
    int64_t id = mb_remote_name(node, name);
    if (id < 0)
      return luaL_error(L, "monitor: %s", mb_strerror((int)id));
    target = (mb_pid_t)id;
  }
  if (mb_proc_room(p, MB_PROC_SET_ENTRY))
    return luaL_error(L, "monitor: out of memory");
  mb_ref_push(L, mb_proc_monitor(p, target));
  return 1;
}

void mb_lib_dist_check(lua_State *L, const mb_msg_t *m, const char *fname)
{
  char err[256];
  if (mb_dist_check_msg(m, err, sizeof err) < 0) {
    mb_msg_t *copy = (mb_msg_t *)m;
    mb_msg_free(copy);
    luaL_error(L, "%s: %s", fname, err);
  }
}
