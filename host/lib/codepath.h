/* codepath.h: the package.path and package.cpath a process starts with.
 *
 * DESIGN
 * A process starts with the package.path and package.cpath of the process
 * that spawned it, as an OS process inherits its environment (Erlang's code
 * path is the node's, which every process sees), and a hibernated process
 * wakes with the paths it had. So a main script that puts its directory on
 * package.path can spawn functions that capture its modules, spawn them by
 * name, and hibernate into them: the new state finds them where the script
 * did.
 *
 * Each distinct pair of paths in use is one entry of a host-wide table,
 * reference-counted, shared by the processes that have it, and freed when
 * the last of them ends. A process record holds the entry of its paths
 * by number, in two bytes (mb_proc_t.codepath; 0 is the host's default
 * and costs nothing), so a process, hibernated or not, pays no byte for
 * them. When a process spawns or hibernates, lstate.c brings that number
 * up to date with its package table, if its package library is open (one
 * that never opened it cannot have changed its paths): a compare of two
 * strings with the entry's when they did not change. A spawned process
 * takes a reference to its parent's entry. lstate.c uses a process's entry
 * where the package library would: in require's light path before the
 * library opens, and as package.path and package.cpath when it opens.
 *
 * Bounded, as a process could otherwise make the host hold any number of
 * paths of any length for processes that hold two bytes each: at most
 * MB_CODEPATH_MAX pairs in use at once, of MB_CODEPATH_BYTES in all (spawn
 * and hibernate then raise); the bytes count in the host's memory
 * (alloc.h).
 *
 * Threads: any; one mutex. An entry's strings do not change while it is
 * referenced, and a holder of a reference reads them without the lock.
 */
#ifndef MB_CODEPATH_H
#define MB_CODEPATH_H

#define MB_CODEPATH_MAX 65535
#define MB_CODEPATH_BYTES (64u << 20)

/* The number of the entry that holds the pair (path, cpath) - an existing
 * one's, else a new one's - with a reference taken for the caller; -1 when
 * a new one would pass MB_CODEPATH_MAX or MB_CODEPATH_BYTES, or memory ran
 * out. Never 0. */
int mb_codepath_intern(const char *path, const char *cpath);

/* Take or drop a reference to entry id (0: nothing to do). */
void mb_codepath_ref(unsigned id);
void mb_codepath_unref(unsigned id);

/* Entry id's package.path, or package.cpath when cpath is 1; id is not 0
 * and the caller holds a reference. */
const char *mb_codepath_get(unsigned id, int cpath);

#endif
