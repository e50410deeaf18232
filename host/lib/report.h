/* report.h: crash reports on stderr.
 *
 * One block per event, written with a single fputs so that reports from two
 * scheduler threads never interleave. The first process's error is printed
 * the way luajit prints an uncaught error ("moonbeam: msg" and the
 * traceback), since moonbeam is a drop-in interpreter; any other process
 * gets a crash report naming it.
 */
#ifndef MB_REPORT_H
#define MB_REPORT_H

#include "proc.h"

/* p died of the error value on top of T's stack (T: the body coroutine, or
 * the main thread for an error while booting, which has no traceback). */
void mb_report_crash(mb_proc_t *p, lua_State *T);
/* p is exiting with reason without an error (mb.exit, exit signal, limits);
 * reported only when it is a fault of its own: out of memory. */
void mb_report_exit(mb_proc_t *p, const mb_msg_t *reason);

#endif
