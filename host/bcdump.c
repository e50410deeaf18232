/* bcdump.c: LuaJIT bytecode dumps, their templates' keys restored (see
 * bcdump.h). Written from the format LuaJIT's lj_bcdump.h describes. */
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "lauxlib.h"
#include "bcdump.h"

/* Dump format constants (lj_bcdump.h). */
#define HEAD "\x1bLJ"
#define F_BE 0x01
#define F_STRIP 0x02
#define KGC_TAB 1
#define KGC_I64 2
#define KGC_COMPLEX 4
#define KGC_STR 5
#define KTAB_NIL 0
#define KTAB_INT 3
#define KTAB_NUM 4
#define KTAB_STR 5

/* Bounds of the walk: instructions after a TDUP, keys and array slots
 * added to one template. */
#define WINDOW 4096
#define MAX_ADD 256
#define MAX_SLOT 32

/* The opcodes, learnt from the probe (opcodes_learn); ok 0: not usable. */
static struct { int ok; unsigned tdup, tsets, tsetb; } op;
static pthread_once_t op_once = PTHREAD_ONCE_INIT;

/* -- Reading ------------------------------------------------------------- */

typedef struct {
  const unsigned char *p, *end;
  bool bad;
} rd_t;

static uint32_t uleb(rd_t *r)
{
  uint32_t v = 0;
  for (int sh = 0; sh <= 28; sh += 7) {
    if (r->p >= r->end)
      break;
    unsigned b = *r->p++;
    v |= (uint32_t)(b & 0x7f) << sh;
    if (b < 0x80)
      return v;
  }
  r->bad = true;
  return 0;
}

static const unsigned char *skip(rd_t *r, size_t n)
{
  const unsigned char *at = r->p;
  if ((size_t)(r->end - r->p) < n) {
    r->bad = true;
    return at;
  }
  r->p += n;
  return at;
}

/* A template's key or value; a string's bytes in *s, *n. */
static uint32_t ktabk(rd_t *r, const unsigned char **s, uint32_t *n)
{
  uint32_t tp = uleb(r);
  if (tp >= KTAB_STR) {
    *n = tp - KTAB_STR;
    *s = skip(r, *n);
  } else if (tp == KTAB_INT) {
    uleb(r);
  } else if (tp == KTAB_NUM) {
    uleb(r);
    uleb(r);
  }
  return tp;
}

/* One GC constant of a prototype, and what is to be added to it. */
typedef struct {
  uint32_t type;
  const unsigned char *start, *end;   /* its bytes, type included */
  const unsigned char *s;             /* a string: its bytes */
  uint32_t slen;
  uint32_t narray, nhash;             /* a template */
  const unsigned char *karray, *khash;
  uint32_t want_narray, nadd;
  uint32_t *add;                      /* the string constants to add as keys */
} kgc_t;

static bool read_kgc(rd_t *r, kgc_t *k)
{
  memset(k, 0, sizeof *k);
  k->start = r->p;
  k->type = uleb(r);
  if (k->type >= KGC_STR) {
    k->slen = k->type - KGC_STR;
    k->s = skip(r, k->slen);
  } else if (k->type == KGC_TAB) {
    k->narray = uleb(r);
    k->nhash = uleb(r);
    k->want_narray = k->narray;
    const unsigned char *s;
    uint32_t n;
    k->karray = r->p;
    for (uint32_t i = 0; i < k->narray && !r->bad; i++)
      ktabk(r, &s, &n);
    k->khash = r->p;
    for (uint32_t i = 0; i < 2 * k->nhash && !r->bad; i++)
      ktabk(r, &s, &n);
  } else if (k->type >= KGC_I64) {
    for (int i = k->type == KGC_COMPLEX ? 4 : 2; i > 0; i--)
      uleb(r);
  }
  k->end = r->p;
  return !r->bad;
}

/* Whether template t has, or is to get, the string key of kgc[si]. */
static bool has_key(const kgc_t *kgc, const kgc_t *t, uint32_t si)
{
  const kgc_t *key = &kgc[si];
  for (uint32_t i = 0; i < t->nadd; i++)
    if (t->add[i] == si)
      return true;
  rd_t r = {t->khash, t->end, false};
  for (uint32_t i = 0; i < t->nhash && !r.bad; i++) {
    const unsigned char *s = NULL;
    uint32_t n = 0;
    uint32_t tp = ktabk(&r, &s, &n);
    if (tp >= KTAB_STR && n == key->slen && memcmp(s, key->s, n) == 0)
      return true;
    ktabk(&r, &s, &n);
  }
  return r.bad;   /* unreadable: add nothing */
}

/* Mark what the stores after each TDUP of a prototype's bytecode (nbc
 * instructions at bc) want in its template. Returns whether any does. */
