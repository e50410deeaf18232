/* report.c: crash reports (see report.h). */
#include <stdio.h>
#include <string.h>

#include "lauxlib.h"
#include "lstate.h"
#include "report.h"
#include "run.h"

/* A report shows at most this much of a reason. */
#define MB_REPORT_REASON_MAX (64 * 1024)

/* A __tostring metamethod is user code run by the host, on a scheduler,
 * outside any slice: it gets this many VM instructions (about 5 ms), then
 * the report goes on without it. */
#define MB_REPORT_TOSTRING_INSTRUCTIONS 1000000

static void tostring_budget_hook(lua_State *L, lua_Debug *ar)
{
  (void)ar;
  luaL_error(L, "__tostring took too long");
}

/* Under a protected call: __tostring of the value at 1, bounded. The
 * hook's error leaves LuaJIT's hooks off in this state for good (see
 * LUAJIT-FACTS.md), which does not matter: the process is dying. */
static int call_tostring(lua_State *L)
{
  mb_lstate_set_hook(L, tostring_budget_hook, LUA_MASKCOUNT, MB_REPORT_TOSTRING_INSTRUCTIONS);
  int has = luaL_callmeta(L, 1, "__tostring");
  mb_lstate_set_hook(L, NULL, 0, 0);
  return has;
}

/* The error value at idx as text, like luajit's report does: a string, a
 * number, or what its __tostring gives within its budget. */
static const char *error_text(lua_State *L, int idx)
{
  if (lua_type(L, idx) == LUA_TSTRING || lua_type(L, idx) == LUA_TNUMBER)
    return lua_tostring(L, idx);
  if (luaL_getmetafield(L, idx, "__tostring")) {
    lua_pop(L, 1);
    lua_pushcfunction(L, call_tostring);
    lua_pushvalue(L, idx);
    if (lua_pcall(L, 1, 1, 0) == 0 && lua_isstring(L, -1))
      return lua_tostring(L, -1);
    const char *why = lua_isstring(L, -1) ? lua_tostring(L, -1) : "it did not give a string";
    return lua_pushfstring(L, "(error object is a %s value; __tostring failed: %s)",
                           luaL_typename(L, idx), why);
  }
  return lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, idx));
}

/* " spawned from function at src:line": the body, the outermost frame of
 * T (the function a hibernated process woke into, after a wake). */
static void add_body_origin(luaL_Buffer *b, mb_proc_t *p, lua_State *T)
{
  lua_Debug ar;
  int lvl = 0;
  while (lua_getstack(T, lvl + 1, &ar))
    lvl++;
  if (!lua_getstack(T, lvl, &ar) || !lua_getinfo(T, "S", &ar))
    return;
  char line[300];
  snprintf(line, sizeof line, " %s function at %s:%d",
           p->wakes ? "woke from hibernation into" : "spawned from",
           ar.short_src, ar.linedefined);
  luaL_addstring(b, line);
}

static void header(luaL_Buffer *b, mb_proc_t *p, lua_State *T, const char *what)
{
  char line[256], pid[MB_PID_TEXT_MAX];
  snprintf(line, sizeof line, "=%s==== %s", what, mb_pid_format(pid, sizeof pid, p->pid));
  luaL_addstring(b, line);
  if (p->name) {
    luaL_addstring(b, " registered as ");
    luaL_addstring(b, p->name);
  }
  const char *origin = atomic_load_explicit(&p->origin, memory_order_relaxed);
  if (origin) {
    luaL_addstring(b, p->wakes ? " woke from hibernation into module '"
                               : " spawned from module '");
    luaL_addstring(b, origin);
    luaL_addchar(b, '\'');
  } else if (T != p->L) {
    add_body_origin(b, p, T);
  }
  luaL_addchar(b, '\n');
}

/* What crash (under lua_cpcall) reports. */
typedef struct crash_args {
  mb_proc_t *p;
  lua_State *T;       /* where it failed */
  const char *text;   /* T == p->L: the error as text, read beforehand */
} crash_args_t;

