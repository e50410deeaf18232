/* strmatch.c: string.find, string.match, string.gmatch and string.gsub,
 * preemptible (see strmatch.h).
 */
#define _GNU_SOURCE   /* memmem */
#include <setjmp.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "lauxlib.h"
#include "lstate.h"
#include "proc.h"
#include "run.h"
#include "scheduler.h"
#include "strmatch.h"

#define PM_MAXCAP 32       /* LuaJIT's LUA_MAXCAPTURES */
#define PM_MAXDEPTH 200    /* LuaJIT's LJ_MAX_XLEVEL: nested match levels */
#define PM_POLL 2048       /* steps between two looks at the runner */

#define CAP_UNFINISHED (-1)
#define CAP_POSITION (-2)

/* -- The matcher ----------------------------------------------------------
 * A match runs the pattern left to right from a subject position. An item
 * that can match in more than one way (x?, x*, x+, x-) pushes a frame
 * that remembers the ways left, and so do a capture's opening and closing,
 * which must be undone when what follows fails. Where a frame's way fails
 * further on, the matcher backtracks: it pops frames until one has a way
 * left, and goes on from there. A frame is one nested match level of
 * LuaJIT's recursive matcher, whose limit the frames keep. */

enum { F_OPT, F_MAX, F_MIN, F_OPEN, F_CLOSE };

typedef struct frame {
  const char *s;        /* F_OPT: the item's position; F_MAX: the first
                           repetition's; F_MIN: the next try's */
  const char *p, *ep;   /* the item: [p, ep) */
  ptrdiff_t i;          /* F_MAX: repetitions now tried; F_CLOSE: capture */
  int kind;
} frame_t;

enum { PM_FAIL, PM_MATCH, PM_STOP };

typedef struct pm {
  const char *src, *end;   /* the subject (a Lua string: *end is NUL) */
  const char *pat;         /* the pattern, after an anchor */
  lua_State *L;            /* errors and results go there */
  jmp_buf *soft;           /* set: an error jumps there instead (a check) */
  ptrdiff_t left;          /* steps until the next look at the runner */
  int why;                 /* PM_STOP's: mb_run_due's answer */
  int stopped;             /* s, p are where matching goes on */
  const char *s, *p;
  const char *e;           /* PM_MATCH: the match's end */
  int level, n;            /* captures, frames */
  struct {
    const char *init;
    ptrdiff_t len;         /* or CAP_UNFINISHED, CAP_POSITION */
  } cap[PM_MAXCAP];
  frame_t f[PM_MAXDEPTH - 1];   /* the outermost level has none */
} pm_t;

static void pm_error(pm_t *m, const char *msg)
{
  if (m->soft)
    longjmp(*m->soft, 1);
  luaL_error(m->L, "%s", msg);
}

/* Character classes, as LuaJIT's: ASCII, whatever the C locale. */
enum { C_ = 1, S_ = 2, P_ = 4, D_ = 8, U_ = 16, L_ = 32, X_ = 64, Z_ = 128 };

static const uint8_t ctype[256] = {
  [0] = C_ | Z_, [1 ... 8] = C_, ['\t' ... '\r'] = C_ | S_, [14 ... 31] = C_, [127] = C_,
  [' '] = S_, ['!' ... '/'] = P_, [':' ... '@'] = P_, ['[' ... '`'] = P_, ['{' ... '~'] = P_,
  ['0' ... '9'] = D_ | X_, ['A' ... 'F'] = U_ | X_, ['G' ... 'Z'] = U_,
  ['a' ... 'f'] = L_ | X_, ['g' ... 'z'] = L_,
};

/* The classes a letter after % names (its upper case: the complement);
 * 0 for any other character, which is itself. */
static const uint8_t classes[256] = {
  ['a'] = U_ | L_, ['c'] = C_, ['d'] = D_, ['g'] = P_ | D_ | U_ | L_, ['l'] = L_,
  ['p'] = P_, ['s'] = S_, ['u'] = U_, ['w'] = D_ | U_ | L_, ['x'] = X_, ['z'] = Z_,
  ['A'] = U_ | L_, ['C'] = C_, ['D'] = D_, ['G'] = P_ | D_ | U_ | L_, ['L'] = L_,
  ['P'] = P_, ['S'] = S_, ['U'] = U_, ['W'] = D_ | U_ | L_, ['X'] = X_, ['Z'] = Z_,
};

static int is_digit(int c) { return ctype[c & 0xff] & D_; }

/* Does c belong to class cl (the character after a %)? */
static inline int in_class(int c, int cl)
{
  int bits = classes[cl];
  if (bits == 0)
    return cl == c;
  int r = (ctype[c] & bits) != 0;
  return (cl & 0x20) ? r : !r;
}