static bool walk(const unsigned char *bc, uint32_t nbc, kgc_t *kgc, uint32_t nkgc,
                 uint32_t *pool)
{
  bool any = false;
  uint32_t used = 0;
  for (uint32_t i = 0; i < nbc; i++) {
    const unsigned char *in = bc + 4 * (size_t)i;   /* op, A, C, B */
    uint32_t d = in[2] | (uint32_t)in[3] << 8;
    if (in[0] != op.tdup || d >= nkgc)
      continue;
    kgc_t *t = &kgc[nkgc - 1 - d];
    if (t->type != KGC_TAB || t->add)   /* (one TDUP a template) */
      continue;
    unsigned r = in[1];
    t->add = pool + used;
    for (uint32_t j = i + 1; j < nbc && j <= i + WINDOW; j++) {
      const unsigned char *s = bc + 4 * (size_t)j;
      if (s[1] == r)   /* r written, or its table used: its fields are set */
        break;
      if (s[3] != r)
        continue;
      if (s[0] == op.tsets && s[2] < nkgc && t->nadd < MAX_ADD) {
        uint32_t si = nkgc - 1 - s[2];
        if (kgc[si].type >= KGC_STR && !has_key(kgc, t, si)) {
          t->add[t->nadd++] = si;
          any = true;
        }
      } else if (s[0] == op.tsetb && s[2] <= MAX_SLOT && s[2] + 1u > t->want_narray) {
        t->want_narray = s[2] + 1u;
        any = true;
      }
    }
    used += t->nadd;
  }
  return any;
}

/* -- Writing ------------------------------------------------------------- */

typedef struct {
  unsigned char *p;
  size_t len, cap;
  bool oom;
} buf_t;

static unsigned char *put(buf_t *b, const void *src, size_t n)
{
  if (b->len + n > b->cap) {
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + n)
      cap *= 2;
    unsigned char *p = realloc(b->p, cap);
    if (p == NULL) {
      b->oom = true;
      return NULL;
    }
    b->p = p;
    b->cap = cap;
  }
  unsigned char *at = b->p + b->len;
  if (src)
    memcpy(at, src, n);
  b->len += n;
  return at;
}

static void put_uleb(buf_t *b, uint32_t v)
{
  unsigned char tmp[5];
  size_t n = 0;
  do {
    tmp[n] = v & 0x7f;
    v >>= 7;
    if (v)
      tmp[n] |= 0x80;
    n++;
  } while (v);
  put(b, tmp, n);
}

static void put_template(buf_t *b, const kgc_t *kgc, const kgc_t *t)
{
  static const unsigned char nil = KTAB_NIL;
  put_uleb(b, KGC_TAB);
  put_uleb(b, t->want_narray);
  put_uleb(b, t->nhash + t->nadd);
  put(b, t->karray, (size_t)(t->khash - t->karray));
  for (uint32_t i = t->narray; i < t->want_narray; i++)
    put(b, &nil, 1);
  put(b, t->khash, (size_t)(t->end - t->khash));
  for (uint32_t i = 0; i < t->nadd; i++) {
    const kgc_t *key = &kgc[t->add[i]];
    put_uleb(b, KTAB_STR + key->slen);
    put(b, key->s, key->slen);
    put(b, &nil, 1);
  }
}

/* One prototype (its pdata at r, len bytes), to out with its length:
 * returns whether it could be read. */
static bool proto(rd_t *r, uint32_t len, bool strip, buf_t *out, bool *changed)
{
  rd_t p = {r->p, r->p + len, false};
  skip(r, len);
  skip(&p, 4);   /* flags, numparams, framesize, numuv */
  if (p.bad)
    return false;
  uint32_t numuv = p.p[-1];
  uint32_t nkgc = uleb(&p);
  uleb(&p);      /* numkn */
  uint32_t nbc = uleb(&p);
  if (!strip && uleb(&p)) {   /* debug info: its length, the lines */
    uleb(&p);
    uleb(&p);
  }
  const unsigned char *bc = skip(&p, 4 * (size_t)nbc);
  skip(&p, 2 * (size_t)numuv);
  if (p.bad || nkgc > len)
    return false;
  const unsigned char *kstart = p.p;
  kgc_t *kgc = malloc((nkgc ? nkgc : 1) * sizeof *kgc);
  uint32_t *pool = malloc(((size_t)nbc + 1) * sizeof *pool);
  bool ok = kgc && pool;
  for (uint32_t i = 0; ok && i < nkgc; i++)
    ok = read_kgc(&p, &kgc[i]);
  if (ok && walk(bc, nbc, kgc, nkgc, pool)) {
    const unsigned char *pstart = p.end - len;
    buf_t pd = {NULL, 0, 0, false};
    put(&pd, pstart, (size_t)(kstart - pstart));   /* head, bytecode, upvalues */
    for (uint32_t i = 0; i < nkgc; i++) {
      const kgc_t *k = &kgc[i];
      if (k->type == KGC_TAB && (k->nadd || k->want_narray != k->narray))
        put_template(&pd, kgc, k);
      else
        put(&pd, k->start, (size_t)(k->end - k->start));
    }
    put(&pd, p.p, (size_t)(p.end - p.p));   /* numbers, debug info */
    ok = !pd.oom && pd.len <= UINT32_MAX;
    if (ok) {
      put_uleb(out, (uint32_t)pd.len);
      put(out, pd.p, pd.len);
      *changed = true;
    }
    free(pd.p);
  } else if (ok) {
    put_uleb(out, len);
    put(out, p.end - len, len);
  }
  free(kgc);
  free(pool);
  return ok;
}

