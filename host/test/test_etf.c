/* test_etf.c: tests of the external term format codec (etf.h): round trips
 * Lua -> message -> ETF -> message -> Lua, terms built with ei, and a fuzz
 * loop that feeds the decoder truncated, mutated and random bytes, which
 * must never crash it (run under ASan+UBSan too). Every check prints one
 * line; the exit code is 0 only if all passed.
 */
#define _POSIX_C_SOURCE 200809L
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "copy.h"
#include "ei.h"
#include "etf.h"
#include "lauxlib.h"
#include "lualib.h"
#include "remote.h"
#include "term.h"

static lua_State *A, *B;

static int l_atom(lua_State *L)
{
  size_t n;
  const char *s = luaL_checklstring(L, 1, &n);
  mb_id_push(L, (uint64_t)mb_atom_intern(s, n), &mb_atom_kind);
  return 1;
}

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

static int l_is_tuple(lua_State *L)
{
  lua_pushboolean(L, mb_tuple_test(L, 1, NULL));
  return 1;
}

static lua_State *new_state(void)
{
  lua_State *L = luaL_newstate();
  luaL_openlibs(L);
  lua_register(L, "atom", l_atom);
  lua_register(L, "tuple", l_tuple);
  lua_register(L, "is_tuple", l_is_tuple);
  const char *eq =
    "function deq(a, b, seen)\n"
    "  if a == b then return true end\n"
    "  if type(a) ~= 'table' or type(b) ~= 'table' then return false end\n"
    "  if is_tuple(a) ~= is_tuple(b) then return false end\n"
    "  for k, v in pairs(a) do if not deq(v, b[k]) then return false end end\n"
    "  for k in pairs(b) do if a[k] == nil then return false end end\n"
    "  return true\n"
    "end\n";
  if (luaL_dostring(L, eq))
    exit(2);
  return L;
}

/* Encode `expr` in A, through ETF, decode in B as global `got`; returns
 * the ETF size or -1 with err. */
static long through_etf(const char *expr, char *err, size_t errlen)
{
  char code[4096];
  snprintf(code, sizeof code, "return %s", expr);
  if (luaL_loadstring(A, code) || lua_pcall(A, 0, 1, 0)) {
    fprintf(stderr, "bad test code %s: %s\n", expr, lua_tostring(A, -1));
    exit(2);
  }
  mb_msg_t *m = mb_copy_encode(A, -1, 1, "msg", NULL, err, errlen);
  lua_pop(A, 1);
  if (!m)
    return -1;
  long size = mb_etf_size(m, 0, err, errlen);
  if (size < 0) {
    mb_msg_free(m);
    return -1;
  }
  char *buf = malloc((size_t)size);
  mb_etf_write(m, 0, buf);
  mb_msg_free(m);
  long idx = 0;
  mb_msg_t *back;
  int rc = mb_etf_decode(buf, size, &idx, 0, &back);
  free(buf);
  if (rc < 0 || idx != size) {
    snprintf(err, errlen, "decode failed: %d", rc);
    return -1;
  }
  mb_copy_decode(B, back);
  lua_setglobal(B, "got");
  mb_msg_free(back);
  return size;
}

static bool b_true(const char *expr)
{
  char code[4096];
  snprintf(code, sizeof code, "return %s", expr);
  if (luaL_loadstring(B, code) || lua_pcall(B, 0, 1, 0)) {
    printf("     (check raised: %s)\n", lua_tostring(B, -1));
    lua_settop(B, 0);
    return false;
  }
  bool r = lua_toboolean(B, -1);
  lua_settop(B, 0);
  return r;
}

/* Lua value in A -> ETF -> B, where `check` (about `got`) must hold. */
static void trip(const char *expr, const char *check_expr)
{
  char err[256];
  long n = through_etf(expr, err, sizeof err);
  if (n < 0) {
    check(false, "%s -> ETF: %s", expr, err);
    return;
  }
  check(b_true(check_expr), "%s -> ETF -> %s", expr, check_expr);
}

static void refused(const char *expr, const char *part)
{
  char err[256];
  long n = through_etf(expr, err, sizeof err);
  check(n < 0 && strstr(err, part) != NULL, "%s is refused (%s): %s", expr, part,
        n < 0 ? err : "accepted");
}

