/* modcache.c: `require`'s Lua-file searcher, with a host-wide cache of
 * compiled modules (see modcache.h).
 */
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "code.h"
#include "lauxlib.h"
#include "modcache.h"
#include "pid.h"
#include "sandbox.h"

/* Two kinds of entries share one table: a file's compiled chunk (key: its
 * path; code set), and where a module name was found (key: name, a
 * newline, the path searched; `file` names the file, NULL if none was). */
typedef struct entry {
  struct entry *next;
  mb_code_t *code;          /* the module's main chunk, dumped */
  char *file;               /* a name entry: the file it resolved to */
  struct timespec mtime;
  off_t size;
  double checked;           /* when the file was last stat'ed, or the name
                             * resolved (ms) */
  int name;                 /* a name entry */
  char path[];
} entry_t;

#define NBUCKETS 512
static entry_t *buckets[NBUCKETS];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static double now_ms(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static unsigned hash(const char *s)
{
  unsigned h = 5381;
  while (*s)
    h = h * 33 + (unsigned char)*s++;
  return h % NBUCKETS;
}

/* The entry of path; lock held. */
static entry_t *find(const char *path)
{
  for (entry_t *e = buckets[hash(path)]; e; e = e->next)
    if (strcmp(e->path, path) == 0)
      return e;
  return NULL;
}

/* A reference to path's cached code if it is still the file's: checked
 * within MB_MODCACHE_CHECK_MS, or now, with st (when st is not NULL). */
static mb_code_t *lookup(const char *path, const struct stat *st)
{
  mb_code_t *c = NULL;
  pthread_mutex_lock(&lock);
  entry_t *e = find(path);
  if (e) {
    double now = now_ms();
    int fresh = st ? e->size == st->st_size &&
                     e->mtime.tv_sec == st->st_mtim.tv_sec &&
                     e->mtime.tv_nsec == st->st_mtim.tv_nsec
                   : now - e->checked < MB_MODCACHE_CHECK_MS;
    if (fresh) {
      if (st)
        e->checked = now;
      c = e->code;
      mb_code_ref(c);
    }
  }
  pthread_mutex_unlock(&lock);
  return c;
}

/* The entry of key, made if missing; lock held. NULL without memory. */
static entry_t *get_entry(const char *key)
{
  entry_t *e = find(key);
  if (e)
    return e;
  size_t n = strlen(key);
  e = calloc(1, sizeof *e + n + 1);
  if (e == NULL)
    return NULL;
  memcpy(e->path, key, n + 1);
  e->next = buckets[hash(key)];
  buckets[hash(key)] = e;
  return e;
}

static void store(const char *path, const struct stat *st, mb_code_t *code)
{
  pthread_mutex_lock(&lock);
  entry_t *e = get_entry(path);
  if (e == NULL) {
    pthread_mutex_unlock(&lock);
    mb_code_unref(code);
    return;
  }
  if (e->code)
    mb_code_unref(e->code);
  e->code = code;
  e->mtime = st->st_mtim;
  e->size = st->st_size;
  e->checked = now_ms();
  pthread_mutex_unlock(&lock);
}

/* Read and compile path from source, push the chunk and cache its dump.
 * Returns 0, or an error with its message pushed. */
static int compile(lua_State *L, const char *path)
{
  FILE *f = fopen(path, "rb");
  if (f == NULL) {
    lua_pushfstring(L, "cannot open %s: %s", path, strerror(errno));
    return LUA_ERRFILE;
  }
  struct stat st;
  if (fstat(fileno(f), &st) != 0) {
    fclose(f);
    lua_pushfstring(L, "cannot stat %s", path);
    return LUA_ERRFILE;
  }
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  char buf[LUAL_BUFFERSIZE];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, f)) > 0)
    luaL_addlstring(&b, buf, n);
  int rerr = ferror(f);
  fclose(f);
  luaL_pushresult(&b);
  if (rerr) {
    lua_pop(L, 1);
    lua_pushfstring(L, "cannot read %s", path);
    return LUA_ERRFILE;
  }
  size_t len;
  const char *src = lua_tolstring(L, -1, &len);
  lua_pushfstring(L, "@%s", path);
  /* Text only, unless the host allows bytecode (sandbox.h); the cache
   * then holds our own dump of it. */
  int rc = mb_sandbox_loadbuffer(L, src, len, lua_tostring(L, -1), NULL);
  lua_remove(L, -2);   /* the chunk name */
  lua_remove(L, -2);   /* the source */
  if (rc != 0)
    return rc;
  /* The first process to require the module runs it as compiled from
   * source; the cache keeps its dump for the others. */
  mb_code_t *code;
  if (mb_code_dump(L, &code) == 0 && code)
    store(path, &st, code);
  return 0;
}

