/* check.h: the one-line-per-check reporting shared by the C test programs.
 * Each check prints "ok" or "FAIL" and its description; a program ends with
 * check_summary(), whose return value is its exit code.
 */
#ifndef MB_TEST_CHECK_H
#define MB_TEST_CHECK_H

#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>

static int npass, nfail;

static bool check(bool ok, const char *fmt, ...)
{
  va_list ap;
  va_start(ap, fmt);
  printf("%s - ", ok ? "ok  " : "FAIL");
  vprintf(fmt, ap);
  printf("\n");
  va_end(ap);
  if (ok)
    npass++;
  else
    nfail++;
  return ok;
}

static int check_summary(void)
{
  printf("%d passed, %d failed\n", npass, nfail);
  return nfail ? 1 : 0;
}

#endif