/* ETF built with ei -> message -> B. */
static int from_ei(ei_x_buff *x, int flags)
{
  long idx = 0;
  mb_msg_t *m;
  int rc = mb_etf_decode(x->buff, x->index, &idx, flags, &m);
  if (rc < 0)
    return rc;
  mb_copy_decode(B, m);
  lua_setglobal(B, "got");
  mb_msg_free(m);
  return 0;
}

static void test_round_trips(void)
{
  trip("42", "got == 42");
  trip("-7", "got == -7");
  trip("2^53", "got == 2^53");
  trip("2^60", "got == 2^60");
  trip("1.5", "got == 1.5");
  trip("-0.0", "got == 0 and 1/got < 0");
  trip("1e300", "got == 1e300");
  trip("true", "got == true");
  trip("false", "got == false");
  trip("'hello'", "got == 'hello'");
  trip("'a\\0b'", "got == 'a\\0b'");
  trip("string.rep('x', 70000)", "#got == 70000");
  trip("{}", "type(got) == 'table' and next(got) == nil");
  trip("{1, 2, 3}", "deq(got, {1, 2, 3})");
  trip("{1, 'two', {3}}", "deq(got, {1, 'two', {3}})");
  trip("{a = 1, b = 'x'}", "deq(got, {a = 1, b = 'x'})");
  trip("{1, 2, x = 3}", "deq(got, {1, 2, x = 3})");
  trip("{[10] = 'ten', [2.5] = 'f'}", "deq(got, {[10] = 'ten', [2.5] = 'f'})");
  trip("{1, 2, ['$tail'] = 3}", "deq(got, {1, 2, ['$tail'] = 3})");
  trip("atom('ok')", "got == atom('ok') and tostring(got) == 'ok'");
  trip("atom('nil')", "got == atom('nil')");
  trip("{atom('nil')}", "#got == 0 or got[1] == nil");
  trip("tuple(atom('ok'), 1, 'x')", "is_tuple(got) and got.n == 3 and got[1] == atom('ok') and got[3] == 'x'");
  trip("tuple()", "is_tuple(got) and got.n == 0");
  trip("tuple(1, nil, 3)", "is_tuple(got) and got.n == 3 and got[2] == nil and got[3] == 3");
  trip("{[tuple(1, 2)] = 'k'}", "(function() for k, v in pairs(got) do return is_tuple(k) and k[2] == 2 and v == 'k' end end)()");
  trip("(function() local t = {1} return {t, t} end)()", "deq(got, {{1}, {1}})");
  trip("{['true'] = 1}", "got['true'] == 1");
  refused("function() end", "function");
  refused("{f = print}", "function");
  refused("1/0", "inf");
  refused("0/0", "nan");
  refused("(function() local t = {} t[1] = t return t end)()", "contains itself");
  refused("{[string.rep('k', 300)] = 1}", "255 bytes");
}

