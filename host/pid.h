/* pid.h: pids and references as Lua values.
 *
 * A pid (process id) and a ref (monitor reference) are 64-bit ids that are
 * unique for the life of the host and never reused. In a Lua state each id is
 * one interned full userdata (a weak-valued table in the registry maps id to
 * userdata), so two pids naming the same process are the same Lua value: they
 * compare equal with == and work as table keys. A pid is its process-table
 * slot plus the slot's generation (see proc.h) and prints as <0.slot.gen>,
 * like Erlang's <0.N.0>; refs print as #Ref<0.N>. A number is never a pid.
 *
 * Remote ids: a pid or ref of another node (dist.h) has MB_ID_REMOTE set;
 * the rest of its id names an entry of the host-wide remote table
 * (remote.h), interned, so two equal remote pids are one id and one Lua
 * value like local ones. MB_ID_REMOTE is bit 52, the top bit of the 53 that
 * a Lua number holds exactly (the intern tables key ids by number); a local
 * pid reaches it only after 2^28 reuses of one process slot.
 *
 * All functions here run on the thread that owns L.
 */
#ifndef MB_PID_H
#define MB_PID_H

#include <stddef.h>
#include <stdint.h>
#include "lua.h"

typedef uint64_t mb_pid_t;      /* 0 is never a valid pid */
#define MB_PID_SLOT_BITS 24
#define MB_PID_SLOT_MASK ((1u << MB_PID_SLOT_BITS) - 1)
typedef uint64_t mb_ref_t;      /* 0 is never a valid ref */
#define MB_ID_REMOTE ((uint64_t)1 << 52)

/* Does id (a pid or ref) name something on another node? */
static inline int mb_id_is_remote(uint64_t id)
{
  return (id & MB_ID_REMOTE) != 0;
}

/* Write "<0.slot.gen>" for pid into buf (n >= MB_PID_TEXT_MAX); returns buf.
 * The one place the text of a pid is made. Any thread. */
#define MB_PID_TEXT_MAX 64
char *mb_pid_format(char *buf, size_t n, mb_pid_t pid);
/* The text of a remote pid or ref (is_ref), set by the layer that owns
 * remote ids (dist.c) at start-up: Erlang's <N.num.serial>. Unset, a remote
 * id prints as <?.id>. */
extern char *(*mb_id_format_remote)(char *buf, size_t n, uint64_t id, int is_ref);
/* Write "#Ref<0.N>" (local) or the remote text for ref into buf
 * (n >= MB_PID_TEXT_MAX); returns buf. */
char *mb_ref_format(char *buf, size_t n, mb_ref_t ref);

/* Push the (interned) pid value for id. */
void mb_pid_push(lua_State *L, mb_pid_t pid);
/* Return the pid at idx, or 0 if the value there is not a pid. */
mb_pid_t mb_pid_test(lua_State *L, int idx);
/* Return the pid at idx or raise "bad argument #arg to 'fname' (pid expected, got T)". */
mb_pid_t mb_pid_check(lua_State *L, int idx);

void mb_ref_push(lua_State *L, mb_ref_t ref);
mb_ref_t mb_ref_test(lua_State *L, int idx);
/* Return the ref at idx or raise "bad argument #idx ... (ref expected, got T)". */
mb_ref_t mb_ref_check(lua_State *L, int idx);

/* A kind of interned id value (pids, refs, sockets, timers): one userdata
 * per id and state, with an opaque metatable giving __tostring, __name and,
 * if `methods` is set, those methods as __index. A kind that messages may
 * carry is registered with the codec (mb_copy_register_kind) under its
 * wire tag. The two keys only provide unique addresses for the registry;
 * define a kind as a static variable. The layer that owns a kind may let a
 * higher one fill in `methods` before the first value is pushed. */
struct luaL_Reg;
typedef struct mb_idkind {
  const char *name;
  lua_CFunction tostring;        /* the userdata's first field is the id */
  const struct luaL_Reg *methods;
  unsigned char tag;             /* wire tag (copy.h), 0 if not sendable */
  char mt_key, intern_key;
} mb_idkind_t;

/* Wire tags of the kinds (the codec's format, copy_format.h, keeps
 * 0x07, 0x08, 0x0D..0x0F and 0x11..0x1F for them). */
