/* lib_fs.c: the `moonbeam.fs` Lua module - files without blocking a
 * scheduler thread.
 *
 * Each call runs its POSIX calls on libuv's thread pool (io.h) while the
 * calling process waits, so other processes keep their scheduler. Expected
 * failures (no such file, permission denied) return nil, "path: message",
 * errno-name; misuse (a wrong argument type) raises. These functions block
 * the calling process and so, like receive, cannot be called from inside a
 * C callback such as a table.sort comparator.
 *
 * Memory: every buffer a call fills in the pool (a file's data, a line, a
 * directory's names) and a write's copy of its data are counted buffers
 * (io.h, mb_io_grow): they count toward the caller's max_memory and the
 * host's --max-memory as they grow, and a growth over either fails the
 * call with ENOMEM, so that nothing a process reads - /dev/zero, a FIFO,
 * an endless line - grows past what it may hold. Only paths come from
 * mb_malloc, which ends the host when the allocator has nothing left.
 */
#include <dirent.h>
#include <pthread.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "io.h"
#include "lauxlib.h"
#include "lib.h"
#include "run.h"
#include "scheduler.h"

/* A file larger than this is refused by read_file (use a stream instead),
 * and no line of read_line is longer. */
#define MB_FS_MAX_READ ((size_t)1 << 30)
/* read_line's longest line unless its caller asks for another. */
#define MB_FS_MAX_LINE ((size_t)1 << 20)
/* A read reads at most this much at a time, and between two asks whether
 * its process still wants the data (a killed one's read stops). */
#define MB_FS_CHUNK ((size_t)1 << 20)
/* A buffer whose doubling the limits refuse grows by less, down to this. */
#define MB_FS_MIN_GROW ((size_t)64 << 10)

static char *dupstr(const char *s, size_t n)
{
  char *d = mb_malloc(n + 1);
  memcpy(d, s, n);
  d[n] = '\0';
  return d;
}

/* Push nil, "path: message", "ENAME" for req->err. */
/* nil, "path: why", code; oom: the limit an ENOMEM is over (io.h). */
static int push_failure(lua_State *L, const char *path, int err, const char *oom)
{
  lua_pushnil(L);
  if (err == UV_ENOMEM && oom)
    lua_pushfstring(L, "%s: not enough memory (over %s)", path, oom);
  else
    lua_pushfstring(L, "%s: %s", path, uv_strerror(err));
  lua_pushstring(L, uv_err_name(err));
  return 3;
}

static int push_error(lua_State *L, mb_io_req_t *req)
{
  return push_failure(L, req->path, req->err, req->oom);
}

/* Grow a counted buffer (io.h: it counts toward the process's max_memory
 * and the host's --max-memory) from *cap toward `want` bytes. A doubling
 * the limits refuse is tried again with half the increase, down to
 * MB_FS_MIN_GROW: the data of a pipe or a line, whose size is not known
 * ahead, may fill what its process may still hold before the read fails.
 * 0 or UV_ENOMEM (req->oom says which limit). */
static int grow(mb_io_req_t *req, char **buf, size_t *cap, size_t want)
{
  size_t step = want - *cap;
  for (;;) {
    int rc = mb_io_grow(req, buf, cap, *cap + step);
    if (rc == 0 || step <= MB_FS_MIN_GROW)
      return rc;
    step /= 2;
  }
}

/* Start req for the caller and block it; the scheduler resumes it with the
 * results of req->push. */
static int run_op(lua_State *L, mb_io_req_t *req, const char *fname)
{
  mb_proc_t *p = mb_proc_of(L);
  if (!mb_run_can_yield(p, L)) {
    mb_io_free(req);
    return mb_lib_block_error(L, fname);
  }
  int rc = mb_io_start(p, req);
  if (rc)
    return luaL_error(L, "%s: %s", fname, uv_strerror(rc));
  return mb_run_yield(L, MB_YIELD_WAIT);
}

/* A request of `size` bytes (an op's struct that embeds it) for the path
 * in argument 1. */
