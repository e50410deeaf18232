/* http_guard.h: the guard around an HTTP handler (moonbeam.http's
 * handler_timeout, heir and exit on close), one per connection process,
 * used by lib_http.c.
 *
 * DESIGN
 * While a handler runs, its connection process does not read its socket,
 * so something else must notice a handler that takes too long: a timer
 * that tells the acceptor (the message "$http_overtime <pid>", from the
 * connection process) once handler_timeout has passed without the
 * response starting. A timer started and cancelled per request (a
 * send_after timer: an id, a message, a list entry, two locks) was a
 * twentieth of a keep-alive request's instructions; this guard is lazy
 * instead. It keeps one libuv timer for the connection's whole life and a
 * deadline: starting a request stores the deadline (now + ms, whole ms,
 * rounded up), finishing it clears it; the timer is armed only when it is
 * idle. When it fires it looks at the deadline: none (no request is
 * timed), it goes idle; a later one (the request it was armed for
 * finished, another began), it arms itself again for what is left; passed,
 * it sends the message and marks the guard fired. So a keep-alive request
 * costs two atomic operations and a clock read, and the timer fires about
 * once per handler_timeout of a busy connection. It never fires early (the
 * loop's clock is a floor of the one the deadline is read from) and at
 * most one loop iteration late, as a send_after timer.
 *
 * The state is one atomic word, deadline << 1 | ARMED, so that the firing
 * (on the timer's loop) and the process (on any scheduler: it may have
 * moved) agree through compare-and-swap: whoever changes the word first
 * decides. Finishing a request that the timer has marked fired fails: its
 * message is on its way, and the handler is about to be killed (the
 * caller waits for that rather than answer). The timer's handle lives on
 * the loop of the scheduler that made the guard and is touched only there
 * (another thread posts its arm or close there).
 *
 * The guard also keeps its socket (a reference), so that a request looks
 * the socket up once, not once per step, and checks on each use, under the
 * socket's lock, that the socket is still open and the caller's.
 *
 * While the host stops (SIGTERM), the acceptor drains its connections:
 * it asks each to stop once it is not busy, a request being busy from its
 * start until its response is complete (a flag in the guard, stored twice
 * a request). So it finds the guards by pid: a table of each process's
 * latest guard, under a lock, changed only when a guard is made or freed.
 *
 * Lifetime: a guard is made by its connection process and freed by
 * mb_hguard_free (the connection's end, its state's __gc when the process
 * died) from any thread; the memory goes once the handle is closed, in its
 * close callback. Handles left at the host's shutdown are closed by a
 * closer (scheduler.h).
 */
#ifndef MB_HTTP_GUARD_H
#define MB_HTTP_GUARD_H

#include "pid.h"
#include "sock.h"

typedef struct mb_hguard mb_hguard_t;

/* A guard for s (its reference, kept until mb_hguard_free; NULL: none), its process self, the
 * acceptor heir; with ms >= 0 it tells heir `msg` from self when a request
 * has run ms without finishing (ms < 0: untimed, no timer). NULL when out
 * of memory. On a scheduler thread: the timer lives on its loop. */
mb_hguard_t *mb_hguard_new(mb_sock_t *s, mb_pid_t self, mb_pid_t heir, double ms,
                           const char *msg);

/* A request starts: its socket ends self when the peer goes (mode, as
 * mb_sock_set_exit_on_close), heir becomes its heir, and the timing starts.
 * When the socket is closed or no longer self's (a handler may hand it
 * on), only the timing starts. Any thread (the caller is self). */
void mb_hguard_start(mb_hguard_t *g, int mode);

/* The response starts: the timing ends. Returns 1, or 0 when the timer had
 * fired already (its message is on its way). Any thread. */
int mb_hguard_stop(mb_hguard_t *g);

/* The guarded socket, if it is still open and self's, with heir set to 0
 * (the response is going out: no one can answer for it any more); else
 * NULL. Not referenced beyond the guard's own reference. */
mb_sock_t *mb_hguard_sock(mb_hguard_t *g);

/* The request's response is complete (its handler may still run). Any
 * thread (the caller is self). */
void mb_hguard_done(mb_hguard_t *g);

/* Is pid's latest guard busy: a request started (mb_hguard_start) whose
 * response is not complete (mb_hguard_done)? 0 for a pid without a guard.
 * For a server's drain while the host stops. Any thread. */
int mb_hguard_busy(mb_pid_t pid);

/* Free g (any thread, once): its timer stops and its socket is let go. */
void mb_hguard_free(mb_hguard_t *g);

#endif
