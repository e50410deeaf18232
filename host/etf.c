/* etf.c: the external term format codec (see etf.h).
 *
 * The encoder walks a payload of the codec's format (copy_format.h) twice:
 * once with a NULL buffer, which ei's encoders accept and then only count
 * (mb_etf_size: the size, and every reason a value cannot be sent), then
 * into the caller's buffer of exactly that size (mb_etf_write). The decoder
 * checks the ETF bytes with its own bounds-checked walk (check_term) before
 * any ei decoder reads them, then builds the message with the builder of
 * msg.h.
 */
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "copy.h"
#include "copy_format.h"
#include "ei.h"
#include "err.h"
#include "etf.h"
#include "remote.h"
#include "term.h"

static uint32_t self_node;       /* atom; 0: nonode@nohost */
static uint32_t self_creation;

void mb_etf_set_node(uint32_t node_atom, uint32_t creation)
{
  self_node = node_atom;
  self_creation = creation;
}

uint32_t mb_etf_node(void) { return self_node; }
uint32_t mb_etf_creation(void) { return self_creation; }

static const char *node_name(uint32_t atom)
{
  const char *s = atom ? mb_atom_name(atom, NULL) : NULL;
  return s ? s : "nonode@nohost";
}

/* -- Pids, refs, atoms ------------------------------------------------------ */

int mb_etf_put_pid(char *buf, int *idx, mb_pid_t pid)
{
  erlang_pid p;
  memset(&p, 0, sizeof p);
  if (mb_id_is_remote(pid)) {
    mb_rpid_t r;
    if (mb_remote_pid_get(pid, &r) < 0)
      return MB_EBADARG;
    if (r.name) {
      /* A name's id (remote.h) is the {Name, Node} Erlang uses for it. */
      if (ei_encode_tuple_header(buf, idx, 2) < 0 || mb_etf_put_atom(buf, idx, r.name) < 0)
        return MB_EBADARG;
      return mb_etf_put_atom(buf, idx, r.node);
    }
    snprintf(p.node, sizeof p.node, "%s", node_name(r.node));
    p.num = r.num;
    p.serial = r.serial;
    p.creation = r.creation;
  } else {
    snprintf(p.node, sizeof p.node, "%s", node_name(self_node));
    p.num = (unsigned)(pid & MB_PID_SLOT_MASK);
    p.serial = (unsigned)(pid >> MB_PID_SLOT_BITS);
    p.creation = self_creation;
  }
  return ei_encode_pid(buf, idx, &p) < 0 ? MB_EBADARG : 0;
}

/* A remote ref by its contents. */
static int put_rref(char *buf, int *idx, const mb_rref_t *rr)
{
  erlang_ref r;
  memset(&r, 0, sizeof r);
  snprintf(r.node, sizeof r.node, "%s", node_name(rr->node));
  r.len = (int)rr->len;
  memcpy(r.n, rr->n, sizeof r.n);
  r.creation = rr->creation;
  return ei_encode_ref(buf, idx, &r) < 0 ? MB_EBADARG : 0;
}

int mb_etf_put_ref(char *buf, int *idx, mb_ref_t ref)
{
  erlang_ref r;
  memset(&r, 0, sizeof r);
  if (mb_id_is_remote(ref)) {
    mb_rref_t rr;
    if (mb_remote_ref_get(ref, &rr) < 0)
      return MB_EBADARG;
    return put_rref(buf, idx, &rr);
  } else {
    /* Our refs are 64-bit counters, laid out as Erlang's three words:
     * the first holds only 18 bits (a node refuses a larger one). */
    snprintf(r.node, sizeof r.node, "%s", node_name(self_node));
    r.len = 3;
    r.n[0] = (unsigned)(ref & 0x3FFFFu);
    r.n[1] = (unsigned)((ref >> 18) & 0xFFFFFFFFu);
    r.n[2] = (unsigned)(ref >> 50);
    r.creation = self_creation;
  }
  return ei_encode_ref(buf, idx, &r) < 0 ? MB_EBADARG : 0;
}

static long utf8_chars(const unsigned char *s, uint32_t n);

/* An atom named by the UTF-8 bytes s[0..n), or -1 if it has more than 255
 * characters or is not valid UTF-8: what the decoder (check_atom) and
 * Erlang's take, which is less than what ei's encoder checks. */
static int put_name(char *buf, int *idx, const void *s, size_t n)
{
  long chars = n <= 255 * 4 ? utf8_chars(s, (uint32_t)n) : -1;
  if (chars < 0 || chars > 255)
    return -1;
  return ei_encode_atom_len_as(buf, idx, s, (int)n, ERLANG_UTF8, ERLANG_UTF8);
}

int mb_etf_put_atom(char *buf, int *idx, uint32_t atom)
{
  size_t n;
  const char *s = mb_atom_name(atom, &n);
  if (s == NULL)
    return MB_EBADARG;
  return put_name(buf, idx, s, n) < 0 ? MB_EBADARG : 0;
}

/* The atom term at buf[*idx] (checked: at most 255 characters, valid
 * UTF-8) as UTF-8 in name (MAXATOMLEN_UTF8 bytes, NUL added), its length
 * in *n; 0, or -1 if it is no atom. Not ei_decode_atom_as, which gives a C
 * string: Erlang allows a NUL in an atom, and the name would lose its end. */
