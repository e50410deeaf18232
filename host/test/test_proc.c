/* test_proc.c: tests of the process table and mailboxes (proc.h) below Lua.
 *
 * It links the core library alone (no Lua layer, no scheduler): processes
 * have no Lua state; they are created and fed messages and exit
 * signals directly, and each check looks at what the owner side (drain,
 * the private queue, exit_reason) makes of them. Every check prints one
 * line; the exit code is 0 only if all passed.
 */
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include "check.h"
#include "proc.h"

/* No scheduler: a woken process is only marked runnable. */
static void on_runnable(mb_proc_t *p)
{
  (void)p;
}

static mb_proc_t *new_proc(void)
{
  mb_proc_t *p = NULL;
  int rc = mb_proc_new(0, &p);
  if (rc)
    check(false, "mb_proc_new: %s", mb_strerror(rc));
  return p;
}

/* A user message carrying the string s. */
static mb_msg_t *msg(const char *s, mb_pid_t from)
{
  mb_msg_t *m = mb_msg_string(s);
  m->kind = MB_MSG_USER;
  m->from = from;
  return m;
}

/* End p with the reason its drain decided (the owner takes it first, as
 * the scheduler does). */
static void die_of_reason(mb_proc_t *p)
{
  mb_msg_t *reason = p->exit_reason;
  p->exit_reason = NULL;
  mb_proc_exit(p, reason);
}

static unsigned queued(mb_proc_t *p)
{
  unsigned n = 0;
  for (mb_msg_t *m = p->q_head; m; m = m->next)
    n++;
  return n;
}

static void test_table(void)
{
  mb_proc_t *a = new_proc(), *b = new_proc();
  check(a && b && a->pid != b->pid, "two processes get different pids");
  mb_proc_t *g = mb_proc_get(a->pid);
  check(g == a, "mb_proc_get finds a live process");
  mb_proc_unref(g);
  check(mb_proc_get(0) == NULL, "pid 0 names no process");
  mb_pid_t old = a->pid;
  mb_proc_exit(a, mb_msg_string("normal"));
  check(mb_proc_get(old) == NULL, "a dead pid is not found");
  mb_proc_t *c = new_proc();
  check(c && c->pid != old, "a reused slot gives a new pid");
  check(mb_proc_get(old) == NULL, "the old pid stays dead after its slot is reused");
  mb_proc_exit(b, mb_msg_string("normal"));
  mb_proc_exit(c, mb_msg_string("normal"));
}

static void test_mailbox_order(void)
{
  mb_proc_t *p = new_proc();
  for (int i = 0; i < 100; i++) {
    char s[16];
    snprintf(s, sizeof s, "m%d", i);
    mb_proc_send(p->pid, msg(s, 1));
  }
  check(atomic_load(&p->mailbox_len) == 100, "the mailbox counts 100 messages");
  check(mb_proc_drain(p) == 0, "draining plain messages does not kill");
  check(queued(p) == 100 && p->in_head == NULL, "drain moves the inbox to the private queue");
  /* Messages keep their order: compare with freshly encoded ones. */
  bool in_order = true;
  int i = 0;
  for (mb_msg_t *m = p->q_head; m; m = m->next, i++) {
    char s[16];
    snprintf(s, sizeof s, "m%d", i);
    mb_msg_t *want = mb_msg_string(s);
    in_order = in_order && m->len == want->len && memcmp(m->data, want->data, m->len) == 0;
    mb_msg_free(want);
  }
  check(in_order, "messages stay in the order they were sent");
  mb_pid_t pid = p->pid;
  mb_proc_exit(p, mb_msg_string("normal"));
  mb_proc_send(pid, msg("to the dead", 1));   /* dropped and freed (ASan) */
  check(mb_proc_get(pid) == NULL, "a send to a dead pid finds no process");
}