static mb_io_req_t *new_req_of(lua_State *L, size_t size, mb_io_work_fn run,
                               mb_io_push_fn push, const char *fname)
{
  mb_lib_self(L);
  size_t n;
  const char *path = luaL_checklstring(L, 1, &n);
  if (n == 0 || memchr(path, '\0', n))
    luaL_error(L, "bad argument #1 to '%s' (a non-empty path without zero bytes expected)",
               fname);
  mb_io_req_t *req = mb_io_new(size, run, push);
  req->path = dupstr(path, n);
  return req;
}

static mb_io_req_t *new_req(lua_State *L, mb_io_work_fn run, mb_io_push_fn push,
                            const char *fname)
{
  return new_req_of(L, sizeof(mb_io_req_t), run, push, fname);
}

/* -- read_file ------------------------------------------------------------ */

/* Wait until fd is ready for events (POLLIN: input, or its writer went;
 * POLLOUT: room), or an error; 0 if the process stopped wanting the
 * operation meanwhile (it died, or its wait ended), which is looked at
 * every AWAIT_SLICE_MS. */
#define AWAIT_SLICE_MS 100
static int await_fd(mb_io_req_t *req, int fd, short events)
{
  struct pollfd pfd = {fd, events, 0};
  for (;;) {
    int r = poll(&pfd, 1, AWAIT_SLICE_MS);
    if (r > 0 || (r < 0 && errno != EINTR))
      return 1;   /* read() says which */
    if (!mb_io_wanted(req))
      return 0;
  }
}

/* read(2) that waits (await_fd) while the read would block: the bytes
 * read, 0 at the end, or -errno (UV_ECANCELED once the process no longer
 * wants the result). */
static ssize_t read_waiting(mb_io_req_t *req, int fd, void *buf, size_t n)
{
  for (;;) {
    ssize_t r = read(fd, buf, n);
    if (r >= 0)
      return r;
    if (errno == EINTR)
      continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK)
      return -errno;
    if (!await_fd(req, fd, POLLIN))
      return UV_ECANCELED;
  }
}

/* The buffer grows as the data comes, counted (grow): a regular file's
 * size is known and taken at once, or refused at once; a special file
 * (/dev/zero, a FIFO, /proc) doubles until its end, MB_FS_MAX_READ, or
 * what the process and the host may still hold - then the read fails with
 * ENOMEM, unless the data ends right there.
 *
 * A FIFO, a terminal or another device can hold a read for ever: a FIFO's
 * open waits for a writer, a read for input. On a thread of the pool,
 * which is the host's for all its processes' file operations and name
 * lookups, that took the thread for good, even from a process killed
 * meanwhile (a handful of reads of a FIFO without a writer stopped every
 * file operation of the host, and its exit). So the file is opened
 * without waiting, and a read that would wait polls instead, a slice at a
 * time, and gives the thread back once no process wants its result. */
static void read_work(mb_io_req_t *req)
{
  int fd = open(req->path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) {
    req->err = -errno;
    return;
  }
  struct stat st;
  int statted = fstat(fd, &st) == 0;
  int known = statted && S_ISREG(st.st_mode) && st.st_size > 0;
  /* Opened so, a FIFO without a writer reads as empty: wait for one. */
  if (statted && S_ISFIFO(st.st_mode) && !await_fd(req, fd, POLLIN)) {
    req->err = UV_ECANCELED;
    close(fd);
    return;
  }
  if (known && (uint64_t)st.st_size >= MB_FS_MAX_READ) {
    req->err = UV_EFBIG;
    close(fd);
    return;
  }
  /* A regular file's size and one byte, to see its end without a growth. */
  size_t first = known ? (size_t)st.st_size + 1 : MB_FS_MIN_GROW;
  char *buf = NULL;
  size_t cap = 0, len = 0;
  int rc = 0;
  for (;;) {
    if (len == cap) {
      if (cap >= MB_FS_MAX_READ) {
        rc = UV_EFBIG;
        break;
      }
      size_t want = cap ? 2 * cap : first;
      if (want > MB_FS_MAX_READ)
        want = MB_FS_MAX_READ;
      rc = cap == 0 && known ? mb_io_grow(req, &buf, &cap, want)
                             : grow(req, &buf, &cap, want);
      if (rc) {
        /* No more room: the data fits only if it ends here. */
        char probe;
        ssize_t r = read_waiting(req, fd, &probe, 1);
        if (r <= 0)
          rc = (int)r;
        break;
      }
    }
    size_t n = cap - len < MB_FS_CHUNK ? cap - len : MB_FS_CHUNK;
    ssize_t r = read_waiting(req, fd, buf + len, n);
    if (r < 0) {
      rc = (int)r;
      break;
    }
    if (r == 0)
      break;
    len += (size_t)r;
    if (!mb_io_wanted(req)) {
      rc = UV_ECANCELED;
      break;
    }
  }
  close(fd);
  req->data = buf;
  req->len = len;
  req->err = rc;
}