static int read_atom(const char *buf, int *idx, char *name, size_t *n)
{
  const unsigned char *p = (const unsigned char *)buf + *idx;
  uint32_t len, hdr;
  if (p[0] == 'd' || p[0] == 'v')
    len = (uint32_t)p[1] << 8 | p[2], hdr = 3;
  else if (p[0] == 's' || p[0] == 'w')
    len = p[1], hdr = 2;
  else
    return -1;
  const unsigned char *s = p + hdr;
  size_t k = 0;
  if (p[0] == 'v' || p[0] == 'w') {
    if (len >= MAXATOMLEN_UTF8)
      return -1;
    memcpy(name, s, len);
    k = len;
  } else {
    for (uint32_t i = 0; i < len; i++) {   /* Latin-1 */
      if (k + 2 >= MAXATOMLEN_UTF8)
        return -1;
      if (s[i] < 0x80) {
        name[k++] = (char)s[i];
      } else {
        name[k++] = (char)(0xC0 | s[i] >> 6);
        name[k++] = (char)(0x80 | (s[i] & 0x3F));
      }
    }
  }
  name[k] = '\0';
  *n = k;
  *idx += (int)(hdr + len);
  return 0;
}

int mb_etf_get_atom(const char *buf, int *idx, uint32_t *out)
{
  char name[MAXATOMLEN_UTF8];
  size_t n;
  if (read_atom(buf, idx, name, &n) < 0)
    return MB_ETF_MALFORMED;
  if (n == 0) {                  /* '' is an atom; ours need a name */
    *out = 0;
    return MB_ETF_UNSUPPORTED;
  }
  int64_t a = mb_atom_intern(name, n);
  if (a < 0)
    return (int)a == MB_EBADARG ? MB_ETF_UNSUPPORTED : (int)a;
  *out = (uint32_t)a;
  return 0;
}

/* The atom of a node name from ei's struct, interned. */
static int node_atom(const char *node, uint32_t *out)
{
  size_t n = strlen(node);
  int64_t a = mb_atom_intern(node, n);
  if (a < 0)
    return (int)a == MB_EBADARG ? MB_ETF_MALFORMED : (int)a;
  *out = (uint32_t)a;
  return 0;
}

int mb_etf_get_pid(const char *buf, int *idx, mb_pid_t *out)
{
  erlang_pid p;
  if (ei_decode_pid(buf, idx, &p) < 0)
    return MB_ETF_MALFORMED;
  mb_rpid_t r = {0};
  int rc = node_atom(p.node, &r.node);
  if (rc < 0)
    return rc;
  if (r.node == self_node && self_node && p.creation == self_creation &&
      p.num <= MB_PID_SLOT_MASK && p.serial < (1u << 28)) {
    *out = ((mb_pid_t)p.serial << MB_PID_SLOT_BITS) | p.num;
    return *out ? 0 : MB_ETF_MALFORMED;
  }
  r.num = p.num;
  r.serial = p.serial;
  r.creation = p.creation;
  int64_t id = mb_remote_pid(&r);
  if (id < 0)
    return (int)id;
  *out = (mb_pid_t)id;
  return 0;
}

/* A ref term at buf[*idx]: 0 and *local set when it is one of ours, or 0
 * and *rr filled for another node's (or an error). */
static int parse_ref(const char *buf, int *idx, mb_ref_t *local, mb_rref_t *rr)
{
  erlang_ref r;
  if (ei_decode_ref(buf, idx, &r) < 0)
    return MB_ETF_MALFORMED;
  memset(rr, 0, sizeof *rr);
  *local = 0;
  int rc = node_atom(r.node, &rr->node);
  if (rc < 0)
    return rc;
  if (r.len < 1 || r.len > MB_REF_MAX_WORDS)
    return MB_ETF_MALFORMED;
  if (rr->node == self_node && self_node && r.creation == self_creation &&
      r.len == 3 && r.n[0] < (1u << 18) && r.n[2] < (1u << 14)) {
    mb_ref_t id = (mb_ref_t)r.n[2] << 50 | (mb_ref_t)r.n[1] << 18 | r.n[0];
    if (id && !mb_id_is_remote(id)) {
      *local = id;
      return 0;
    }
  }
  rr->creation = r.creation;
  rr->len = (uint32_t)r.len;
  memcpy(rr->n, r.n, rr->len * sizeof rr->n[0]);
  return 0;
}

int mb_etf_get_ref(const char *buf, int *idx, mb_ref_t *out)
{
  mb_rref_t rr;
  int rc = parse_ref(buf, idx, out, &rr);
  if (rc < 0 || *out)
    return rc;
  int64_t id = mb_remote_ref(&rr);
  if (id < 0)
    return (int)id;
  *out = (mb_ref_t)id;
  return 0;
}

/* -- Encoder: payload -> ETF ------------------------------------------------ */

typedef struct {
  const unsigned char *base, *end;
  char *out;                     /* NULL: count only */
  int idx;
  int depth;
  size_t stack[MB_COPY_MAX_DEPTH + 1];  /* offsets of the tables being
                                           encoded: a back-reference to one
                                           of them is a cycle */
  char *err;
  size_t errlen;
} enc_t;

static int efail(enc_t *e, const char *what)
{
  if (e->err && e->errlen)
    snprintf(e->err, e->errlen, "%s", what);
  return -1;
}