/* -- Chunks kept in a reused state -------------------------------------------
 * Loading a dump is most of a require: moonbeam.http_conn's is ~55k of the
 * ~214k instructions of an HTTP connection per request (callgrind), every
 * constant string interned and every prototype read again. A process's
 * state is reused by a later one (lstate.c, "Reused states"), and the
 * module's prototypes - bytecode and constants, which no Lua code can
 * change - could serve it as they are. So the main chunk a state loaded
 * from the cache stays in the table at MB_REGSLOT_CHUNKS, code serial ->
 * function, and a later require of the same code object in that state
 * runs that function again instead of loading the dump: a new run of a
 * main chunk makes new closures and tables, exactly as a fresh load would.
 * A main chunk has no upvalues; what ties it to a process is its
 * environment, which is the requiring process's globals while it is in
 * use and, after a reset, the table at key 0 (mb_modcache_reset_kept), an
 * empty table no process can reach: the function is handed out only after
 * its environment was set. A process's first collection (mb_lstate_settle
 * calls mb_modcache_drop_unused) drops the chunks it did not use, so that
 * the state of a process that needs none carries no one else's modules
 * (idle memory). At most MB_CHUNKS_MAX per state. */
#define MB_CHUNKS_MAX 8

/* Push the state's table of kept chunks; 0 (nothing pushed) if it has
 * none. */
static int push_chunks(lua_State *L)
{
  lua_rawgeti(L, LUA_REGISTRYINDEX, MB_REGSLOT_CHUNKS);
  if (lua_istable(L, -1))
    return 1;
  lua_pop(L, 1);
  return 0;
}

/* Push the chunk of c this state kept, with the caller's globals as its
 * environment; 0 (nothing pushed) if it has none. */
static int push_kept(lua_State *L, mb_code_t *c)
{
  if (!push_chunks(L))
    return 0;
  lua_pushnumber(L, (lua_Number)mb_code_serial(c));
  lua_rawget(L, -2);
  lua_remove(L, -2);
  if (!lua_isfunction(L, -1)) {
    lua_pop(L, 1);
    return 0;
  }
  lua_pushvalue(L, LUA_GLOBALSINDEX);
  lua_setfenv(L, -2);
  return 1;
}

/* Keep the chunk on top, just loaded from the code object of this serial,
 * for the state's next processes (see above). Raises only for memory, as
 * the load itself. */
static void keep(lua_State *L, uint64_t serial)
{
  if (lua_getupvalue(L, -1, 1) != NULL) {   /* (a main chunk has none) */
    lua_pop(L, 1);
    return;
  }
  if (!push_chunks(L)) {
    lua_createtable(L, 0, 2);
    lua_newtable(L);
    lua_rawseti(L, -2, 0);            /* the environment of a chunk not in use */
    lua_pushvalue(L, -1);
    lua_rawseti(L, LUA_REGISTRYINDEX, MB_REGSLOT_CHUNKS);
  }
  int n = 0;
  for (lua_pushnil(L); lua_next(L, -2); lua_pop(L, 1))
    n++;
  if (n <= MB_CHUNKS_MAX) {           /* (key 0 is not a chunk) */
    lua_pushnumber(L, (lua_Number)serial);
    lua_pushvalue(L, -3);
    lua_rawset(L, -3);
  }
  lua_pop(L, 1);
}

void mb_modcache_reset_kept(lua_State *L)
{
  if (!push_chunks(L))
    return;
  for (lua_pushnil(L); lua_next(L, -2); lua_pop(L, 1)) {
    if (lua_isfunction(L, -1)) {
      lua_rawgeti(L, -3, 0);
      lua_setfenv(L, -2);
    }
  }
  lua_pop(L, 1);
}

