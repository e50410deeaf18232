/* main.c: the `moonbeam` command - a drop-in for `luajit` whose script runs
 * as the first process of the host.
 *
 * Options are read the way luajit reads them (-e, -l, -i, -v, -E, -j, -O,
 * --, -), after the host's own long options (--schedulers, --reductions,
 * --allow-ffi, --allow-bytecode); `arg` is built exactly as luajit builds
 * it. The first process runs LUA_INIT, each -l and -e in order, then the
 * script with arg[1..n] as its `...`, then, with -i or with no script on a
 * terminal, the interactive prompt. The JIT is always off, so of luajit's
 * -j commands only -joff and -jflush (no-ops) are accepted; -O flags are
 * accepted and change nothing.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "lauxlib.h"
#include "lib.h"
#include "lstate.h"
#include "luajit.h"
#include "sandbox.h"
#include "scheduler.h"

#define MB_VERSION "0.1.0"

typedef struct cli {
  int argc;
  char **argv;
  int script;       /* index of the script in argv, or argc if none */
  int has_exec;     /* -e or -l given */
  int version;      /* -v (or -i) given */
  int interactive;  /* -i given */
  int stdin_script; /* the script is "-" */
  int noenv;        /* -E given */
} cli_t;

static cli_t cli;

static void usage(FILE *f)
{
  fputs(
    "usage: moonbeam [host options] [options]... [script [args]...]\n"
    "Runs script as the first process of a Moonbeam host: Erlang-style\n"
    "processes (isolated LuaJIT states) on one scheduler thread per core.\n"
    "Host options:\n"
    "  --schedulers N   Scheduler threads (default: the number of cores).\n"
    "  --reductions N   Reductions per time slice before a process is\n"
    "                   preempted (default 500, about 0.2 ms; one reduction is\n"
    "                   about 100 VM instructions); 0 turns preemption off.\n"
    "  --allow-ffi      Trust processes with native code: require \"ffi\",\n"
    "                   package.loadlib, string.buffer's raw pointers.\n"
    "  --allow-bytecode Let load, loadfile, dofile and require load binary\n"
    "                   chunks (LuaJIT does not verify bytecode).\n"
    "  -h, --help       Show this help.\n"
    "Options as in luajit:\n"
    "  -e chunk  Execute string 'chunk'.\n"
    "  -l name   Require library 'name'.\n"
    "  -i        Enter interactive mode after executing 'script'.\n"
    "  -v        Show version information.\n"
    "  -E        Ignore environment variables (LUA_INIT, LUA_PATH, LUA_CPATH).\n"
    "  -joff     Accepted, as -jflush: the JIT is always off. Other -j\n"
    "            commands are refused; -O[opt] is accepted and ignored.\n"
    "  --        Stop handling options.\n"
    "  -         Execute stdin and stop handling options.\n"
    "With no script, no -e and no -v, a terminal on stdin gets the prompt.\n"
    "The host exits when no process is left (status 0 if the first process\n"
    "ended normally, 1 if it crashed), on os.exit(code) or mb.halt(code) in\n"
    "any process, or on SIGINT/SIGTERM (130/143).\n", f);
}

static int parse_int(const char *s, const char *opt, int min)
{
  char *end;
  long v = s ? strtol(s, &end, 10) : 0;
  if (s == NULL || *end || v < min || v > 1 << 20) {
    fprintf(stderr, "moonbeam: %s needs a whole number >= %d\n", opt, min);
    exit(1);
  }
  return (int)v;
}

static void bad_usage(const char *fmt, const char *a)
{
  fputs("moonbeam: ", stderr);
  fprintf(stderr, fmt, a);
  fputc('\n', stderr);
  usage(stderr);
  exit(1);
}

/* -j cmd: the JIT is off in every process, so turning it off (or flushing
 * its empty trace cache) is a no-op and everything else is refused. */
static void jit_command(const char *cmd)
{
  size_t n = strcspn(cmd, "=");
  if ((n == 3 && strncmp(cmd, "off", 3) == 0) ||
      (n == 5 && strncmp(cmd, "flush", 5) == 0))
    return;
  fprintf(stderr, "moonbeam: -j%s: the JIT is always off in Moonbeam (compiled "
          "code cannot be preempted); only -joff and -jflush are accepted\n", cmd);
  exit(1);
}

/* Does argv[i] take the next argument as its value? */
static int takes_value(const char *a)
{
  return strcmp(a, "--schedulers") == 0 || strcmp(a, "--reductions") == 0 ||
         ((a[1] == 'e' || a[1] == 'l' || a[1] == 'j') && a[0] == '-' && a[2] == '\0');
}