/* Readers of our own format; the payload was made on this host, but a
 * short read still fails cleanly. */
static int rd_byte(enc_t *e, size_t *pos, unsigned *v)
{
  if (e->base + *pos >= e->end)
    return -1;
  *v = e->base[(*pos)++];
  return 0;
}

static int rd_varint(enc_t *e, size_t *pos, uint32_t *v)
{
  *v = 0;
  for (int shift = 0; shift < 35; shift += 7) {
    unsigned b;
    if (rd_byte(e, pos, &b) < 0)
      return -1;
    *v |= (uint32_t)(b & 0x7F) << shift;
    if (!(b & 0x80))
      return 0;
  }
  return -1;
}

static int rd_bytes(enc_t *e, size_t *pos, void *dst, size_t n)
{
  if ((size_t)(e->end - (e->base + *pos)) < n)
    return -1;
  memcpy(dst, e->base + *pos, n);
  *pos += n;
  return 0;
}

static int skip_value(enc_t *e, size_t *pos, int depth);

/* Skip the value at *pos (to count a table's live array items). */
static int skip_value(enc_t *e, size_t *pos, int depth)
{
  unsigned tag;
  uint32_t n, nh;
  if (depth > MB_COPY_MAX_DEPTH || rd_byte(e, pos, &tag) < 0)
    return -1;
  if (tag & T_SHORTSTR) {
    n = tag & SHORTSTR_MAX;
    if ((size_t)(e->end - (e->base + *pos)) < n)
      return -1;
    *pos += n;
    return 0;
  }
  switch (tag & ~T_SHARED) {
  case T_NIL: case T_FALSE: case T_TRUE:
    return 0;
  case T_NUMBER:
    *pos += 8;
    return e->base + *pos <= e->end ? 0 : -1;
  case T_STRING: case T_MODULE:
    if (rd_varint(e, pos, &n) < 0 || (size_t)(e->end - (e->base + *pos)) < n)
      return -1;
    *pos += n;
    return 0;
  case T_CFIELD:
    for (int k = 0; k < 2; k++) {
      if (rd_varint(e, pos, &n) < 0 || (size_t)(e->end - (e->base + *pos)) < n)
        return -1;
      *pos += n;
    }
    return 0;
  case T_BACKREF:
    return rd_varint(e, pos, &n);
  case T_RREF: {
    unsigned len;
    *pos += 8;
    if (e->base + *pos > e->end || rd_byte(e, pos, &len) < 0)
      return -1;
    *pos += 4 * (size_t)len;
    return e->base + *pos <= e->end ? 0 : -1;
  }
  case T_TABLE:
    if (rd_varint(e, pos, &n) < 0 || rd_bytes(e, pos, &nh, 4) < 0)
      return -1;
    for (uint64_t i = 0; i < n + 2 * (uint64_t)nh; i++)
      if (skip_value(e, pos, depth + 1) < 0)
        return -1;
    return 0;
  case T_TUPLE:
    if (rd_varint(e, pos, &n) < 0)
      return -1;
    for (uint32_t i = 0; i < n; i++)
      if (skip_value(e, pos, depth + 1) < 0)
        return -1;
    return 0;
  case T_FUNCTION: {
    unsigned nups;
    if (rd_varint(e, pos, &n) < 0 || rd_byte(e, pos, &nups) < 0)
      return -1;
    for (unsigned i = 0; i < nups; i++) {
      if (e->base + *pos < e->end && e->base[*pos] == T_UPJOIN) {
        (*pos)++;
        unsigned b;
        if (rd_varint(e, pos, &n) < 0 || rd_byte(e, pos, &b) < 0)
          return -1;
      } else if (skip_value(e, pos, depth + 1) < 0) {
        return -1;
      }
    }
    return 0;
  }
  default:
    if (mb_id_kind_of_tag(tag) == NULL)
      return -1;
    *pos += 8;
    return e->base + *pos <= e->end ? 0 : -1;
  }
}

static int enc_value(enc_t *e, size_t *pos, int flags);

#define E(call) do { if ((call) < 0) return efail(e, "cannot encode the value for Erlang"); } while (0)

static int enc_number(enc_t *e, double d)
{
  if (!isfinite(d))
    return efail(e, "cannot send inf or nan to another node (Erlang has no such floats)");
  if (d == floor(d) && fabs(d) < 9223372036854775808.0 && !(d == 0 && signbit(d)))
    E(ei_encode_longlong(e->out, &e->idx, (long long)d));
  else
    E(ei_encode_double(e->out, &e->idx, d));
  return 0;
}

static int enc_string_at(enc_t *e, size_t *pos, unsigned tag, const unsigned char **s, uint32_t *n)
{
  if (tag & T_SHORTSTR) {
    *n = tag & SHORTSTR_MAX;
  } else if (rd_varint(e, pos, n) < 0) {
    return -1;
  }
  if ((size_t)(e->end - (e->base + *pos)) < *n)
    return -1;
  *s = e->base + *pos;
  *pos += *n;
  return 0;
}