void mb_modcache_drop_unused(lua_State *L)
{
  if (!push_chunks(L))
    return;
  lua_rawgeti(L, -1, 0);
  for (lua_pushnil(L); lua_next(L, -3); ) {
    int unused = 0;
    if (lua_isfunction(L, -1)) {
      lua_getfenv(L, -1);
      unused = lua_rawequal(L, -1, -4);   /* still the table at key 0 */
      lua_pop(L, 1);
    }
    lua_pop(L, 1);
    if (unused) {   /* (clearing a field during lua_next is allowed) */
      lua_pushvalue(L, -1);
      lua_pushnil(L);
      lua_rawset(L, -5);
    }
  }
  lua_pop(L, 2);
}

/* Push the cached chunk of path, or compile it. Returns 0, or an error
 * with its message pushed. */
static int load(lua_State *L, const char *path)
{
  mb_code_t *c = lookup(path, NULL);
  struct stat st;
  if (c == NULL && stat(path, &st) == 0)
    c = lookup(path, &st);
  if (c == NULL)
    return compile(L, path);
  if (push_kept(L, c)) {
    mb_code_unref(c);
    return 0;
  }
  size_t len;
  const unsigned char *bc = mb_code_bytes(c, &len);
  int rc = luaL_loadbuffer(L, (const char *)bc, len, path);
  uint64_t serial = mb_code_serial(c);
  mb_code_unref(c);
  if (rc == 0)
    keep(L, serial);
  return rc;
}

/* -- Where names are found ---------------------------------------------------
 * A name entry (key: name "\n" path) remembers the file a module name
 * resolved to on a path, or that it resolved to none (missing), for
 * MB_MODCACHE_CHECK_MS: a require of a C module searched package.path for
 * a Lua file twice (before and after the package library opened), a
 * syscall a template each time. At most MAX_NAMES of them: a new one past
 * that drops them all first, since a process that sets package.path to a
 * new string before each require (or requires names that do not exist)
 * would otherwise grow the table without bound. */
#define MAX_NAMES 4096
static int nnames;

static void drop_names(void)
{
  for (int i = 0; i < NBUCKETS; i++)
    for (entry_t **pe = &buckets[i]; *pe; ) {
      entry_t *e = *pe;
      if (e->name) {
        *pe = e->next;
        free(e->file);
        free(e);
      } else {
        pe = &e->next;
      }
    }
  nnames = 0;
}

/* What key resolved to, if that is fresh: 1 with the file copied to buf
 * (NUL-terminated, at most n bytes), -1 if it resolved to none, 0 if not
 * known. Pushes nothing: no Lua error can come while the lock is held. */
static int resolved(const char *key, char *buf, size_t n)
{
  int r = 0;
  pthread_mutex_lock(&lock);
  entry_t *e = find(key);
  if (e && e->name && now_ms() - e->checked < MB_MODCACHE_CHECK_MS) {
    if (e->file == NULL)
      r = -1;
    else if (strlen(e->file) < n) {
      strcpy(buf, e->file);
      r = 1;
    }
  }
  pthread_mutex_unlock(&lock);
  return r;
}

/* Remember that key resolved to file (NULL: to none). */
static void remember(const char *key, const char *file)
{
  pthread_mutex_lock(&lock);
  entry_t *e = find(key);
  if (e == NULL) {
    if (nnames >= MAX_NAMES)
      drop_names();
    e = get_entry(key);
    if (e) {
      e->name = 1;
      nnames++;
    }
  }
  if (e && (file == NULL || e->file == NULL || strcmp(e->file, file) != 0)) {
    free(e->file);
    e->file = file ? strdup(file) : NULL;
  }
  /* (without memory for the name, a found file is not remembered as none) */
  if (e)
    e->checked = file && e->file == NULL ? 0 : now_ms();
  pthread_mutex_unlock(&lock);
}

/* (modcache.h) With `list` 2, push only the list of the files tried,
 * testing none. LuaJIT's search opens each candidate to see whether it can be read; so,
 * with every descriptor taken (a server at its limit of connections), it
 * found no module at all, and each connection's or waking process's
 * require of one failed with "module not found" although its code was in
 * the cache. access() asks the same of the file (the host is not
 * set-user-ID) without opening it. */