/* Read the host's long options, then luajit's; set cli.script. */
static void parse(int argc, char **argv, mb_sched_opts_t *o)
{
  int i;
  cli.argc = argc;
  cli.argv = argv;
  for (i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (strcmp(a, "--schedulers") == 0)
      o->schedulers = parse_int(argv[++i], a, 1);
    else if (strncmp(a, "--schedulers=", 13) == 0)
      o->schedulers = parse_int(a + 13, "--schedulers", 1);
    else if (strcmp(a, "--reductions") == 0)
      o->slice_reds = parse_int(argv[++i], a, 0);
    else if (strncmp(a, "--reductions=", 13) == 0)
      o->slice_reds = parse_int(a + 13, "--reductions", 0);
    else if (strcmp(a, "--allow-ffi") == 0)
      mb_sandbox_opts.allow_ffi = 1;
    else if (strcmp(a, "--allow-bytecode") == 0)
      mb_sandbox_opts.allow_bytecode = 1;
    else if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
      usage(stdout);
      exit(0);
    } else if (a[0] != '-') {
      break;
    } else if (strcmp(a, "--") == 0) {
      i++;
      break;
    } else if (strcmp(a, "-") == 0) {
      cli.stdin_script = 1;
      break;
    } else if (a[1] == 'e' || a[1] == 'l' || a[1] == 'j') {
      if (takes_value(a) && ++i >= argc)
        bad_usage("'%s' needs an argument", a);
      if (a[1] == 'j')
        jit_command(a[2] ? a + 2 : argv[i]);
      else
        cli.has_exec = 1;
    } else if (a[1] == 'O') {
      /* luajit's optimisation flags: nothing is compiled here */
    } else if (strcmp(a, "-i") == 0) {
      cli.interactive = cli.version = 1;
    } else if (strcmp(a, "-v") == 0) {
      cli.version = 1;
    } else if (strcmp(a, "-E") == 0) {
      cli.noenv = 1;
    } else if (a[1] == 'b') {
      bad_usage("'%s': saving or listing bytecode is not supported (use luajit -b)", a);
    } else {
      bad_usage("unrecognized option '%s'", a);
    }
  }
  cli.script = i;
}

/* arg[i - script] = argv[i] for every i, as luajit does. */
static void push_arg_table(lua_State *L)
{
  int narg = cli.argc - cli.script - 1;
  lua_createtable(L, narg > 0 ? narg : 0, cli.script + 1);
  for (int i = 0; i < cli.argc; i++) {
    lua_pushstring(L, cli.argv[i]);
    lua_rawseti(L, -2, i - cli.script);
  }
}

/* The first process's body: LUA_INIT, -l and -e in order, then the script,
 * then the prompt (if any). */
static const char driver_src[] =
  "local items, script, n, repl = ...\n"
  "for i = 1, #items do\n"
  "  local it = items[i]\n"
  "  if type(it) == 'string' then require(it) else it() end\n"
  "end\n"
  "if not repl then\n"
  "  if script then return script(unpack(arg, 1, n)) end\n"
  "  return\n"
  "end\n"
  "if script then script(unpack(arg, 1, n)) end\n"
  "return repl()\n";

/* The interactive prompt, as luajit's (lua.c's): "> " and ">> " (or
 * _PROMPT and _PROMPT2); a line that ends inside a statement (its syntax
 * error ends in '<eof>') continues on the next; "=expr" prints expr; errors
 * go to stderr with a traceback; results are printed with print. It runs in
 * the first process, so mb.spawn and mb.receive work at the prompt, and it
 * reads lines with moonbeam.fs's read_line on the thread pool, so other
 * processes keep the scheduler while it waits. The end of input ends the
 * session and halts the host. */
static const char repl_src[] =
  "local read_line = require('moonbeam.fs').read_line\n"
  "local stdout, stderr = io.stdout, io.stderr\n"
  "local function prompt(first)\n"
  "  local p = _G[first and '_PROMPT' or '_PROMPT2']\n"
  "  if type(p) ~= 'string' and type(p) ~= 'number' then\n"
  "    p = first and '> ' or '>> '\n"
  "  end\n"
  "  stdout:write(p)\n"
  "  stdout:flush()\n"
  "end\n"
  "local function report(msg)\n"
  "  if msg == nil then return end\n"
  "  if type(msg) ~= 'string' and type(msg) ~= 'number' then\n"
  "    msg = '(error object is not a string)'\n"
  "  end\n"
  "  stderr:write(msg, '\\n')\n"
  "  stderr:flush()\n"
  "end\n"
  "local function traceback(msg)\n"
  "  if type(msg) ~= 'string' and type(msg) ~= 'number' then\n"
  "    local mt = debug.getmetatable(msg)\n"
  "    local ts = mt and rawget(mt, '__tostring')\n"
  "    if msg == nil or not ts then return msg end\n"
  "    msg = ts(msg)\n"
  "    if type(msg) ~= 'string' and type(msg) ~= 'number' then return msg end\n"
  "  end\n"
  "  local tb = debug.traceback(msg, 2)\n"
  "  return (tb:gsub(\"\\n\\t%[C%]: in function 'xpcall'\\n.*$\", ''))\n"
  "end\n"
  "local function show(ok, ...)\n"
  "  if not ok then return report((...)) end\n"
  "  if select('#', ...) > 0 then\n"
  "    local pok, err = pcall(print, ...)\n"
  "    if not pok then report(\"error calling 'print' (\" .. tostring(err) .. ')') end\n"
  "  end\n"
  "end\n"
  "stdout:write('JIT: off (Moonbeam preempts processes with a count hook)\\n')\n"
  "while true do\n"
  "  prompt(true)\n"
  "  local line = read_line()\n"
  "  if line == nil then break end\n"
  "  if line:sub(1, 1) == '=' then line = 'return ' .. line:sub(2) end\n"
  "  local f, err = loadstring(line, '=stdin')\n"
  "  while not f and type(err) == 'string' and err:sub(-7) == \"'<eof>'\" do\n"
  "    prompt(false)\n"
  "    local more = read_line()\n"
  "    if more == nil then line = nil break end\n"
  "    line = line .. '\\n' .. more\n"
  "    f, err = loadstring(line, '=stdin')\n"
  "  end\n"
  "  if line == nil then break end\n"
  "  if f then show(xpcall(f, traceback)) else report(err) end\n"
  "end\n"
  "stdout:write('\\n')\n"
  "stdout:flush()\n"
  "os.exit(0)\n";