static void test_from_erlang(void)
{
  ei_x_buff x;
  ei_x_new_with_version(&x);
  ei_x_encode_string(&x, "hi");          /* an Erlang string */
  check(from_ei(&x, 0) == 0 && b_true("deq(got, {104, 105})"), "\"hi\" arrives as {104, 105}");
  ei_x_free(&x);

  ei_x_new_with_version(&x);
  ei_x_encode_map_header(&x, 2);
  ei_x_encode_atom(&x, "name");
  ei_x_encode_binary(&x, "bob", 3);
  ei_x_encode_binary(&x, "k", 1);
  ei_x_encode_atom(&x, "nil");
  check(from_ei(&x, 0) == 0 && b_true("got.name == 'bob' and got.k == nil"),
        "#{name => <<\"bob\">>, <<\"k\">> => nil} arrives as {name = 'bob'}");
  ei_x_free(&x);

  ei_x_new_with_version(&x);
  ei_x_encode_atom(&x, "nil");
  check(from_ei(&x, 0) == 0 && b_true("got == atom('nil')"), "a top-level nil atom is the atom value");
  ei_x_free(&x);

  ei_x_new_with_version(&x);
  ei_x_encode_atom(&x, "noconnection");
  check(from_ei(&x, MB_ETF_REASON) == 0 && b_true("got == 'noconnection'"),
        "an atom reason arrives as a string");
  ei_x_free(&x);

  ei_x_new_with_version(&x);
  ei_x_format_wo_ver(&x, "[~i, ~i]", 1, 2);
  check(from_ei(&x, 0) == 0 && b_true("deq(got, {1, 2})"), "a list");
  ei_x_free(&x);

  ei_x_new_with_version(&x);
  ei_x_encode_list_header(&x, 1);
  ei_x_encode_atom(&x, "alias");
  ei_x_encode_long(&x, 7);             /* improper tail */
  check(from_ei(&x, 0) == 0 && b_true("got[1] == atom('alias') and got['$tail'] == 7"),
        "[alias | 7] arrives with $tail");
  ei_x_free(&x);

  /* A tail that arrives as an empty table ends the list as [] does: "" is
   * [] in Erlang, and #{} arrives as {} and goes back as []. */
  static const char *const empty_tails[] = {"k\0\0", "t\0\0\0\0"};
  for (int k = 0; k < 2; k++) {
    ei_x_new_with_version(&x);
    ei_x_encode_list_header(&x, 1);
    ei_x_encode_atom(&x, "a");
    ei_x_append_buf(&x, empty_tails[k], k ? 5 : 3);
    check(from_ei(&x, 0) == 0 && b_true("got[1] == atom('a') and got['$tail'] == nil"),
          "[a | %s] arrives as {a}", k ? "#{}" : "\"\"");
    ei_x_free(&x);
  }

  /* A big integer beyond 64 bits. */
  ei_x_new_with_version(&x);
  char big[] = {'n', 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1};
  ei_x_append_buf(&x, big, sizeof big);
  check(from_ei(&x, 0) == 0 && b_true("got == 2^64"), "a bignum arrives as the nearest number");
  ei_x_free(&x);

  /* Beyond a double's range: the largest number, not inf (which cannot be
   * sent back: Erlang has none). */
  for (int neg = 0; neg <= 1; neg++) {
    ei_x_new_with_version(&x);
    char huge[6 + 300] = {'o', 0, 0, 1, 44, (char)neg};
    huge[6 + 299] = 1;                 /* 2^2392 */
    ei_x_append_buf(&x, huge, sizeof huge);
    check(from_ei(&x, 0) == 0 && b_true(neg ? "got == -1.7976931348623157e308"
                                            : "got == 1.7976931348623157e308"),
          "a bignum beyond a double's range arrives as the largest number (%s)",
          neg ? "negative" : "positive");
    ei_x_free(&x);
  }
  char err[256];
  check(through_etf("1.7976931348623157e308", err, sizeof err) > 0 &&
        b_true("got == 1.7976931348623157e308"), "and goes back");

  /* A fun: unsupported, not malformed. */
  ei_x_new_with_version(&x);
  ei_x_encode_tuple_header(&x, 2);
  ei_x_encode_atom(&x, "f");
  char exp[] = {'q', 's', 1, 'm', 's', 1, 'f', 'a', 0};
  ei_x_append_buf(&x, exp, sizeof exp);
  check(from_ei(&x, 0) == MB_ETF_UNSUPPORTED, "a message with a fun is unsupported");
  ei_x_free(&x);
}

/* The decoder on bytes: returns its result; the message, if any, is
 * rebuilt in B under pcall (it must never fail for a decoded message). */
static int feed(const char *buf, long len, bool *rebuilt_ok)
{
  long idx = 0;
  mb_msg_t *m;
  int rc = mb_etf_decode(buf, len, &idx, 0, &m);
  *rebuilt_ok = true;
  if (rc == 0) {
    if (idx > len)
      *rebuilt_ok = false;
    /* mb_copy_decode raises on a corrupt message: it must not. */
    lua_settop(B, 0);
    mb_copy_decode(B, m);
    lua_settop(B, 0);
    mb_msg_free(m);
  }
  return rc;
}

static unsigned long long rng = 88172645463325252ull;
static unsigned rnd(void)
{
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return (unsigned)rng;
}

