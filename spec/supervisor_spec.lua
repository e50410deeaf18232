-- Specs of moonbeam.supervisor. They run inside the host:
--   busted --lua=build/moonbeam spec/supervisor_spec.lua
-- The children report their life to the test process ({started = id, pid =}
-- and {stopped = id, reason =}), so the specs check orders by what arrives,
-- never by timing. Every wait is bounded; each test checks that it leaves no
-- process and no message behind.
local mb = require "moonbeam"
local server = require "moonbeam.server"
local supervisor = require "moonbeam.supervisor"
local S = require "spec.support"

-- A child process body. It traps exits so that it can report being shut
-- down; a stubborn one ignores exit signals (to test the kill). Messages:
-- "crash" raises an error, "exit" ends it normally. It reports its start to
-- `to`, then acknowledges it to `starter` (see child below).
local function worker(to, id, stubborn, starter)
  mb.trap_exit(true)
  mb.send(to, { started = id, pid = mb.self() })
  mb.send(starter, { ack = mb.self() })
  while true do
    local m = mb.receive(30000)
    if m == nil then return end
    if type(m) == "table" and m.event == "EXIT" then
      if not stubborn then
        mb.send(to, { stopped = id, reason = m.reason })
        mb.exit(m.reason)
      end
    elseif m == "crash" then
      error("worker " .. id .. " crashes on purpose")
    elseif m == "exit" then
      return
    end
  end
end

-- Starts a worker from inside the supervisor and returns once it is running,
-- like server.start does: so children start one after the other, and their
-- "started" reports arrive in start order.
local function start_worker(to, id, stubborn)
  local pid = mb.spawn_link(worker, to, id, stubborn, mb.self())
  local m = mb.receive(function(m)
    return type(m) == "table" and (m.ack == pid or (m.event == "EXIT" and m.pid == pid))
  end, 5000)
  if m == nil or m.event == "EXIT" then return nil, "worker " .. id .. " did not start" end
  return pid
end

-- A child spec for a worker reporting to `to`; extra fields are merged in,
-- except extra.stubborn, which is passed to the worker.
local function child(to, id, extra)
  extra = extra or {}
  local stubborn = extra.stubborn
  local spec = { id = id, start = function() return start_worker(to, id, stubborn) end }
  for k, v in pairs(extra) do
    if k ~= "stubborn" then spec[k] = v end
  end
  return spec
end

local function error_of(fn, ...)
  local ok, err = pcall(fn, ...)
  assert(not ok, "expected an error")
  return tostring(err)
end

-- Waits for the next started/stopped report; returns "started a" etc.
local function event()
  local m = S.recv(function(m)
    return type(m) == "table" and (m.started ~= nil or m.stopped ~= nil)
  end, nil, "a child's report")
  if m.started then return "started " .. m.started, m.pid end
  return "stopped " .. m.stopped, m.reason
end

-- The next n events, as a list.
local function events(n)
  local list = {}
  for i = 1, n do list[i] = event() end
  return list
end

local function pid_of(sup, id)
  for _, c in ipairs(supervisor.which_children(sup, S.T)) do
    if c.id == id then return c.pid, c end
  end
end

local function ids(sup)
  local list = {}
  for i, c in ipairs(supervisor.which_children(sup, S.T)) do list[i] = c.id end
  return list
end

-- No report is waiting in the mailbox (after the supervisor has handled
-- everything that could cause one: callers make a call to it first).
local function no_reports()
  return mb.receive(function(m)
    return type(m) == "table" and (m.started ~= nil or m.stopped ~= nil)
  end, 0) == nil
end

