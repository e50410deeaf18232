/* replay.c: a main() for the fuzz targets, so that any compiler builds them
 * and ctest replays their corpora (spec/fuzz/<target>/) in every build.
 *
 * DESIGN
 * A target (host/fuzz/fuzz_<name>.c) defines LLVMFuzzerTestOneInput and,
 * optionally, LLVMFuzzerInitialize, as libFuzzer expects. With clang and
 * -DMB_FUZZ=ON the same source is linked with libFuzzer to search for new
 * inputs; linked with this file instead it runs each file named on the
 * command line, or each file of each directory named (in name order, so a
 * run is repeatable), once. A crash, a sanitizer report or an abort() in the
 * target's own checks ends the program abnormally, which fails the test. An
 * empty or missing corpus fails too: a replay that runs nothing checks
 * nothing.
 */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv) __attribute__((weak));

/* Run the target on one file; -1 if it cannot be read. */
static int replay_file(const char *path)
{
  FILE *f = fopen(path, "rb");
  if (!f) {
    perror(path);
    return -1;
  }
  size_t cap = 4096, n = 0;
  uint8_t *buf = malloc(cap);
  size_t got;
  while (buf && (got = fread(buf + n, 1, cap - n, f)) > 0) {
    n += got;
    if (n == cap)
      buf = realloc(buf, cap *= 2);
  }
  int err = !buf || ferror(f);
  fclose(f);
  if (err) {
    fprintf(stderr, "%s: cannot read\n", path);
    free(buf);
    return -1;
  }
  /* Exactly n bytes, as libFuzzer gives them, so that ASan sees a read
   * past the end of the input. */
  uint8_t *exact = malloc(n ? n : 1);
  memcpy(exact, buf, n);
  free(buf);
  LLVMFuzzerTestOneInput(exact, n);
  free(exact);
  return 0;
}

static int by_name(const void *a, const void *b)
{
  return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Run the target on every regular file of dir; returns how many, or -1. */
static long replay_dir(const char *dir)
{
  DIR *d = opendir(dir);
  if (!d) {
    perror(dir);
    return -1;
  }
  char **names = NULL;
  size_t n = 0, cap = 0;
  struct dirent *e;
  while ((e = readdir(d)) != NULL) {
    if (e->d_name[0] == '.')
      continue;
    if (n == cap)
      names = realloc(names, (cap = cap ? cap * 2 : 64) * sizeof *names);
    names[n++] = strdup(e->d_name);
  }
  closedir(d);
  if (n)
    qsort(names, n, sizeof *names, by_name);
  long count = 0;
  for (size_t i = 0; i < n; i++) {
    char path[4096];
    struct stat st;
    snprintf(path, sizeof path, "%s/%s", dir, names[i]);
    if (stat(path, &st) == 0 && S_ISREG(st.st_mode)) {
      if (replay_file(path) != 0)
        count = -1;
      else if (count >= 0)
        count++;
    }
    free(names[i]);
  }
  free(names);
  return count;
}

int main(int argc, char **argv)
{
  if (argc < 2) {
    fprintf(stderr, "usage: %s corpus-dir-or-file...\n", argv[0]);
    return 2;
  }
  if (LLVMFuzzerInitialize)
    LLVMFuzzerInitialize(&argc, &argv);
  int bad = 0;
  for (int i = 1; i < argc; i++) {
    struct stat st;
    if (stat(argv[i], &st) != 0) {
      perror(argv[i]);
      bad = 1;
    } else if (S_ISDIR(st.st_mode)) {
      long n = replay_dir(argv[i]);
      printf("%s: %ld inputs replayed\n", argv[i], n);
      if (n <= 0)
        bad = 1;
    } else if (replay_file(argv[i]) != 0) {
      bad = 1;
    } else {
      printf("%s: replayed\n", argv[i]);
    }
  }
  return bad;
}
