/* fuzz_copy.c: fuzz target for the message decoder, mb_copy_decode
 * (host/copy_decode.c), on arbitrary bytes.
 *
 * DESIGN
 * Input: byte 0 is the message's nvalues, the rest its payload. The decoder
 * runs in a lua_pcall in a state with the standard libraries (so module and
 * C-function values find "string", "table", ...), whose package.path and
 * cpath are empty: a module name from the bytes must not load a file. What
 * must hold: the decode either pushes nvalues values or raises a Lua error,
 * without crash, sanitizer report or leak. A message that decodes is then
 * encoded again (mb_copy_encode) and, if that succeeds, must decode again
 * with the same number of values.
 *
 * Functions (tag 0x06) name one of the message's code objects (code.h),
 * never bytecode in the payload: a message made of bytes holds none, so
 * every function tag is refused as corrupt and no byte of the input reaches
 * LuaJIT's bytecode loader.
 */
#include <stdint.h>
#include <string.h>

#include "alloc.h"
#include "copy.h"
#include "fuzz.h"
#include "lauxlib.h"
#include "lualib.h"

static lua_State *L;
/* A cap on the Lua heap far above what a 4 KB input can legitimately build,
 * so that a runaway decode fails with a memory error instead of OOM-killing
 * the fuzzer. */
static mb_alloc_t heap = {.limit = 512u << 20};

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
  L = lua_newstate(mb_alloc_fn, &heap);
  FUZZ_CHECK(L != NULL, "lua_newstate");
  luaL_openlibs(L);
  const char *setup = "package.path = '' package.cpath = ''";
  FUZZ_CHECK(luaL_dostring(L, setup) == 0, "setup");
  return 0;
}

static int decode_cf(lua_State *L)
{
  const mb_msg_t *m = lua_touserdata(L, 1);
  lua_pop(L, 1);
  return mb_copy_decode(L, m);
}

/* Decode m in a pcall; the number of values, or -1 after an error. */
static int decode(const mb_msg_t *m)
{
  int top = lua_gettop(L);
  lua_pushcfunction(L, decode_cf);
  lua_pushlightuserdata(L, (void *)m);
  if (lua_pcall(L, 1, LUA_MULTRET, 0) != 0) {
    FUZZ_CHECK(lua_gettop(L) == top + 1, "stack after an error");
    lua_settop(L, top);
    return -1;
  }
  return lua_gettop(L) - top;
}

int LLVMFuzzerTestOneInput(const uint8_t *in, size_t size)
{
  if (!L)
    LLVMFuzzerInitialize(NULL, NULL);
  size_t len = size ? size - 1 : 0;
  mb_msg_t *m = mb_msg_new(len);
  FUZZ_CHECK(m != NULL, "mb_msg_new");
  m->nvalues = size ? in[0] : 0;
  if (len)
    memcpy(m->data, in + 1, len);
  int n = decode(m);
  FUZZ_CHECK(n == -1 || n == (int)m->nvalues, "decode pushed %d values of %u", n, m->nvalues);
  if (n > 0) {
    char err[256];
    mb_msg_t *again = mb_copy_encode(L, 1, n, "msg", NULL, err, sizeof err);
    lua_settop(L, 0);
    if (again) {
      int n2 = decode(again);
      FUZZ_CHECK(n2 == n, "a re-encoded message decodes to %d values of %d", n2, n);
      mb_msg_free(again);
    }
  }
  lua_settop(L, 0);
  mb_msg_free(m);
  lua_gc(L, LUA_GCCOLLECT, 0);
  return 0;
}
