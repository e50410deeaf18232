/* term.h: Erlang's atoms and tuples as Lua values - what a process needs to
 * read and build the terms other nodes send (see etf.h for the wire side).
 *
 * DESIGN
 * Atoms: one host-wide table of interned names, as in the BEAM. An atom is
 * an id (its index in the table, from 1) of the id kind mb_atom_kind
 * (pid.h, wire tag MB_TAG_ATOM), so in a Lua state an atom is one interned
 * userdata: two atoms of the same name are the same value, == and table keys
 * work, and tostring gives the name. The table only grows (atoms are never
 * freed, as in Erlang) and holds at most MB_ATOM_MAX atoms: past that,
 * interning fails (MB_ETOOMANY) rather than letting a peer that sends
 * endless new atoms exhaust the host's memory. Names are at most
 * MB_ATOM_MAX_LEN bytes.
 * Entries live in fixed chunks that never move, so the name of an atom is
 * read without a lock; only interning takes the table's mutex.
 *
 * Tuples: a Lua table whose metatable is its state's tuple metatable (kept
 * in the registry), with the elements at 1..n and the arity in field n (so
 * that a tuple may hold nils). The codec (copy_format.h, T_TUPLE) keeps the
 * metatable across messages, so a tuple stays a tuple between processes and
 * nodes. Only elements 1..n are part of the tuple; other fields are not sent.
 *
 * Threads: the atom functions, any thread; the tuple functions, the thread
 * that owns L.
 */
#ifndef MB_TERM_H
#define MB_TERM_H

#include <stddef.h>
#include <stdint.h>

#include "lua.h"
#include "pid.h"

#define MB_ATOM_MAX (1u << 20)      /* 1,048,576 atoms, Erlang's default */
#define MB_ATOM_MAX_LEN 1020        /* bytes of a name: 255 characters of
                                       up to 4 UTF-8 bytes, as Erlang */

/* The atom kind (registered with the codec by mb_term_init). */
extern mb_idkind_t mb_atom_kind;

/* Register the atom kind with the codec. Once, at start-up. */
void mb_term_init(void);

/* The atom named s (n bytes), interned. Returns its id (> 0), or
 * MB_ETOOMANY when the table is full, MB_EBADARG when n is 0 or over
 * MB_ATOM_MAX_LEN. Any thread. */
int64_t mb_atom_intern(const char *s, size_t n);
/* The atom named s if it exists, else 0 (never adds one). */
uint32_t mb_atom_find(const char *s, size_t n);
/* The name of atom id (NUL-terminated; lives as long as the host) and its
 * length in *n; NULL if id names no atom. Any thread, no lock. */
const char *mb_atom_name(uint32_t id, size_t *n);
/* How many atoms exist. */
uint32_t mb_atom_count(void);

/* Push L's tuple metatable (created on first use). */
void mb_tuple_push_mt(lua_State *L);
/* Is the value at idx a tuple? Its arity in *n (may be NULL). */
int mb_tuple_test(lua_State *L, int idx, uint32_t *n);
/* Set the table at idx to be a tuple of arity n (sets t.n and the
 * metatable). */
void mb_tuple_make(lua_State *L, int idx, uint32_t n);

#endif