static void test_fuzz(void)
{
  /* A term with every supported tag. */
  ei_x_buff x;
  ei_x_new_with_version(&x);
  ei_x_format_wo_ver(&x, "{~a, ~i, ~f, ~s, [~i, {~a, ~i}]}", "ok", 123456, 2.5,
                     "str", 1, "x", -5);
  ei_x_encode_binary(&x, "binary", 6);
  erlang_pid p = {"other@host", 12, 3, 77};
  erlang_ref r = {"other@host", 3, {1, 2, 3}, 77};
  ei_x_encode_list_header(&x, 3);
  ei_x_encode_pid(&x, &p);
  ei_x_encode_ref(&x, &r);
  ei_x_encode_map_header(&x, 1);
  ei_x_encode_atom(&x, "k");
  ei_x_encode_longlong(&x, 1ll << 60);
  ei_x_encode_empty_list(&x);
  bool ok = true;
  int crashes = 0;
  /* Keep only the tuple: re-encode as one term. */
  ei_x_buff y;
  ei_x_new_with_version(&y);
  ei_x_encode_tuple_header(&y, 3);
  ei_x_append_buf(&y, x.buff + 1, x.index - 1);
  int rc0 = feed(y.buff, y.index, &ok);
  check(rc0 == 0 && ok, "the sample term decodes (%d)", rc0);

  int decoded = 0, malformed = 0;
  for (long cut = 0; cut < y.index; cut++) {
    int rc = feed(y.buff, cut, &ok);
    malformed += rc == MB_ETF_MALFORMED;
    crashes += !ok;
  }
  check(malformed == y.index && crashes == 0, "every truncation is malformed (%d of %d)", malformed, y.index);

  char *buf = malloc((size_t)y.index);
  for (int round = 0; round < 200000; round++) {
    memcpy(buf, y.buff, (size_t)y.index);
    int flips = 1 + rnd() % 4;
    for (int k = 0; k < flips; k++) {
      int at = (int)(rnd() % (unsigned)y.index);
      switch (rnd() % 4) {
      case 0: buf[at] = (char)rnd(); break;
      case 1: buf[at] ^= (char)(1 << (rnd() % 8)); break;
      case 2: buf[at] = (char)(rnd() % 2 ? 0xFF : 0); break;
      default: buf[at] = "abcdFhijklmnostvwXZgrekqpMfYx"[rnd() % 29]; break;
      }
    }
    int rc = feed(buf, y.index, &ok);
    decoded += rc == 0;
    crashes += !ok;
  }
  check(crashes == 0, "200000 mutated terms: no crash (%d still decoded)", decoded);
  free(buf);

  char rbuf[256];
  for (int round = 0; round < 200000; round++) {
    int n = 1 + (int)(rnd() % sizeof rbuf);
    for (int k = 0; k < n; k++)
      rbuf[k] = (char)(k == 0 ? 131 : rnd());
    feed(rbuf, n, &ok);
    crashes += !ok;
  }
  check(crashes == 0, "200000 random byte strings: no crash");

  /* Hostile lengths and nesting. */
  char huge[] = {(char)131, 'l', 0x7F, (char)0xFF, (char)0xFF, (char)0xFF, 'j'};
  check(feed(huge, sizeof huge, &ok) == MB_ETF_MALFORMED, "a list claiming 2^31 elements is malformed");
  char hbin[] = {(char)131, 'm', (char)0xFF, (char)0xFF, (char)0xFF, (char)0xF0, 'x'};
  check(feed(hbin, sizeof hbin, &ok) == MB_ETF_MALFORMED, "a binary longer than its bytes is malformed");
  char longref[] = {(char)131, 'Z', 0, 9, 's', 1, 'n', 0, 0, 0, 1};
  check(feed(longref, sizeof longref, &ok) == MB_ETF_MALFORMED, "a ref of 9 words is malformed");
  char deep[2000];
  deep[0] = (char)131;
  int n = 1;
  for (int k = 0; k < 500; k++) {
    deep[n++] = 'h';
    deep[n++] = 1;
  }
  deep[n++] = 'j';
  check(feed(deep, n, &ok) == MB_ETF_MALFORMED, "500 nested tuples are malformed (too deep)");
  char nan[] = {(char)131, 'F', 0x7F, (char)0xF8, 0, 0, 0, 0, 0, 0};
  check(feed(nan, sizeof nan, &ok) == MB_ETF_MALFORMED, "a NaN float is malformed");
  char cache[] = {(char)131, 'C', 1};
  check(feed(cache, sizeof cache, &ok) == MB_ETF_MALFORMED, "an atom cache reference is malformed");
  ei_x_free(&x);
  ei_x_free(&y);
}

