/* test_bcdump.c: tests of the template repair of bytecode dumps (bcdump.h).
 *
 * Each case is a chunk returning a function that builds a table. It runs
 * compiled from source, loaded from its plain dump, and loaded from the
 * repaired dump, each in a state of its own whose allocator counts calls:
 * the repaired one must build the same tables with no more allocations
 * than the source (the plain dump's extra ones are the rehashes the repair
 * removes, so the cases show the check can fail). Then dumps cut short or
 * damaged must be refused or repaired into something that loads, never
 * read out of bounds (this program also runs under ASan).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "lauxlib.h"
#include "lualib.h"
#include "luajit.h"
#include "bcdump.h"

static long nalloc;

static void *counting(void *ud, void *ptr, size_t osize, size_t nsize)
{
  (void)ud;
  (void)osize;
  if (nsize == 0) {
    free(ptr);
    return NULL;
  }
  if (ptr == NULL || nsize > osize)
    nalloc++;
  return realloc(ptr, nsize);
}

typedef struct {
  unsigned char *p;
  size_t len;
} dump_t;

static int writer(lua_State *L, const void *p, size_t n, void *ud)
{
  (void)L;
  dump_t *d = ud;
  d->p = realloc(d->p, d->len + n);
  memcpy(d->p + d->len, p, n);
  d->len += n;
  return 0;
}

/* A table as sorted "key=value" lines, nested tables inline. */
static const char show_src[] =
  "local function show(v)\n"
  "  if type(v) ~= 'table' then return tostring(v) end\n"
  "  local ks = {}\n"
  "  for k, x in pairs(v) do ks[#ks + 1] = tostring(k) .. '=' .. show(x) end\n"
  "  table.sort(ks)\n"
  "  return '{' .. table.concat(ks, ',') .. '}'\n"
  "end\n"
  "return show\n";

static lua_State *state(void)
{
  lua_State *L = lua_newstate(counting, NULL);
  luaL_openlibs(L);
  /* The interpreter only: a trace may sink or hoist a loop's tables. */
  luaJIT_setmode(L, 0, LUAJIT_MODE_ENGINE | LUAJIT_MODE_OFF);
  if (luaL_loadstring(L, show_src) || lua_pcall(L, 0, 1, 0))
    abort();
  lua_setglobal(L, "show");
  return L;
}

/* Load chunk (source, or dump bytes) in a fresh state, run it for the
 * builder function, call that n times with GC stopped; returns the
 * allocations of the calls and the last result shown, in *shown. */
static long run(const char *chunk, size_t len, int n, char *shown, size_t cap)
{
  lua_State *L = state();
  if (luaL_loadbuffer(L, chunk, len, "=case") || lua_pcall(L, 0, 1, 0)) {
    snprintf(shown, cap, "error: %s", lua_tostring(L, -1));
    lua_close(L);
    return -1;
  }
  lua_gc(L, LUA_GCSTOP, 0);
  long before = nalloc;
  for (int i = 0; i < n; i++) {
    lua_pushvalue(L, -1);
    lua_pushinteger(L, i);
    lua_pushliteral(L, "b");
    lua_call(L, 2, 1);
    if (i < n - 1)
      lua_pop(L, 1);
  }
  long used = nalloc - before;
  lua_getglobal(L, "show");
  lua_insert(L, -2);
  lua_call(L, 1, 1);
  snprintf(shown, cap, "%s", lua_tostring(L, -1));
  lua_close(L);
  return used;
}

static dump_t dump_of(const char *src, int strip)
{
  dump_t d = {NULL, 0};
  lua_State *L = luaL_newstate();
  luaL_openlibs(L);
  if (luaL_loadstring(L, src))
    abort();
  if (strip) {   /* string.dump(f, true): no debug info */
    lua_getglobal(L, "string");
    lua_getfield(L, -1, "dump");
    lua_pushvalue(L, -3);
    lua_pushboolean(L, 1);
    lua_call(L, 2, 1);
    size_t n;
    const char *s = lua_tolstring(L, -1, &n);
    writer(L, s, n, &d);
  } else {
    lua_dump(L, writer, &d);
  }
  lua_close(L);
  return d;
}

typedef struct {
  const char *name, *src;
  int rehashes;   /* whether the plain dump is known to allocate more */
} case_t;

