/* code.h: code objects - the bytecode of Lua functions, shared host-wide.
 *
 * DESIGN
 * Processes share nothing, but the code they run is immutable: when a
 * function crosses between processes (spawn, a message, a hibernated
 * process's continuation) its bytecode travels as a reference to one code
 * object, not as a copy. Code objects are interned by content (the
 * bytecode, debug info included, as lua_dump writes it, its templates
 * repaired: mb_code_dump): two million processes hibernated in the same
 * loop function hold one copy of it, and spawning the same function again
 * finds the copy already there.
 *
 * A code object is reference counted: a message that carries a function
 * holds a reference until it is freed (msg.h), a Lua state that dumped or
 * loaded the function may keep one in its cache (host/lib/lstate.c). The
 * last unref frees it and drops it from the table.
 *
 * Memory: a code object's block counts once in the host's total (alloc.h,
 * --max-memory) from its intern to its free. A queued message counts the
 * code of its functions in its receiver's mailbox too (msg.h,
 * mb_msg_cost), so that a receiver flooded with big functions ends "out of
 * memory". A hibernated continuation's, a pending send_after timer's, an
 * unstarted spawn body's and a state's cache (mb_proc_t.fncodes) count in
 * no process: each holds a few at most, most often shared (two million
 * processes hibernated in one function), and the host's total sees them.
 *
 * Threads: any. The table is one hash table under one mutex; interning
 * hashes the bytes outside the lock. Costs: intern = hash of the bytecode
 * (about 1 ns a byte) + one locked lookup; ref/unref = one atomic op.
 */
#ifndef MB_CODE_H
#define MB_CODE_H

#include <stddef.h>
#include <stdint.h>

#include "lua.h"

typedef struct mb_code mb_code_t;

/* The code object of the Lua function on top of L's stack (left there):
 * its lua_dump, with the table templates the dump leaves short repaired
 * (bcdump.h), so that code loaded from it builds tables as fast as code
 * compiled from source. Returns lua_dump's status (LUA_ERRMEM: L's
 * allocator refused); on 0, *c is the code object with a reference for
 * the caller, or NULL when memory ran out. The dump is written in a buffer
 * of the thread's, kept for its next dump. */
int mb_code_dump(lua_State *L, mb_code_t **c);

void mb_code_ref(mb_code_t *c);
void mb_code_unref(mb_code_t *c);

/* A number no other code object of the host's life has (a freed object's
 * address may be another's): 1, 2, ... */
uint64_t mb_code_serial(const mb_code_t *c);
/* The bytes (valid while a reference is held). */
const unsigned char *mb_code_bytes(const mb_code_t *c, size_t *len);

/* How many code objects exist and how many bytes they hold (for tests and
 * benchmarks). */
void mb_code_stats(size_t *count, size_t *bytes);

#endif