/* Is c in the set [ ... ] from p (its '[') to ec (its ']')? */
static int in_set(int c, const char *p, const char *ec)
{
  int yes = 1;
  if (p[1] == '^') {
    yes = 0;
    p++;
  }
  while (++p < ec) {
    if (*p == '%') {
      if (in_class(c, (unsigned char)*++p))
        return yes;
    } else if (p[1] == '-' && p + 2 < ec) {
      if ((unsigned char)p[0] <= c && c <= (unsigned char)p[2])
        return yes;
      p += 2;
    } else if ((unsigned char)*p == c) {
      return yes;
    }
  }
  return !yes;
}

/* The end of the single-character class at p: one character, %x, or a set. */
static const char *item_end(pm_t *m, const char *p)
{
  char c = *p++;
  if (c == '%') {
    if (*p == '\0')
      pm_error(m, "malformed pattern (ends with '%')");
    return p + 1;
  }
  if (c == '[') {
    if (*p == '^')
      p++;
    do {   /* the first character is in the set even if it is ']' */
      if (*p == '\0')
        pm_error(m, "malformed pattern (missing ']')");
      if (*p++ == '%' && *p != '\0')
        p++;
    } while (*p != ']');
    return p + 1;
  }
  return p;
}

static inline int single(int c, const char *p, const char *ep)
{
  switch (*p) {
  case '.': return 1;
  case '%': return in_class(c, (unsigned char)p[1]);
  case '[': return in_set(c, p, ep - 1);
  default: return (unsigned char)*p == c;
  }
}

static void push_frame(pm_t *m, int kind, const char *s, const char *p, const char *ep,
                       ptrdiff_t i)
{
  if (m->n >= PM_MAXDEPTH - 1)
    pm_error(m, "pattern too complex");
  frame_t *f = &m->f[m->n++];
  f->kind = kind;
  f->s = s;
  f->p = p;
  f->ep = ep;
  f->i = i;
}

/* Set m up for a match at a new position. */
static void pm_start(pm_t *m)
{
  m->level = m->n = 0;
  m->stopped = 0;
}

/* Look at the runner (see mb_run_due); 0 if the match goes on. */
static int pm_due(pm_t *m)
{
  m->left = PM_POLL;
  mb_proc_t *p = mb_sched_self() ? mb_proc_of(m->L) : NULL;
  m->why = p && p->L ? mb_run_due(p) : 0;
  return m->why;
}

/* Match from subject position s, or on from where it stopped: PM_MATCH
 * (m->e its end, m->cap its captures), PM_FAIL (no match from that
 * position), or PM_STOP (the runner said so: m->s, m->p and the frames
 * are where to go on). */