describe("moonbeam.supervisor", function()
  teardown(S.cleanup_tmp)
  local before, me

  before_each(function()
    before = S.snapshot()
    me = mb.self()
  end)

  after_each(function()
    local stray = mb.receive(0)
    S.check_clean(before)
    assert.is_nil(stray, "a message was left in the test process's mailbox: " .. server.show(stray))
  end)

  local function nothing_new()
    for _, p in ipairs(mb.processes()) do
      if not before[p] then return false end
    end
    return true
  end

  describe("start and stop", function()
    it("starts the children in order, lists them, and stops them in reverse order", function()
      local sup = assert(supervisor.start({
        children = { child(me, "a"), child(me, "b"), child(me, "c") },
      }))
      local _, pa = event()
      local _, pb = event()
      local _, pc = event()
      local list = supervisor.which_children(sup, S.T)
      assert.are.same({
        { id = "a", pid = pa, type = "worker", restart = "permanent" },
        { id = "b", pid = pb, type = "worker", restart = "permanent" },
        { id = "c", pid = pc, type = "worker", restart = "permanent" },
      }, list)
      assert.is_true(supervisor.stop(sup, nil, S.T))
      assert.are.same({ "stopped c", "stopped b", "stopped a" }, events(3))
      assert.is_nil(mb.info(sup))
    end)

    it("passes the shutdown reason to children", function()
      local sup = assert(supervisor.start({ children = { child(me, "a") } }))
      event()
      supervisor.stop(sup, nil, S.T)
      local what, reason = event()
      assert.are.equal("stopped a", what)
      assert.are.equal("shutdown", reason)
    end)

    it("registers spec.name", function()
      local sup = assert(supervisor.start({ name = "spec_sup", children = { child(me, "a") } }))
      event()
      assert.are.equal(sup, mb.whereis("spec_sup"))
      assert.are.same({ "a" }, ids("spec_sup"))
      supervisor.stop("spec_sup", nil, S.T)
      event()
      assert.is_nil(mb.whereis("spec_sup"))
    end)

    it("starts a child from {module, args...}", function()
      local sup = assert(supervisor.start({
        children = { { id = "m", start = { "spec.fixtures.sup_child_mod", me, "m" } } },
      }))
      local what, pid = event()
      assert.are.equal("started m", what)
      assert.are.equal(pid, pid_of(sup, "m"))
      mb.send(pid, "crash")
      local again, pid2 = event()
      assert.are.equal("started m", again)
      assert.are_not.equal(pid, pid2)
      supervisor.stop(sup, nil, S.T)
    end)

    it("starts and restarts a {module} child found on the package.path its starter set", function()
      -- In a child host: its first process puts a directory of its own on
      -- package.path, as a main script does; the supervisor and the child
      -- it starts inherit it (a new process used to have the default path:
      -- start refused the module as not found).
      local dir = S.tmpdir()
      S.write("pathchild.lua", [[
        local mb = require "moonbeam"
        return function(to) mb.send(to, { started = mb.self() }); mb.receive() end
      ]], dir)
      local code, out, err = S.child(string.format([[
        local mb = require "moonbeam"
        local supervisor = require "moonbeam.supervisor"
        package.path = %q .. "/?.lua;" .. package.path
        local me = mb.self()
        local sup = assert(supervisor.start({ children = { { id = "c", start = { "pathchild", me } } } }))
        local first = mb.receive(5000).started
        mb.exit(first, "kill")
        local second = mb.receive(5000).started
        print("restarted", first ~= second)
        print("start_child", supervisor.start_child(sup, { id = "d", start = { "pathchild", me } }) ~= nil)
        supervisor.stop(sup, nil, 5000)
      ]], dir), "", 30)
      assert.are.equal(0, code, err)
      assert.is_true(S.has(out, "restarted\ttrue"), out .. err)
      assert.is_true(S.has(out, "start_child\ttrue"), out .. err)
    end)

    it("starts a server child and restarts it under its name", function()
      local sup = assert(supervisor.start({
        children = { {
          id = "store",
          start = function()
            return server.start("examples.kv.store", { x = 1 }, { name = "spec_store", link = true })
          end,
        } },
      }))
      local first = mb.whereis("spec_store")
      assert.are.equal(1, server.call("spec_store", { op = "get", key = "x" }))
      assert.is_false(pcall(server.call, "spec_store", { op = "get", key = {} }))
      assert.is_true(S.eventually(function()
        local p = mb.whereis("spec_store")
        return p ~= nil and p ~= first
      end))
      assert.are.equal(1, server.call("spec_store", { op = "get", key = "x" }))
      supervisor.stop(sup, nil, S.T)
      assert.is_nil(mb.whereis("spec_store"))
    end)

    it("returns nil and the error when a child fails to start, stopping the others", function()
      local none, err = supervisor.start({
        children = {
          child(me, "a"),
          { id = "b", start = function() return nil, "port in use" end },
          child(me, "c"),
        },
      })
      assert.is_nil(none)
      assert.are.equal("child 'b' failed to start: port in use", err)
      assert.are.same({ "started a", "stopped a" }, events(2))
      assert.is_true(S.eventually(nothing_new))
    end)

    it("returns nil and the error when a server child fails in init", function()
      local none, err = supervisor.start({
        children = {
          child(me, "a"),
          { id = "srv", start = function()
              return server.start({ init = function() return nil, "config missing" end },
                                  nil, { link = true })
            end },
        },
      })
      assert.is_nil(none)
      assert.are.equal("child 'srv' failed to start: config missing", err)
      assert.are.same({ "started a", "stopped a" }, events(2))
      assert.is_true(S.eventually(nothing_new))
    end)

    it("reports a start function that raises or returns something else than a pid", function()
      local none, err = supervisor.start({
        children = { { id = "x", start = function() error("cannot start x") end } },
      })
      assert.is_nil(none)
      assert.is_true(S.has(err, "child 'x' failed to start"), err)
      assert.is_true(S.has(err, "cannot start x"), err)
      none, err = supervisor.start({
        children = { { id = "y", start = function() return 42 end } },
      })
      assert.is_nil(none)
      assert.is_true(S.has(err, "start returned 42 instead of a pid"), err)
    end)

    it("starts with no children", function()
      local sup = assert(supervisor.start({}))
      assert.are.same({}, supervisor.which_children(sup, S.T))
      supervisor.stop(sup, nil, S.T)
    end)
  end)

  describe("restarts", function()
    it("one_for_one restarts only the child that ended", function()
      local sup = assert(supervisor.start({
        strategy = "one_for_one",
        children = { child(me, "a"), child(me, "b"), child(me, "c") },
      }))
      local _, pa = event()
      local _, pb = event()
      local _, pc = event()
      mb.send(pb, "crash")
      local what, pb2 = event()
      assert.are.equal("started b", what)
      assert.are_not.equal(pb, pb2)
      assert.are.equal(pa, pid_of(sup, "a"))
      assert.are.equal(pb2, pid_of(sup, "b"))
      assert.are.equal(pc, pid_of(sup, "c"))
      assert.is_true(no_reports())
      supervisor.stop(sup, nil, S.T)
      events(3)
    end)

    it("one_for_all stops the others in reverse order, then starts all in order", function()
      local sup = assert(supervisor.start({
        strategy = "one_for_all",
        children = { child(me, "a"), child(me, "b"), child(me, "c") },
      }))
      local _, _ = event()
      local _, pb = event()
      event()
      mb.send(pb, "crash")
      assert.are.same({ "stopped c", "stopped a", "started a", "started b", "started c" }, events(5))
      supervisor.stop(sup, nil, S.T)
      assert.are.same({ "stopped c", "stopped b", "stopped a" }, events(3))
    end)

    it("rest_for_one restarts the child and those started after it", function()
      local sup = assert(supervisor.start({
        strategy = "rest_for_one",
        children = { child(me, "a"), child(me, "b"), child(me, "c"), child(me, "d") },
      }))
      local _, pa = event()
      local _, pb = event()
      event()
      event()
      mb.send(pb, "crash")
      assert.are.same({ "stopped d", "stopped c", "started b", "started c", "started d" }, events(5))
      assert.are.equal(pa, pid_of(sup, "a"))
      assert.is_true(no_reports())
      supervisor.stop(sup, nil, S.T)
      events(4)
    end)

    it("restarts a permanent child that exits normally", function()
      local sup = assert(supervisor.start({ children = { child(me, "p") } }))
      local _, pid = event()
      mb.send(pid, "exit")
      local what, pid2 = event()
      assert.are.equal("started p", what)
      assert.are_not.equal(pid, pid2)
      supervisor.stop(sup, nil, S.T)
      event()
    end)

    it("does not restart a transient child that exits normally, but does after a crash", function()
      local sup = assert(supervisor.start({
        children = { child(me, "t", { restart = "transient" }) },
      }))
      local _, pid = event()
      mb.send(pid, "crash")
      local what, pid2 = event()
      assert.are.equal("started t", what)
      mb.send(pid2, "exit")
      assert.is_true(S.eventually(function() return pid_of(sup, "t") == nil end))
      local _, c = pid_of(sup, "t")
      assert.are.equal("transient", c.restart)
      assert.is_true(no_reports())
      supervisor.stop(sup, nil, S.T)
    end)

    it("never restarts a temporary child and forgets it when it ends", function()
      local sup = assert(supervisor.start({
        children = { child(me, "keep"), child(me, "temp", { restart = "temporary" }) },
      }))
      event()
      local _, pid = event()
      mb.send(pid, "crash")
      assert.is_true(S.eventually(function() return #supervisor.which_children(sup, S.T) == 1 end))
      assert.are.same({ "keep" }, ids(sup))
      assert.is_true(no_reports())
      supervisor.stop(sup, nil, S.T)
      event()
    end)

    it("exits with reason shutdown when restarts exceed the intensity, stopping the children", function()
      local sup = assert(supervisor.start({
        max_restarts = 2, max_seconds = 3600,
        children = { child(me, "stable"), child(me, "crashy") },
      }))
      local ref = mb.monitor(sup)
      event()
      local _, pid = event()
      for _ = 1, 2 do
        mb.send(pid, "crash")
        local what
        what, pid = event()
        assert.are.equal("started crashy", what)
      end
      mb.send(pid, "crash")
      -- The third crash within the period is one too many.
      assert.are.same({ "stopped stable" }, events(1))
      assert.are.equal("shutdown", (S.await_down(ref)))
      assert.is_true(S.eventually(nothing_new))
    end)

    it("with max_restarts = 0 gives up at the first crash", function()
      local sup = assert(supervisor.start({ max_restarts = 0, children = { child(me, "a") } }))
      local ref = mb.monitor(sup)
      local _, pid = event()
      mb.send(pid, "crash")
      assert.are.equal("shutdown", (S.await_down(ref)))
    end)

    it("retries a child whose restart fails, and gives up at the intensity", function()
      local sup = assert(supervisor.start({
        max_restarts = 3, max_seconds = 3600,
        children = { {
          id = "once",
          -- Copied into the supervisor with this upvalue: it counts there.
          start = (function()
            local n = 0
            return function()
              n = n + 1
              if n > 1 then return nil, "attempt " .. n .. " refused" end
              return start_worker(me, "once")
            end
          end)(),
        } },
      }))
      local ref = mb.monitor(sup)
      local _, pid = event()
      mb.send(pid, "crash")
      assert.are.equal("shutdown", (S.await_down(ref)))
      assert.is_true(no_reports())
    end)
  end)

  describe("shutdown", function()
    it("kills a child that does not stop within its shutdown time", function()
      local sup = assert(supervisor.start({
        children = {
          child(me, "polite"),
          child(me, "stubborn", { shutdown = 50, stubborn = true }),
        },
      }))
      event()
      local _, pid = event()
      local ref = mb.monitor(pid)
      assert.is_true(supervisor.stop(sup, nil, S.T))
      assert.are.equal("killed", (S.await_down(ref)))
      assert.are.same({ "stopped polite" }, events(1))
    end)

    it("kills a brutal_kill child at once", function()
      local sup = assert(supervisor.start({
        children = { child(me, "b", { shutdown = "brutal_kill" }) },
      }))
      local _, pid = event()
      local ref = mb.monitor(pid)
      supervisor.stop(sup, nil, S.T)
      assert.are.equal("killed", (S.await_down(ref)))
      assert.is_true(no_reports())
    end)

    it("stops the children when its parent sends an exit signal", function()
      local sup = assert(supervisor.start({ children = { child(me, "a"), child(me, "b") } }))
      events(2)
      local ref = mb.monitor(sup)
      mb.exit(sup, "shutdown")
      assert.are.same({ "stopped b", "stopped a" }, events(2))
      assert.are.equal("shutdown", (S.await_down(ref)))
    end)
  end)

  describe("nested supervisors", function()
    it("restart inside the subtree, and the parent restarts a subtree that gave up", function()
      local sub_spec = { max_restarts = 1, max_seconds = 3600, children = { child(me, "x") } }
      local top = assert(supervisor.start({
        children = {
          { id = "sub", type = "supervisor",
            start = function() return supervisor.start(sub_spec) end },
          child(me, "w"),
        },
      }))
      local _, px = event()
      event() -- w
      local sub = pid_of(top, "sub")
      local _, c = pid_of(top, "sub")
      assert.are.equal("supervisor", c.type)

      -- The subtree handles one crash by itself.
      mb.send(px, "crash")
      local what, px2 = event()
      assert.are.equal("started x", what)
      assert.are.equal(sub, pid_of(top, "sub"))

      -- The second crash is beyond the subtree's intensity: the top
      -- supervisor restarts the whole subtree.
      mb.send(px2, "crash")
      local again = event()
      assert.are.equal("started x", again)
      assert.is_true(S.eventually(function()
        local p = pid_of(top, "sub")
        return p ~= nil and p ~= sub
      end))
      assert.is_nil(mb.info(sub))

      supervisor.stop(top, nil, S.T)
      assert.are.same({ "stopped w", "stopped x" }, events(2))
    end)
  end)

  describe("dynamic children", function()
    it("start_child adds a child at the end and refuses a duplicate id", function()
      local sup = assert(supervisor.start({ children = { child(me, "a") } }))
      event()
      local pid = assert(supervisor.start_child(sup, child(me, "b")))
      local what, reported = event()
      assert.are.equal("started b", what)
      assert.are.equal(pid, reported)
      assert.are.same({ "a", "b" }, ids(sup))
      local none, err = supervisor.start_child(sup, child(me, "b"))
      assert.is_nil(none)
      assert.are.equal("child id 'b' already exists", err)
      none, err = supervisor.start_child(sup, { id = "c", start = function() return nil, "nope" end })
      assert.is_nil(none)
      assert.are.equal("child 'c' failed to start: nope", err)
      assert.are.same({ "a", "b" }, ids(sup))
      supervisor.stop(sup, nil, S.T)
      assert.are.same({ "stopped b", "stopped a" }, events(2))
    end)

    -- Any process may call a supervisor: a request made by hand with a bad
    -- spec ended it and its children (red team), as did a start.n that
    -- unpack could not give (its error was raised outside the pcall).
    it("answers a bad start_child request with an error and goes on", function()
      local sup = assert(supervisor.start({ children = { child(me, "a") } }))
      local _, a = event()
      for _, arg in ipairs({ false, { id = "x" }, { id = "x", start = 123 }, { start = {} } }) do
        local r = server.call(sup, { op = "start_child", arg = arg or nil }, S.T)
        assert.is_truthy(type(r) == "table" and r.err and
                         r.err:find("supervisor.start_child: child spec", 1, true), server.show(r))
      end
      local none, err = supervisor.start_child(sup, { id = "n", start = { "moonbeam.server", n = 100000 } })
      assert.is_nil(none)
      assert.is_truthy(S.has(err, "child 'n' failed to start"), err)
      -- A module that is not there: refused before any process starts (it
      -- used to start, fail, and end the supervisor through its restarts).
      none, err = supervisor.start_child(sup, { id = "typo", start = { "no_such_modul" } })
      assert.is_nil(none)
      assert.are.equal("child 'typo' failed to start: module 'no_such_modul' not found", err)
      assert.are.same({ "a" }, ids(sup))
      assert.is_truthy(mb.info(a), "the running child lives on")
      supervisor.stop(sup, nil, S.T)
      assert.are.same({ "stopped a" }, events(1))
    end)

    it("terminate_child stops a child and keeps its spec; restart_child starts it again", function()
      local sup = assert(supervisor.start({ children = { child(me, "a") } }))
      event()
      assert.is_true(supervisor.terminate_child(sup, "a"))
      assert.are.equal("stopped a", (event()))
      local pid, c = pid_of(sup, "a")
      assert.is_nil(pid)
      assert.are.equal("a", c.id)
      assert.is_true(no_reports())
      local pid2 = assert(supervisor.restart_child(sup, "a"))
      local what, reported = event()
      assert.are.equal("started a", what)
      assert.are.equal(pid2, reported)
      local none, err = supervisor.restart_child(sup, "a")
      assert.is_nil(none)
      assert.are.equal("child 'a' is already running", err)
      supervisor.stop(sup, nil, S.T)
      event()
    end)

    it("terminate_child of a temporary child forgets it", function()
      local sup = assert(supervisor.start({ children = { child(me, "t", { restart = "temporary" }) } }))
      event()
      assert.is_true(supervisor.terminate_child(sup, "t"))
      event()
      assert.are.same({}, ids(sup))
      supervisor.stop(sup, nil, S.T)
    end)

    it("delete_child removes a stopped child, not a running one", function()
      local sup = assert(supervisor.start({ children = { child(me, "a"), child(me, "b") } }))
      events(2)
      local none, err = supervisor.delete_child(sup, "a")
      assert.is_nil(none)
      assert.are.equal("child 'a' is running; terminate it first", err)
      supervisor.terminate_child(sup, "a")
      event()
      assert.is_true(supervisor.delete_child(sup, "a"))
      assert.are.same({ "b" }, ids(sup))
      supervisor.stop(sup, nil, S.T)
      event()
    end)

    it("terminate_child calls off a restart that failed and waits for its retry", function()
      -- The child's start function runs in the supervisor: the first start
      -- succeeds; the restart tells the test it runs and waits for the word
      -- to fail, which the test gives only once its terminate_child call is
      -- queued, so the call comes before the retry.
      local sup = assert(supervisor.start({
        max_restarts = 10, max_seconds = 3600,
        children = { {
          id = "r",
          start = (function()
            local n = 0
            return function()
              n = n + 1
              if n == 1 then return start_worker(me, "r") end
              mb.send(me, { restarting = n })
              mb.receive(function(m) return m == "fail now" end, 5000)
              return nil, "attempt " .. n .. " refused"
            end
          end)(),
        } },
      }))
      local _, pid = event()
      mb.send(pid, "crash")
      S.recv(S.field("restarting", 2), nil, "the restart")
      local caller = mb.spawn(function()
        mb.send(me, { terminated = supervisor.terminate_child(sup, "r", 5000) })
      end)
      assert.is_true(S.eventually(function()
        local i = mb.info(sup)
        return i ~= nil and i.mailbox >= 1
      end), "the terminate_child call did not reach the supervisor")
      mb.send(sup, "fail now")
      assert.is_true(S.recv(S.field("terminated", true), nil, "terminate_child's answer").terminated)
      -- Handled after the call: the retry must not start the child again.
      assert.is_nil((pid_of(sup, "r")))
      assert.is_nil(mb.receive(function(m) return type(m) == "table" and m.restarting end, 0))
      assert.is_true(no_reports())
      supervisor.stop(sup, nil, S.T)
      local ref = mb.monitor(caller)
      S.await_down(ref)
    end)

    it("returns nil and an error for an unknown child id", function()
      local sup = assert(supervisor.start({}))
      for _, f in ipairs({ "terminate_child", "restart_child", "delete_child" }) do
        local none, err = supervisor[f](sup, "ghost")
        assert.is_nil(none)
        assert.are.equal("no child with id 'ghost'", err)
      end
      supervisor.stop(sup, nil, S.T)
    end)
  end)

  describe("system requests and dead children", function()
    it("server.get_state gives the supervisor's state, with stopped children", function()
      local sup = assert(supervisor.start({ children = { child(me, "a"), child(me, "b") } }))
      events(2)
      assert.is_true(supervisor.terminate_child(sup, "a"))
      event()
      local st = server.get_state(sup, S.T)
      assert.are.equal("one_for_one", st.strategy)
      assert.are.equal(2, #st.children)
      assert.are.equal("a", st.children[1].id)
      assert.is_nil(st.children[1].pid)
      assert.are.equal(pid_of(sup, "b"), st.children[2].pid)
      supervisor.stop(sup, nil, S.T)
      event()
    end)

    it("answers which_children and get_state while children die and restart", function()
      local sup = assert(supervisor.start({
        max_restarts = 100, max_seconds = 3600,
        children = { child(me, "a"), child(me, "b") },
      }))
      events(2)
      for _ = 1, 5 do
        local pid = pid_of(sup, "a")
        mb.exit(pid, "kill")
        -- Asked at once: the answer may name the dead child or its successor.
        local list = supervisor.which_children(sup, S.T)
        assert.are.equal(2, #list)
        assert.is_table(server.get_state(sup, S.T))
        assert.are.equal("started a", (event()))
        assert.are_not.equal(pid, pid_of(sup, "a"))
      end
      supervisor.stop(sup, nil, S.T)
      events(2)
    end)

    it("raises for a dead supervisor, from get_state too", function()
      local sup = assert(supervisor.start({}))
      supervisor.stop(sup, nil, S.T)
      assert.is_true(S.has(error_of(server.get_state, sup), "not running (noproc)"))
      assert.is_true(S.has(error_of(supervisor.which_children, sup), "not running (noproc)"))
    end)
  end)

  describe("bad input", function()
    local function start_err(spec) return error_of(supervisor.start, spec) end

    it("raises for a spec that is not a table or has bad settings", function()
      assert.is_true(S.has(start_err("x"), "spec must be a table, got string"))
      assert.is_true(S.has(start_err({ strategy = "one_for_some" }),
                           "unknown strategy \"one_for_some\""))
      assert.is_true(S.has(start_err({ max_restarts = -1 }), "max_restarts must be an integer >= 0"))
      assert.is_true(S.has(start_err({ max_seconds = 0 }), "max_seconds must be a number > 0"))
      assert.is_true(S.has(start_err({ children = 5 }), "children must be a list of child specs"))
      assert.is_true(S.has(start_err({ name = 5 }), "name must be a string"))
    end)

    it("raises for a child spec with missing or wrong fields, naming the child", function()
      local ok_start = function() end
      assert.is_true(S.has(start_err({ children = { 7 } }),
                           "children[1]: child spec must be a table, got number"))
      assert.is_true(S.has(start_err({ children = { { start = ok_start } } }),
                           "children[1]: missing field 'id'"))
      assert.is_true(S.has(start_err({ children = { { id = {}, start = ok_start } } }),
                           "children[1]: id must be a string or a number, got table"))
      assert.is_true(S.has(start_err({ children = { { id = "a", start = ok_start }, { id = "b" } } }),
                           "children[2] (id 'b'): missing field 'start'"))
      assert.is_true(S.has(start_err({ children = { { id = "a", start = "mod" } } }),
                           "start must be a function or {module, args...}, got string"))
      assert.is_true(S.has(start_err({ children = { { id = "a", start = { 1 } } } }),
                           "start must be {module, args...} with a module name first"))
      assert.is_true(S.has(start_err({ children = { { id = "a", start = ok_start, restart = "always" } } }),
                           "restart must be \"permanent\", \"transient\" or \"temporary\", got \"always\""))
      assert.is_true(S.has(start_err({ children = { { id = "a", start = ok_start, shutdown = -1 } } }),
                           "shutdown must be a number of ms >= 0"))
      assert.is_true(S.has(start_err({ children = { { id = "a", start = ok_start, type = "boss" } } }),
                           "type must be \"worker\" or \"supervisor\""))
    end)

    it("raises for a NaN id and a bad start.n", function()
      local ok_start = function() end
      assert.is_true(S.has(start_err({ children = { { id = 0 / 0, start = ok_start } } }),
                           "children[1]: id must not be NaN"))
      assert.is_true(S.has(start_err({ children = { { id = "m", start = { "mod", n = "two" } } } }),
                           "children[1] (id 'm'): start.n must be the number of values in start"))
      assert.is_true(S.has(start_err({ children = { { id = "m", start = { "mod", n = 0 } } } }),
                           "start.n must be the number of values in start (an integer >= 1), got 0"))
    end)

    it("tells pids with mb.is_pid, not by how a value prints", function()
      local fake = newproxy(true)
      getmetatable(fake).__tostring = function() return "<0.1.0>" end
      assert.is_true(S.has(error_of(supervisor.which_children, fake), "bad supervisor"))
      -- (Made in the supervisor: a userdata cannot be copied there.)
      local none, err = supervisor.start({ children = { { id = "f", start = function()
        local f = newproxy(true)
        getmetatable(f).__tostring = function() return "<0.1.0>" end
        return f
      end } } })
      assert.is_nil(none)
      assert.are.equal("child 'f' failed to start: start returned <0.1.0> instead of a pid", err)
    end)

    it("raises for duplicate child ids, naming both", function()
      local err = start_err({ children = { child(me, "a"), child(me, "b"), child(me, "a") } })
      assert.is_true(S.has(err, "duplicate child id 'a' (children[1] and children[3])"), err)
    end)

    it("raises for a bad child spec given to start_child", function()
      local sup = assert(supervisor.start({}))
      local err = error_of(supervisor.start_child, sup, { start = function() end })
      assert.is_true(S.has(err, "supervisor.start_child: child spec: missing field 'id'"), err)
      assert.is_true(S.has(error_of(supervisor.terminate_child, sup, nil), "bad child id"))
      supervisor.stop(sup, nil, S.T)
    end)

    it("raises, without waiting, for an unknown name or a dead supervisor", function()
      local err = error_of(supervisor.which_children, "spec_no_sup")
      assert.is_true(S.has(err, "supervisor.which_children: no process registered as 'spec_no_sup'"), err)
      local sup = assert(supervisor.start({}))
      supervisor.stop(sup, nil, S.T)
      err = error_of(supervisor.start_child, sup, child(me, "a"))
      assert.is_true(S.has(err, "not running (noproc)"), err)
      err = error_of(supervisor.stop, sup)
      assert.is_true(S.has(err, "supervisor.stop"), err)
      assert.is_true(S.has(err, "not running (noproc)"), err)
      assert.is_true(S.has(error_of(supervisor.which_children, 42), "bad supervisor"))
    end)
  end)

  describe("reports", function()
    after_each(function() S.cleanup_tmp() end)

    it("logs a child that ends with another reason while it is shut down", function()
      local script = S.write("sup.lua", [[
        local mb = require "moonbeam"
        local supervisor = require "moonbeam.supervisor"
        -- A worker that ends with `reason` when shut down.
        local function worker(reason)
          return function()
            return mb.spawn_link(function()
              mb.trap_exit(true)
              mb.receive(function(m) return type(m) == "table" and m.event == "EXIT" end, 5000)
              mb.exit(reason)
            end)
          end
        end
        local sup = assert(supervisor.start({ name = "demo_sup", children = {
          { id = "clean", start = worker("shutdown") },
          { id = "normal", start = worker("normal") },
          { id = "messy", start = worker("cleanup failed") },
          { id = "brutal", start = worker("never seen"), shutdown = "brutal_kill" },
        } }))
        io.stderr:write("@@ started\n")
        for _, id in ipairs({ "clean", "normal", "brutal" }) do
          assert(supervisor.terminate_child(sup, id))
        end
        io.stderr:write("@@ quiet ones stopped\n")
        assert(supervisor.terminate_child(sup, "messy"))
        io.stderr:write("@@ messy stopped\n")
        supervisor.stop(sup)
      ]])
      local code, _, err = S.moonbeam(S.q(script))
      assert.are.equal(0, code, err)
      assert.is_true(S.has(err, "@@ started\n@@ quiet ones stopped\n=SUPERVISOR REPORT===="), err)
      assert.matches("@@ quiet ones stopped\n=SUPERVISOR REPORT==== <[%d.]+> registered as demo_sup\n"
                     .. "child: 'messy' <[%d.]+>\nreason: cleanup failed\n"
                     .. "action: none; it ended with this reason while being shut down\n@@ messy stopped\n$", err)
    end)

    it("logs a child that fails to start when the supervisor starts", function()
      local script = S.write("sup.lua", [[
        local mb = require "moonbeam"
        local supervisor = require "moonbeam.supervisor"
        print(supervisor.start({ name = "demo_sup", children = {
          { id = "ok", start = function() return mb.spawn_link(function() mb.receive(5000) end) end },
          { id = "db", start = function() return nil, "no database" end },
        } }))
      ]])
      local code, out, err = S.moonbeam(S.q(script))
      assert.are.equal(0, code, err)
      assert.is_true(S.has(out, "nil\tchild 'db' failed to start: no database"), out)
      assert.matches("^=SUPERVISOR REPORT==== <[%d.]+> registered as demo_sup\n"
                     .. "child: 'db'\nreason: no database\naction: none; it failed to start, so the "
                     .. "supervisor stops the children started before it and does not start\n$", err)
    end)

    it("logs each restart as one block naming the supervisor, the child and the reason", function()
      local script = S.write("sup.lua", [[
        local mb = require "moonbeam"
        local supervisor = require "moonbeam.supervisor"
        local me = mb.self()
        local sup = supervisor.start({ name = "demo_sup", children = { {
          id = "w",
          start = function()
            return mb.spawn_link(function()
              mb.send(me, mb.self())
              if mb.receive(5000) == "crash" then error("w crashed on purpose") end
            end)
          end,
        } } })
        mb.send(mb.receive(5000), "crash")
        print("restarted as", mb.receive(5000))
        supervisor.stop(sup)
      ]])
      local code, out, err = S.moonbeam(S.q(script))
      assert.are.equal(0, code, err)
      assert.is_true(S.has(out, "restarted as\t<"), out)
      assert.matches("=SUPERVISOR REPORT==== <[%d.]+> registered as demo_sup\nchild: 'w' <[%d.]+>\n"
                     .. "reason: [^\n]*w crashed on purpose\naction: restarted 'w' as <[%d.]+> "
                     .. "%(one_for_one; restart 1 of at most 3 within 5 s%)\n", err)
    end)
  end)
end)
