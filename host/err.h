/* err.h: the host's error codes - one table for every C function that
 * fails - and its debug assertions.
 *
 * DESIGN
 * A function that can fail returns 0 or a negative code. Codes below come
 * from MB_ERRNO_MAP; libuv's codes (negative errno values, UV_EOF...) pass
 * through unchanged, so one int carries either. The table gives each code
 * the short name Lua code sees in `nil, name` results ("closed", "noproc")
 * and a sentence for reports. Ours are MB_ERR_BASE + 1 and up, a range
 * libuv never uses (its codes are -errno, -3000.. for getaddrinfo, and
 * UV_EOF = -4095), so the two never meet.
 */
#ifndef MB_ERR_H
#define MB_ERR_H

#define MB_ERR_BASE (-5000)

/* XX(NAME, lua name, message) */
#define MB_ERRNO_MAP(XX)                                                    \
  XX(NOPROC, "noproc", "no such process")                                   \
  XX(TAKEN, "taken", "the name is already registered")                      \
  XX(HASNAME, "hasname", "the process already has a name")                  \
  XX(CLOSED, "closed", "closed")                                            \
  XX(NOTOWNER, "not owner", "only the socket's owner may use it")           \
  XX(NOMEM, "out of memory", "not enough memory")                           \
  XX(TOOMANY, "too many", "a table of the host is full")                    \
  XX(TIMEOUT, "timeout", "timed out")                                       \
  XX(BADADDR, "bad address", "not a numeric address, localhost or *")      \
  XX(BADARG, "bad argument", "bad argument")                                \
  XX(NOCONN, "noconnection", "no connection to the node")                   \
  XX(NOTDIST, "not distributed", "this host is not a node (start it with --sname or --name)")

enum {
  MB_ERR_FIRST_ = MB_ERR_BASE,
#define XX(name, lname, msg) MB_E##name,
  MB_ERRNO_MAP(XX)
#undef XX
  MB_ERR_LAST_
};

/* The name Lua sees for code (ours or libuv's); never NULL. */
const char *mb_err_name(int code);
/* A sentence for code (ours or libuv's); never NULL. */
const char *mb_strerror(int code);

/* Assertions of the rules the headers state (thread and lock ownership),
 * checked in debug builds (MB_DEBUG: the sanitizer builds) and free in
 * release builds, like the BEAM's lock checker. */
#ifdef MB_DEBUG
#define MB_ASSERT(c) ((c) ? (void)0 : mb_assert_fail(#c, __FILE__, __LINE__))
#else
#define MB_ASSERT(c) ((void)0)
#endif
_Noreturn void mb_assert_fail(const char *what, const char *file, int line);

#endif