static const case_t cases[] = {
  {"two non-constant fields (a ring hop)",
   "return function(h, me) return {hop = h + 1, from = me} end", 0},
  {"three non-constant fields",
   "return function(a, b) return {a = a, b = b, c = a} end", 1},
  {"a tuple with a constant tag",
   "return function(v) return {'ok', v} end", 1},
  {"constants, positions, a nested table",
   "return function(a, b) return {x = 1, y = a, a, b, 7, z = {w = b, a}} end", 1},
  {"twelve fields",
   "return function(a, b) return {f1 = a, f2 = b, f3 = a, f4 = b, f5 = a, f6 = b,"
   " f7 = a, f8 = b, f9 = a, f10 = b, f11 = a, f12 = b} end", 1},
  {"a field set after the constructor",
   "return function(a) local t = {k = a, j = a}; t.later = a; return t end", 0},
  {"a key given twice",
   "return function(a) return {k = 1, k = a, j = a} end", 0},
  {"a nested function's constructor (child prototype)",
   "local function mk(a, b) return {a = a, b = b, c = b} end\n"
   "return function(a, b) return mk(a, b) end", 1},
  {"a constructor in a loop, register reused after",
   "return function(a, b)\n"
   "  local last\n"
   "  for i = 1, 3 do local t = {i = i, a = a}; last = t end\n"
   "  local u = {u = b}\n"
   "  return {last = last, u = u}\n"
   "end", 0},
  {"no constructor at all",
   "return function(a, b) return a .. b end", 0},
};

/* Allocations a call, from runs of 100 and 300 calls (what a state does
 * once, on its first calls, cancels out); -1 if it did not load. */
static long per_call(const char *chunk, size_t len, char *shown, size_t cap)
{
  long a = run(chunk, len, 100, shown, cap), b = run(chunk, len, 300, shown, cap);
  return a < 0 || b < 0 ? -1 : (b - a) / 200;
}

static void test_cases(int strip)
{
  char src_shown[512], plain_shown[512], fixed_shown[512];
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    const case_t *c = &cases[i];
    dump_t d = dump_of(c->src, strip);
    size_t flen = 0;
    unsigned char *fixed = mb_bcdump_presize(d.p, d.len, &flen);
    long from_src = per_call(c->src, strlen(c->src), src_shown, sizeof src_shown);
    long plain = per_call((const char *)d.p, d.len, plain_shown, sizeof plain_shown);
    long repaired = fixed ? per_call((const char *)fixed, flen, fixed_shown, sizeof fixed_shown)
                          : plain;
    if (!fixed)
      strcpy(fixed_shown, plain_shown);
    check(strcmp(src_shown, fixed_shown) == 0 && strcmp(src_shown, plain_shown) == 0,
          "%s%s: the same table (%s) from source, dump and repaired dump (%s)", c->name,
          strip ? ", stripped" : "", src_shown, fixed_shown);
    check(repaired >= 0 && repaired <= from_src,
          "%s%s: repaired dump allocates %ld a call, source %ld (plain dump %ld)",
          c->name, strip ? ", stripped" : "", repaired, from_src, plain);
    if (c->rehashes)
      check(fixed != NULL && plain > from_src,
            "%s%s: the plain dump allocates more (%ld > %ld), and is repaired", c->name,
            strip ? ", stripped" : "", plain, from_src);
    else if (strcmp(c->name, "no constructor at all") == 0)
      check(fixed == NULL, "%s%s: nothing to repair", c->name, strip ? ", stripped" : "");
    free(fixed);
    free(d.p);
  }
}

/* Every prefix of a dump, and the dump with each byte changed, is either
 * refused or repaired into bytes that LuaJIT's loader takes or refuses
 * cleanly; nothing is read out of bounds (ASan). */
static void test_damaged(void)
{
  const char *src = cases[2].src;
  dump_t d = dump_of(src, 0);
  int refused = 0, repaired = 0;
  for (size_t n = 0; n < d.len; n++) {
    unsigned char *cut = malloc(n ? n : 1);
    memcpy(cut, d.p, n);
    size_t flen;
    unsigned char *f = mb_bcdump_presize(cut, n, &flen);
    if (f)
      repaired++;
    else
      refused++;
    free(f);
    free(cut);
  }
  check(repaired == 0 && refused == (int)d.len,
        "every dump cut short is left as it is (%d of %zu)", refused, d.len);
  int loaded = 0;
  for (size_t i = 4; i < d.len; i++)
    for (int bit = 0; bit < 8; bit += 3) {
      unsigned char *bad = malloc(d.len);
      memcpy(bad, d.p, d.len);
      bad[i] ^= (unsigned char)(1u << bit);
      size_t flen;
      unsigned char *f = mb_bcdump_presize(bad, d.len, &flen);
      if (f)
        loaded++;
      free(f);
      free(bad);
    }
  check(loaded > 0, "damaged dumps: %d repaired, none read out of bounds", loaded);
  free(d.p);
}

int main(void)
{
  test_cases(0);
  test_cases(1);
  test_damaged();
  return check_summary();
}
