/* etf.h: Erlang's external term format <-> our messages (msg.h), the codec
 * of the distribution layer, written with ei's encode/decode functions.
 *
 * DESIGN
 * A message that crosses nodes is translated between its payload (the
 * codec's format, copy_format.h) and ETF directly, without a Lua state, so
 * either direction runs on any thread. The mapping (README "Terms"):
 *   Lua                      Erlang
 *   nil                      the atom nil (a top-level nil atom arrives as
 *                            the atom value, so that it is a message)
 *   true, false              true, false
 *   number, integral and     integer (|n| < 2^63; integers beyond 2^53
 *     finite (not -0)          arrive as the nearest number)
 *   other finite number      float (inf and nan cannot be sent)
 *   string                   binary
 *   {} (empty table)         [] (and #{} arrives as {})
 *   array table {a, b}       proper list [A, B] (nil holes: the atom nil)
 *   {a, b, ["$tail"] = t}    improper list [A, B | T]
 *   other table              map: string keys <-> atom keys, other keys as
 *                            values; array items as integer keys
 *   tuple (term.h)           tuple
 *   atom (term.h)            atom
 *   pid, ref                 pid, reference (ours carry this node's name)
 * Erlang strings (lists of small integers) arrive as arrays of numbers, and
 * go back as lists of integers. Functions, module references, sockets,
 * timers and cycles cannot be sent (an error names which); funs, ports and
 * bit strings that are not whole bytes arrive as nothing: such a message is
 * dropped (MB_ETF_UNSUPPORTED) and the connection stays up.
 * Exit reasons (MB_ETF_REASON): a top-level string crosses as an atom and a
 * top-level atom arrives as a string, so that "normal", "kill", "shutdown"
 * and "noconnection" mean the same on both sides.
 *
 * Untrusted input: the decoder first walks the bytes with its own bounds
 * checks (every length and count against what is left, nesting at most
 * MB_ETF_MAX_DEPTH, only the tags listed above) and only then calls ei's
 * decoders, which trust their input; anything inconsistent is
 * MB_ETF_MALFORMED, and the caller closes the connection. Decoded payloads
 * over MB_COPY_MAX_BYTES are MB_ETF_MALFORMED too.
 *
 * Local pids and refs are written with this node's name and creation, set
 * once by mb_etf_set_node (until then: nonode@nohost, creation 0).
 * Threads: any; mb_etf_set_node before the schedulers run.
 */
#ifndef MB_ETF_H
#define MB_ETF_H

#include <stddef.h>
#include <stdint.h>

#include "msg.h"
#include "pid.h"

/* Nesting of tuples, lists and maps in one term (the decoded message must
 * stay within MB_COPY_MAX_DEPTH). */
#define MB_ETF_MAX_DEPTH 190

/* Decoder results besides 0 (errors of err.h may come too: MB_ETOOMANY
 * when the atom or remote tables are full, MB_ENOMEM). */
#define MB_ETF_MALFORMED (-1)
#define MB_ETF_UNSUPPORTED (-2)

/* Flags: the value is an exit reason (see DESIGN); the term has no version
 * byte (a reason inside a control message). */
#define MB_ETF_REASON 1
#define MB_ETF_BARE 2

/* This node's name (an atom) and creation. */
void mb_etf_set_node(uint32_t node_atom, uint32_t creation);
uint32_t mb_etf_node(void);
uint32_t mb_etf_creation(void);

/* The size in bytes of msg's first value as an ETF term (with its version
 * byte), or -1 with a message in err when it cannot be sent to another
 * node. */
long mb_etf_size(const mb_msg_t *msg, int flags, char *err, size_t errlen);
/* Write that term at buf (mb_etf_size bytes). */
void mb_etf_write(const mb_msg_t *msg, int flags, char *buf);

/* Decode the term (with its version byte) at buf[*idx], len bytes in buf,
 * into a new one-value message (*out, owned by the caller); *idx moves past
 * the term. Returns 0, MB_ETF_MALFORMED, MB_ETF_UNSUPPORTED (the term is
 * valid and *idx is past it, but it has no Lua value), MB_ETOOMANY or
 * MB_ENOMEM. */
int mb_etf_decode(const char *buf, long len, long *idx, int flags, mb_msg_t **out);

/* Check the term (with version byte) at buf[*idx]: 0 and *idx past it, or
 * MB_ETF_MALFORMED. After this, ei's decoders may read it. */
int mb_etf_check(const char *buf, long len, long *idx);

/* Pieces of control messages (dist.c): a pid or ref as an ETF term at
 * buf[*idx] (buf NULL: only count), and back (the bytes already checked).
 * The decoders return 0 or an error (MB_ETF_MALFORMED, MB_ETOOMANY). */
int mb_etf_put_pid(char *buf, int *idx, mb_pid_t pid);
int mb_etf_put_ref(char *buf, int *idx, mb_ref_t ref);
int mb_etf_put_atom(char *buf, int *idx, uint32_t atom);
int mb_etf_get_pid(const char *buf, int *idx, mb_pid_t *out);
int mb_etf_get_ref(const char *buf, int *idx, mb_ref_t *out);
/* mb_etf_get_ref: another node's ref comes back held once for the caller,
 * who releases it (mb_remote_ref_release). In a decoded message, such a
 * ref is carried by its contents and interned only when a process decodes
 * the message (remote.h). */
/* An atom term: its id (interned), or an error. */
int mb_etf_get_atom(const char *buf, int *idx, uint32_t *out);

#endif
