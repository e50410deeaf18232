/* copy.h: deep copy of Lua values between isolated states.
 *
 * DESIGN
 * Processes share nothing, so a value crosses from one lua_State to another as
 * a flat byte string (an mb_msg_t) that belongs to neither: the sender's thread
 * encodes it, any thread may move it, the receiver's thread decodes it into the
 * receiver's state. Encoding never touches the receiver and decoding never
 * touches the sender, so the two may run on different scheduler threads.
 *
 * What copies: nil, booleans, numbers (bit-exact: inf, nan, -0), strings
 * (binary-safe), tables (any copyable keys and values; shared references and
 * cycles are preserved within one message), id values of the kinds
 * registered with mb_id_register (pids, refs, sockets, ...), Lua functions
 * (bytecode plus upvalues copied by value; an upvalue that is a loaded module,
 * a value of package.loaded, travels as its module name and is re-required by
 * the receiver; a C function that is a field of a loaded module, such as
 * table.insert or print, travels as module + field name). Metatables are not
 * copied. Anything else (coroutine, userdata, cdata, a C function not found in
 * a loaded module) fails with an error naming where it sits, for example
 * "msg.handlers[2]: cannot send a coroutine".
 *
 * Limits: MB_COPY_MAX_BYTES of encoded size and MB_COPY_MAX_DEPTH of nesting.
 */
#ifndef MB_COPY_H
#define MB_COPY_H

#include <stddef.h>
#include <stdint.h>
#include "lua.h"
#include "msg.h"

/* Encoded size limit of one message (64 MiB). */
#define MB_COPY_MAX_BYTES (64u << 20)
/* Nesting limit of tables and functions within one message. */
#define MB_COPY_MAX_DEPTH 200

/* Hooks of the layer that runs processes (set once at start-up, or left
 * NULL): a function that was just rebuilt from code object `code` sits at
 * idx of L (mb_copy_on_load); and, when a function at idx of L is to be
 * sent, the code object it is known to have come from, with a reference for
 * the caller, or NULL (mb_copy_code_of) - which spares a lua_dump of a
 * function that arrived as a code object, such as a hibernating process's
 * loop function, hibernated again and again. */
struct mb_code;
extern void (*mb_copy_on_load)(lua_State *L, int idx, struct mb_code *code);
/* If L's state keeps a function of code object `code` ready for reuse,
 * push it and return 1 (the decoder then sets all its upvalues); 0: the
 * decoder loads the bytes. */
extern int (*mb_copy_load)(lua_State *L, struct mb_code *code);
extern struct mb_code *(*mb_copy_code_of)(lua_State *L, int idx);
/* A function at idx of L was just dumped into code object `code` (the
 * layer may remember the pair, as for mb_copy_on_load). */
extern void (*mb_copy_on_dump)(lua_State *L, int idx, struct mb_code *code);
/* Push module `name` (n bytes) of L's state if the layer provides it itself
 * (the `moonbeam` module, without opening the package library) and return
 * 1; 0: the decoder takes it from package.loaded or requires it. */
extern int (*mb_copy_module)(lua_State *L, const char *name, size_t n);
/* Push require(name) of a module not yet loaded, the layer's way, and
 * return 1; 0: the decoder calls the receiver's global require. */
extern int (*mb_copy_require)(lua_State *L, const char *name, size_t n);
/* If L's state holds the module the layer provides itself, push it and
 * return its name; else return NULL, pushing nothing. The encoder sends it,
 * and C functions that are fields of it, by name, as it does those of
 * package.loaded (where that module may not be). */
extern const char *(*mb_copy_own_module)(lua_State *L);

/* Encode the n values at stack slots first..first+n-1 of L into a new
 * message (malloc'ed, owner: the caller; free with mb_msg_free). root names
 * the values in error paths: with n == 1 it is the whole name ("msg"), with
 * n > 1 value i is named root[i] (spawn passes "arg" -> "arg[2].x"), unless
 * names is non-NULL, which gives one name per value.
 * On failure returns NULL and writes a NUL-terminated message to err
 * (errlen bytes at most). Never raises a Lua error for a bad value, but may
 * raise a memory error from L. Leaves the stack as it found it. */
mb_msg_t *mb_copy_encode(lua_State *L, int first, int n, const char *root,
                         const char *const *names, char *err, size_t errlen);

/* Push the values of msg onto L (msg->nvalues of them) and return that count.
 * Raises a Lua error if the message cannot be rebuilt (a module that is not
 * found in the receiver, out of memory, bytecode rejected). msg stays owned
 * by the caller, who must keep it reachable (or free it) if this raises. */
int mb_copy_decode(lua_State *L, const mb_msg_t *msg);

/* Called (if set) after decoding a function whose bytecode has 64-bit
 * constants: loading it made LuaJIT load its FFI into L's state, which the
 * Lua layer may hide again (lib/sandbox.c). Set once, before threads run. */
extern void (*mb_copy_on_ffi_bytecode)(lua_State *L);


#endif