/* FLOAT_EXT: 31 bytes of text, which ei reads with sscanf - on to the
 * first NUL, wherever that is. */
static void test_old_floats(void)
{
  char buf[64];
  memset(buf, 0, sizeof buf);
  buf[0] = (char)131;
  buf[1] = 'c';
  memcpy(buf + 2, "1.50000000000000000000e+00", 26);
  long idx = 0;
  mb_msg_t *m;
  check(mb_etf_decode(buf, 33, &idx, 0, &m) == 0 && idx == 33, "a FLOAT_EXT decodes");
  mb_copy_decode(B, m);
  lua_setglobal(B, "got");
  mb_msg_free(m);
  check(b_true("got == 1.5"), "to its value");
  memset(buf + 2, '1', 31);             /* no NUL: sscanf would go on ... */
  memcpy(buf + 33, "999", 3);           /* ... into bytes that are not the term's */
  idx = 0;
  m = NULL;
  int rc = mb_etf_decode(buf, 33, &idx, 0, &m);
  check(rc == MB_ETF_MALFORMED, "a FLOAT_EXT with no NUL in its 31 bytes is malformed (%d)", rc);
  mb_msg_free(m);
}

/* `levels` one-element lists around the term `inner` (n bytes): the
 * inner term sits at depth `levels`. */
static long nest(char *buf, int levels, const char *inner, int n)
{
  long k = 0;
  buf[k++] = (char)131;
  for (int i = 0; i < levels; i++) {
    memcpy(buf + k, "l\0\0\0\1", 5);
    k += 5;
  }
  memcpy(buf + k, inner, (size_t)n);
  k += n;
  for (int i = 0; i < levels; i++)
    buf[k++] = 'j';
  return k;
}

/* What decodes can be sent back: the encoder writes tables and tuples at
 * depths 0..MB_ETF_MAX_DEPTH-1, so the decoder takes no more (a [] or an
 * Erlang string is a table too; a proper list's [] tail is not). */
static void test_depth(void)
{
  static const struct { const char *what, *bytes; int n; } inner[] = {
    {"an empty tuple", "h\0", 2}, {"[]", "j", 1}, {"a string", "k\0\1x", 4},
    {"an empty map", "t\0\0\0\0", 5}, {"a list", "l\0\0\0\1a\1j", 8},
  };
  char buf[2048];
  for (size_t i = 0; i < sizeof inner / sizeof inner[0]; i++) {
    long len = nest(buf, MB_ETF_MAX_DEPTH - 1, inner[i].bytes, inner[i].n), idx = 0;
    mb_msg_t *m = NULL;
    int rc = mb_etf_decode(buf, len, &idx, 0, &m);
    char err[256] = "";
    long back = m ? mb_etf_size(m, 0, err, sizeof err) : -1;
    check(rc == 0 && back > 0, "%s at depth %d decodes and goes back (%d, %s)",
          inner[i].what, MB_ETF_MAX_DEPTH - 1, rc, err);
    mb_msg_free(m);
    len = nest(buf, MB_ETF_MAX_DEPTH, inner[i].bytes, inner[i].n);
    idx = 0;
    m = NULL;
    rc = mb_etf_decode(buf, len, &idx, 0, &m);
    check(rc == MB_ETF_MALFORMED, "%s at depth %d is malformed (%d)", inner[i].what,
          MB_ETF_MAX_DEPTH, rc);
    mb_msg_free(m);
  }
  /* A leaf at MB_ETF_MAX_DEPTH is what the encoder writes inside its deepest table. */
  long len = nest(buf, MB_ETF_MAX_DEPTH, "a\7", 2), idx = 0;
  mb_msg_t *m = NULL;
  check(mb_etf_decode(buf, len, &idx, 0, &m) == 0, "a number at depth %d decodes",
        MB_ETF_MAX_DEPTH);
  mb_msg_free(m);
}

/* Atoms: what Erlang's decoder takes and ei's encoder writes back - at
 * most 255 characters, and UTF-8 ones valid UTF-8. */