#define MB_TAG_PID 0x07
#define MB_TAG_REF 0x08
#define MB_TAG_SOCKET 0x0D
#define MB_TAG_TIMER 0x0E
#define MB_TAG_ATOM 0x0F
#define MB_TAG_KIND_MAX 0x1F

/* Registry slots at fixed negative integer keys, for values looked up on
 * hot paths: luaL_ref only makes positive keys, and a lua_rawgeti on the
 * registry costs ~50 instructions where a light-userdata key costs ~160
 * (pushing one interns the pointer in GC64 LuaJIT). Every such slot is
 * listed here, so that none is used twice. */
#define MB_REGSLOT_INTERN(tag) (-0x100 - (int)(tag))  /* a kind's intern table */
#define MB_REGSLOT_IDMT(tag) (-0x140 - (int)(tag))    /* a kind's metatable */
#define MB_REGSLOT_RREF_MT (-0x160)      /* remote refs' metatable (pid.c) */
#define MB_REGSLOT_RECEIVE (-0x200)      /* run.c's receive function */
#define MB_REGSLOT_MOONBEAM (-0x201)     /* the moonbeam module (lstate.c) */
#define MB_REGSLOT_PACKAGE (-0x202)      /* the package library, once open (lstate.c) */
#define MB_REGSLOT_SIGNAL_MSG (-0x203)   /* DOWN and EXIT messages' builder (lib_mb.c) */
#define MB_REGSLOT_BODY_FN (-0x204)      /* a reused state's last body (run.c) */
#define MB_REGSLOT_BASE (-0x205)         /* a reused state's base library (lstate.c) */
#define MB_REGSLOT_NEW_CO (-0x206)       /* a new body coroutine, made under a protected
                                            call and anchored on the stack (lstate.c) */
#define MB_REGSLOT_IO (-0x207)           /* run.c's I/O wake-up function */
#define MB_REGSLOT_CHUNKS (-0x208)       /* a reused state's module chunks (modcache.c) */
#define MB_REGSLOT_HTTP_MT (-0x209)      /* moonbeam.http_parser's parser metatable */
#define MB_REGSLOT_GUARD_MT (-0x20a)     /* and its guards' (lib_http.c) */
#define MB_REGSLOT_CONT (-0x20b)         /* a suspended C call's continuation (run.c) */
#define MB_REGSLOT_CONT_FN (-0x20c)      /* run.c's function that runs it */
#define MB_REGSLOT_LUAFNS (-0x20d)       /* a reused state's makers of the host's
                                            library functions in Lua (lstate.c) */

/* The kinds defined here (registered from the start). */
extern mb_idkind_t mb_pid_kind, mb_ref_kind;

/* Make a kind sendable: the codec then encodes its values under kind->tag
 * and decodes that tag into its values. Once per kind, at start-up, before
 * any scheduler runs. */
void mb_id_register(mb_idkind_t *kind);
/* Is key a registry slot of a registered kind's intern table or
 * metatable (MB_REGSLOT_INTERN, MB_REGSLOT_IDMT, MB_REGSLOT_RREF_MT)? Those
 * hold only host-made, opaque values (the metatables answer getmetatable
 * with false), so a reused state keeps them (see host/lib/lstate.c,
 * "Reused states"). */
int mb_id_regslot(double key);
/* The registered kind of a wire tag, or NULL. Any thread. */
mb_idkind_t *mb_id_kind_of_tag(unsigned tag);

/* Push the interned value of id of this kind. */
void mb_id_push(lua_State *L, uint64_t id, mb_idkind_t *kind);
/* The same for an id that no state can have seen yet (a new process's pid,
 * a new ref): no look-up first, ~170 instructions less. */
void mb_id_push_new(lua_State *L, uint64_t id, mb_idkind_t *kind);
/* The id of the value at idx if it is of this kind, else 0. */
uint64_t mb_id_test(lua_State *L, int idx, const mb_idkind_t *kind);
/* The kind of the id value at idx (and its id in *id), or NULL if the
 * value there is not an id value. */
const mb_idkind_t *mb_id_kind(lua_State *L, int idx, uint64_t *id);
/* The same for a value known to be a full userdata (the encoder's case,
 * which has just asked lua_type): one API call less. */
const mb_idkind_t *mb_id_kind_ud(lua_State *L, int idx, uint64_t *id);

#endif