int mb_modcache_search(lua_State *L, const char *name, const char *path, int list)
{
  int top = lua_gettop(L);
  luaL_Buffer tried;   /* (its pieces, if any, on the stack from top + 1) */
  if (list)
    luaL_buffinit(L, &tried);
  for (const char *t = path; *t; ) {
    const char *end = strchr(t, ';');
    size_t n = end ? (size_t)(end - t) : strlen(t);
    if (n > 0) {
      luaL_Buffer b;
      luaL_buffinit(L, &b);
      for (size_t i = 0; i < n; i++) {
        if (t[i] != '?') {
          luaL_addchar(&b, t[i]);
          continue;
        }
        for (const char *c = name; *c; c++)
          luaL_addchar(&b, *c == '.' ? '/' : *c);
      }
      luaL_pushresult(&b);
      const char *file = lua_tostring(L, -1);
      if (list != 2 && access(file, R_OK) == 0) {
        if (lua_gettop(L) > top + 1) {   /* over the list's pieces */
          lua_replace(L, top + 1);
          lua_settop(L, top + 1);
        }
        return 1;
      }
      if (list) {
        lua_pushfstring(L, "\n\tno file " LUA_QS, file);
        lua_remove(L, -2);
        luaL_addvalue(&tried);
      } else {
        lua_pop(L, 1);
      }
    }
    t += n + (end != NULL);
  }
  if (list)
    luaL_pushresult(&tried);
  return 0;
}

int mb_modcache_locate(lua_State *L, const char *name, const char *path, int list)
{
  char file[4096];
  lua_pushfstring(L, "%s\n%s", name, path);
  int r = resolved(lua_tostring(L, -1), file, sizeof file);
  if (r > 0) {
    lua_pop(L, 1);
    lua_pushstring(L, file);
    return 1;
  }
  if (r < 0 && !list) {
    lua_pop(L, 1);
    return 0;
  }
  int found = mb_modcache_search(L, name, path, r < 0 ? 2 : list);
  if (r == 0)
    remember(lua_tostring(L, -1 - (found || list)), found ? lua_tostring(L, -1) : NULL);
  lua_remove(L, -1 - (found || list));   /* the key */
  return found;
}

/* Push the chunk of module name from the file on top, which it replaces,
 * or raise require's error. */
static void load_found(lua_State *L, const char *name)
{
  const char *file = lua_tostring(L, -1);
  if (load(L, file) != 0)
    luaL_error(L, "error loading module '%s' from file '%s':\n\t%s",
               name, file, lua_tostring(L, -1));
  lua_remove(L, -2);   /* the file */
}

/* package.loaders[2](name): as LuaJIT's Lua-file searcher - the loader of
 * the first file of package.path that exists, or the list of files tried
 * - but a module compiled once is loaded from the cache. */
static int searcher(lua_State *L)
{
  const char *name = luaL_checkstring(L, 1);
  lua_getfield(L, LUA_GLOBALSINDEX, "package");
  lua_getfield(L, -1, "path");
  if (!lua_isstring(L, -1))
    return luaL_error(L, "'package.path' must be a string");
  if (mb_modcache_locate(L, name, lua_tostring(L, -1), 1))
    load_found(L, name);
  return 1;   /* the chunk, or the list of files tried */
}

int mb_modcache_find(lua_State *L, const char *name, const char *path)
{
  if (!mb_modcache_locate(L, name, path, 0))
    return 0;
  load_found(L, name);
  return 1;
}

void mb_modcache_install(lua_State *L)
{
  lua_getfield(L, LUA_GLOBALSINDEX, "package");
  lua_getfield(L, -1, "loaders");
  lua_pushcfunction(L, searcher);
  lua_rawseti(L, -2, 2);
  lua_pop(L, 2);
}

void mb_modcache_clear(void)
{
  pthread_mutex_lock(&lock);
  for (int i = 0; i < NBUCKETS; i++) {
    while (buckets[i]) {
      entry_t *e = buckets[i];
      buckets[i] = e->next;
      if (e->code)
        mb_code_unref(e->code);
      free(e->file);
      free(e);
    }
  }
  pthread_mutex_unlock(&lock);
}
