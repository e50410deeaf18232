/* test_dist_recv.c: tests of what a peer's frames do (dist_handle_frame,
 * dist_recv.c), on a connection that has no socket: the refs of other
 * nodes that control messages bring are held exactly as long as a monitor
 * needs them, and nothing stays allocated, whether the frame is good or
 * makes the connection close; and once the table of remote pids is full,
 * a pid it cannot take closes the connection only where a link, a monitor
 * or an exit signal would have to name it.
 * Every check prints one line; the exit code is 0 only if all passed.
 */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "check.h"
#include "dist_int.h"
#include "ei.h"
#include "err.h"
#include "etf.h"
#include "remote.h"
#include "term.h"

static conn_t *conn;
static erlang_pid peer_pid = {"peer@localhost", 12, 0, 3};
static erlang_pid our_pid = {"me@localhost", 1, 0, 5};
static erlang_ref peer_ref = {"peer@localhost", 3, {1, 2, 3}, 3};

static erlang_pid new_pid = {"peer@localhost", 1000, 0, 3};

/* Handle the frame {op, items...}: 'p' the peer's pid, 'q' another of its
 * pids, never seen before, 'o' one of ours,
 * 'r' the peer's ref, 'a' an atom (next argument), 'n' a NaN (which passes
 * the check but does not decode); a final '+' adds the message 'ok', a
 * final '*' that message and a stray byte after it. */
static int frame(long op, const char *items, ...)
{
  va_list ap;
  va_start(ap, items);
  ei_x_buff x;
  ei_x_new(&x);
  char pt = 112;
  ei_x_append_buf(&x, &pt, 1);
  ei_x_encode_version(&x);
  size_t n = strlen(items);
  int msg = n && (items[n - 1] == '+' || items[n - 1] == '*');
  ei_x_encode_tuple_header(&x, 1 + (long)(n - msg));
  ei_x_encode_long(&x, op);
  for (const char *c = items; *c && c < items + n - msg; c++) {
    if (*c == 'p')
      ei_x_encode_pid(&x, &peer_pid);
    else if (*c == 'q')
      new_pid.num++, ei_x_encode_pid(&x, &new_pid);
    else if (*c == 'o')
      ei_x_encode_pid(&x, &our_pid);
    else if (*c == 'r')
      ei_x_encode_ref(&x, &peer_ref);
    else if (*c == 'a')
      ei_x_encode_atom(&x, va_arg(ap, const char *));
    else
      ei_x_append_buf(&x, "F\x7f\xf8\0\0\0\0\0\0", 9);
  }
  va_end(ap);
  if (msg) {
    ei_x_encode_version(&x);
    ei_x_encode_atom(&x, "ok");
  }
  if (msg && items[n - 1] == '*')
    ei_x_append_buf(&x, "j", 1);
  int rc = dist_handle_frame(conn, x.buff, x.index);
  ei_x_free(&x);
  return rc;
}

static void up(void)
{
  pthread_mutex_lock(&dist_lock);
  conn = dist_table_add((uint32_t)mb_atom_intern("peer@localhost", 14), 1);
  pthread_mutex_unlock(&dist_lock);
}

int main(void)
{
  ei_init();
  mb_term_init();
  uint32_t self = (uint32_t)mb_atom_intern("me@localhost", 12);
  mb_etf_set_node(self, 5);
  dist_self_atom = self;
  uint32_t base = mb_remote_ref_count();

  up();
  check(frame(19, "par", "net_kernel") == 0 && mb_remote_ref_count() == base + 1,
        "a monitor of net_kernel holds its watcher's ref");
  check(frame(20, "par", "net_kernel") == 0 && mb_remote_ref_count() == base,
        "its demonitor lets go of it");
  check(frame(19, "par", "net_kernel") == 0 && mb_remote_ref_count() == base + 1,
        "monitored again");
  dist_conn_down(conn, NULL);
  check(mb_remote_ref_count() == base, "the connection going down lets go of it");

  up();
  check(frame(19, "por") == 0 && mb_remote_ref_count() == base,
        "a monitor of a process that does not exist holds nothing");
  check(frame(21, "porn") == -1, "a MONITOR_P_EXIT with a malformed reason closes");
  check(mb_remote_ref_count() == base, "and holds nothing (%u held)",
        mb_remote_ref_count() - base);
  check(frame(21, "pora", "normal") == 0 && mb_remote_ref_count() == base,
        "a MONITOR_P_EXIT for a monitor we do not have holds nothing");
  check(frame(33, "pr+") == 0 && mb_remote_ref_count() == base,
        "an ALIAS_SEND to another node's ref holds nothing");
  dist_conn_down(conn, NULL);

  /* A message followed by a stray byte closes the connection, and the
   * message that decoded is freed (LeakSanitizer checks that in the ASan
   * build). */
  up();
  check(frame(2, "ao*", "") == -1, "a SEND whose message has bytes after it closes");
  dist_conn_down(conn, NULL);

  /* Fill the table of remote pids (never freed, as atoms: remote.h). */
  mb_rpid_t r = {.node = (uint32_t)mb_atom_intern("filler@localhost", 16), .creation = 1};
  int64_t id;
  while ((id = mb_remote_pid(&r)) > 0)
    r.num++;
  check(id == MB_ETOOMANY, "the table of remote pids fills up (%u)", mb_remote_pid_count());
  up();
  check(frame(22, "qo+") == 0, "a SEND_SENDER from a pid it cannot take is delivered");
  check(frame(33, "qr+") == 0 && frame(6, "qaa+", "", "nobody") == 0,
        "and so are an ALIAS_SEND and a REG_SEND");
  check(frame(2, "aq+", "") == 0, "a SEND to a pid it cannot take goes nowhere");
  check(frame(4, "qo") == 0 && frame(3, "qoa", "normal") == 0 && frame(20, "qor") == 0,
        "an UNLINK, a link EXIT and a DEMONITOR_P from one are ignored: nothing names it");
  check(frame(1, "qo") == MB_ETOOMANY, "a LINK from one closes, not as malformed");
  dist_conn_down(conn, NULL);
  up();
  check(frame(19, "qor") == MB_ETOOMANY && mb_remote_ref_count() == base,
        "and so does a MONITOR_P, holding nothing");
  dist_conn_down(conn, NULL);
  up();
  check(frame(8, "qoa", "kill") == MB_ETOOMANY, "and an EXIT2");
  dist_conn_down(conn, NULL);
  return check_summary();
}