/* A map key: strings become atoms, anything else is encoded as a value. */
static int enc_key(enc_t *e, size_t *pos)
{
  size_t at = *pos;
  unsigned tag;
  if (rd_byte(e, pos, &tag) < 0)
    return efail(e, "corrupt message");
  if ((tag & T_SHORTSTR) || tag == T_STRING) {
    const unsigned char *s;
    uint32_t n;
    if (enc_string_at(e, pos, tag, &s, &n) < 0)
      return efail(e, "corrupt message");
    if (n > 255)
      return efail(e, "a table key longer than 255 bytes cannot be sent to "
                   "another node (string keys become atoms)");
    if (put_name(e->out, &e->idx, s, n) < 0)
      return efail(e, "a table key that is not valid UTF-8 cannot be sent to "
                   "another node (string keys become atoms)");
    return 0;
  }
  *pos = at;
  return enc_value(e, pos, 0);
}

static int enc_table(enc_t *e, size_t at, size_t *pos)
{
  uint32_t narr, nhash;
  if (rd_varint(e, pos, &narr) < 0 || rd_bytes(e, pos, &nhash, 4) < 0)
    return efail(e, "corrupt message");
  if (e->depth >= MB_ETF_MAX_DEPTH)
    return efail(e, "message nested too deep for another node");
  e->stack[e->depth++] = at;
  if (nhash == 0) {
    if (narr) {
      E(ei_encode_list_header(e->out, &e->idx, (int)narr));
      for (uint32_t i = 0; i < narr; i++)
        if (enc_value(e, pos, 0) < 0)
          return -1;
    }
    E(ei_encode_empty_list(e->out, &e->idx));
    e->depth--;
    return 0;
  }
  /* An improper list: array items and the one key "$tail". */
  size_t hpos = *pos;
  for (uint32_t i = 0; i < narr; i++)
    if (skip_value(e, &hpos, 0) < 0)
      return efail(e, "corrupt message");
  if (narr && nhash == 1 && e->base + hpos + 6 <= e->end &&
      e->base[hpos] == (T_SHORTSTR | 5) && memcmp(e->base + hpos + 1, "$tail", 5) == 0) {
    E(ei_encode_list_header(e->out, &e->idx, (int)narr));
    for (uint32_t i = 0; i < narr; i++)
      if (enc_value(e, pos, 0) < 0)
        return -1;
    *pos = hpos + 6;
    if (enc_value(e, pos, 0) < 0)
      return -1;
    e->depth--;
    return 0;
  }
  /* A map: array items under their integer keys, nil holes left out. */
  uint32_t live = 0;
  size_t p = *pos;
  for (uint32_t i = 0; i < narr; i++) {
    if (e->base + p >= e->end)
      return efail(e, "corrupt message");
    live += e->base[p] != T_NIL;
    if (skip_value(e, &p, 0) < 0)
      return efail(e, "corrupt message");
  }
  E(ei_encode_map_header(e->out, &e->idx, (int)(live + nhash)));
  for (uint32_t i = 0; i < narr; i++) {
    if (e->base[*pos] == T_NIL) {
      (*pos)++;
      continue;
    }
    E(ei_encode_long(e->out, &e->idx, (long)i + 1));
    if (enc_value(e, pos, 0) < 0)
      return -1;
  }
  for (uint32_t i = 0; i < nhash; i++)
    if (enc_key(e, pos) < 0 || enc_value(e, pos, 0) < 0)
      return -1;
  e->depth--;
  return 0;
}

static int enc_value(enc_t *e, size_t *pos, int flags)
{
  size_t at = *pos;
  unsigned tag;
  if (rd_byte(e, pos, &tag) < 0)
    return efail(e, "corrupt message");
  if ((tag & T_SHORTSTR) || tag == T_STRING) {
    const unsigned char *s;
    uint32_t n;
    if (enc_string_at(e, pos, tag, &s, &n) < 0)
      return efail(e, "corrupt message");
    if ((flags & MB_ETF_REASON) && n > 0 && n <= 255 && put_name(e->out, &e->idx, s, n) == 0)
      return 0;
    E(ei_encode_binary(e->out, &e->idx, s, (long)n));
    return 0;
  }
  switch (tag & ~T_SHARED) {
  case T_NIL:
    E(ei_encode_atom(e->out, &e->idx, "nil"));
    return 0;
  case T_FALSE:
  case T_TRUE:
    E(ei_encode_boolean(e->out, &e->idx, tag == T_TRUE));
    return 0;
  case T_NUMBER: {
    double d;
    if (rd_bytes(e, pos, &d, 8) < 0)
      return efail(e, "corrupt message");
    return enc_number(e, d);
  }
  case T_TABLE:
    return enc_table(e, at, pos);
  case T_TUPLE: {
    uint32_t n;
    if (rd_varint(e, pos, &n) < 0)
      return efail(e, "corrupt message");
    if (e->depth >= MB_ETF_MAX_DEPTH)
      return efail(e, "message nested too deep for another node");
    e->stack[e->depth++] = at;
    E(ei_encode_tuple_header(e->out, &e->idx, (int)n));
    for (uint32_t i = 0; i < n; i++)
      if (enc_value(e, pos, 0) < 0)
        return -1;
    e->depth--;
    return 0;
  }
  case T_BACKREF: {
    uint32_t off;
    if (rd_varint(e, pos, &off) < 0 || off >= at)
      return efail(e, "corrupt message");
    for (int d = 0; d < e->depth; d++)
      if (e->stack[d] == off)
        return efail(e, "cannot send a table that contains itself to another node");
    /* A table met twice is sent twice: ETF has no sharing. */
    size_t p = off;
    return enc_value(e, &p, flags);
  }
  case T_RREF: {
    mb_rref_t r;
    unsigned len;
    memset(&r, 0, sizeof r);
    if (rd_bytes(e, pos, &r.node, 4) < 0 || rd_bytes(e, pos, &r.creation, 4) < 0 ||
        rd_byte(e, pos, &len) < 0 || len < 1 || len > MB_REF_MAX_WORDS ||
        rd_bytes(e, pos, r.n, 4 * (size_t)len) < 0)
      return efail(e, "corrupt message");
    r.len = len;
    if (put_rref(e->out, &e->idx, &r) < 0)
      return efail(e, "cannot encode a ref");
    return 0;
  }
  case T_FUNCTION:
  case T_MODULE:
  case T_CFIELD:
    return efail(e, "cannot send a function to another node");
  default: {
    mb_idkind_t *kind = mb_id_kind_of_tag(tag);
    uint64_t id;
    if (kind == NULL || rd_bytes(e, pos, &id, 8) < 0)
      return efail(e, "corrupt message");
    if (kind == &mb_pid_kind) {
      if (mb_etf_put_pid(e->out, &e->idx, id) < 0)
        return efail(e, "cannot encode a pid");
    } else if (kind == &mb_ref_kind) {
      if (mb_etf_put_ref(e->out, &e->idx, id) < 0)
        return efail(e, "cannot encode a ref");
    } else if (kind == &mb_atom_kind) {
      if (mb_etf_put_atom(e->out, &e->idx, (uint32_t)id) < 0)
        return efail(e, "cannot encode an atom");
    } else {
      char what[64];
      snprintf(what, sizeof what, "cannot send a %s to another node", kind->name);
      return efail(e, what);
    }
    return 0;
  }
  }
}

