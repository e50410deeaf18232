/* reg.h: the registry of process names (mb.register / mb.whereis).
 *
 * One table for the host, guarded by one lock: registering is rare next to
 * sending, and a send by name only reads. A name belongs to at most one live
 * process and a process has at most one name (as in Erlang); a process's name
 * is released when it dies.
 */
#ifndef MB_REG_H
#define MB_REG_H

#include "proc.h"

/* Set up: drop a dying process's name (an exit hook) and free the table at
 * shutdown. Once, at start-up. */
void mb_reg_init(void);

/* Register name for p. Returns 0, MB_ETAKEN (the name is registered
 * already), MB_EHASNAME (p has a name already) or MB_ENOPROC (p is not
 * alive). Any thread. */
int mb_reg_register(const char *name, mb_proc_t *p);
/* Returns 1 if name was registered. */
int mb_reg_unregister(const char *name);
/* The pid registered as name, or 0. */
mb_pid_t mb_reg_whereis(const char *name);
/* The same for a name of n bytes that may hold a NUL (an atom from another
 * node): such a name is nobody's, never the name before the NUL. */
mb_pid_t mb_reg_whereis_n(const char *name, size_t n);
/* Copy p's name into buf (truncated to n); 0 if it has none. */
int mb_reg_name_of(mb_proc_t *p, char *buf, size_t n);

#endif
