/* lib_tcp.c: placeholder, replaced by the TCP module. */
#include "lauxlib.h"
#include "lib.h"

int mb_lib_tcp_open(lua_State *L)
{
  return luaL_error(L, "moonbeam.tcp: not built yet");
}
