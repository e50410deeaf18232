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
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/random.h>
#include <sys/syscall.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "dist.h"
#include "io.h"
#include "lauxlib.h"
#include "lib.h"
#include "lstate.h"
#include "luajit.h"
#include "reg.h"
#include "run.h"
#include "sandbox.h"
#include "scheduler.h"
#include "sock.h"
#include "term.h"
#include "timer.h"

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
static mb_dist_opts_t dist;

/* -- Seeds for LuaJIT's states without a system call each -------------------
 * lua_newstate seeds each new state's PRNG (LuaJIT's hardening: string
 * hash seeds, allocator randomisation) with syscall(SYS_getrandom), a
 * system call per spawn and per wake from hibernation (measured: ~0.4 us, 3%
 * of a spawn). This executable defines `syscall`, to which the dynamic
 * linker binds LuaJIT's calls: a getrandom request of a state's size is
 * served from a per-thread xoshiro256** stream seeded once from the kernel
 * (unpredictable from outside, which is what those seeds need); every other
 * system call goes to the C library's syscall unchanged. Sanitizer builds
 * keep the plain system call. */
#ifndef MB_LIBC_MALLOC
static long (*real_syscall)(long, ...);
static pthread_once_t real_once = PTHREAD_ONCE_INIT;
static _Thread_local uint64_t seed_s[4];
static _Thread_local int seeded;

