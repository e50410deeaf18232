/* msg.h: messages - the flat blocks of bytes that carry values between
 * processes - and a builder that writes them from C.
 *
 * DESIGN
 * A message belongs to no Lua state: the codec (copy.h) encodes Lua values
 * into one, any thread moves it, and the receiver decodes it. Code that has
 * no Lua state at hand (the process table's exit reasons, a socket's
 * active-mode messages built on a loop thread) writes one with the builder
 * below, which produces exactly the bytes the encoder would for the same
 * values. The byte format is the codec's (copy_format.h); only msg.c and the
 * codec know it.
 *
 * Allocation: messages are malloc'ed blocks; every function here that
 * allocates returns NULL when memory runs out, and callers check.
 * Threads: none of this touches shared state; any thread.
 */
#ifndef MB_MSG_H
#define MB_MSG_H

#include <stddef.h>
#include <stdint.h>

/* One message. The mailbox links messages through next; kind, from, ref
 * and port are set by whoever queues it (proc.h), not by the codec. A
 * message that carries functions holds a reference to each one's code
 * object (code.h): ncode pointers stored after the payload, released when
 * the message is freed, and after them (ncode > 0 only) a size_t, the bytes
 * of those code objects, summed once by the encoder (mb_msg_cost). */
typedef struct mb_msg {
  struct mb_msg *next;
  uint16_t kind;
  uint16_t ncode;        /* code objects referred to by the payload */
  uint32_t nvalues;      /* how many values were encoded */
  uint64_t from;
  uint64_t ref;          /* DOWN messages: the monitor's ref; user: alias */
  uint64_t port;         /* a socket's active-mode message: its id */
  size_t len;            /* bytes in data */
  unsigned char data[];
} mb_msg_t;

/* Where a message's code pointers start: the payload, 8-byte aligned. */
#define MB_MSG_CODES_AT(len) (((len) + 7) & ~(size_t)7)
#define MB_MSG_MAX_CODES 0xFFFF

/* The bytes after the payload's padding for ncode code objects: their
 * pointers and their bytes' sum (none without functions). */
#define MB_MSG_CODES_LEN(ncode) \
  ((ncode) ? (size_t)(ncode) * sizeof(void *) + sizeof(size_t) : 0)

/* The code objects of m (m->ncode of them). */
static inline struct mb_code **mb_msg_codes(const mb_msg_t *m)
{
  return (struct mb_code **)(void *)((char *)m->data + MB_MSG_CODES_AT(m->len));
}

/* The bytes of m's own block (header, payload, code pointers and their
 * sum): what it adds to the host's total (alloc.h), where its code objects
 * count once by themselves (code.h). */
static inline size_t mb_msg_size(const mb_msg_t *m)
{
  return sizeof *m + MB_MSG_CODES_AT(m->len) + MB_MSG_CODES_LEN(m->ncode);
}

/* The bytes of the code objects m refers to (0 without functions). */
static inline size_t mb_msg_code_bytes(const mb_msg_t *m)
{
  return m->ncode ? *(const size_t *)(const void *)(mb_msg_codes(m) + m->ncode) : 0;
}

/* What m costs the process whose mailbox holds it (its max_memory,
 * mb.info's memory, the --max-memory killer's choice): its block and the
 * code of its functions, which it keeps alive. A code object shared with
 * others counts in full for each message that refers to it: a flood of big
 * functions must end its receiver as a flood of big strings does (1,200
 * functions of 512 KB queued for a process capped at 8 MB held 1.26 GB). */
static inline size_t mb_msg_cost(const mb_msg_t *m)
{
  return mb_msg_size(m) + mb_msg_code_bytes(m);
}

/* A message with no values and room for len bytes of payload, zeroed. */
mb_msg_t *mb_msg_new(size_t len);
/* Free msg and drop its code references. */
void mb_msg_free(mb_msg_t *msg);
/* A block of MB_MSG_SMALL bytes for a new message (NULL when memory runs
 * out), from the thread's cache of freed small messages if it has one:
 * the encoder's first allocation. A block of this size is malloc's, so
 * realloc and free work on it as on any message. */
#define MB_MSG_SMALL 128
void *mb_msg_alloc_small(void);
/* A copy of m (header, payload, code references; next is NULL). */
mb_msg_t *mb_msg_dup(const mb_msg_t *m);

/* The one-value message holding the string s (a reason: "noproc"). */
mb_msg_t *mb_msg_string(const char *s);
/* Is m the one-value message holding exactly the string s? */
int mb_msg_is_string(const mb_msg_t *m, const char *s);

/* -- The builder ----------------------------------------------------------
 * mb_msgb_init, then the values in encoding order (a table's header, then
 * its narr array values, then its nhash key/value pairs), then
 * mb_msgb_finish with the number of top-level values. A failed allocation
 * is remembered and reported by mb_msgb_finish (NULL). */
struct mb_idkind;
typedef struct mb_msgb {
  mb_msg_t *m;
  size_t len, cap;
  int failed;
} mb_msgb_t;

void mb_msgb_init(mb_msgb_t *b, size_t hint);
void mb_msgb_nil(mb_msgb_t *b);
void mb_msgb_bool(mb_msgb_t *b, int v);
void mb_msgb_number(mb_msgb_t *b, double v);
void mb_msgb_string(mb_msgb_t *b, const char *s, size_t n);
void mb_msgb_cstring(mb_msgb_t *b, const char *s);
/* An id value of a kind registered with the codec (pid.h); a remote ref
 * is written by its contents (T_RREF). */
void mb_msgb_id(mb_msgb_t *b, const struct mb_idkind *kind, uint64_t id);
void mb_msgb_table(mb_msgb_t *b, uint32_t narr, uint32_t nhash);
/* A remote ref by its contents (copy_format.h, T_RREF): node (an atom),
 * creation, n words (1..5). */
void mb_msgb_remote_ref(mb_msgb_t *b, uint32_t node, uint32_t creation, uint32_t n,
                        const uint32_t *words);
/* A tuple (term.h) of n elements: the n values follow. */
void mb_msgb_tuple(mb_msgb_t *b, uint32_t n);
mb_msg_t *mb_msgb_finish(mb_msgb_t *b, uint32_t nvalues);

#endif
