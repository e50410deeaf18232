/* remote.h: the host-wide tables of remote pids and refs - the processes
 * and references of other nodes as ids (pid.h, MB_ID_REMOTE).
 *
 * DESIGN
 * A pid of another node is (node, num, serial, creation), a ref (node,
 * creation, up to 5 words). Each distinct one gets one entry, interned by a
 * hash of its fields, and its id is MB_ID_REMOTE | index: the same remote
 * pid always gets the same id, so it is one Lua value in every state and
 * works as a table key, and messages carry it as 8 bytes like a local pid.
 * The node is an atom (term.h).
 * Pids: entries are never freed (as atoms); at most MB_REMOTE_MAX of them,
 * past that interning fails (MB_ETOOMANY) and the term that needed it is
 * refused (etf.c). A host that meets millions of distinct processes of
 * other nodes over its life reaches that bound.
 *
 * Refs are counted instead, since a peer brings a new one with each call
 * (gen_server's monitor/alias refs): an entry lives while something holds
 * it - a Lua state that has the ref as a value (pid.c: the ref's userdata
 * holds it until collected) or the distribution layer (a remote monitor of
 * one of our processes) - and is freed when the last holder lets go. A ref
 * in a message does not hold an entry: the codec carries a remote ref
 * inline, by its contents (copy_format.h, T_RREF), and interns it only
 * when a process decodes the message. So at most MB_REMOTE_MAX distinct
 * remote refs can be held at once, and none outlives its holders. A freed
 * entry's index is reused under a new generation (the id's bits 22..51),
 * so a stale id never names another ref: reading it fails.
 * Reading a pid entry takes no lock (chunks never move); refs are read
 * under the table's mutex, since a freed entry is rewritten.
 * Threads: any.
 * Threads: any.
 */
#ifndef MB_REMOTE_H
#define MB_REMOTE_H

#include <stdint.h>

#include "pid.h"

#define MB_REMOTE_MAX (1u << 22)     /* entries per table: 4M */
#define MB_REF_MAX_WORDS 5

typedef struct mb_rpid {
  uint32_t node;                     /* atom */
  uint32_t num, serial, creation;
  uint32_t name;                     /* a name's entry (below): the name
                                        (atom), num, serial, creation 0 */
} mb_rpid_t;

typedef struct mb_rref {
  uint32_t node;                     /* atom */
  uint32_t creation;
  uint32_t len;                      /* words used, 1..MB_REF_MAX_WORDS */
  uint32_t n[MB_REF_MAX_WORDS];
} mb_rref_t;

/* The id of remote pid *p (interned): > 0, or MB_ETOOMANY. */
int64_t mb_remote_pid(const mb_rpid_t *p);
/* The fields of remote pid id; 0, or MB_EBADARG if id names none. */
int mb_remote_pid_get(mb_pid_t id, mb_rpid_t *out);

/* The id of remote ref *r, interned and held once for the caller (release
 * it with mb_remote_ref_release): > 0, or MB_ETOOMANY. */
int64_t mb_remote_ref(const mb_rref_t *r);
/* The fields of remote ref id; 0, or MB_EBADARG if id names none (or a
 * freed one). */
int mb_remote_ref_get(mb_ref_t id, mb_rref_t *out);
/* Hold id once more / let go of one hold (the last frees the entry). Ids
 * that name no live entry are ignored. */
void mb_remote_ref_retain(mb_ref_t id);
void mb_remote_ref_release(mb_ref_t id);
/* How many remote refs are held now; how many remote pids (and names)
 * were ever interned. */
uint32_t mb_remote_ref_count(void);
uint32_t mb_remote_pid_count(void);

/* A registered name on a node as a pid-like id: the target of a monitor
 * by name (mb.monitor({name, node})), which names no process, so that the
 * process's monitor set can hold it like a remote pid. The DOWN of such a
 * monitor carries it, it prints as {name, node} and a send to it is a send
 * to the name. Interned in the pid table: > 0, or MB_ETOOMANY. */
int64_t mb_remote_name(uint32_t node, uint32_t name);
/* The name (atom) of a name's id, or 0 for anything else. */
uint32_t mb_remote_name_of(mb_pid_t id);

/* The node atom of a remote pid id, or 0. */
uint32_t mb_remote_node(uint64_t id);

#endif
