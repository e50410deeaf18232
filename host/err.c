/* err.c: names and messages of the host's error codes (see err.h). */
#include <stdio.h>
#include <stdlib.h>

#include <uv.h>

#include "err.h"

static const char *const names[] = {
#define XX(name, lname, msg) lname,
  MB_ERRNO_MAP(XX)
#undef XX
};

static const char *const messages[] = {
#define XX(name, lname, msg) msg,
  MB_ERRNO_MAP(XX)
#undef XX
};

static int ours(int code)
{
  return code > MB_ERR_FIRST_ && code < MB_ERR_LAST_;
}

const char *mb_err_name(int code)
{
  return ours(code) ? names[code - MB_ERR_FIRST_ - 1] : uv_strerror(code);
}

const char *mb_strerror(int code)
{
  return ours(code) ? messages[code - MB_ERR_FIRST_ - 1] : uv_strerror(code);
}

void mb_assert_fail(const char *what, const char *file, int line)
{
  fprintf(stderr, "moonbeam: assertion failed at %s:%d: %s\n", file, line, what);
  abort();
}