static int pm_exec(pm_t *m, const char *s)
{
  const char *p = m->pat, *ep;
  ptrdiff_t left = m->left;   /* in a register; m->left again on return */
  if (m->stopped) {
    s = m->s;
    p = m->p;
    m->stopped = 0;
  }
  for (;;) {
    if (--left <= 0) {
      int stop = pm_due(m);
      left = m->left;
      if (stop) {
        m->s = s;
        m->p = p;
        m->stopped = 1;
        return PM_STOP;
      }
    }
    switch (*p) {
    case '\0':
      m->left = left;
      m->e = s;
      return PM_MATCH;
    case '(': {
      int pos = p[1] == ')';
      if (m->level >= PM_MAXCAP)
        pm_error(m, "too many captures");
      m->cap[m->level].init = s;
      m->cap[m->level].len = pos ? CAP_POSITION : CAP_UNFINISHED;
      m->level++;
      push_frame(m, F_OPEN, s, p, NULL, 0);
      p += pos ? 2 : 1;
      continue;
    }
    case ')': {
      int l = m->level - 1;
      while (l >= 0 && m->cap[l].len != CAP_UNFINISHED)
        l--;
      if (l < 0)
        pm_error(m, "invalid pattern capture");
      m->cap[l].len = s - m->cap[l].init;
      push_frame(m, F_CLOSE, s, p, NULL, l);
      p++;
      continue;
    }
    case '$':
      if (p[1] == '\0') {
        if (s != m->end)
          goto fail;
        m->left = left;
        m->e = s;
        return PM_MATCH;
      }
      break;   /* a '$' elsewhere is itself */
    case '%':
      if (p[1] == 'b') {   /* %bxy: a balanced run from x to y */
        if (p[2] == '\0' || p[3] == '\0')
          pm_error(m, "unbalanced pattern");
        if (*s != p[2])    /* at the end, the subject's NUL */
          goto fail;
        int depth = 1;
        const char *q = s;
        while (++q < m->end) {
          if (*q == p[3]) {
            if (--depth == 0)
              break;
          } else if (*q == p[2]) {
            depth++;
          }
        }
        left -= q - s;
        if (q >= m->end)
          goto fail;
        s = q + 1;
        p += 4;
        continue;
      }
      if (p[1] == 'f') {   /* %f[set]: a frontier */
        p += 2;
        if (*p != '[')
          pm_error(m, "missing '[' after '%f' in pattern");
        ep = item_end(m, p);
        int before = s == m->src ? 0 : (unsigned char)s[-1];
        if (in_set(before, p, ep - 1) || !in_set((unsigned char)*s, p, ep - 1))
          goto fail;
        p = ep;
        continue;
      }
      if (is_digit((unsigned char)p[1])) {   /* %1-%9: a capture again */
        int l = p[1] - '1';
        if (l < 0 || l >= m->level || m->cap[l].len == CAP_UNFINISHED)
          pm_error(m, "invalid capture index");
        size_t len = (size_t)m->cap[l].len;   /* a position's: never fits */
        if ((size_t)(m->end - s) < len || memcmp(m->cap[l].init, s, len) != 0)
          goto fail;
        left -= (ptrdiff_t)len;
        s += len;
        p += 2;
        continue;
      }
      break;
    }
    /* A single-character class, and what may repeat it. */
    ep = item_end(m, p);
    int one = s < m->end && single((unsigned char)*s, p, ep);
    switch (*ep) {
    case '?':
      if (one) {
        push_frame(m, F_OPT, s, p, ep, 0);
        s++;
      }
      p = ep + 1;
      continue;
    case '+':
      if (!one)
        goto fail;
      s++;
      /* fall through - then as many more as there are */
    case '*': {
      ptrdiff_t i = 0;
      while (s + i < m->end && single((unsigned char)s[i], p, ep))
        i++;
      left -= i;
      push_frame(m, F_MAX, s, p, ep, i);
      s += i;
      p = ep + 1;
      continue;
    }
    case '-':
      push_frame(m, F_MIN, s, p, ep, 0);
      p = ep + 1;
      continue;
    default:
      if (!one)
        goto fail;
      s++;
      p = ep;
      continue;
    }
  fail:
    /* Back to the newest frame with a way left, undoing the captures on
     * the way there. */
    for (;;) {
      if (m->n == 0) {
        m->left = left;
        return PM_FAIL;
      }
      frame_t *f = &m->f[m->n - 1];
      if (f->kind == F_OPT) {             /* without the item */
        s = f->s;
        p = f->ep + 1;
        m->n--;
        break;
      }
      if (f->kind == F_MAX && f->i > 0) {   /* one repetition fewer */
        s = f->s + --f->i;
        p = f->ep + 1;
        break;
      }
      if (f->kind == F_MIN && f->s < m->end &&
          single((unsigned char)*f->s, f->p, f->ep)) {   /* one more */
        s = ++f->s;
        p = f->ep + 1;
        break;
      }
      if (f->kind == F_OPEN)
        m->level--;
      else if (f->kind == F_CLOSE)
        m->cap[f->i].len = CAP_UNFINISHED;
      m->n--;
    }
  }
}

/* The whole pattern as the matcher would walk it, raising the first error
 * it would meet (see DESIGN, Limits); repl: gsub's replacement string, or
 * NULL. Every match walks the same items in the same order, whatever the
 * subject, so the captures open at each item are known here. */
static void pm_check(pm_t *m, const char *repl, size_t rlen)
{
  const char *p = m->pat;
  int level = 0, depth = 1;   /* frames, but for x?'s */
  size_t opt = 0;             /* x?'s: each of their frames holds a character */
  char open[PM_MAXCAP];
  while (*p) {
    switch (*p) {
    case '(':
      if (level >= PM_MAXCAP)
        pm_error(m, "too many captures");
      open[level++] = p[1] != ')';
      depth++;
      p += p[1] == ')' ? 2 : 1;
      continue;
    case ')': {
      int l = level - 1;
      while (l >= 0 && !open[l])
        l--;
      if (l < 0)
        pm_error(m, "invalid pattern capture");
      open[l] = 0;
      depth++;
      p++;
      continue;
    }
    case '$':
      if (p[1] == '\0') {
        p++;
        continue;
      }
      break;
    case '%':
      if (p[1] == 'b') {
        if (p[2] == '\0' || p[3] == '\0')
          pm_error(m, "unbalanced pattern");
        p += 4;
        continue;
      }
      if (p[1] == 'f') {
        if (p[2] != '[')
          pm_error(m, "missing '[' after '%f' in pattern");
        p = item_end(m, p + 2);
        continue;
      }
      if (is_digit((unsigned char)p[1])) {
        int l = p[1] - '1';
        if (l < 0 || l >= level || open[l])
          pm_error(m, "invalid capture index");
        p += 2;
        continue;
      }
      break;
    }
    p = item_end(m, p);
    if (*p == '?')
      opt++;
    else if (*p == '*' || *p == '+' || *p == '-')
      depth++;
    if (*p == '?' || *p == '*' || *p == '+' || *p == '-')
      p++;
  }
  size_t len = (size_t)(m->end - m->src);
  if (depth + (opt < len ? opt : len) > PM_MAXDEPTH)
    pm_error(m, "pattern too complex");
  if (repl == NULL) {   /* all captures are results */
    for (int l = 0; l < level; l++)
      if (open[l])
        pm_error(m, "unfinished capture");
    return;
  }
  for (size_t i = 0; i + 1 < rlen; i++) {
    if (repl[i] != '%')
      continue;
    int l = repl[++i] - '1';
    if (l < 0 || l > 8)
      continue;   /* %0, or a character as itself */
    if (l >= level && l != 0)
      pm_error(m, "invalid capture index");
    if (l < level && open[l])
      pm_error(m, "unfinished capture");
  }
}