/* Under lua_cpcall on p->L, so that no allocation of the report (its
 * closure included) can fail outside a protected call: LuaJIT would end
 * the host. */
static int crash(lua_State *L)
{
  crash_args_t *a = lua_touserdata(L, 1);
  mb_proc_t *p = a->p;
  lua_State *T = a->T;
  /* The error value at 2: T's (a dead coroutine: its value is read, not
   * taken), or the text read from p->L before the call. */
  if (T != L) {
    lua_pushvalue(T, -1);
    lua_xmove(T, L, 1);
  } else if (a->text) {
    lua_pushstring(L, a->text);
  } else {
    lua_pushnil(L);
  }
  const char *msg = p->alloc.oom
      ? "out of memory (the process went over its max_memory)"
      : error_text(L, 2);
  luaL_Buffer b;
  if (p->first) {
    /* As luajit: nothing for a nil error, no traceback for a value that
     * is not a string and has no __tostring. */
    if (lua_isnil(L, 2) && !p->alloc.oom)
      return 0;
    if (!lua_isstring(L, 2) && !luaL_getmetafield(L, 2, "__tostring")) {
      fputs("moonbeam: (error object is not a string)\n", stderr);
      return 0;
    }
    lua_pushfstring(L, "moonbeam: %s", msg);
  } else {
    luaL_buffinit(L, &b);
    header(&b, p, T, "CRASH REPORT");
    luaL_addstring(&b, "reason: ");
    size_t n = strlen(msg);
    if (n > MB_REPORT_REASON_MAX) {
      luaL_addlstring(&b, msg, MB_REPORT_REASON_MAX);
      lua_pushfstring(L, "... (%d bytes, cut)", (int)n);
      luaL_addvalue(&b);
    } else {
      luaL_addlstring(&b, msg, n);
    }
    luaL_pushresult(&b);
  }
  if (T != p->L)
    luaL_traceback(L, T, lua_tostring(L, -1), 0);
  lua_pushliteral(L, "\n");
  lua_concat(L, 2);
  fputs(lua_tostring(L, -1), stderr);
  fflush(stderr);
  return 0;
}

void mb_report_crash(mb_proc_t *p, lua_State *T)
{
  /* Report from the main thread: it is idle and has room, and T may be a
   * dead coroutine. A failure to report must not stop the exit. An error
   * of the main thread's own is read before the call, whose frame hides
   * it: a string as it is, anything else by its type (a boot fails with
   * strings). */
  lua_State *L = p->L;
  int top = lua_gettop(L);
  crash_args_t a = {p, T, NULL};
  char other[64];
  if (T == L && top > 0) {
    if (lua_type(L, top) == LUA_TSTRING) {
      a.text = lua_tostring(L, top);
    } else if (!lua_isnil(L, top)) {
      snprintf(other, sizeof other, "(error object is a %s value)", luaL_typename(L, top));
      a.text = other;
    }
  }
  char pid[MB_PID_TEXT_MAX];
  mb_run_host_lua(p, 1);
  int failed = lua_cpcall(L, crash, &a) != 0;
  mb_run_host_lua(p, 0);
  if (failed)
    fprintf(stderr, "=CRASH REPORT==== %s\nreason: %s (no report: %s)\n",
            mb_pid_format(pid, sizeof pid, p->pid),
            p->alloc.oom ? "out of memory" : "(unknown)",
            lua_isstring(L, -1) ? lua_tostring(L, -1) : "it failed");
  lua_settop(L, top);
}

void mb_report_exit(mb_proc_t *p, const mb_msg_t *reason)
{
  if (reason == NULL || (!p->alloc.oom && !mb_msg_is_string(reason, "out of memory")))
    return;
  char line[256], pid[MB_PID_TEXT_MAX];
  snprintf(line, sizeof line,
           "=CRASH REPORT==== %s%s%s\nreason: out of memory "
           "(the process went over its max_memory, or the host over its memory)\n",
           mb_pid_format(pid, sizeof pid, p->pid),
           p->name ? " registered as " : "", p->name ? p->name : "");
  fputs(line, stderr);
}