/* Boot of the first process (protected, on its main thread): compile
 * everything first, so that a syntax error is reported like luajit does,
 * without a traceback. Leaves the driver and its four arguments. */
static int boot_first(lua_State *L)
{
  lua_settop(L, 0);
  push_arg_table(L);
  lua_setfield(L, LUA_GLOBALSINDEX, "arg");
  if (luaL_loadbuffer(L, driver_src, sizeof driver_src - 1, "=moonbeam"))
    return lua_error(L);
  lua_newtable(L);
  int n = 0;
  const char *init = cli.noenv ? NULL : getenv("LUA_INIT");
  if (init) {
    int st = init[0] == '@'
      ? mb_sandbox_loadfile(L, init + 1, NULL)
      : mb_sandbox_loadbuffer(L, init, strlen(init), "=LUA_INIT", NULL);
    if (st)
      return lua_error(L);
    lua_rawseti(L, -2, ++n);
  }
  for (int i = 1; i < cli.script && i < cli.argc; i++) {
    const char *a = cli.argv[i];
    int value = takes_value(a);
    if (a[0] == '-' && (a[1] == 'e' || a[1] == 'l')) {
      const char *val = value ? cli.argv[i + 1] : a + 2;
      if (a[1] == 'l')
        lua_pushstring(L, val);
      else if (mb_sandbox_loadbuffer(L, val, strlen(val), "=(command line)", NULL))
        return lua_error(L);
      lua_rawseti(L, -2, ++n);
    }
    i += value;
  }
  int no_script = cli.script >= cli.argc && !cli.stdin_script;
  int bare = no_script && !cli.has_exec && !cli.version;
  int tty_prompt = bare && isatty(0);
  if (!no_script && !cli.stdin_script) {
    if (mb_sandbox_loadfile(L, cli.argv[cli.script], NULL))
      return lua_error(L);
  } else if (cli.stdin_script || (bare && !tty_prompt)) {
    if (mb_sandbox_loadfile(L, NULL, NULL))
      return lua_error(L);
  } else {
    lua_pushnil(L);
  }
  lua_pushinteger(L, cli.argc - cli.script - 1);
  if (cli.interactive || tty_prompt) {
    if (tty_prompt)
      printf("Moonbeam %s -- %s\n", MB_VERSION, LUAJIT_VERSION);
    if (luaL_loadbuffer(L, repl_src, sizeof repl_src - 1, "=moonbeam.repl"))
      return lua_error(L);
  } else {
    lua_pushnil(L);
  }
  return 5;
}

int main(int argc, char **argv)
{
  mb_sched_opts_t opts = {.schedulers = 0, .slice_reds = MB_SLICE_REDS};
  signal(SIGPIPE, SIG_IGN);
  parse(argc, argv, &opts);
  mb_lstate_noenv = cli.noenv;
  if (cli.version) {
    printf("Moonbeam %s -- %s\n", MB_VERSION, LUAJIT_VERSION);
    fflush(stdout);
    if (cli.script >= argc && !cli.has_exec && !cli.interactive && !cli.stdin_script)
      return 0;
  }
  int rc = mb_sched_start(&opts);
  if (rc) {
    fprintf(stderr, "moonbeam: cannot start schedulers: %s\n", uv_strerror(rc));
    return 1;
  }
  mb_sched_on_empty_install();
  char err[256];
  mb_proc_t *p = mb_proc_new(0, err, sizeof err);
  if (p == NULL) {
    fprintf(stderr, "moonbeam: %s\n", err);
    return 1;
  }
  p->first = 1;
  p->boot = boot_first;
  mb_sched_enqueue(p);
  rc = mb_sched_run();
  if (rc) {
    fprintf(stderr, "moonbeam: cannot start scheduler threads: %s\n", strerror(-rc));
    return 1;
  }
  int code = mb_sched_wait();
  fflush(NULL);
  return code;
}