/* -- Results --------------------------------------------------------------- */

/* Capture i of a match [s, e) (the whole match for capture 0 of a pattern
 * without captures). */
static void push_capture(pm_t *m, int i, const char *s, const char *e)
{
  lua_State *L = m->L;
  if (i >= m->level) {
    if (i != 0)
      pm_error(m, "invalid capture index");
    lua_pushlstring(L, s, (size_t)(e - s));
    return;
  }
  ptrdiff_t len = m->cap[i].len;
  if (len == CAP_UNFINISHED)
    pm_error(m, "unfinished capture");
  if (len == CAP_POSITION)
    lua_pushinteger(L, m->cap[i].init - m->src + 1);
  else
    lua_pushlstring(L, m->cap[i].init, (size_t)len);
}

/* All captures, or the whole match if there are none and s is not NULL. */
static int push_captures(pm_t *m, const char *s, const char *e)
{
  int n = m->level == 0 && s ? 1 : m->level;
  luaL_checkstack(m->L, n, "too many captures");
  for (int i = 0; i < n; i++)
    push_capture(m, i, s, e);
  return n;
}

/* -- Calls ------------------------------------------------------------------
 * A call's state, on the C stack while it runs from Lua, in a userdata
 * (its continuation) once suspended: what the driver of each function
 * (drive) needs to go on, with the matcher. */

enum { FIND, MATCH, GMATCH, GSUB };

/* A continuation's environment table anchors what its call points into:
 * at 1-3 the call's arguments (gmatch's iterator: its upvalues), at A_BUF
 * gsub's result so far (a boxed call's: only that, its arguments are on
 * its Lua loop's stack). */
enum { A_BUF = 4 };

/* gmatch's iterator's state, its first upvalue (the subject and the
 * pattern are the others, which anchor them). */
typedef struct gmatch {
  const char *s, *pat;
  size_t len;
  size_t pos;             /* where the next search starts */
} gmatch_t;

typedef struct call {
  mb_run_cont_t cont;     /* first: run.c's */
  int what;
  int anchor;             /* find, match, gsub: the pattern began with ^ */
  int stops;              /* may it suspend (not gsub calling Lua)? */
  int boxed;              /* it lives in a userdata of its own: a gsub
                             whose replacements a Lua loop makes (see
                             gsub_start) */
  const char *at;         /* where the current match started */
  gmatch_t *gm;           /* gmatch's iterator's */
  int lead_known;         /* lead_p, lead_ep are set */
  const char *lead_p, *lead_ep;   /* the character every match starts with
                                     (a class), or NULL if none (see skip) */
  /* gsub */
  int n, max_n;           /* replacements done, allowed */
  int repl_type;
  const char *repl;       /* a string replacement */
  size_t repl_len;
  int buf_slot;           /* the stack slot anchoring buf's userdata
                             (boxed: its environment's A_BUF, see buf_need) */
  const char *ps, *pe;    /* boxed: the match [ps, pe) its Lua loop is
                             replacing, or ps NULL */
  int done;               /* boxed: the loop has ended */
  char *buf;              /* the result so far: in init or a userdata */
  size_t len, cap;
  char init[256];
  pm_t m;
} call_t;

/* Room for more bytes of gsub's result: a userdata twice as large,
 * anchored at buf_slot instead of the last (a boxed call, which is its
 * userdata at 1: in that one's environment). */
static void buf_need(call_t *c, size_t more)
{
  if (c->cap - c->len >= more)
    return;
  lua_State *L = c->m.L;
  if (more > ((size_t)1 << 31) - c->len)
    luaL_error(L, "string length overflow");
  size_t cap = c->cap * 2 > c->len + more ? c->cap * 2 : c->len + more;
  char *b = lua_newuserdata(L, cap);
  memcpy(b, c->buf, c->len);
  if (c->boxed) {
    lua_getfenv(L, 1);
    lua_insert(L, -2);
    lua_rawseti(L, -2, A_BUF);
    lua_pop(L, 1);
  } else {
    lua_replace(L, c->buf_slot);
  }
  c->buf = b;
  c->cap = cap;
}

static void buf_add(call_t *c, const char *s, size_t len)
{
  buf_need(c, len);
  memcpy(c->buf + c->len, s, len);
  c->len += len;
}

/* Add the value at the top of L (a string or number, popped). */
static void buf_add_top(call_t *c)
{
  size_t len;
  const char *s = lua_tolstring(c->m.L, -1, &len);
  buf_add(c, s, len);
  lua_pop(c->m.L, 1);
}