/* -- The opcodes ----------------------------------------------------------- */

static int probe_writer(lua_State *L, const void *p, size_t n, void *ud)
{
  (void)L;
  return put(ud, p, n) ? 0 : 1;
}

/* Compile and dump a chunk whose bytecode is known (luajit -bl):
 *   VARG 0 2 0; TDUP 1 t; TSETS 0 1 "k"; TSETB 0 1 1; RET1 1 2
 * and read the three opcodes from it. */
static void opcodes_learn(void)
{
  static const char src[] = "local a = ...\nlocal t = {k = a, a}\nreturn t\n";
  lua_State *L = luaL_newstate();
  buf_t b = {NULL, 0, 0, false};
  if (L && luaL_loadbuffer(L, src, sizeof src - 1, "=probe") == 0 &&
      lua_dump(L, probe_writer, &b) == 0 && !b.oom && b.len > 8 &&
      memcmp(b.p, HEAD, 3) == 0) {
    rd_t r = {b.p + 4, b.p + b.len, false};
    uint32_t flags = uleb(&r);
    if (!(flags & F_STRIP))
      skip(&r, uleb(&r));
    uint32_t plen = uleb(&r);
    rd_t p = {r.p, r.p + plen, false};
    skip(&p, 4);
    uint32_t nkgc = uleb(&p);
    uleb(&p);
    uint32_t nbc = uleb(&p);
    if (!(flags & F_STRIP) && uleb(&p)) {
      uleb(&p);
      uleb(&p);
    }
    const unsigned char *bc = skip(&p, 4 * (size_t)nbc);
    kgc_t k;
    uint32_t tab = UINT32_MAX, key = UINT32_MAX;
    for (uint32_t i = 0; i < nkgc && !p.bad && read_kgc(&p, &k); i++) {
      if (k.type == KGC_TAB)
        tab = nkgc - 1 - i;
      else if (k.type == KGC_STR + 1 && k.s[0] == 'k')
        key = nkgc - 1 - i;
    }
    const unsigned char *dup = bc + 4, *sets = bc + 8, *setb = bc + 12;
    if (!p.bad && !(flags & F_BE) && nbc == 5 && tab != UINT32_MAX && key != UINT32_MAX &&
        dup[1] == 1 && (uint32_t)(dup[2] | dup[3] << 8) == tab &&
        sets[1] == 0 && sets[3] == 1 && sets[2] == (unsigned)key &&
        setb[1] == 0 && setb[3] == 1 && setb[2] == 1 &&
        dup[0] != sets[0] && dup[0] != setb[0] && sets[0] != setb[0]) {
      op.tdup = dup[0];
      op.tsets = sets[0];
      op.tsetb = setb[0];
      op.ok = 1;
    }
  }
  free(b.p);
  if (L)
    lua_close(L);
}

/* -- The dump ---------------------------------------------------------------- */

unsigned char *mb_bcdump_presize(const unsigned char *dump, size_t len, size_t *outlen)
{
  pthread_once(&op_once, opcodes_learn);
  if (!op.ok || len < 5 || memcmp(dump, HEAD, 3) != 0)
    return NULL;
  rd_t r = {dump + 4, dump + len, false};
  uint32_t flags = uleb(&r);
  if (flags & F_BE)
    return NULL;
  if (!(flags & F_STRIP))
    skip(&r, uleb(&r));
  buf_t out = {NULL, 0, 0, false};
  put(&out, dump, (size_t)(r.p - dump));
  bool changed = false, ok = !r.bad;
  while (ok) {
    uint32_t plen = uleb(&r);
    if (r.bad || plen == 0)
      break;
    ok = plen <= (size_t)(r.end - r.p) && proto(&r, plen, flags & F_STRIP, &out, &changed);
  }
  if (ok && !r.bad) {
    put_uleb(&out, 0);
    put(&out, r.p, (size_t)(r.end - r.p));
  }
  if (!ok || r.bad || out.oom || !changed) {
    free(out.p);
    return NULL;
  }
  *outlen = out.len;
  return out.p;
}
