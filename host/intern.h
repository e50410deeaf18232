/* intern.h: interned strings - one never-freed copy of each, host-wide.
 *
 * For the few names a process record points at while other threads may
 * read them (the module a process was spawned from, which the watchdog
 * prints about a process that is running): an interned string never moves
 * or goes away, so reading it needs no lock. Only for small, bounded sets
 * of names (module names), never for data. Threads: any (one mutex).
 */
#ifndef MB_INTERN_H
#define MB_INTERN_H

#include <stddef.h>

/* The interned copy of the n bytes at s (NUL-terminated), or NULL when
 * memory runs out. */
const char *mb_intern(const char *s, size_t n);

#endif