/* gsub: what replaces the match [s, e). */
static void add_replacement(call_t *c, const char *s, const char *e)
{
  pm_t *m = &c->m;
  lua_State *L = m->L;
  if (c->repl_type == LUA_TSTRING) {
    const char *r = c->repl, *rend = r + c->repl_len;
    while (r < rend) {
      const char *pct = memchr(r, '%', (size_t)(rend - r));
      if (pct == NULL) {
        buf_add(c, r, (size_t)(rend - r));
        break;
      }
      buf_add(c, r, (size_t)(pct - r));
      r = pct + 1;   /* at the end: the string's NUL, added as itself */
      if (!is_digit((unsigned char)*r)) {
        buf_add(c, r, 1);
      } else if (*r == '0') {
        buf_add(c, s, (size_t)(e - s));
      } else {
        push_capture(m, *r - '1', s, e);
        buf_add_top(c);
      }
      r++;
    }
    return;
  }
  if (c->repl_type == LUA_TFUNCTION) {
    mb_run_calls_lua();
    lua_pushvalue(L, 3);
    lua_call(L, push_captures(m, s, e), 1);
  } else {
    push_capture(m, 0, s, e);
    lua_gettable(L, 3);
  }
  if (!lua_toboolean(L, -1)) {   /* nil or false: the match stays */
    lua_pop(L, 1);
    buf_add(c, s, (size_t)(e - s));
  } else if (!lua_isstring(L, -1)) {
    luaL_error(L, "invalid replacement value (a %s)", luaL_typename(L, -1));
  } else {
    buf_add_top(c);
  }
}

/* The first position from t where a match can start: where the
 * pattern's first item matches, if it takes a character (x or x+). Where
 * it does not, a start there fails at its first item: this skips in a
 * tight loop what the matcher would try and fail position by position.
 * Called after a first try, which has checked the item's syntax. */
static const char *skip(call_t *c, const char *t)
{
  pm_t *m = &c->m;
  if (!c->lead_known) {
    const char *p = m->pat;
    c->lead_known = 1;
    c->lead_p = NULL;
    if (*p == '\0' || *p == '(' || *p == ')' || (*p == '$' && p[1] == '\0') ||
        (*p == '%' && (p[1] == 'b' || p[1] == 'f' || is_digit((unsigned char)p[1]))))
      return t;
    const char *ep = item_end(m, p);
    if (*ep == '?' || *ep == '*' || *ep == '-')
      return t;
    c->lead_p = p;
    c->lead_ep = ep;
  }
  if (c->lead_p == NULL)
    return t;
  const char *from = t;
  while (t < m->end && !single((unsigned char)*t, c->lead_p, c->lead_ep))
    t++;
  m->left -= t - from;
  return t;
}

/* The matcher stopped (PM_STOP): suspend (1), or go on (0)? Where the
 * process cannot yield, an exit signal raises instead. */
static int stop_here(call_t *c, int suspended)
{
  if (suspended)
    return 1;
  lua_State *L = c->m.L;
  if (c->stops && mb_run_can_yield(mb_proc_of(L), L))
    return 1;
  if (c->m.why == 2)
    luaL_error(L, "process is exiting");
  return 0;
}

/* gsub past the match [s, e) (e NULL: none at s): where the next match is
 * tried, the text skipped kept. 0 if there is none to try. */
static int gsub_next(call_t *c, const char *s, const char *e)
{
  pm_t *m = &c->m;
  if (e && e > s) {
    c->at = e;
  } else if (s < m->end) {   /* the text up to the next possible match stays */
    c->at = c->anchor ? s + 1 : skip(c, s + 1);
    buf_add(c, s, (size_t)(c->at - s));
  } else {
    return 0;
  }
  if (c->anchor)
    return 0;
  pm_start(m);
  return 1;
}

/* Run call c on: push its results and return their number, or -1 where
 * it is to suspend. suspended: c runs as a continuation. */
static int drive(call_t *c, int suspended)
{
  pm_t *m = &c->m;
  lua_State *L = m->L;
  for (;;) {
    if (c->what == GSUB && (c->n >= c->max_n || c->done))
      break;
    int r = pm_exec(m, c->at);
    if (r == PM_STOP) {
      if (stop_here(c, suspended))
        return -1;
      continue;
    }
    const char *s = c->at, *e = r == PM_MATCH ? m->e : NULL;
    switch (c->what) {
    case FIND:
      if (e) {
        lua_pushinteger(L, s - m->src + 1);
        lua_pushinteger(L, e - m->src);
        return push_captures(m, NULL, NULL) + 2;
      }
      /* fall through */
    case MATCH:
      if (e)
        return push_captures(m, s, e);
      if (c->anchor || s >= m->end) {
        lua_pushnil(L);
        return 1;
      }
      c->at = skip(c, s + 1);
      pm_start(m);
      continue;
    case GMATCH:
      if (e) {   /* the next search starts after it (after one more if
                    empty), even if its captures raise, as in LuaJIT */
        c->gm->pos = (size_t)(e - m->src) + (e == s);
        return push_captures(m, s, e);
      }
      if (s >= m->end)
        return 0;
      c->at = skip(c, s + 1);
      pm_start(m);
      continue;
    }
    /* GSUB */
    if (e) {
      c->n++;
      if (c->boxed) {   /* the Lua loop makes the replacement */
        c->ps = s;
        c->pe = e;
        lua_pushboolean(L, 1);
        return 1 + push_captures(m, s, e);
      }
      add_replacement(c, s, e);
    }
    if (!gsub_next(c, s, e))
      break;
  }
  buf_add(c, c->at, (size_t)(m->end - c->at));
  if (c->boxed)
    lua_pushboolean(L, 0);
  lua_pushlstring(L, c->buf, c->len);
  lua_pushinteger(L, c->n);
  if (c->boxed) {
    if (c->buf != c->init) {   /* the spare holds nothing of the call */
      c->buf = c->init;
      lua_getfenv(L, 1);
      lua_pushnil(L);
      lua_rawseti(L, -2, A_BUF);
      lua_pop(L, 1);
    }
    return 3;
  }
  return 2;
}

