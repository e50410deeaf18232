/* lib.h: the `moonbeam` Lua module (lib_mb.c) as the rest of the host sees it. */
#ifndef MB_LIB_H
#define MB_LIB_H

#include "lua.h"
#include "proc.h"

/* Set up the Lua layer: the runner (run.h), the lazy libraries, the
 * bindings' value kinds. Once, at start-up, after the layers below. */
void mb_lib_init(void);

/* luaopen for require "moonbeam": pushes the module table. */
int mb_lib_open(lua_State *L);

/* luaopen for require "moonbeam.fs" (lib_fs.c). */
int mb_lib_fs_open(lua_State *L);

/* luaopen for require "moonbeam.tcp" (lib_tcp.c), and its set-up (the
 * socket values' methods), once at start-up. */
int mb_lib_tcp_open(lua_State *L);
void mb_lib_tcp_init(void);
/* sock:read, for moonbeam.http_parser's read (lib_http.c). */
int mb_lib_tcp_read(lua_State *L);

/* luaopen for require "moonbeam.http_parser" (lib_http.c). */
int mb_lib_http_parser_open(lua_State *L);

/* The calling process; raises (and makes sure the process ends) if it was
 * killed or went over its memory limit: such a process may not act. */
mb_proc_t *mb_lib_self(lua_State *L);

/* Raise "fname: cannot block here ..." for a blocking call made where the
 * process cannot yield (inside a C callback). */
int mb_lib_block_error(lua_State *L, const char *fname);

/* Halt the host with code and stop the calling process; use as
 * `return mb_lib_halt(L, code)` from a C function. */
int mb_lib_halt(lua_State *L, int code);

/* Push the message m (decoded; EXIT/DOWN become their tables) onto L.
 * Raises on a corrupt message; m stays owned by the caller. */
void mb_lib_push_msg(lua_State *L, const mb_msg_t *m);

/* Receive on behalf of p (owner thread): look for the oldest message that
 * matches the pending receive (p->recv_match) and push it onto L.
 * Returns 1 if a message was pushed, 0 if none matched, -1 if p must die. */
int mb_lib_try_receive(mb_proc_t *p, lua_State *L);
/* mb_lib_try_receive without draining p's inbox first: for a caller that
 * just did (mb_proc_drain), which spares a lock round trip per message.
 * Never returns -1. */
int mb_lib_receive_queued(mb_proc_t *p, lua_State *L);

/* The distribution functions of the module (lib_dist.c), which the module
 * table (lib_mb.c) serves like its own. */
struct luaL_Reg;
extern const struct luaL_Reg mb_lib_dist_funcs[];
/* Send m (taken) to the {name, node} at stack slot 1; raises on misuse. */
int mb_lib_dist_send_named(lua_State *L, mb_msg_t *m, const char *fname);
/* After mb.send to remote pid dest: may make the sender wait while the
 * connection's output is busy (lib_dist.c); returns the result count. */
int mb_lib_dist_sent(lua_State *L, mb_pid_t dest);
/* mb.monitor({name, node}) (lib_dist.c). */
int mb_lib_dist_monitor_named(lua_State *L);
/* Raise "fname: why" (freeing m) if m cannot be sent to another node. */
void mb_lib_dist_check(lua_State *L, const mb_msg_t *m, const char *fname);

#endif
