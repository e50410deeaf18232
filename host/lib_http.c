/* lib_http.c: placeholder, replaced by the http_parser binding. */
#include "lauxlib.h"
#include "lib.h"

int mb_lib_http_parser_open(lua_State *L)
{
  return luaL_error(L, "moonbeam.http_parser: not built yet");
}
