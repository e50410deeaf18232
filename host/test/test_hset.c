/* test_hset.c: the hash of 64-bit keys (hset.h) against a plain array,
 * through random adds and takes that grow, shrink and wrap it around.
 */
#include <stdint.h>
#include <stdlib.h>

#include "../hset.h"
#include "check.h"

enum { MAXE = 20000 };

static uint64_t rkey[MAXE], rval[MAXE];   /* the reference: a multiset */
static int nref;

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static uint64_t next_rand(void)
{
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return rng;
}

static int ref_find(uint64_t key)
{
  for (int i = 0; i < nref; i++)
    if (rkey[i] == key)
      return i;
  return -1;
}

/* Does every entry of the set match the reference, and the reverse? */
static int agrees(const mb_hset_t *s)
{
  if ((int)s->n != nref)
    return 0;
  uint32_t live = 0;
  for (uint32_t i = 0; i < s->cap; i++)
    live += s->v[i].key != 0;
  if (live != s->n)
    return 0;
  for (int i = 0; i < nref; i++) {
    const mb_hslot_t *e = mb_hset_find(s, rkey[i]);
    if (e == NULL || e->key != rkey[i])
      return 0;
  }
  return 1;
}

static void random_ops(int keyspace, int ops, const char *what)
{
  mb_hset_t s = {0};
  nref = 0;
  int ok = 1, grew = 0;
  for (int op = 0; op < ops && ok; op++) {
    uint64_t key = 1 + next_rand() % (uint64_t)keyspace;
    /* Grow for the first half, then mostly take: the set shrinks again. */
    int add = op < ops / 2 ? next_rand() % 3 != 0 : next_rand() % 3 == 0;
    if (add && nref < MAXE) {
      uint64_t val = next_rand();
      mb_hset_add(&s, key, val);
      rkey[nref] = key;
      rval[nref] = val;
      nref++;
    } else {
      int i = ref_find(key);
      uint64_t val = 0;
      int took = mb_hset_take(&s, key, &val);
      if (took != (i >= 0)) {
        ok = 0;
        break;
      }
      if (i >= 0) {
        /* Which duplicate came out is the set's choice: take that one. */
        int j = i;
        while (j < nref && !(rkey[j] == key && rval[j] == val))
          j++;
        if (j == nref) {
          ok = 0;
          break;
        }
        rkey[j] = rkey[nref - 1];
        rval[j] = rval[nref - 1];
        nref--;
      }
    }
    if (s.cap > (uint32_t)grew)
      grew = (int)s.cap;
    if (op % 97 == 0)
      ok = agrees(&s);
  }
  check(ok && agrees(&s), "%s: %d random adds and takes agree with a plain array", what, ops);
  check(grew >= 2 * nref, "%s: it grew (%d slots at most, %d entries at the end)", what,
        grew, nref);
  while (nref > 0) {
    uint64_t val;
    if (!mb_hset_take(&s, rkey[nref - 1], &val))
      break;
    int j = nref - 1;
    while (j >= 0 && !(rkey[j] == rkey[nref - 1] && rval[j] == val))
      j--;
    if (j < 0)
      break;
    rkey[j] = rkey[nref - 1];
    rval[j] = rval[nref - 1];
    nref--;
  }
  check(nref == 0 && s.n == 0 && mb_hset_find(&s, 1) == NULL, "%s: emptied by takes", what);
  mb_hset_free(&s);
}

int main(void)
{
  mb_hset_t s = {0};
  check(mb_hset_find(&s, 42) == NULL && !mb_hset_take(&s, 42, NULL),
        "an empty (zeroed) set finds nothing and takes nothing");
  mb_hset_add(&s, 42, 7);
  mb_hset_add(&s, 42, 8);
  uint64_t a = 0, b = 0;
  int t1 = mb_hset_take(&s, 42, &a), t2 = mb_hset_take(&s, 42, &b);
  check(t1 && t2 && a + b == 15 && !mb_hset_take(&s, 42, NULL),
        "a key added twice is taken twice, each value once");
  mb_hset_free(&s);
  check(s.v == NULL && s.n == 0 && s.cap == 0, "free leaves an empty set");

  for (uint64_t k = 1; k <= 10000; k++)
    mb_hset_add(&s, k, k * 3);
  uint32_t big = s.cap;
  int right = 1;
  for (uint64_t k = 1; k <= 9990; k++) {
    uint64_t v = 0;
    right &= mb_hset_take(&s, k, &v) && v == k * 3;
  }
  check(right && s.n == 10 && big >= 20000 && s.cap <= 160,
        "10,000 keys in %u slots; 9,990 taken: %u slots for the 10 left", big, s.cap);
  mb_hset_free(&s);

  random_ops(50, 20000, "a few keys, many duplicates");
  random_ops(5000, 30000, "many keys");
  random_ops(1 << 30, 30000, "sparse keys");
  return check_summary();
}