/* A suspended call's step (mb_run_cont_t): on the process's main thread
 * L, the call's userdata at 1. */
static int step(lua_State *L, void *self)
{
  call_t *c = self;
  c->m.L = L;
  if (c->boxed)
    return drive(c, 1);
  lua_getfenv(L, 1);                  /* 2: its anchors */
  lua_rawgeti(L, 2, 3);               /* 3: gsub's replacement (add_replacement) */
  lua_rawgeti(L, 2, A_BUF);           /* 4: gsub's result, if in a userdata */
  c->buf_slot = 4;
  int n = drive(c, 1);
  if (n < 0) {
    lua_pushvalue(L, 4);
    lua_rawseti(L, 2, A_BUF);
  }
  return n;
}

/* Suspend call c (on the C stack) of the C function running in L: check
 * its pattern whole, then move c into a continuation that anchors the
 * strings it points into. Returns as mb_run_suspend. */
static int suspend(call_t *c)
{
  lua_State *L = c->m.L;
  if (c->boxed) {   /* checked by gsub_start; its userdata at 1 */
    c->cont.step = step;
    lua_pushvalue(L, 1);
    return mb_run_suspend(L);
  }
  pm_check(&c->m, c->what == GSUB ? c->repl : NULL, c->repl_len);
  call_t *u = lua_newuserdata(L, sizeof *u);
  memcpy(u, c, sizeof *u);
  if (c->buf == c->init)
    u->buf = u->init;
  u->cont.step = step;
  lua_createtable(L, A_BUF, 0);
  for (int a = 1; a <= A_BUF; a++) {
    if (a == A_BUF && c->what != GSUB)
      break;
    lua_pushvalue(L, a == A_BUF ? c->buf_slot : c->what == GMATCH ? lua_upvalueindex(a) : a);
    lua_rawseti(L, -2, a);
  }
  lua_setfenv(L, -2);
  return mb_run_suspend(L);
}

/* Run call c, set up, from Lua: its results, or its suspension. */
static int run_call(call_t *c)
{
  c->m.left = PM_POLL;
  int n = drive(c, 0);
  return n >= 0 ? n : suspend(c);
}

static void call_init(call_t *c, lua_State *L, int what, const char *s, size_t len,
                      const char *pat)
{
  c->what = what;
  c->anchor = 0;
  c->lead_known = 0;
  c->stops = 1;
  c->boxed = 0;
  c->done = 0;
  c->m.L = L;
  c->m.soft = NULL;
  c->m.src = s;
  c->m.end = s + len;
  if (what != GMATCH && *pat == '^') {
    c->anchor = 1;
    pat++;
  }
  c->m.pat = pat;
}

/* -- The functions ------------------------------------------------------- */

/* An integer argument as LuaJIT's string functions read it (a double
 * truncated to 32 bits, out of range as the x86 conversion gives). */
static int32_t opt_int32(lua_State *L, int i, int32_t def)
{
  if (lua_isnoneornil(L, i))
    return def;
  lua_Number n = luaL_checknumber(L, i);
  return n >= -2147483648.0 && n < 2147483648.0 ? (int32_t)n : INT32_MIN;
}

/* The first n in h. memmem is linear but sets up a table first: a short
 * haystack, or a needle of one or two characters, is searched directly. */
static const char *find_plain(const char *h, size_t hl, const char *n, size_t nl)
{
  if (nl == 0)
    return h;
  if (nl > hl)
    return NULL;
  if (nl > 2 && hl > 256)
    return memmem(h, hl, n, nl);
  const char *last = h + (hl - nl);
  for (const char *q = h; q <= last; q++) {
    q = memchr(q, n[0], (size_t)(last - q) + 1);
    if (q == NULL)
      return NULL;
    if (memcmp(q + 1, n + 1, nl - 1) == 0)
      return q;
  }
  return NULL;
}