static void test_atoms(void)
{
  static const struct { const char *what; const char *bytes; int n; int ok; } atoms[] = {
    {"a UTF-8 atom cut inside a character", "w\6norma\xd6", 8, 0},
    {"a UTF-8 atom with a stray continuation byte", "w\2a\x80", 4, 0},
    {"a UTF-8 atom with an overlong form", "w\2\xc0\xaf", 4, 0},
    {"a UTF-8 atom with a surrogate", "w\3\xed\xa0\x80", 5, 0},
    {"a UTF-8 atom past U+10FFFF", "w\4\xf4\x90\x80\x80", 6, 0},
    {"a UTF-8 atom of 2-, 3- and 4-byte characters", "w\11\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80", 11, 1},
    {"a Latin-1 atom", "s\4caf\xe9", 6, 1},
  };
  char buf[2048];
  for (size_t i = 0; i < sizeof atoms / sizeof atoms[0]; i++) {
    buf[0] = (char)131;
    memcpy(buf + 1, atoms[i].bytes, (size_t)atoms[i].n);
    long idx = 0;
    mb_msg_t *m = NULL;
    int rc = mb_etf_decode(buf, 1 + atoms[i].n, &idx, 0, &m);
    long back = m ? mb_etf_size(m, 0, NULL, 0) : -1;
    check(atoms[i].ok ? rc == 0 && back > 0 : rc == MB_ETF_MALFORMED, "%s %s (%d)",
          atoms[i].what, atoms[i].ok ? "decodes and goes back" : "is malformed", rc);
    mb_msg_free(m);
  }
  /* Erlang allows a NUL in an atom: the name keeps its end. */
  static const char nul[] = {(char)131, 'w', 3, 'a', 0, 'b'};
  for (int flags = 0; flags <= MB_ETF_REASON; flags += MB_ETF_REASON) {
    long idx = 0;
    mb_msg_t *m = NULL;
    check(mb_etf_decode(nul, sizeof nul, &idx, flags, &m) == 0, "an atom with a NUL decodes");
    if (m) {
      mb_copy_decode(B, m);
      lua_setglobal(B, "got");
    }
    mb_msg_free(m);
    check(b_true(flags ? "got == 'a\\0b'" : "tostring(got) == 'a\\0b'"),
          "with all of its name (%s)", flags ? "a reason, as a string" : "an atom");
  }
  /* What is sent as an atom must be what the decoder takes (ei's encoder
   * checks less: a lead byte past 0xF4, an overlong form, a surrogate). */
  refused("{['\\xf6\\x82\\x82\\x82'] = 1}", "not valid UTF-8");
  refused("{['\\xc0\\xaf'] = 1}", "not valid UTF-8");
  refused("atom('\\xed\\xa0\\x80')", "atom");
  lua_pushstring(A, "\xf6\x82\x82\x82");
  mb_msg_t *r = mb_copy_encode(A, -1, 1, "reason", NULL, NULL, 0);
  lua_pop(A, 1);
  long rsize = r ? mb_etf_size(r, MB_ETF_REASON, NULL, 0) : -1;
  char rbuf[64];
  long ridx = 0;
  mb_msg_t *rback = NULL;
  if (rsize > 0 && rsize <= (long)sizeof rbuf)
    mb_etf_write(r, MB_ETF_REASON, rbuf);
  int rrc = rsize > 0 ? mb_etf_decode(rbuf, rsize, &ridx, MB_ETF_REASON, &rback) : -9;
  check(rrc == 0, "a reason that is not valid UTF-8 goes as a binary and comes back (%d)", rrc);
  mb_msg_free(r);
  mb_msg_free(rback);
  /* 255 characters, not bytes. */
  for (int chars = 255; chars <= 256; chars++) {
    for (int utf8 = 0; utf8 <= 1; utf8++) {
      int n = chars * (utf8 ? 2 : 1);
      buf[0] = (char)131;
      buf[1] = utf8 ? 'v' : 'd';
      buf[2] = (char)(n >> 8);
      buf[3] = (char)n;
      for (int k = 0; k < chars; k++) {
        if (utf8)
          memcpy(buf + 4 + 2 * k, "\xc3\xa9", 2);
        else
          buf[4 + k] = 'a';
      }
      long idx = 0;
      mb_msg_t *m = NULL;
      int rc = mb_etf_decode(buf, 4 + n, &idx, 0, &m);
      long back = m ? mb_etf_size(m, 0, NULL, 0) : -1;
      check(chars == 255 ? rc == 0 && back > 0 : rc == MB_ETF_MALFORMED,
            "a %s atom of %d characters %s (%d)", utf8 ? "UTF-8" : "Latin-1", chars,
            chars == 255 ? "decodes and goes back" : "is malformed", rc);
      mb_msg_free(m);
    }
  }
}