static int encode(const mb_msg_t *msg, int flags, char *out, char *err, size_t errlen)
{
  enc_t e;
  e.base = msg->data;
  e.end = msg->data + msg->len;
  e.out = out;
  e.idx = 0;
  e.depth = 0;
  e.err = err;
  e.errlen = errlen;
  if (err && errlen)
    err[0] = '\0';
  if (msg->nvalues < 1)
    return efail(&e, "empty message");
  if (!(flags & MB_ETF_BARE) && ei_encode_version(out, &e.idx) < 0)
    return -1;
  size_t pos = 0;
  if (enc_value(&e, &pos, flags & MB_ETF_REASON) < 0)
    return -1;
  return e.idx;
}

long mb_etf_size(const mb_msg_t *msg, int flags, char *err, size_t errlen)
{
  return encode(msg, flags, NULL, err, errlen);
}

void mb_etf_write(const mb_msg_t *msg, int flags, char *buf)
{
  encode(msg, flags, buf, NULL, 0);
}

/* -- Checking ETF bytes ------------------------------------------------------ */

typedef struct {
  const unsigned char *p;
  long len, i;
  int unsupported;
} chk_t;

static int need(chk_t *c, uint64_t n)
{
  return (uint64_t)(c->len - c->i) >= n ? 0 : -1;
}