static int has_magic(const char *p, size_t len)
{
  for (size_t i = 0; i < len; i++)
    if (p[i] != '\0' && strchr("^$*+?.([%-", p[i]))
      return 1;
  return 0;
}

static int find_or_match(lua_State *L, int what)
{
  size_t len, plen;
  const char *s = luaL_checklstring(L, 1, &len);
  const char *pat = luaL_checklstring(L, 2, &plen);
  int32_t init = opt_int32(L, 3, 1);
  init = init < 0 ? init + (int32_t)len : init - 1;
  size_t at = init < 0 ? 0 : (size_t)init > len ? len : (size_t)init;
  if (what == FIND && (lua_toboolean(L, 4) || !has_magic(pat, plen))) {
    const char *q = find_plain(s + at, len - at, pat, plen);
    if (q == NULL) {
      lua_pushnil(L);
      return 1;
    }
    lua_pushinteger(L, q - s + 1);
    lua_pushinteger(L, q - s + (ptrdiff_t)plen);
    return 2;
  }
  call_t c;
  call_init(&c, L, what, s, len, pat);
  c.at = s + at;
  pm_start(&c.m);
  return run_call(&c);
}

static int l_find(lua_State *L)
{
  return find_or_match(L, FIND);
}

static int l_match(lua_State *L)
{
  return find_or_match(L, MATCH);
}

/* gmatch's iterator (see gmatch_t). */
static int gmatch_next(lua_State *L)
{
  gmatch_t *g = lua_touserdata(L, lua_upvalueindex(1));
  if (g->pos > g->len)
    return 0;
  call_t c;
  call_init(&c, L, GMATCH, g->s, g->len, g->pat);
  c.gm = g;
  c.at = g->s + g->pos;
  pm_start(&c.m);
  return run_call(&c);
}

static int l_gmatch(lua_State *L)
{
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  const char *pat = luaL_checkstring(L, 2);
  gmatch_t *g = lua_newuserdata(L, sizeof *g);
  g->s = s;
  g->pat = pat;
  g->len = len;
  g->pos = 0;
  lua_pushvalue(L, 1);
  lua_pushvalue(L, 2);
  lua_pushcclosure(L, gmatch_next, 3);
  return 1;
}

/* Has the table at idx an __index metamethod (so that indexing it may
 * call Lua)? */
static int has_index(lua_State *L, int idx)
{
  if (!lua_getmetatable(L, idx))
    return 0;
  lua_pushliteral(L, "__index");
  lua_rawget(L, -2);
  int yes = !lua_isnil(L, -1);
  lua_pop(L, 2);
  return yes;
}

static int l_gsub(lua_State *L)
{
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  const char *pat = luaL_checkstring(L, 2);
  int t = lua_type(L, 3);
  int max_n = (int)luaL_optinteger(L, 4, (lua_Integer)len + 1);
  if (t != LUA_TNUMBER && t != LUA_TSTRING && t != LUA_TFUNCTION && t != LUA_TTABLE)
    return luaL_argerror(L, 3, "string/function/table expected");
  /* A function replacement calls back into Lua from here, and each level
   * of such a recursion nests this frame (see mb_lstate_cstack_check). */
  mb_lstate_cstack_check(L);
  lua_settop(L, 4);
  lua_pushnil(L);            /* 5: the result's userdata, once it grows */
  call_t c;
  call_init(&c, L, GSUB, s, len, pat);
  c.n = 0;
  c.max_n = max_n;
  c.repl_type = t == LUA_TNUMBER ? LUA_TSTRING : t;
  c.repl = NULL;
  c.repl_len = 0;
  if (c.repl_type == LUA_TSTRING)
    c.repl = lua_tolstring(L, 3, &c.repl_len);
  c.stops = c.repl_type == LUA_TSTRING || (t == LUA_TTABLE && !has_index(L, 3));
  c.buf_slot = 5;
  c.buf = c.init;
  c.len = 0;
  c.cap = sizeof c.init;
  c.at = s;
  pm_start(&c.m);
  return run_call(&c);
}

/* -- gsub calling Lua -------------------------------------------------------
 * gsub with a function replacement, or a table with __index, is a Lua loop
 * (gsub_src) over a call of the matcher boxed in a userdata: gsub_step
 * runs it to the next match and returns its captures, the loop makes the
 * replacement (a call of the function, an index of the table) and hands it
 * to the next step. So the process can be preempted, receive or be killed
 * in the replacement function as anywhere in Lua, and gsub_step, called
 * from Lua, suspends where the matcher stops, as find does. The C gsub does
 * the rest (a string replacement, a table indexed raw, a bad argument or
 * pattern: so that its errors are LuaJIT's, raised where LuaJIT raises
 * them) by a tail call. go tail-calls itself: one frame however many
 * matches, holding the subject, the pattern and the replacement (the
 * boxed call points into the first two), and gsub_step's errors name the
 * line that called gsub (level 2: gsub_step's caller is go, in gsub's
 * place). A finished call's userdata is kept for the next (spare); a call
 * under way is never the spare, so that a gsub made meanwhile (by the
 * replacement function, a debug hook, a finalizer) takes another. */