static void find_real_syscall(void)
{
  real_syscall = (long (*)(long, ...))dlsym(RTLD_NEXT, "syscall");
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static uint64_t next_seed(void)
{
  uint64_t r = rotl(seed_s[1] * 5, 7) * 9, t = seed_s[1] << 17;
  seed_s[2] ^= seed_s[0];
  seed_s[3] ^= seed_s[1];
  seed_s[1] ^= seed_s[2];
  seed_s[0] ^= seed_s[3];
  seed_s[2] ^= t;
  seed_s[3] = rotl(seed_s[3], 45);
  return r;
}

long syscall(long n, ...)
{
  va_list ap;
  long a[6];
  va_start(ap, n);
  for (int i = 0; i < 6; i++)
    a[i] = va_arg(ap, long);
  va_end(ap);
  pthread_once(&real_once, find_real_syscall);
  if (n == SYS_getrandom && a[2] == 0 && a[1] > 0 && a[1] <= 64) {
    if (!seeded) {
      if (getrandom(seed_s, sizeof seed_s, 0) != (ssize_t)sizeof seed_s)
        return real_syscall(n, a[0], a[1], a[2]);
      seeded = 1;
    }
    unsigned char *out = (unsigned char *)a[0];
    for (long i = 0; i < a[1]; i += 8) {
      uint64_t r = next_seed();
      memcpy(out + i, &r, a[1] - i < 8 ? (size_t)(a[1] - i) : 8);
    }
    return a[1];
  }
  return real_syscall(n, a[0], a[1], a[2], a[3], a[4], a[5]);
}
#endif

static void usage(FILE *f)
{
  fputs(
    "usage: moonbeam [host options] [options]... [script [args]...]\n"
    "Runs script as the first process of a Moonbeam host: Erlang-style\n"
    "processes (isolated LuaJIT states) on one scheduler thread per core.\n"
    "Host options:\n"
    "  --schedulers N   Scheduler threads (default: the number of cores).\n"
    "  --reductions N   Reductions per time slice before a process is\n"
    "                   preempted (default 500: 0.2 ms; one reduction is 0.4 us,\n"
    "                   or 100 VM instructions once a process computes);\n"
    "                   0 turns preemption off.\n"
    "  --max-memory N   Bytes all processes may hold (heaps, queued messages,\n"
    "                   timers, monitors, file buffers, records; K, M, G\n"
    "                   suffixes): over it the process holding the most is\n"
    "                   killed ('out of memory'; an essential one, see\n"
    "                   spawn_opt, only when no other is left and its end\n"
    "                   brings the host under) and reported,\n"
    "                   and no new process starts until the host is under it.\n"
    "  --watchdog MS    Report a process that holds a scheduler longer than\n"
    "                   MS without a preemption point, and move that\n"
    "                   scheduler's other work away (default 1000; 0: off).\n"
    "  --shutdown-timeout MS  How long a stop on SIGTERM may take before the\n"
    "                   host halts anyway (default 10000; 0: SIGTERM halts at\n"
    "                   once).\n"
    "  --sname NAME     Make the host a node of an Erlang cluster named\n"
    "                   NAME@<short host name> (as erl -sname).\n"
    "  --name NAME@HOST Make the host a node with a long name (as erl -name).\n"
    "  --cookie COOKIE  The cluster's secret (default: ~/.erlang.cookie,\n"
    "                   created as erl does when missing).\n"
    "  --net-ticktime S A connected node that is silent (or does not read)\n"
    "                   for S seconds is taken for dead (default 60, as\n"
    "                   erl's kernel net_ticktime).\n"
    "  --net-setuptime S A handshake with another node, either way, not done\n"
    "                   within S seconds is dropped (default 7, at most 120,\n"
    "                   as erl's kernel net_setuptime).\n"
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
    "any process, on SIGINT (130), or after a stop on SIGTERM: the first\n"
    "process and those spawned graceful get the exit signal \"shutdown\", and\n"
    "once they (and what their ends take down) have ended, the host halts\n"
    "(status as above, \"shutdown\" counting as normal; 143 if the stop ran\n"
    "past --shutdown-timeout or a second signal came).\n", f);
}

static int parse_int(const char *s, const char *opt, int min)
{
  char *end;
  long v = s ? strtol(s, &end, 10) : 0;
  if (s == NULL || *s == '\0' || *end || v < min || v > 1 << 20) {
    fprintf(stderr, "moonbeam: %s needs a whole number >= %d\n", opt, min);
    exit(1);
  }
  return (int)v;
}

/* A size: a number of bytes, or with a K, M or G suffix. */
static long long parse_bytes(const char *s, const char *opt)
{
  char *end;
  double v = s ? strtod(s, &end) : -1;
  if (s && (*end == 'k' || *end == 'K'))
    v *= 1024, end++;
  else if (s && (*end == 'm' || *end == 'M'))
    v *= 1024 * 1024, end++;
  else if (s && (*end == 'g' || *end == 'G'))
    v *= 1024.0 * 1024 * 1024, end++;
  if (s == NULL || *end || v < 1) {
    fprintf(stderr, "moonbeam: %s needs a size in bytes (a number, or with K, M or G)\n", opt);
    exit(1);
  }
  return (long long)v;
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
         strcmp(a, "--max-memory") == 0 || strcmp(a, "--watchdog") == 0 ||
         strcmp(a, "--shutdown-timeout") == 0 ||
         strcmp(a, "--sname") == 0 || strcmp(a, "--name") == 0 ||
         strcmp(a, "--cookie") == 0 || strcmp(a, "--net-ticktime") == 0 ||
         strcmp(a, "--net-setuptime") == 0 ||
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
    else if (strcmp(a, "--max-memory") == 0)
      o->max_memory = parse_bytes(argv[++i], a);
    else if (strncmp(a, "--max-memory=", 13) == 0)
      o->max_memory = parse_bytes(a + 13, "--max-memory");
    else if (strcmp(a, "--watchdog") == 0)
      o->watchdog_ms = parse_int(argv[++i], a, 0);
    else if (strncmp(a, "--watchdog=", 11) == 0)
      o->watchdog_ms = parse_int(a + 11, "--watchdog", 0);
    else if (strcmp(a, "--shutdown-timeout") == 0)
      o->shutdown_ms = parse_int(argv[++i], a, 0);
    else if (strncmp(a, "--shutdown-timeout=", 19) == 0)
      o->shutdown_ms = parse_int(a + 19, "--shutdown-timeout", 0);
    else if (strcmp(a, "--sname") == 0 || strcmp(a, "--name") == 0) {
      if (i + 1 >= argc) {
        fprintf(stderr, "moonbeam: %s needs a node name\n", a);
        exit(1);
      }
      dist.name = argv[++i];
      dist.longnames = a[2] == 'n';
    } else if (strcmp(a, "--cookie") == 0) {
      if (i + 1 >= argc || argv[i + 1][0] == '\0') {
        fprintf(stderr, "moonbeam: --cookie needs a cookie\n");
        exit(1);
      }
      dist.cookie = argv[++i];
    } else if (strcmp(a, "--net-ticktime") == 0) {
      dist.ticktime = (unsigned)parse_int(argv[++i], a, 1);
    } else if (strcmp(a, "--net-setuptime") == 0) {
      dist.setuptime = (unsigned)parse_int(argv[++i], a, 1);
    } else if (strcmp(a, "--allow-ffi") == 0)
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
  mb_lstate_lexer(L);
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
  mb_sched_opts_t opts = {.schedulers = 0, .slice_reds = MB_SLICE_REDS,
                          .watchdog_ms = MB_WATCHDOG_MS,
                          .shutdown_ms = MB_SHUTDOWN_MS};
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
  /* The subsystems, bottom up: each registers its hooks with the layers
   * below it (see host/LAYERS). */
  mb_alloc_init();
  mb_alloc_reserve(MB_ALLOC_RESERVE);
  mb_term_init();
  mb_reg_init();
  mb_io_init();
  mb_timer_init();
  mb_sock_init();
  mb_lib_init();
  mb_sched_on_empty_install();
  if (dist.name) {
    char err[256];
    if (mb_dist_start(&dist, err, sizeof err) < 0) {
      fprintf(stderr, "moonbeam: %s\n", err);
      return 1;
    }
  } else if (dist.cookie) {
    fprintf(stderr, "moonbeam: --cookie needs --sname or --name\n");
    return 1;
  }
  mb_proc_t *p;
  rc = mb_proc_new(0, &p);
  if (rc) {
    fprintf(stderr, "moonbeam: %s\n", mb_strerror(rc));
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
