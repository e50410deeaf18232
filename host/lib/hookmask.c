/* hookmask.c: letting the count hook into code LuaJIT runs with hooks
 * held off (see hookmask.h).
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "hookmask.h"

/* lj_obj.h, LuaJIT 2.1: the hook mask's flags besides the event mask. */
#define HOOK_ACTIVE 0x10
#define HOOK_GC 0x40
/* Where a lua_State keeps its global_State (glref, after the GC header and
 * two bytes, 8-aligned); checked by the probe. */
#define GLREF_OFF 16

/* The hook mask's offset in the global_State, or -1: not found. */
static ptrdiff_t mask_off = -1;

static volatile uint8_t *hook_mask(lua_State *L)
{
  char *g;
  memcpy(&g, (char *)L + GLREF_OFF, sizeof g);
  return (volatile uint8_t *)(g + mask_off);
}

int mb_hookmask_in_gc(lua_State *L)
{
  return mask_off >= 0 && (*hook_mask(L) & HOOK_GC);
}

void mb_hookmask_unhold(lua_State *L)
{
  if (mask_off < 0)
    return;
  volatile uint8_t *m = hook_mask(L);
  uint8_t v = *m;
  if (v & HOOK_ACTIVE)
    *m = (uint8_t)(v & ~HOOK_ACTIVE);
}

void mb_hookmask_hold(lua_State *L)
{
  if (mask_off < 0)
    return;
  volatile uint8_t *m = hook_mask(L);
  *m = (uint8_t)(*m | HOOK_ACTIVE);
}

/* -- The probe ------------------------------------------------------------- */

/* The probe state's first block (its GG_State, which holds the
 * global_State): where it starts and how long it is. */
typedef struct {
  char *first;
  size_t size;
} block_t;

static void *probe_alloc(void *ud, void *ptr, size_t osize, size_t nsize)
{
  block_t *b = ud;
  (void)osize;
  if (nsize == 0) {
    free(ptr);
    return NULL;
  }
  void *p = realloc(ptr, nsize);
  if (ptr == NULL && b->first == NULL) {
    b->first = p;
    b->size = nsize;
  }
  return p;
}

/* The candidate offsets, one byte each of the global_State's span: 1 while
 * every test so far fits. */
typedef struct {
  char *g;
  size_t n;
  unsigned char *ok;
  int fin_ran;
} cands_t;

static cands_t probe;

/* Keep the candidates whose byte, masked, is `want`. */
static void keep(cands_t *c, uint8_t mask, uint8_t want)
{
  for (size_t i = 0; i < c->n; i++)
    if (((uint8_t)c->g[i] & mask) != want)
      c->ok[i] = 0;
}

static void nop_hook(lua_State *L, lua_Debug *ar)
{
  (void)L;
  (void)ar;
}

static int probe_gc(lua_State *L)
{
  (void)L;
  keep(&probe, HOOK_GC | HOOK_ACTIVE, HOOK_GC | HOOK_ACTIVE);
  probe.fin_ran = 1;
  return 0;
}

/* Under lua_cpcall on the probe state. */
static int probe_cf(lua_State *L)
{
  static const int masks[] = {LUA_MASKCOUNT, LUA_MASKCALL | LUA_MASKLINE,
                              LUA_MASKRET | LUA_MASKCOUNT, LUA_MASKLINE, 0};
  for (size_t i = 0; i < sizeof masks / sizeof *masks; i++) {
    lua_sethook(L, masks[i] ? nop_hook : NULL, masks[i], masks[i] ? 1000 : 0);
    keep(&probe, 0xff, (uint8_t)masks[i]);
  }
  lua_newuserdata(L, 8);
  lua_createtable(L, 0, 1);
  lua_pushcfunction(L, probe_gc);
  lua_setfield(L, -2, "__gc");
  lua_setmetatable(L, -2);
  lua_pop(L, 1);
  lua_gc(L, LUA_GCCOLLECT, 0);
  keep(&probe, 0xff, 0);
  return 0;
}

void mb_hookmask_init(void)
{
  block_t b = {NULL, 0};
  lua_State *P = lua_newstate(probe_alloc, &b);
  if (P == NULL)
    return;
  char *g;
  memcpy(&g, (char *)P + GLREF_OFF, sizeof g);
  lua_State *T = lua_newthread(P);
  char *gt;
  memcpy(&gt, (char *)T + GLREF_OFF, sizeof gt);
  if ((char *)P == b.first && g > b.first && g < b.first + b.size && gt == g) {
    probe.g = g;
    probe.n = (size_t)(b.first + b.size - g);
    probe.ok = malloc(probe.n);
    if (probe.ok) {
      for (size_t i = 0; i < probe.n; i++)
        probe.ok[i] = 1;
      if (lua_cpcall(P, probe_cf, NULL) == 0 && probe.fin_ran) {
        ptrdiff_t found = -1;
        int nfound = 0;
        for (size_t i = 0; i < probe.n; i++)
          if (probe.ok[i]) {
            found = (ptrdiff_t)i;
            nfound++;
          }
        if (nfound == 1)
          mask_off = found;
      }
      free(probe.ok);
    }
  }
  lua_close(P);
  probe = (cands_t){0};
}