static int read_push(lua_State *L, mb_io_req_t *req)
{
  mb_io_uncharge(req);   /* the heap counts the copy instead (io.h) */
  if (req->err)
    return push_error(L, req);
  lua_pushlstring(L, req->len ? req->data : "", req->len);
  return 1;
}

/* fs.read_file(path) -> data | nil, err, code */
static int l_read_file(lua_State *L)
{
  return run_op(L, new_req(L, read_work, read_push, "read_file"), "read_file");
}

/* -- write_file, append_file ---------------------------------------------- */

/* Write all n bytes; a descriptor opened without waiting (a FIFO: see
 * append_work) is waited for a slice at a time, while req is wanted. */
static int write_all(mb_io_req_t *req, int fd, const char *p, size_t n)
{
  while (n > 0) {
    ssize_t w = write(fd, p, n);
    if (w < 0 && errno == EINTR)
      continue;
    if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      if (await_fd(req, fd, POLLOUT))
        continue;
      return UV_ECANCELED;
    }
    if (w < 0)
      return -errno;
    p += w;
    n -= (size_t)w;
  }
  return 0;
}

static atomic_uint tmp_counter;

/* -- Stale temporaries ---------------------------------------------------- */

/* write_file's temporary files are PATH.tmp.PID.N. A host killed between
 * creating one and renaming it leaves it behind. The first write_file to a
 * path in a host's life removes the stale ones beside it: those whose
 * writer PID is gone (kill(pid, 0) says ESRCH; a live PID, even a reused
 * one, keeps its file) and that were not modified for MB_FS_STALE_SECONDS
 * (a writer in another PID namespace sharing the directory looks gone but
 * keeps writing). Deleting a live writer's file by mistake would only make
 * that write_file fail; the target file is never touched. */
#define MB_FS_STALE_SECONDS 60

/* Paths already cleaned by this host, as hashes in a direct-mapped table:
 * a collision only costs one more directory scan. */
#define MB_FS_CLEANED_SLOTS 1024
static atomic_uint_fast64_t cleaned[MB_FS_CLEANED_SLOTS];

static uint64_t path_hash(const char *s)
{
  uint64_t h = 0xcbf29ce484222325u;   /* FNV-1a */
  for (; *s; s++)
    h = (h ^ (unsigned char)*s) * 0x100000001b3u;
  return h | 1;   /* never 0, the empty slot */
}

/* Is name BASE.tmp.PID.N for base (len blen)? Gives PID. */
static int stale_name(const char *name, const char *base, size_t blen, long *pid)
{
  if (strncmp(name, base, blen) != 0 || strncmp(name + blen, ".tmp.", 5) != 0)
    return 0;
  const char *p = name + blen + 5;
  char *end;
  if (*p < '0' || *p > '9')
    return 0;
  *pid = strtol(p, &end, 10);
  if (*end != '.' || end[1] < '0' || end[1] > '9')
    return 0;
  strtoul(end + 1, &end, 10);
  return *end == '\0' && *pid > 0;
}