static void test_exit_signals(void)
{
  mb_proc_t *p = new_proc();
  mb_proc_exit_signal(p->pid, 7, mb_msg_string("normal"), 0);
  check(mb_proc_drain(p) == 0 && p->exit_reason == NULL,
        "an exit signal 'normal' does not end a process that does not trap");
  check(queued(p) == 0 && atomic_load(&p->nsignals) == 0, "and it leaves nothing queued");

  mb_proc_send(p->pid, msg("before", 7));
  mb_proc_exit_signal(p->pid, 7, mb_msg_string("boom"), 0);
  check(mb_proc_drain(p) == 1 && p->exit_reason != NULL,
        "an abnormal exit signal ends a process that does not trap");
  mb_msg_t *boom = mb_msg_string("boom");
  check(p->exit_reason && p->exit_reason->len == boom->len &&
        memcmp(p->exit_reason->data, boom->data, boom->len) == 0,
        "with the signal's reason");
  mb_msg_free(boom);
  die_of_reason(p);

  mb_proc_t *t = new_proc();
  t->trap_exit = 1;
  mb_proc_exit_signal(t->pid, 7, mb_msg_string("boom"), 0);
  mb_proc_exit_signal(t->pid, 8, mb_msg_string("normal"), 0);
  check(mb_proc_drain(t) == 0 && queued(t) == 2, "a trapping process keeps both signals as messages");
  check(t->q_head && t->q_head->kind == MB_MSG_TRAPPED &&
        t->q_head->next->kind == MB_MSG_TRAPPED, "marked as trapped EXIT messages");
  t->trap_exit = 0;
  mb_proc_send(t->pid, msg("later", 9));
  check(mb_proc_drain(t) == 0 && t->exit_reason == NULL && queued(t) == 3,
        "trapped signals stay messages after trap_exit is turned off");
  mb_proc_exit_signal(t->pid, 7, mb_msg_string("kill"), 1);
  t->trap_exit = 1;
  check(mb_proc_drain(t) == 1 && t->exit_reason != NULL, "kill cannot be trapped");
  mb_msg_t *killed = mb_msg_string("killed");
  check(t->exit_reason->len == killed->len &&
        memcmp(t->exit_reason->data, killed->data, killed->len) == 0, "its reason is 'killed'");
  mb_msg_free(killed);
  check(atomic_load(&t->nsignals) == 0, "no signal is counted twice");
  die_of_reason(t);
}

static void test_links_monitors(void)
{
  mb_proc_t *a = new_proc(), *b = new_proc(), *w = new_proc();
  check(mb_proc_link(a, b->pid) == 0, "link to a live process");
  mb_ref_t ref = mb_proc_monitor(w, b->pid);
  check(ref != 0, "monitor returns a ref");
  mb_pid_t bpid = b->pid;
  mb_proc_exit(b, mb_msg_string("crash"));
  check(mb_proc_drain(a) == 1, "a linked process dies with an abnormal exit");
  mb_proc_drain(w);
  check(w->q_head && w->q_head->kind == MB_MSG_DOWN && w->q_head->ref == ref &&
        w->q_head->from == bpid, "the monitor gets DOWN with its ref and the pid");
  check(mb_proc_link(w, bpid) == MB_ENOPROC, "linking a dead pid fails (noproc)");
  mb_ref_t r2 = mb_proc_monitor(w, bpid);
  mb_proc_drain(w);
  check(w->q_head && w->q_head->next && w->q_head->next->kind == MB_MSG_DOWN &&
        w->q_head->next->ref == r2, "monitoring a dead pid gives DOWN at once");
  mb_proc_t *c = new_proc();
  mb_ref_t r3 = mb_proc_monitor(w, c->pid);
  check(mb_proc_demonitor(w, r3) == 1 && mb_proc_demonitor(w, r3) == 0,
        "demonitor is true once, then false");
  unsigned before = queued(w);
  mb_proc_exit(c, mb_msg_string("crash"));
  mb_proc_drain(w);
  check(queued(w) == before, "no DOWN after demonitor");
  die_of_reason(a);
  mb_proc_exit(w, mb_msg_string("normal"));
}

static void test_aliases(void)
{
  mb_proc_t *p = new_proc();
  mb_ref_t r = mb_proc_newref();
  check(!mb_proc_has_alias(p, r), "a new ref is not an alias");
  mb_proc_alias(p, r);
  check(mb_proc_has_alias(p, r), "alias activates it");
  check(mb_proc_unalias(p, r) == 1 && mb_proc_unalias(p, r) == 0, "unalias is true once");
  check(!mb_proc_has_alias(p, r), "and deactivates it");
  mb_proc_exit(p, mb_msg_string("normal"));
}

int main(void)
{
  mb_proc_on_runnable = on_runnable;
  test_table();
  test_mailbox_order();
  test_exit_signals();
  test_links_monitors();
  test_aliases();
  return check_summary();
}