/* A fun as OTP 25 writes it: term_to_binary({fun(X) -> X + 1 end, 1}).
 * NEW_FUN_EXT's size field counts itself and what follows, not the tag. */
static const unsigned char fun_pair[] = {
  131, 104, 2, 112, 0, 0, 0, 69, 1, 163, 39, 205, 248, 96, 217, 228, 140, 226, 76, 76, 100,
  82, 92, 163, 227, 0, 0, 0, 0, 0, 0, 0, 0, 100, 0, 1, 116, 97, 0, 98, 5, 25, 62, 111, 88,
  100, 0, 13, 110, 111, 110, 111, 100, 101, 64, 110, 111, 104, 111, 115, 116, 0, 0, 0, 9, 0,
  0, 0, 0, 0, 0, 0, 0, 97, 1};

static void test_funs(void)
{
  long len = sizeof fun_pair, idx = 0;
  mb_msg_t *m;
  check(mb_etf_check((const char *)fun_pair, len, &idx) == 0 && idx == len,
        "a fun followed by another term checks to its end (%ld of %ld)", idx, len);
  idx = 0;
  check(mb_etf_decode((const char *)fun_pair, len, &idx, 0, &m) == MB_ETF_UNSUPPORTED &&
        idx == len, "a message holding a fun and more is unsupported, not malformed");
  /* Its parts must fit its size: ei_skip_term reads them. */
  unsigned char lying[sizeof fun_pair];
  memcpy(lying, fun_pair, sizeof lying);
  lying[35] = 38;                       /* the module atom 't' claims 38 bytes,
                                           which end inside the next term */
  idx = 0;
  check(mb_etf_check((const char *)lying, len, &idx) == MB_ETF_MALFORMED,
        "a fun whose module atom runs past its size is malformed");
  memcpy(lying, fun_pair, sizeof lying);
  lying[32] = 1;                        /* one free variable that is not there */
  idx = 0;
  check(mb_etf_check((const char *)lying, len, &idx) == MB_ETF_MALFORMED,
        "a fun with more free variables than its size holds is malformed");
}

/* Remote refs are held only by the states that have them (remote.h). */
static void test_remote_ref_holds(void)
{
  for (int k = 0; k < 2; k++) {   /* earlier tests' garbage lets go first */
    lua_gc(A, LUA_GCCOLLECT, 0);
    lua_gc(B, LUA_GCCOLLECT, 0);
  }
  uint32_t base = mb_remote_ref_count();
  ei_x_buff x;
  ei_x_new_with_version(&x);
  erlang_ref r = {"other@host", 3, {1, 2, 3}, 77};
  ei_x_encode_tuple_header(&x, 2);
  ei_x_encode_ref(&x, &r);
  ei_x_encode_ref(&x, &r);
  long idx = 0;
  mb_msg_t *m;
  check(mb_etf_decode(x.buff, x.index, &idx, 0, &m) == 0, "a tuple of two remote refs decodes");
  check(mb_remote_ref_count() == base, "a message in transit holds no remote ref (%u)",
        mb_remote_ref_count() - base);
  mb_copy_decode(B, m);
  lua_setglobal(B, "held");
  check(mb_remote_ref_count() == base + 1, "a state that has it holds it once");
  check(b_true("held[1] == held[2] and tostring(held[1]):find('^#Ref<') ~= nil"),
        "the two are one value in the state");
  /* Back out to ETF from the state: the same ref. */
  lua_getglobal(B, "held");
  char err[128];
  mb_msg_t *out = mb_copy_encode(B, -1, 1, "msg", NULL, err, sizeof err);
  lua_pop(B, 1);
  long n = out ? mb_etf_size(out, 0, err, sizeof err) : -1;
  char *buf = n > 0 ? malloc((size_t)n) : NULL;
  if (buf)
    mb_etf_write(out, 0, buf);
  int i = 1, arity = 0;
  erlang_ref back;
  bool same = buf && ei_decode_tuple_header(buf, &i, &arity) == 0 && arity == 2 &&
              ei_decode_ref(buf, &i, &back) == 0 && back.len == 3 && back.n[2] == 3 &&
              back.creation == 77 && strcmp(back.node, "other@host") == 0;
  check(same, "a remote ref goes back to ETF unchanged");
  free(buf);
  mb_msg_free(out);
  mb_msg_free(m);
  lua_pushnil(B);
  lua_setglobal(B, "held");
  lua_gc(B, LUA_GCCOLLECT, 0);
  lua_gc(B, LUA_GCCOLLECT, 0);
  check(mb_remote_ref_count() == base, "collected, it is freed (%u held)",
        mb_remote_ref_count() - base);
  /* A control message's ref is held for the caller until released; an
   * id of a freed entry names nothing afterwards. */
  i = 1;
  ei_decode_tuple_header(x.buff, &i, &arity);
  mb_ref_t id;
  check(mb_etf_get_ref(x.buff, &i, &id) == 0 && mb_remote_ref_count() == base + 1,
        "mb_etf_get_ref holds the ref");
  mb_remote_ref_release(id);
  mb_rref_t rr;
  check(mb_remote_ref_count() == base && mb_remote_ref_get(id, &rr) < 0,
        "released, its id names nothing");
  i = 1;
  ei_decode_tuple_header(x.buff, &i, &arity);
  mb_ref_t id2;
  mb_etf_get_ref(x.buff, &i, &id2);
  check(id2 != id && mb_remote_ref_get(id2, &rr) == 0, "interned again under a new id");
  mb_remote_ref_release(id2);
  ei_x_free(&x);
}