static uint32_t be16(const unsigned char *p) { return (uint32_t)p[0] << 8 | p[1]; }
static uint32_t be32(const unsigned char *p)
{
  return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* The characters of s[0..n) if it is valid UTF-8 (RFC 3629: no overlong
 * form, surrogate or code point past U+10FFFF), else -1. */
static long utf8_chars(const unsigned char *s, uint32_t n)
{
  long chars = 0;
  for (uint32_t i = 0; i < n; chars++) {
    unsigned b = s[i];
    uint32_t k, cp, min;
    if (b < 0x80) {
      i++;
      continue;
    }
    if (b >= 0xC2 && b <= 0xDF)
      k = 1, cp = b & 0x1F, min = 0x80;
    else if ((b & 0xF0) == 0xE0)
      k = 2, cp = b & 0x0F, min = 0x800;
    else if (b >= 0xF0 && b <= 0xF4)
      k = 3, cp = b & 0x07, min = 0x10000;
    else
      return -1;
    if (n - i <= k)
      return -1;
    for (uint32_t j = 1; j <= k; j++) {
      if ((s[i + j] & 0xC0) != 0x80)
        return -1;
      cp = cp << 6 | (s[i + j] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
      return -1;
    i += k + 1;
  }
  return chars;
}

/* An atom term (also the node of a pid, ref or port): at most 255
 * characters, and a UTF-8 one valid UTF-8. That is what Erlang's decoder
 * takes, and ei's encoder refuses anything else, so a name that arrives
 * can be sent back. */
static int check_atom(chk_t *c)
{
  if (need(c, 1) < 0)
    return -1;
  unsigned tag = c->p[c->i++];
  uint32_t n;
  if (tag == 'd' || tag == 'v') {
    if (need(c, 2) < 0)
      return -1;
    n = be16(c->p + c->i);
    c->i += 2;
  } else if (tag == 's' || tag == 'w') {
    if (need(c, 1) < 0)
      return -1;
    n = c->p[c->i++];
  } else {
    return -1;
  }
  if (need(c, n) < 0)
    return -1;
  long chars = tag == 'd' || tag == 's' ? (long)n : utf8_chars(c->p + c->i, n);
  if (chars < 0 || chars > 255)
    return -1;
  c->i += n;
  return 0;
}

static int check_n(chk_t *c, int depth, uint64_t n);
static int check_term(chk_t *c, int depth);

/* One of the given tags starts the term at c->i (a fun's integers and pid). */
static int check_one_of(chk_t *c, int depth, const char *tags)
{
  if (need(c, 1) < 0 || c->p[c->i] == 0 || strchr(tags, c->p[c->i]) == NULL)
    return -1;
  return check_term(c, depth);
}

/* A fun (NEW_FUN_EXT). Its size field counts itself and the rest, not the
 * tag. Every part is checked, and must end where the size says: ei's
 * decoders read the parts (ei_skip_term does, on a SEND's cookie for
 * instance) and trust the lengths they find there. Layout: tag, size,
 * arity (1), uniq (16), index (4), number of free variables (4), module
 * (atom), old index and old uniq (integers), pid, free variables. */
static int check_fun(chk_t *c, int depth)
{
  if (need(c, 30) < 0)
    return -1;
  uint32_t size = be32(c->p + c->i + 1), nfree = be32(c->p + c->i + 26);
  if (size < 29 || need(c, 1 + (uint64_t)size) < 0)
    return -1;
  long end = c->i + 1 + (long)size;
  c->i += 30;
  if (check_atom(c) < 0 || check_one_of(c, depth, "ab") < 0 ||
      check_one_of(c, depth, "ab") < 0 || check_one_of(c, depth, "gX") < 0 ||
      c->i > end)
    return -1;
  chk_t inner = *c;
  inner.len = end;                      /* the free variables stay inside */
  if (check_n(&inner, depth, nfree) < 0 || inner.i != end)
    return -1;
  c->i = end;
  return 0;
}

static int check_term(chk_t *c, int depth)
{
  if (depth > MB_ETF_MAX_DEPTH || need(c, 1) < 0)
    return -1;
  unsigned tag = c->p[c->i];
  uint32_t n;
  /* Terms that arrive as tables (a [] or string too) stay above
   * MB_ETF_MAX_DEPTH, where the encoder writes its deepest ones, so that
   * whatever decodes can be sent back. */
  if (depth >= MB_ETF_MAX_DEPTH && tag && strchr("hijklt", (int)tag) != NULL)
    return -1;
  switch (tag) {
  case 'a': return need(c, 2) < 0 ? -1 : (c->i += 2, 0);
  case 'b': return need(c, 5) < 0 ? -1 : (c->i += 5, 0);
  case 'c':
    /* FLOAT_EXT: "%.20e" in 31 bytes, padded with NULs. ei parses it with
     * sscanf, which reads on to a NUL: there must be one among them (every
     * encoder writes at most 28 characters). */
    if (need(c, 32) < 0 || memchr(c->p + c->i + 1, 0, 31) == NULL)
      return -1;
    c->i += 32;
    return 0;
  case 'F': return need(c, 9) < 0 ? -1 : (c->i += 9, 0);
  case 'd': case 's': case 'v': case 'w':
    return check_atom(c);
  case 'j':
    c->i++;
    return 0;
  case 'h':
    if (need(c, 2) < 0)
      return -1;
    n = c->p[c->i + 1];
    c->i += 2;
    return check_n(c, depth, n);
  case 'i': case 'l': case 't':
    if (need(c, 5) < 0)
      return -1;
    n = be32(c->p + c->i + 1);
    c->i += 5;
    if (check_n(c, depth, tag == 't' ? 2 * (uint64_t)n : n) < 0)
      return -1;
    if (tag != 'l')
      return 0;
    /* The tail: a proper list's [] is no table of its own. */
    if (need(c, 1) == 0 && c->p[c->i] == 'j') {
      c->i++;
      return 0;
    }
    return check_term(c, depth + 1);
  case 'k':
    if (need(c, 3) < 0)
      return -1;
    n = be16(c->p + c->i + 1);
    c->i += 3;
    return need(c, n) < 0 ? -1 : (c->i += n, 0);
  case 'm':
    if (need(c, 5) < 0)
      return -1;
    n = be32(c->p + c->i + 1);
    c->i += 5;
    return need(c, n) < 0 ? -1 : (c->i += n, 0);
  case 'M':
    if (need(c, 6) < 0)
      return -1;
    n = be32(c->p + c->i + 1);
    c->i += 6;
    c->unsupported = 1;
    return need(c, n) < 0 ? -1 : (c->i += n, 0);
  case 'n':
    if (need(c, 3) < 0)
      return -1;
    n = c->p[c->i + 1];
    c->i += 3;
    return need(c, n) < 0 ? -1 : (c->i += n, 0);
  case 'o':
    if (need(c, 6) < 0)
      return -1;
    n = be32(c->p + c->i + 1);
    c->i += 6;
    return need(c, n) < 0 ? -1 : (c->i += n, 0);
  case 'g': case 'X':
    c->i++;
    if (check_atom(c) < 0)
      return -1;
    n = tag == 'g' ? 9 : 12;
    return need(c, n) < 0 ? -1 : (c->i += n, 0);
  case 'e':
    c->i++;
    if (check_atom(c) < 0)
      return -1;
    return need(c, 5) < 0 ? -1 : (c->i += 5, 0);
  case 'r': case 'Z': {
    if (need(c, 3) < 0)
      return -1;
    uint32_t words = be16(c->p + c->i + 1);
    c->i += 3;
    if (words < 1 || words > MB_REF_MAX_WORDS || check_atom(c) < 0)
      return -1;
    n = (tag == 'r' ? 1 : 4) + 4 * words;
    return need(c, n) < 0 ? -1 : (c->i += n, 0);
  }
  case 'f': case 'Y': case 'x':
    c->i++;
    if (check_atom(c) < 0)
      return -1;
    n = tag == 'f' ? 5 : tag == 'Y' ? 8 : 12;
    c->unsupported = 1;
    return need(c, n) < 0 ? -1 : (c->i += n, 0);
  case 'p':
    c->unsupported = 1;
    return check_fun(c, depth);
  case 'q':
    /* An export (fun M:F/A): ei_decode_fun reads two atoms and an integer. */
    c->i++;
    c->unsupported = 1;
    if (check_atom(c) < 0 || check_atom(c) < 0 || need(c, 2) < 0 || c->p[c->i] != 'a')
      return -1;
    c->i += 2;
    return 0;
  default:
    return -1;
  }
}

static int check_n(chk_t *c, int depth, uint64_t n)
{
  if (n > (uint64_t)(c->len - c->i))     /* a byte per term at least */
    return -1;
  for (uint64_t k = 0; k < n; k++)
    if (check_term(c, depth + 1) < 0)
      return -1;
  return 0;
}

/* Check the term at *idx (versioned unless bare); 1 if it holds something
 * unsupported. */
static int check(const char *buf, long len, long *idx, int bare)
{
  chk_t c = {(const unsigned char *)buf, len, *idx, 0};
  if (!bare) {
    if (need(&c, 1) < 0 || c.p[c.i] != (unsigned char)131)
      return MB_ETF_MALFORMED;
    c.i++;
  }
  if (check_term(&c, 0) < 0)
    return MB_ETF_MALFORMED;
  *idx = c.i;
  return c.unsupported;
}

int mb_etf_check(const char *buf, long len, long *idx)
{
  int rc = check(buf, len, idx, 0);
  return rc < 0 ? rc : 0;
}

/* -- Decoder: ETF -> message ------------------------------------------------- */

typedef struct {
  const char *buf;
  int i;
  mb_msgb_t b;
} dec_t;

#define KEY 0x100       /* the term is a map key */
#define TOP 0x200       /* the term is the whole message */

static int dec_term(dec_t *d, int flags);

/* A big integer as the nearest double (digits are little-endian bytes).
 * Beyond a double's range that is the largest one, not inf: Erlang has no
 * inf, so a value that arrived could not be sent back. */
static double big_value(const unsigned char *digits, uint32_t n, int neg)
{
  double v = 0;
  for (uint32_t k = n; k-- > 0 && v <= DBL_MAX; )
    v = v * 256.0 + digits[k];
  if (v > DBL_MAX)
    v = DBL_MAX;
  return neg ? -v : v;
}

static int dec_atom(dec_t *d, int flags)
{
  char name[MAXATOMLEN_UTF8];
  size_t n;
  if (read_atom(d->buf, &d->i, name, &n) < 0)
    return MB_ETF_MALFORMED;
  if ((flags & (KEY | MB_ETF_REASON)) || n == 0) {
    mb_msgb_string(&d->b, name, n);
    return 0;
  }
  if ((n == 4 && memcmp(name, "true", 4) == 0) || (n == 5 && memcmp(name, "false", 5) == 0)) {
    mb_msgb_bool(&d->b, name[0] == 't');
    return 0;
  }
  if (n == 3 && memcmp(name, "nil", 3) == 0 && !(flags & TOP)) {
    mb_msgb_nil(&d->b);
    return 0;
  }
  int64_t a = mb_atom_intern(name, n);
  if (a < 0)
    return (int)a == MB_EBADARG ? MB_ETF_MALFORMED : (int)a;
  mb_msgb_id(&d->b, &mb_atom_kind, (uint64_t)a);
  return 0;
}

static int dec_list(dec_t *d)
{
  int n;
  if (ei_decode_list_header(d->buf, &d->i, &n) < 0)
    return MB_ETF_MALFORMED;
  mb_msgb_table(&d->b, (uint32_t)n, 0);
  size_t hpos = d->b.len - 4;            /* the hash count, patched below */
  for (int k = 0; k < n; k++) {
    int rc = dec_term(d, 0);
    if (rc < 0)
      return rc;
  }
  if (n == 0)
    return 0;
  /* A tail that arrives as an empty table ends the list as [] does: "" is
   * [] in Erlang, and #{} arrives as {} and would go back as []. */
  const unsigned char *t = (const unsigned char *)d->buf + d->i;
  if (t[0] == ERL_NIL_EXT || (t[0] == 'k' && be16(t + 1) == 0) ||
      (t[0] == 't' && be32(t + 1) == 0)) {
    d->i += t[0] == ERL_NIL_EXT ? 1 : t[0] == 'k' ? 3 : 5;
    return 0;
  }
  /* An improper list: the tail goes under "$tail". */
  if (!d->b.failed) {
    uint32_t one = 1;
    memcpy(d->b.m->data + hpos, &one, 4);
  }
  mb_msgb_string(&d->b, "$tail", 5);
  return dec_term(d, 0);
}

static int dec_term(dec_t *d, int flags)
{
  const unsigned char *p = (const unsigned char *)d->buf + d->i;
  int rc;
  if (d->b.len > MB_COPY_MAX_BYTES)
    return MB_ETF_MALFORMED;
  switch (p[0]) {
  case 'a': case 'b': {
    long v;
    if (ei_decode_long(d->buf, &d->i, &v) < 0)
      return MB_ETF_MALFORMED;
    mb_msgb_number(&d->b, (double)v);
    return 0;
  }
  case 'n': case 'o': {
    long long v;
    if (ei_decode_longlong(d->buf, &d->i, &v) == 0) {
      mb_msgb_number(&d->b, (double)v);
      return 0;
    }
    uint32_t n = p[0] == 'n' ? p[1] : be32(p + 1);
    const unsigned char *digits = p + (p[0] == 'n' ? 3 : 6);
    int neg = p[0] == 'n' ? p[2] : p[5];
    mb_msgb_number(&d->b, big_value(digits, n, neg));
    if (ei_skip_term(d->buf, &d->i) < 0)
      return MB_ETF_MALFORMED;
    return 0;
  }
  case 'c': case 'F': {
    double v;
    if (ei_decode_double(d->buf, &d->i, &v) < 0 || !isfinite(v))
      return MB_ETF_MALFORMED;
    mb_msgb_number(&d->b, v);
    return 0;
  }
  case 'd': case 's': case 'v': case 'w':
    return dec_atom(d, flags);
  case 'h': case 'i': {
    int n;
    if (ei_decode_tuple_header(d->buf, &d->i, &n) < 0)
      return MB_ETF_MALFORMED;
    mb_msgb_tuple(&d->b, (uint32_t)n);
    for (int k = 0; k < n; k++)
      if ((rc = dec_term(d, 0)) < 0)
        return rc;
    return 0;
  }
  case 'j': case 'l':
    return dec_list(d);
  case 'k': {
    /* A string: a list of small integers. */
    uint32_t n = be16(p + 1);
    mb_msgb_table(&d->b, n, 0);
    for (uint32_t k = 0; k < n; k++)
      mb_msgb_number(&d->b, p[3 + k]);
    return ei_skip_term(d->buf, &d->i) < 0 ? MB_ETF_MALFORMED : 0;
  }
  case 'm': {
    long n;
    mb_msgb_string(&d->b, (const char *)p + 5, be32(p + 1));
    return ei_decode_binary(d->buf, &d->i, NULL, &n) < 0 ? MB_ETF_MALFORMED : 0;
  }
  case 't': {
    int n;
    if (ei_decode_map_header(d->buf, &d->i, &n) < 0)
      return MB_ETF_MALFORMED;
    mb_msgb_table(&d->b, 0, (uint32_t)n);
    for (int k = 0; k < n; k++)
      if ((rc = dec_term(d, KEY)) < 0 || (rc = dec_term(d, 0)) < 0)
        return rc;
    return 0;
  }
  case 'g': case 'X': {
    mb_pid_t pid;
    if ((rc = mb_etf_get_pid(d->buf, &d->i, &pid)) < 0)
      return rc;
    mb_msgb_id(&d->b, &mb_pid_kind, pid);
    return 0;
  }
  case 'e': case 'r': case 'Z': {
    /* Another node's ref goes into the message by its contents: it is
     * interned only when a process decodes it (remote.h). */
    mb_ref_t ref;
    mb_rref_t rr;
    if ((rc = parse_ref(d->buf, &d->i, &ref, &rr)) < 0)
      return rc;
    if (ref)
      mb_msgb_id(&d->b, &mb_ref_kind, ref);
    else
      mb_msgb_remote_ref(&d->b, rr.node, rr.creation, rr.len, rr.n);
    return 0;
  }
  default:
    return MB_ETF_UNSUPPORTED;
  }
}

int mb_etf_decode(const char *buf, long len, long *idx, int flags, mb_msg_t **out)
{
  *out = NULL;
  long start = *idx, end = start;
  int bare = (flags & MB_ETF_BARE) != 0;
  int rc = check(buf, len, &end, bare);
  if (rc < 0)
    return rc;
  *idx = end;
  if (rc == 1)
    return MB_ETF_UNSUPPORTED;
  if (end - start > 0x7FFFFFFF)
    return MB_ETF_MALFORMED;
  /* ei's decoders take an int index: decode from the term's own start. */
  dec_t d;
  d.buf = buf + start + !bare;
  d.i = 0;
  size_t hint = (size_t)(end - start) * 2 + 16;
  mb_msgb_init(&d.b, hint < 65536 ? hint : 65536);
  rc = dec_term(&d, (flags & MB_ETF_REASON) | TOP);
  if (rc == 0 && d.i != end - start - !bare)
    rc = MB_ETF_MALFORMED;
  if (rc == 0 && d.b.len > MB_COPY_MAX_BYTES)
    rc = MB_ETF_MALFORMED;
  mb_msg_t *m = mb_msgb_finish(&d.b, 1);
  if (rc < 0) {
    mb_msg_free(m);
    return rc;
  }
  if (m == NULL)
    return MB_ENOMEM;
  *out = m;
  return 0;
}