static const char gsub_src[] =
  "return function(cgsub, start, step)\n"
  "  local spare\n"
  "  local function go(st, s, p, repl, isf, more, ...)\n"
  "    if not more then\n"
  "      spare = st\n"
  "      return ...\n"
  "    end\n"
  "    local v\n"
  "    if isf then v = repl(...) else v = repl[(...)] end\n"
  "    return go(st, s, p, repl, isf, step(st, v))\n"
  "  end\n"
  "  return function(s, p, repl, n)\n"
  "    local kept = spare\n"
  "    spare = nil\n"
  "    local st, isf = start(kept, s, p, repl, n)\n"
  "    if st == nil then\n"
  "      spare = kept\n"
  "      return cgsub(s, p, repl, n)\n"
  "    end\n"
  "    return go(st, s, p, repl, isf, step(st))\n"
  "  end, go\n"
  "end\n";
static mb_lstate_chunk_t gsub_chunk = MB_LSTATE_LIBCHUNK(gsub_src, "=string.gsub");

/* gsub_start(spare, s, p, repl, n) -> the call, is repl a function; or
 * nothing where the C gsub is to do it: a replacement that is not a
 * function or a table with __index, an argument that is not what this
 * loop takes (s and p must be strings: the loop anchors those), or a
 * pattern in which the check finds an error (the C gsub raises it if
 * LuaJIT would: not where no match reaches the bad part). spare: a
 * finished call, or nil. */
static int gsub_start(lua_State *L)
{
  int t = lua_type(L, 4);
  if ((t != LUA_TFUNCTION && (t != LUA_TTABLE || !has_index(L, 4))) ||
      lua_type(L, 2) != LUA_TSTRING || lua_type(L, 3) != LUA_TSTRING ||
      !(lua_isnoneornil(L, 5) || lua_isnumber(L, 5)))
    return 0;
  size_t len;
  const char *s = lua_tolstring(L, 2, &len);
  const char *pat = lua_tostring(L, 3);
  int max_n = (int)luaL_optinteger(L, 5, (lua_Integer)len + 1);
  call_t *c = lua_touserdata(L, 1);
  if (c == NULL) {
    c = lua_newuserdata(L, sizeof *c);
    lua_createtable(L, A_BUF, 0);
    lua_setfenv(L, -2);
  } else {
    lua_pushvalue(L, 1);
  }
  call_init(c, L, GSUB, s, len, pat);
  jmp_buf jb;
  c->m.soft = &jb;
  if (setjmp(jb) != 0) {
    c->m.soft = NULL;
    return 0;
  }
  pm_check(&c->m, NULL, 0);
  c->m.soft = NULL;
  c->boxed = 1;
  c->n = 0;
  c->max_n = max_n;
  c->repl_type = t;
  c->repl = NULL;
  c->repl_len = 0;
  c->buf = c->init;
  c->len = 0;
  c->cap = sizeof c->init;
  c->at = s;
  c->ps = NULL;
  pm_start(&c->m);
  lua_pushboolean(L, t == LUA_TFUNCTION);
  return 2;
}

/* gsub_step(call[, v]) -> true, the captures of the next match (the whole
 * match if there are none); or false, the result, the number of matches.
 * v: the replacement for the match the last step returned. */
static int gsub_step(lua_State *L)
{
  call_t *c = lua_touserdata(L, 1);
  c->m.L = L;
  c->m.left = PM_POLL;
  if (c->ps) {
    const char *s = c->ps, *e = c->pe;
    c->ps = NULL;
    if (!lua_toboolean(L, 2)) {   /* nil or false: the match stays */
      buf_add(c, s, (size_t)(e - s));
    } else if (lua_isstring(L, 2)) {
      size_t len;
      const char *r = lua_tolstring(L, 2, &len);
      buf_add(c, r, len);
    } else {
      luaL_where(L, 2);
      lua_pushfstring(L, "invalid replacement value (a %s)", luaL_typename(L, 2));
      lua_concat(L, 2);
      return lua_error(L);
    }
    if (!gsub_next(c, s, e))
      c->done = 1;
  }
  int n = drive(c, 0);
  return n < 0 ? suspend(c) : n;
}

void mb_strmatch_open(lua_State *L, int idx)
{
  static const luaL_Reg fns[] = {
    {"find", l_find}, {"match", l_match}, {"gmatch", l_gmatch}, {NULL, NULL}
  };
  idx = idx < 0 ? lua_gettop(L) + idx + 1 : idx;
  for (const luaL_Reg *f = fns; f->name; f++) {
    lua_pushcfunction(L, f->func);
    lua_setfield(L, idx, f->name);
  }
  static const lua_CFunction gsub_fns[] = {l_gsub, gsub_start, gsub_step, NULL};
  mb_lstate_push_lua_fn(L, &gsub_chunk, gsub_fns);
  lua_setfield(L, idx, "gsub");
}