/* An allocator that refuses once `left` allocations are spent (frees and
 * shrinks always succeed). */
typedef struct {
  int armed;
  int left;
} failing_t;

static void *failing_alloc(void *ud, void *ptr, size_t osize, size_t nsize)
{
  failing_t *f = ud;
  (void)osize;
  if (nsize == 0) {
    free(ptr);
    return NULL;
  }
  if (f->armed && nsize > (ptr ? osize : 0) && f->left-- <= 0)
    return NULL;
  return realloc(ptr, nsize);
}

static int decode_msg_cf(lua_State *L)
{
  return mb_copy_decode(L, lua_touserdata(L, 1));
}

/* A remote ref's hold is let go when rebuilding it in a state fails (the
 * state out of memory at each allocation in turn). */
static void test_remote_ref_oom(void)
{
  uint32_t base = mb_remote_ref_count();
  ei_x_buff x;
  ei_x_new_with_version(&x);
  erlang_ref r = {"other@host", 3, {4, 5, 6}, 78};
  ei_x_encode_list_header(&x, 3);
  ei_x_encode_ref(&x, &r);
  ei_x_encode_ref(&x, &r);
  ei_x_encode_string(&x, "a string that needs an allocation of its own");
  ei_x_encode_empty_list(&x);
  long idx = 0;
  mb_msg_t *m;
  check(mb_etf_decode(x.buff, x.index, &idx, 0, &m) == 0, "a list with remote refs decodes");
  int failed = 0, ok = 0;
  for (int k = 0; k < 200 && ok == 0; k++) {
    failing_t f = {0, k};
    lua_State *L = lua_newstate(failing_alloc, &f);
    f.armed = 1;
    if (lua_cpcall(L, decode_msg_cf, m) == 0)
      ok = 1;
    else
      failed++;
    lua_close(L);
    if (mb_remote_ref_count() != base) {
      check(false, "a failed rebuild at allocation %d lets its holds go (%u held)", k,
            mb_remote_ref_count() - base);
      break;
    }
  }
  check(ok && failed > 0, "rebuilt once memory sufficed, after %d refused (no hold left)",
        failed);
  mb_msg_free(m);
  ei_x_free(&x);
}

int main(void)
{
  ei_init();
  mb_term_init();
  int64_t node = mb_atom_intern("me@host", 7);
  mb_etf_set_node((uint32_t)node, 5);
  A = new_state();
  B = new_state();
  test_round_trips();
  test_from_erlang();
  test_fuzz();
  test_funs();
  test_old_floats();
  test_depth();
  test_atoms();
  test_remote_ref_holds();
  test_remote_ref_oom();
  lua_close(A);
  lua_close(B);
  return check_summary();
}