static void clean_stale(const char *path)
{
  uint64_t h = path_hash(path);
  atomic_uint_fast64_t *slot = &cleaned[h % MB_FS_CLEANED_SLOTS];
  if (atomic_exchange(slot, h) == h)
    return;
  const char *slash = strrchr(path, '/');
  const char *base = slash ? slash + 1 : path;
  char *dir = slash ? dupstr(path, slash == path ? 1 : (size_t)(slash - path))
                    : dupstr(".", 1);
  DIR *d = opendir(dir);
  mb_free(dir);
  if (d == NULL)
    return;
  size_t blen = strlen(base);
  time_t now = time(NULL);
  long self = (long)getpid();
  struct dirent *e;
  while ((e = readdir(d)) != NULL) {
    long pid;
    struct stat st;
    if (!stale_name(e->d_name, base, blen, &pid) || pid == self)
      continue;
    if (kill((pid_t)pid, 0) == 0 || errno != ESRCH)
      continue;
    if (fstatat(dirfd(d), e->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0 ||
        !S_ISREG(st.st_mode) || now - st.st_mtime < MB_FS_STALE_SECONDS)
      continue;
    unlinkat(dirfd(d), e->d_name, 0);
  }
  closedir(d);
}

/* Write to a temporary file in the same directory, flush it to disk, then
 * rename it over the path: readers see the old file or the new one, never
 * a part. */
static void write_work(mb_io_req_t *req)
{
  size_t n = strlen(req->path) + 48;
  req->path2 = mb_malloc(n);
  snprintf(req->path2, n, "%s.tmp.%ld.%u", req->path, (long)getpid(),
           atomic_fetch_add(&tmp_counter, 1));
  int fd = open(req->path2, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
  if (fd < 0) {
    req->err = -errno;
    return;
  }
  int rc = write_all(req, fd, req->data, req->len);
  if (rc == 0 && fsync(fd) != 0)
    rc = -errno;
  if (close(fd) != 0 && rc == 0)
    rc = -errno;
  if (rc == 0 && rename(req->path2, req->path) != 0)
    rc = -errno;
  if (rc)
    unlink(req->path2);
  req->err = rc;
  clean_stale(req->path);
}

/* As read_work does, a FIFO is opened without waiting: without a reader
 * that fails (ENXIO), and is tried again a slice at a time, as long as
 * the process wants it. */
static void append_work(mb_io_req_t *req)
{
  int fd;
  for (;;) {
    fd = open(req->path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC | O_NONBLOCK, 0666);
    if (fd >= 0 || errno != ENXIO)
      break;
    if (!mb_io_wanted(req)) {
      errno = ECANCELED;
      break;
    }
    struct timespec ts = {0, AWAIT_SLICE_MS * 1000000L};
    nanosleep(&ts, NULL);
  }
  if (fd < 0) {
    req->err = -errno;
    return;
  }
  int rc = write_all(req, fd, req->data, req->len);
  if (close(fd) != 0 && rc == 0)
    rc = -errno;
  req->err = rc;
}

static int ok_push(lua_State *L, mb_io_req_t *req)
{
  mb_io_uncharge(req);
  if (req->err)
    return push_error(L, req);
  lua_pushboolean(L, 1);
  return 1;
}

/* The data is copied for the pool thread (the process may die and its
 * state go while the write runs). The copy counts in the host's total
 * (over --max-memory, or more than the allocator has, the write fails with
 * ENOMEM) but not in the process's max_memory: the string it copies
 * counts there already, so the copy is at most that much again, for as
 * long as the write takes (io.h: charged before mb_io_start). */
static int write_common(lua_State *L, mb_io_work_fn run, const char *fname)
{
  size_t n;
  const char *data = luaL_checklstring(L, 2, &n);
  mb_io_req_t *req = new_req(L, run, ok_push, fname);
  char *copy = NULL;
  size_t cap = 0;
  if (mb_io_grow(req, &copy, &cap, n ? n : 1) != 0) {
    const char *why = req->oom;
    mb_io_free(req);   /* first: pushing the message may raise */
    return push_failure(L, lua_tostring(L, 1), UV_ENOMEM, why);
  }
  memcpy(copy, data, n);
  req->data = copy;
  req->len = n;
  return run_op(L, req, fname);
}

/* fs.write_file(path, data) -> true | nil, err, code  (atomic replace) */
static int l_write_file(lua_State *L)
{
  return write_common(L, write_work, "write_file");
}

/* fs.append_file(path, data) -> true | nil, err, code */
static int l_append_file(lua_State *L)
{
  return write_common(L, append_work, "append_file");
}

/* -- stat ----------------------------------------------------------------- */

static void stat_work(mb_io_req_t *req)
{
  struct stat st;
  if (lstat(req->path, &st) != 0) {
    req->err = -errno;
    return;
  }
  req->st.st_size = (uint64_t)st.st_size;
  req->st.st_mode = (uint64_t)st.st_mode;
  req->st.st_mtim.tv_sec = st.st_mtim.tv_sec;
  req->st.st_mtim.tv_nsec = st.st_mtim.tv_nsec;
  req->st.st_atim.tv_sec = st.st_atim.tv_sec;
  req->st.st_atim.tv_nsec = st.st_atim.tv_nsec;
  req->st.st_ctim.tv_sec = st.st_ctim.tv_sec;
  req->st.st_ctim.tv_nsec = st.st_ctim.tv_nsec;
}

static double ts(uv_timespec_t t)
{
  return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static int stat_push(lua_State *L, mb_io_req_t *req)
{
  if (req->err)
    return push_error(L, req);
  mode_t m = (mode_t)req->st.st_mode;
  lua_createtable(L, 0, 6);
  lua_pushnumber(L, (lua_Number)req->st.st_size);
  lua_setfield(L, -2, "size");
  lua_pushstring(L, S_ISREG(m) ? "file" : S_ISDIR(m) ? "directory"
                 : S_ISLNK(m) ? "link" : "other");
  lua_setfield(L, -2, "type");
  lua_pushinteger(L, m & 07777);
  lua_setfield(L, -2, "permissions");
  lua_pushnumber(L, ts(req->st.st_mtim));
  lua_setfield(L, -2, "mtime");
  lua_pushnumber(L, ts(req->st.st_atim));
  lua_setfield(L, -2, "atime");
  lua_pushnumber(L, ts(req->st.st_ctim));
  lua_setfield(L, -2, "ctime");
  return 1;
}

/* fs.stat(path) -> {size, type, permissions, mtime, atime, ctime} | nil, err, code */
static int l_stat(lua_State *L)
{
  return run_op(L, new_req(L, stat_work, stat_push, "stat"), "stat");
}

/* -- list_dir ------------------------------------------------------------- */

/* The names go in req->data, one counted block of NUL-terminated strings
 * as readdir gives them, and their offsets in a counted array, sorted: a
 * huge directory costs its names and a word each, within what the process
 * and the host may hold (else ENOMEM), and is never copied twice. */
typedef struct list_req {
  mb_io_req_t req;
  size_t *offs;
} list_req_t;

static _Thread_local const char *sort_names;   /* qsort has no user data */

static int by_name(const void *a, const void *b)
{
  return strcmp(sort_names + *(const size_t *)a, sort_names + *(const size_t *)b);
}

static void list_free(mb_io_req_t *req)
{
  mb_free(((list_req_t *)req)->offs);
}

static void list_work(mb_io_req_t *req)
{
  list_req_t *lr = (list_req_t *)req;
  DIR *d = opendir(req->path);
  if (d == NULL) {
    req->err = -errno;
    return;
  }
  char *names = NULL, *offs = NULL;
  size_t cap = 0, len = 0, ocap = 0, n = 0;
  int rc = 0;
  struct dirent *e;
  while (rc == 0 && (e = readdir(d)) != NULL) {
    if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
      continue;
    size_t l = strlen(e->d_name) + 1;
    if (n == INT_MAX) {   /* a Lua table's length */
      rc = UV_E2BIG;
      break;
    }
    if (len + l > cap || (n + 1) * sizeof(size_t) > ocap) {
      if (cap && !mb_io_wanted(req)) {
        rc = UV_ECANCELED;
        break;
      }
      if (len + l > cap)
        rc = grow(req, &names, &cap, cap ? 2 * cap + l : 4096);
      if (rc == 0 && (n + 1) * sizeof(size_t) > ocap)
        rc = grow(req, &offs, &ocap, ocap ? 2 * ocap : 64 * sizeof(size_t));
      if (rc)
        break;
    }
    memcpy(names + len, e->d_name, l);
    ((size_t *)offs)[n++] = len;
    len += l;
  }
  closedir(d);
  if (rc == 0 && n > 1) {
    sort_names = names;
    qsort(offs, n, sizeof(size_t), by_name);
  }
  req->data = names;
  lr->offs = (size_t *)offs;
  req->len = n;
  req->err = rc;
}

static int list_push(lua_State *L, mb_io_req_t *req)
{
  /* The table and its strings are the heap's to count (over max_memory:
   * "out of memory", as for any of the process's allocations). */
  mb_io_uncharge(req);
  if (req->err)
    return push_error(L, req);
  const size_t *offs = ((list_req_t *)req)->offs;
  lua_createtable(L, (int)req->len, 0);
  for (size_t i = 0; i < req->len; i++) {
    lua_pushstring(L, req->data + offs[i]);
    lua_rawseti(L, -2, (int)i + 1);
  }
  return 1;
}

/* fs.list_dir(path) -> {name, ...} (sorted) | nil, err, code */
static int l_list_dir(lua_State *L)
{
  mb_io_req_t *req = new_req_of(L, sizeof(list_req_t), list_work, list_push, "list_dir");
  req->free = list_free;
  return run_op(L, req, "list_dir");
}

/* -- remove --------------------------------------------------------------- */

static void remove_work(mb_io_req_t *req)
{
  if (remove(req->path) != 0)
    req->err = -errno;
}

/* fs.remove(path) -> true | nil, err, code  (a file or an empty directory) */
static int l_remove(lua_State *L)
{
  return run_op(L, new_req(L, remove_work, ok_push, "remove"), "remove");
}

/* -- stdin ---------------------------------------------------------------- */

/* One reader at a time: lines come out whole and in order. The line is
 * read in a pool thread, which waits for input while its process wants
 * the line (await_fd), then blocks until the line is whole.
 *
 * Its buffer is counted (io.h) and bounded: a line is at most `max` bytes
 * (MB_FS_MAX_LINE unless the caller asks for more, at most MB_FS_MAX_READ),
 * and no more than the process and the host may hold. A longer line is
 * not lost: the call returns nil, an error (EMSGSIZE, or ENOMEM at the
 * limits) and what it read of the line, and the next call goes on from
 * there (the byte that did not fit is put back: ungetc). A process killed
 * meanwhile stops its read at the buffer's next growth and skips to the
 * end of that line, without keeping it (the next reader starts on a line
 * of its own; the line is dropped, as a killed reader's always was). */
static pthread_mutex_t stdin_lock = PTHREAD_MUTEX_INITIALIZER;

typedef struct line_req {
  mb_io_req_t req;
  size_t max;
} line_req_t;

/* Nothing is left in stdin's buffer (the next getc reads the descriptor)?
 * glibc's FILE says so in fields of its public struct; elsewhere, assume
 * there is something (the read blocks, as it did). */
static int stdin_drained(void)
{
#ifdef __GLIBC__
  return stdin->_IO_read_ptr >= stdin->_IO_read_end;
#else
  return 0;
#endif
}

static void line_work(mb_io_req_t *req)
{
  size_t max = ((line_req_t *)req)->max;
  char *buf = NULL;
  size_t cap = 0, len = 0;
  int rc = 0, end = 0;
  pthread_mutex_lock(&stdin_lock);
  flockfile(stdin);   /* against io.read in a process, too */
  /* Before a line begins, wait for input only while the process wants the
   * line: a prompt waiting for a line that never comes gives its thread
   * back once its process ends (the host's halt too: Ctrl-C at the
   * prompt exited only after the halt's 3 s wait for the pool). Once a
   * line began, the rest is read as it comes. */
  if (stdin_drained() && !await_fd(req, fileno(stdin), POLLIN)) {
    funlockfile(stdin);
    pthread_mutex_unlock(&stdin_lock);
    req->err = UV_ECANCELED;
    return;
  }
  for (;;) {
    int c = getc_unlocked(stdin);
    if (c == EOF) {
      int e = errno;
      if (ferror_unlocked(stdin))
        rc = e > 0 ? -e : UV_EIO;
      end = rc == 0 && len == 0;
      break;
    }
    if (c == '\n')
      break;
    if (len == max) {
      ungetc(c, stdin);
      rc = UV_EMSGSIZE;
      break;
    }
    if (len == cap) {
      if (cap && !mb_io_wanted(req)) {
        while (c != EOF && c != '\n')
          c = getc_unlocked(stdin);
        rc = UV_ECANCELED;
        break;
      }
      size_t want = cap ? 2 * cap : 256;
      rc = grow(req, &buf, &cap, want < max ? want : max);
      if (rc) {
        ungetc(c, stdin);
        break;
      }
    }
    buf[len++] = (char)c;
  }
  funlockfile(stdin);
  pthread_mutex_unlock(&stdin_lock);
  req->data = buf;
  req->len = len;
  req->err = rc;
  req->flags = end;   /* end of input */
}

static int line_push(lua_State *L, mb_io_req_t *req)
{
  mb_io_uncharge(req);
  if (req->err) {
    int n;
    if (req->err == UV_EMSGSIZE) {
      lua_pushnil(L);
      lua_pushfstring(L, "stdin: line longer than %d bytes",
                      (int)((line_req_t *)req)->max);
      lua_pushstring(L, uv_err_name(req->err));
      n = 3;
    } else {
      n = push_error(L, req);
    }
    /* What was read of the line: the next call goes on after it. */
    lua_pushlstring(L, req->len ? req->data : "", req->len);
    return n + 1;
  }
  if (req->flags) {
    lua_pushnil(L);
    return 1;
  }
  lua_pushlstring(L, req->len ? req->data : "", req->len);
  return 1;
}

/* fs.read_line([max]) -> line (without its newline) | nil at end of input |
 * nil, err, code, part (a line longer than max bytes, default
 * MB_FS_MAX_LINE: EMSGSIZE; over the process's or host's memory: ENOMEM;
 * `part` is what was read of it, and the next call goes on from there) */
static int l_read_line(lua_State *L)
{
  mb_lib_self(L);
  lua_Number m = luaL_optnumber(L, 1, (lua_Number)MB_FS_MAX_LINE);
  luaL_argcheck(L, m >= 1 && m <= (lua_Number)MB_FS_MAX_READ, 1,
                "a maximum line length from 1 byte to 1 GiB expected");
  mb_io_req_t *req = mb_io_new(sizeof(line_req_t), line_work, line_push);
  ((line_req_t *)req)->max = (size_t)m;
  req->path = dupstr("stdin", 5);
  return run_op(L, req, "read_line");
}

static const luaL_Reg funcs[] = {
  {"read_line", l_read_line},
  {"read_file", l_read_file},
  {"write_file", l_write_file},
  {"append_file", l_append_file},
  {"stat", l_stat},
  {"list_dir", l_list_dir},
  {"remove", l_remove},
  {NULL, NULL}
};

int mb_lib_fs_open(lua_State *L)
{
  lua_createtable(L, 0, sizeof funcs / sizeof *funcs - 1);
  for (const luaL_Reg *r = funcs; r->name; r++) {
    lua_pushcfunction(L, r->func);
    lua_setfield(L, -2, r->name);
  }
  return 1;
}
