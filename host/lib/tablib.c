/* tablib.c: table.sort, preemptible where it calls Lua (see tablib.h).
 */
#include "lauxlib.h"
#include "lstate.h"
#include "tablib.h"

/* table.sort: LuaJIT's C sort where no Lua is called (plan), else the
 * sort in Lua, made when first needed (sort_load; most processes that open
 * the table library never sort by a comparator). fail raises its error at
 * the caller's line. */
static const char sort_src[] =
  "return function(csort, plan, fail, load)\n"
  "  local sort\n"
  "  return function(t, comp)\n"
  "    local n = plan(t, comp)\n"
  "    if n == nil then return csort(t, comp) end\n"
  "    sort = sort or load()\n"
  "    if sort(t, 1, n, comp) then fail() end\n"
  "  end\n"
  "end\n";
static mb_lstate_chunk_t sort_chunk = MB_LSTATE_LIBCHUNK(sort_src, "=table.sort");

/* The sort in Lua: LuaJIT's algorithm (quicksort, the pivot a median of
 * three, recursion into the smaller part), step for step, so that it
 * makes the same calls of the comparator in the same order, leaves equal
 * elements in the same order and finds an invalid order function at the
 * same point, where it returns true (the caller raises). Elements are read
 * and written with t[i], which plan makes sure is raw access, as LuaJIT's.
 * lt, for elements whose __lt is a Lua function, is a function of its own
 * and kept with the sort (see mb_lstate_push_lua_part). */
static const char sort_algo_src[] =
  "return function()\n"
  "  local function lt(a, b) return a < b end\n"
  "  local function sort(t, lo, hi, lt)\n"
  "    while lo < hi do\n"
  "      local a, b = t[lo], t[hi]\n"
  "      if lt(b, a) then t[lo] = b; t[hi] = a end\n"
  "      if hi - lo == 1 then return end\n"
  "      local m = lo + hi\n"
  "      m = (m - m % 2) / 2\n"
  "      a, b = t[m], t[lo]\n"
  "      if lt(a, b) then\n"
  "        t[m] = b; t[lo] = a\n"
  "      else\n"
  "        b = t[hi]\n"
  "        if lt(b, a) then t[m] = b; t[hi] = a end\n"
  "      end\n"
  "      if hi - lo == 2 then return end\n"
  "      local p = t[m]\n"
  "      t[m] = t[hi - 1]; t[hi - 1] = p\n"
  "      local i, j = lo, hi - 1\n"
  "      while true do\n"
  "        i = i + 1\n"
  "        local x = t[i]\n"
  "        while lt(x, p) do\n"
  "          if i >= hi then return true end\n"
  "          i = i + 1; x = t[i]\n"
  "        end\n"
  "        j = j - 1\n"
  "        local y = t[j]\n"
  "        while lt(p, y) do\n"
  "          if j <= lo then return true end\n"
  "          j = j - 1; y = t[j]\n"
  "        end\n"
  "        if j < i then break end\n"
  "        t[i] = y; t[j] = x\n"
  "      end\n"
  "      p = t[hi - 1]; t[hi - 1] = t[i]; t[i] = p\n"
  "      if i - lo < hi - i then\n"
  "        if sort(t, lo, i - 1, lt) then return true end\n"
  "        lo = i + 1\n"
  "      else\n"
  "        if sort(t, i + 1, hi, lt) then return true end\n"
  "        hi = i - 1\n"
  "      end\n"
  "    end\n"
  "  end\n"
  "  return function(t, lo, hi, comp) return sort(t, lo, hi, comp or lt) end, sort, lt\n"
  "end\n";
static mb_lstate_chunk_t sort_algo_chunk = MB_LSTATE_LIBCHUNK(sort_algo_src, "=table.sort");

/* Does comparing v call a Lua function: is its __lt one? Strings and
 * numbers compare without metamethods. */
static int has_lua_lt(lua_State *L, int v)
{
  int t = lua_type(L, v);
  if (t == LUA_TNIL || t == LUA_TNUMBER || t == LUA_TSTRING || !lua_getmetatable(L, v))
    return 0;
  lua_pushliteral(L, "__lt");
  lua_rawget(L, -2);
  int yes = lua_isfunction(L, -1) && !lua_iscfunction(L, -1);
  lua_pop(L, 2);
  return yes;
}

/* Is t[i] raw access for i in 1..n: has the table at index 1 no
 * __index or __newindex, or no hole there? (A sort writes only values it
 * read: where 1..n holds no nil, it reads and writes only keys present.) */
static int raw_access(lua_State *L, int n)
{
  if (!lua_getmetatable(L, 1))
    return 1;
  lua_pushliteral(L, "__index");
  lua_rawget(L, -2);
  lua_pushliteral(L, "__newindex");
  lua_rawget(L, -3);
  int meta = !lua_isnil(L, -1) || !lua_isnil(L, -2);
  lua_pop(L, 3);
  for (int i = 1; meta && i <= n; i++) {
    lua_rawgeti(L, 1, i);
    int hole = lua_isnil(L, -1);
    lua_pop(L, 1);
    if (hole)
      return 0;
  }
  return 1;
}

/* plan(t, comp) -> the length of the array to sort in Lua, or nothing
 * where LuaJIT's sort is to do it: a bad argument (it raises the error),
 * no Lua to call, or an array where t[i] would not be raw access (a hole,
 * and __index or __newindex: rare enough to leave to C). Without a
 * comparator, the first comparison is of t[n] with t[1], and every other
 * element meets a pivot that compared with t[1] before anything else: so
 * every comparison that does not raise is between values that compare as
 * t[1] does (its type; its __lt, which LuaJIT requires of both sides), and
 * if t[1] is a number or a string or has no __lt that is a Lua function,
 * no Lua runs. */
static int sort_plan(lua_State *L)
{
  if (!lua_istable(L, 1))
    return 0;
  if (lua_isnoneornil(L, 2)) {
    lua_rawgeti(L, 1, 1);
    if (!has_lua_lt(L, -1))
      return 0;
  } else if (!lua_isfunction(L, 2)) {
    return 0;
  }
  int n = (int)lua_objlen(L, 1);
  if (!raw_access(L, n))
    return 0;
  lua_pushinteger(L, n);
  return 1;
}

/* load(): the sort in Lua. */
static int sort_load(lua_State *L)
{
  mb_lstate_push_lua_part(L, &sort_chunk, &sort_algo_chunk);
  return 1;
}

/* fail(): LuaJIT's error for an order function that says a < b and b < a,
 * at the line that called table.sort (level 2: fail's caller is the sort). */
static int sort_fail(lua_State *L)
{
  luaL_where(L, 2);
  lua_pushliteral(L, "invalid order function for sorting");
  lua_concat(L, 2);
  return lua_error(L);
}

void mb_tablib_open(lua_State *L, int idx)
{
  idx = idx < 0 ? lua_gettop(L) + idx + 1 : idx;
  lua_getfield(L, idx, "sort");
  lua_CFunction fns[] = {lua_tocfunction(L, -1), sort_plan, sort_fail, sort_load, NULL};
  lua_pop(L, 1);
  if (fns[0] == NULL)
    return;   /* not LuaJIT's: leave it */
  mb_lstate_push_lua_fn(L, &sort_chunk, fns);
  lua_setfield(L, idx, "sort");
}
