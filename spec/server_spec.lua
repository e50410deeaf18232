-- Specs of moonbeam.server (request/reply servers). They run inside the host:
--   busted --lua=build/moonbeam spec/server_spec.lua
-- Every receive has a timeout; timings only bound waits, they never decide a
-- result. Each test checks that it leaves no process and no message behind.
local mb = require "moonbeam"
local server = require "moonbeam.server"
local S = require "spec.support"

local function is_alive(pid) return mb.info(pid) ~= nil end

-- Receives the first table message that pred accepts (fails after S.T ms).
local function expect(pred, what)
  return S.recv(function(m) return type(m) == "table" and pred(m) end, nil, what)
end

local function down_of(ref)
  local _, m = S.await_down(ref)
  return m
end

-- Returns the error raised by fn(...) as a string (fails if none is raised).
local function error_of(fn, ...)
  local ok, err = pcall(fn, ...)
  assert(not ok, "expected an error")
  return tostring(err)
end

-- A counter server, as a table of callbacks.
local counter = {
  init = function(n) return n end,
  handle_call = function(req, from, n)
    if req == "get" then return n, n end
    if type(req) == "table" and req[1] == "add" then return n + req[2], n + req[2] end
    if req == "crash" then error("crash on request") end
    if req == "stop" then return "stopping", n, "normal" end
    return "unknown request", n
  end,
  handle_cast = function(msg, n)
    if type(msg) == "table" and msg[1] == "add" then return n + msg[2] end
    if msg == "crash" then error("crash on cast") end
    return n
  end,
  handle_info = function(msg, n)
    if type(msg) == "table" and msg.add then return n + msg.add end
    return n
  end,
}

describe("moonbeam.server", function()
  local before

  before_each(function()
    before = S.snapshot()
  end)

  after_each(function()
    local stray = mb.receive(0)
    S.check_clean(before)
    assert.is_nil(stray, "a message was left in the test process's mailbox: " .. server.show(stray))
  end)

  -- No process is alive that was not alive before the test.
  local function nothing_new()
    for _, p in ipairs(mb.processes()) do
      if not before[p] then return false end
    end
    return true
  end

  describe("start", function()
    it("runs init and returns the pid of a live server", function()
      local pid = assert(server.start(counter, 41))
      assert.is_true(is_alive(pid))
      assert.are.equal(41, server.call(pid, "get"))
      assert.is_true(server.stop(pid))
      assert.is_false(is_alive(pid))
    end)

    it("uses the argument as state when there is no init", function()
      local pid = assert(server.start({ handle_call = function(_, _, s) return s, s end }, "arg"))
      assert.are.equal("arg", server.call(pid, "anything"))
      server.stop(pid)
    end)

    it("registers opts.name and frees it when the server stops", function()
      local pid = assert(server.start(counter, 1, { name = "spec_counter" }))
      assert.are.equal(pid, mb.whereis("spec_counter"))
      assert.are.equal(1, server.call("spec_counter", "get"))
      server.stop("spec_counter")
      assert.is_nil(mb.whereis("spec_counter"))
    end)

    it("returns nil and an error when the name is taken", function()
      local pid = assert(server.start(counter, 1, { name = "spec_taken" }))
      local none, err = server.start(counter, 2, { name = "spec_taken" })
      assert.is_nil(none)
      assert.matches("spec_taken", err)
      assert.matches("already registered", err)
      assert.are.equal(1, server.call("spec_taken", "get"))
      server.stop(pid)
    end)

    -- A string that cannot be a name ("", over 255 bytes, a NUL) gave
    -- mb.whereis's error, not the function's (red team).
    it("refuses a name that cannot be one, and finds no process by it", function()
      for _, bad in ipairs({ "", ("n"):rep(256), "a\0b" }) do
        local ok, err = pcall(server.start, counter, 1, { name = bad })
        assert.is_false(ok)
        assert.is_truthy(S.has(err, "server.start: opts.name must be a string of 1 to 255 bytes without NUL"), err)
        ok, err = pcall(server.call, bad, "get")
        assert.is_false(ok)
        assert.is_truthy(S.has(err, "server.call: no process registered as"), err)
        local none, why = server.cast(bad, "x")
        assert.is_nil(none)
        assert.is_truthy(S.has(why, "no process registered as"), why)
      end
    end)

    it("returns nil and the error when init raises, leaving nothing running", function()
      local none, err = server.start({ init = function() error("no database") end }, nil)
      assert.is_nil(none)
      assert.matches("init failed", err)
      assert.matches("no database", err)
      assert.is_true(nothing_new())
    end)

    it("returns nil and the error when a callbacks module fails in init", function()
      local none, err = server.start("spec.fixtures.bad_init_server", "db.sqlite", { name = "spec_bad" })
      assert.is_nil(none)
      assert.is_true(S.has(err, "init failed: "), err)
      assert.is_true(S.has(err, "cannot open db.sqlite"), err)
      assert.is_true(nothing_new())
      assert.is_nil(mb.whereis("spec_bad"))
    end)

    it("returns nil and the error when init returns nil, err", function()
      local none, err = server.start({ init = function(a) return nil, "refused " .. a end }, "x")
      assert.is_nil(none)
      assert.are.equal("refused x", err)
      assert.is_true(nothing_new())
    end)

    it("returns nil and an error when the callbacks module cannot be loaded", function()
      local none, err = server.start("spec.no_such_module_here", nil)
      assert.is_nil(none)
      assert.matches("cannot load callbacks module 'spec.no_such_module_here'", err, 1, true)
    end)

    it("returns nil and an error when the callbacks module is not a table", function()
      -- This fixture module returns a function (it is meant for spawn).
      local none, err = server.start("spec.fixtures.echo_mod", nil)
      assert.is_nil(none)
      assert.matches("callbacks module 'spec.fixtures.echo_mod' returned function, not a table",
                     err, 1, true)
      assert.is_true(nothing_new())
    end)

    it("starts from a callbacks module name, required in the server", function()
      local pid = assert(server.start("examples.kv.store", { a = 1 }))
      assert.are.equal(1, server.call(pid, { op = "get", key = "a" }))
      server.stop(pid)
    end)

    it("kills the server when init does not finish within opts.timeout", function()
      local none, err = server.start({ init = function() mb.sleep(60000) end }, nil, { timeout = 50 })
      assert.is_nil(none)
      assert.matches("did not finish within 50 ms", err)
      assert.is_true(nothing_new())
    end)

    it("links the server to the caller with opts.link", function()
      local me = mb.self()
      -- A helper starts a linked server, reports it, then crashes when told.
      local helper = mb.spawn(function()
        local pid = server.start(counter, 0, { link = true })
        mb.send(me, { server = pid })
        if mb.receive(5000) == "crash" then error("helper crashes on purpose") end
      end)
      local m = expect(function(m) return m.server ~= nil end)
      assert.is_truthy(m)
      assert.is_true(is_alive(m.server))
      local ref = mb.monitor(m.server)   -- before the crash: else it may be gone (noproc)
      mb.send(helper, "crash")
      local down = down_of(ref)
      assert.is_truthy(down, "the linked server did not exit")
      assert.matches("helper crashes on purpose", tostring(down.reason))
    end)
  end)

  describe("call", function()
    it("sends a request and returns the reply, keeping the state", function()
      local pid = assert(server.start(counter, 0))
      assert.are.equal(5, server.call(pid, { "add", 5 }))
      assert.are.equal(7, server.call(pid, { "add", 2 }))
      assert.are.equal(7, server.call(pid, "get"))
      server.stop(pid)
    end)

    it("copies tables both ways", function()
      local pid = assert(server.start({
        handle_call = function(req, _, s) req.seen = true; return req, s end,
      }, nil))
      local req = { a = { 1, 2, 3 } }
      local reply = server.call(pid, req)
      assert.are.same({ a = { 1, 2, 3 }, seen = true }, reply)
      assert.is_nil(req.seen)
      server.stop(pid)
    end)

    it("returns nil replies", function()
      local pid = assert(server.start({ handle_call = function(_, _, s) return nil, s end }, nil))
      assert.is_nil(server.call(pid, "x"))
      server.stop(pid)
    end)

    it("accepts a deferred reply through server.reply", function()
      -- handle_call keeps `from` and answers from a later callback.
      local pid = assert(server.start({
        handle_call = function(req, from, s)
          s[#s + 1] = { from = from, req = req }
          if #s == 2 then mb.send(mb.self(), "answer both") end
          return server.noreply, s
        end,
        handle_info = function(msg, s)
          for i = #s, 1, -1 do server.reply(s[i].from, "late " .. s[i].req) end
          return {}
        end,
      }, {}))
      -- A second caller makes the server answer; replies go to the right caller.
      local me = mb.self()
      mb.spawn(function() mb.send(me, { other = server.call(pid, "two") }) end)
      assert.are.equal("late one", server.call(pid, "one"))
      assert.are.equal("late two", expect(function(m) return m.other end).other)
      server.stop(pid)
    end)

    it("raises a clear error when the server crashes during the call", function()
      local pid = assert(server.start(counter, 0))
      local err = error_of(server.call, pid, "crash")
      assert.matches("exited during the call", err, 1, true)
      assert.matches("crash on request", err, 1, true)
      assert.is_false(is_alive(pid))
    end)

    it("raises a clear error when the server is killed while handling the call", function()
      local pid = assert(server.start({
        handle_call = function(_, _, s) mb.sleep(60000) return 1, s end,
      }, nil))
      mb.spawn(function() mb.sleep(30); mb.exit(pid, "kill") end)
      local err = error_of(server.call, pid, "slow", 5000)
      assert.matches("exited during the call", err, 1, true)
      assert.matches("killed", err, 1, true)
    end)

    it("raises on timeout, and the late reply never arrives", function()
      -- The server holds the first call until it is told to go on, so the
      -- call times out whatever the timing; then it replies, late.
      local pid = assert(server.start({
        handle_call = function(req, _, s)
          if req == "held" then
            mb.receive(function(m) return m == "go on" end, 5000)
          end
          return "reply to " .. req, s
        end,
      }, nil))
      local err = error_of(server.call, pid, "held", 50)
      assert.matches("timeout after 50 ms", err, 1, true)
      assert.matches('to answer "held"', err, 1, true)
      mb.send(pid, "go on")
      -- The server handles calls in order: when this one returns, the late
      -- reply to the first has been sent. It must not have reached us.
      assert.are.equal("reply to next", server.call(pid, "next"))
      assert.is_nil(mb.receive(0), "the late reply reached the caller")
      server.stop(pid)
    end)

    it("leaves no message behind after many calls", function()
      local pid = assert(server.start(counter, 0))
      for i = 1, 100 do assert.are.equal(i, server.call(pid, { "add", 1 })) end
      assert.is_nil(mb.receive(0))
      server.stop(pid)
    end)

    -- A call's receive starts past the messages queued before it (mb.receive's
    -- ref argument, Erlang's receive marker): with 10,000 queued a call took
    -- 2.5 ms, testing every one. Those messages must all stay, in order.
    it("finds its replies past a long mailbox, which stays as it was", function()
      local pid = assert(server.start(counter, 0))
      local me = mb.self()
      for i = 1, 2000 do
        if i % 100 == 0 then   -- decoys: a reply and a DOWN of other calls
          mb.send(me, { mb.make_ref(), -i, n = i })
        elseif i % 100 == 50 then
          mb.send(me, { event = "DOWN", ref = mb.make_ref(), reason = "x", n = i })
        else
          mb.send(me, { n = i })
        end
      end
      for i = 1, 50 do assert.are.equal(i, server.call(pid, { "add", 1 })) end
      mb.send(me, { n = 2001 })
      local err = error_of(server.call, pid, "crash")   -- its DOWN, past the backlog
      assert.matches("crash on request", err, 1, true)
      for i = 1, 2001 do
        local m = mb.receive(0)
        assert.are.equal(i, m and m.n, "message " .. i)
      end
    end)

    it("works without a timeout (math.huge), including crashes", function()
      local pid = assert(server.start(counter, 3))
      assert.are.equal(3, server.call(pid, "get", math.huge))
      local err = error_of(server.call, pid, "crash", math.huge)
      assert.matches("crash on request", err, 1, true)
    end)

    it("calls by registered name", function()
      local pid = assert(server.start(counter, 9, { name = "spec_byname" }))
      assert.are.equal(9, server.call("spec_byname", "get"))
      server.stop(pid)
    end)

    it("raises a clear error for an unknown name, without waiting", function()
      local err = error_of(server.call, "spec_nobody", "get", 60000)
      assert.matches("no process registered as 'spec_nobody'", err, 1, true)
    end)

    it("raises a clear error for a dead pid, without waiting", function()
      local pid = assert(server.start(counter, 0))
      server.stop(pid)
      local err = error_of(server.call, pid, "get", 60000)
      assert.matches("not running (noproc)", err, 1, true)
    end)

    it("raises for a bad destination, a nil request and a bad timeout", function()
      assert.matches("bad destination", error_of(server.call, 42, "get"))
      local pid = assert(server.start(counter, 0))
      assert.matches("request is nil", error_of(server.call, pid, nil))
      assert.matches("bad timeout", error_of(server.call, pid, "get", -1))
      assert.matches("bad timeout", error_of(server.call, pid, "get", "soon"))
      server.stop(pid)
    end)

    it("raises when the request cannot be copied, and spawns nothing", function()
      local pid = assert(server.start(counter, 0))
      local n = #mb.processes()
      local err = error_of(server.call, pid, { co = coroutine.create(function() end) })
      assert.matches("cannot send the request", err, 1, true)
      assert.matches("coroutine", err, 1, true)
      assert.are.equal(n, #mb.processes())
      server.stop(pid)
    end)

    it("refuses a call from the server to itself", function()
      local pid = assert(server.start({
        handle_call = function(req, _, s)
          if req == "self" then
            local ok, err = pcall(server.call, mb.self(), "x")
            return tostring(err), s
          end
          return "x", s
        end,
      }, nil))
      assert.matches("cannot call itself", server.call(pid, "self"), 1, true)
      server.stop(pid)
    end)

    it("does not leave an intermediary behind when the caller dies mid-call", function()
      local pid = assert(server.start({
        handle_call = function(req, from, s)
          if req == "count" then return #s, s end
          s[#s + 1] = from
          return server.noreply, s
        end,
        handle_cast = function(_, s)
          -- The reply goes to the dead intermediary and is dropped.
          for _, f in ipairs(s) do server.reply(f, "late") end
          return s
        end,
      }, {}))
      local n = #mb.processes()
      local caller = mb.spawn(function() server.call(pid, "hang", 60000) end)
      assert.is_true(S.eventually(function() return server.call(pid, "count") == 1 end))
      mb.exit(caller, "kill")
      assert.is_true(S.eventually(function() return #mb.processes() == n end))
      server.cast(pid, "release")
      assert.are.equal(1, server.call(pid, "count"))
      server.stop(pid)
    end)
  end)

  describe("cast and handle_info", function()
    it("changes the state without a reply", function()
      local pid = assert(server.start(counter, 0))
      assert.is_true(server.cast(pid, { "add", 3 }))
      assert.is_true(server.cast(pid, { "add", 4 }))
      assert.are.equal(7, server.call(pid, "get"))
      server.stop(pid)
    end)

    it("returns nil and an error for an unknown name", function()
      local ok, err = server.cast("spec_nobody", "x")
      assert.is_nil(ok)
      assert.matches("no process registered as 'spec_nobody'", err, 1, true)
    end)

    it("drops a cast to a dead pid silently", function()
      local pid = assert(server.start(counter, 0))
      server.stop(pid)
      assert.is_true(server.cast(pid, "x"))
    end)

    it("raises for a nil message", function()
      local pid = assert(server.start(counter, 0))
      assert.matches("message is nil", error_of(server.cast, pid, nil))
      server.stop(pid)
    end)

    it("passes other messages to handle_info", function()
      local pid = assert(server.start(counter, 1))
      mb.send(pid, { add = 10 })
      mb.send(pid, "ignored")
      assert.are.equal(11, server.call(pid, "get"))
      server.stop(pid)
    end)

    it("survives messages when there is no handle_info", function()
      local pid = assert(server.start({ handle_call = function(_, _, s) return s, s end }, 5))
      mb.send(pid, "stray")
      assert.are.equal(5, server.call(pid, "get"))
      server.stop(pid)
    end)

    it("ends the server when a cast handler crashes, with the error as reason", function()
      local pid = assert(server.start(counter, 0))
      local ref = mb.monitor(pid)
      server.cast(pid, "crash")
      local down = down_of(ref)
      assert.is_truthy(down)
      assert.matches("crash on cast", tostring(down.reason), 1, true)
    end)
  end)

  describe("stop and terminate", function()
    local function reporting(me)
      return {
        init = function(s) return s end,
        handle_call = function(req, _, s)
          if req == "stop" then return "bye", s, "done" end
          return s, s
        end,
        handle_cast = function(msg, s) return s, msg end,
        terminate = function(reason, s) mb.send(me, { terminated = reason, state = s }) end,
      }
    end

    it("runs terminate(reason, state) and waits until the server is gone", function()
      local pid = assert(server.start(reporting(mb.self()), "st"))
      assert.is_true(server.stop(pid, "normal"))
      assert.is_false(is_alive(pid))
      local m = expect(function(m) return m.terminated ~= nil end)
      assert.are.same({ terminated = "normal", state = "st" }, m)
    end)

    it("exits with the given reason", function()
      local pid = assert(server.start(reporting(mb.self()), "st"))
      local ref = mb.monitor(pid)
      assert.is_true(server.stop(pid, "shutdown"))
      assert.are.equal("shutdown", down_of(ref).reason)
      assert.are.equal("shutdown", expect(function(m) return m.terminated end).terminated)
    end)

    it("stops when handle_call returns a stop reason, after replying", function()
      local pid = assert(server.start(reporting(mb.self()), "st"))
      local ref = mb.monitor(pid)
      assert.are.equal("bye", server.call(pid, "stop"))
      assert.are.equal("done", down_of(ref).reason)
      assert.are.equal("done", expect(function(m) return m.terminated end).terminated)
    end)

    it("stops when handle_cast returns a stop reason", function()
      local pid = assert(server.start(reporting(mb.self()), "st"))
      local ref = mb.monitor(pid)
      server.cast(pid, "normal")
      assert.are.equal("normal", down_of(ref).reason)
      assert.is_truthy(expect(function(m) return m.terminated end))
    end)

    it("runs terminate when a crash ends the server", function()
      local me = mb.self()
      local pid = assert(server.start({
        handle_cast = function() error("boom") end,
        terminate = function(reason) mb.send(me, { terminated = reason }) end,
      }, nil))
      server.cast(pid, "x")
      local m = expect(function(m) return m.terminated end)
      assert.matches("boom", tostring(m.terminated), 1, true)
    end)

    it("runs terminate when its parent sends an exit signal and it traps exits", function()
      local me = mb.self()
      local pid = assert(server.start({
        init = function() mb.trap_exit(true) return "st" end,
        terminate = function(reason, s) mb.send(me, { terminated = reason, state = s }) end,
      }, nil))
      local ref = mb.monitor(pid)
      mb.exit(pid, "shutdown")
      assert.are.same({ terminated = "shutdown", state = "st" },
                      expect(function(m) return m.terminated end))
      assert.are.equal("shutdown", down_of(ref).reason)
    end)

    it("raises for an unknown name and a dead pid", function()
      assert.matches("no process registered as 'spec_nobody'",
                     error_of(server.stop, "spec_nobody"), 1, true)
      local pid = assert(server.start(counter, 0))
      server.stop(pid)
      assert.matches("not running (noproc)", error_of(server.stop, pid), 1, true)
    end)

    it("raises when the server does not stop in time, and leaves it alone", function()
      local pid = assert(server.start({
        handle_cast = function(_, s)
          mb.receive(function(m) return m == "go on" end, 5000)
          return s
        end,
      }, nil))
      server.cast(pid, "hold")
      local err = error_of(server.stop, pid, "normal", 30)
      assert.matches("did not stop within 30 ms", err, 1, true)
      assert.is_true(is_alive(pid))
      -- The stop request is still queued: the server ends after its cast.
      local ref = mb.monitor(pid)
      mb.send(pid, "go on")
      assert.are.equal("normal", down_of(ref).reason)
    end)
  end)

  describe("bad input", function()
    it("raises for callbacks that are neither a module name nor a table", function()
      assert.matches("callbacks must be a module name or a table of functions, got number",
                     error_of(server.start, 42), 1, true)
      assert.matches("got nil", error_of(server.start, nil), 1, true)
    end)

    it("raises for a callback that is not a function, naming it", function()
      assert.matches("callbacks.handle_call must be a function, got string",
                     error_of(server.start, { handle_call = "oops" }), 1, true)
      assert.matches("callbacks.init must be a function, got number",
                     error_of(server.start, { init = 1 }), 1, true)
      assert.matches("callbacks.terminate must be a function, got table",
                     error_of(server.start, { terminate = {} }), 1, true)
    end)

    it("raises for bad options", function()
      assert.matches("opts must be a table", error_of(server.start, counter, 0, "name"), 1, true)
      assert.matches("opts.name must be a string", error_of(server.start, counter, 0, { name = 1 }), 1, true)
      assert.matches("opts.link must be a boolean", error_of(server.start, counter, 0, { link = 1 }), 1, true)
      assert.matches("bad timeout", error_of(server.start, counter, 0, { timeout = -5 }), 1, true)
    end)

    it("raises when a call has no handle_call, and the server ends", function()
      local pid = assert(server.start({ handle_cast = function(_, s) return s end }, nil))
      local err = error_of(server.call, pid, "get")
      assert.matches("no handle_call callback", err, 1, true)
    end)

    it("raises for a bad 'from' in server.reply", function()
      assert.matches("bad 'from'", error_of(server.reply, nil, 1), 1, true)
      assert.matches("bad 'from'", error_of(server.reply, { pid = mb.self() }, 1), 1, true)
    end)
  end)

  describe("bad return values", function()
    -- A server whose callbacks return nothing when told "nothing" (the
    -- forgotten `return state`), and report terminate to `me`.
    local function forgetful(me)
      return {
        init = function(s) return s end,
        handle_call = function(req, _, s)
          if req == "nothing" then return end
          if req == "one" then return 42 end
          return "ok", s
        end,
        handle_cast = function(msg, s) if msg ~= "nothing" then return s end end,
        handle_info = function(msg, s) if msg ~= "nothing" then return s end end,
        terminate = function(reason, s) mb.send(me, { terminated = reason, state = s }) end,
      }
    end

    local function terminated()
      return expect(function(m) return m.terminated ~= nil end, "terminate's report")
    end

    it("ends the server when handle_call returns nothing, and the call raises", function()
      local pid = assert(server.start(forgetful(mb.self()), { n = 1 }))
      local ref = mb.monitor(pid)
      local err = error_of(server.call, pid, "nothing")
      assert.matches("exited during the call", err, 1, true)
      assert.matches("bad return value from handle_call: nothing", err, 1, true)
      assert.are.equal("bad return value from handle_call: nothing", down_of(ref).reason)
      -- terminate saw the reason and the state from before the call, not nil.
      assert.are.same({ terminated = "bad return value from handle_call: nothing", state = { n = 1 } },
                      terminated())
    end)

    it("ends the server when handle_call returns a reply without a state", function()
      local pid = assert(server.start(forgetful(mb.self()), "st"))
      local ref = mb.monitor(pid)
      assert.matches("bad return value from handle_call: 42", error_of(server.call, pid, "one"), 1, true)
      assert.are.equal("bad return value from handle_call: 42", down_of(ref).reason)
      assert.are.equal("st", terminated().state)
    end)

    it("ends the server when handle_cast returns nothing", function()
      local pid = assert(server.start(forgetful(mb.self()), "st"))
      local ref = mb.monitor(pid)
      server.cast(pid, "nothing")
      assert.are.equal("bad return value from handle_cast: nothing", down_of(ref).reason)
      assert.are.same({ terminated = "bad return value from handle_cast: nothing", state = "st" },
                      terminated())
    end)

    it("ends the server when handle_info returns nothing", function()
      local pid = assert(server.start(forgetful(mb.self()), "st"))
      local ref = mb.monitor(pid)
      mb.send(pid, "nothing")
      assert.are.equal("bad return value from handle_info: nothing", down_of(ref).reason)
      assert.are.equal("st", terminated().state)
    end)

    it("refuses to start when init returns nothing", function()
      local none, err = server.start({ init = function() end }, "x", { name = "spec_bad_init" })
      assert.is_nil(none)
      assert.are.equal("bad return value from init: nothing", err)
      assert.is_true(nothing_new())
      assert.is_nil(mb.whereis("spec_bad_init"))
    end)

    it("accepts an explicit nil state, and nil, err from init only with an error", function()
      local pid = assert(server.start({
        init = function() return nil end,
        handle_cast = function(msg, s) return msg ~= "clear" and msg or nil end,
        handle_call = function(_, _, s) return s, s end,
      }, "unused"))
      assert.is_nil(server.call(pid, "get"))
      server.cast(pid, "set")
      assert.are.equal("set", server.call(pid, "get"))
      server.cast(pid, "clear")
      assert.is_nil(server.call(pid, "get"))
      server.stop(pid)
      local pid2 = assert(server.start({ init = function() return nil, nil end }, nil))
      assert.is_nil(server.get_state(pid2))
      server.stop(pid2)
    end)
  end)

  describe("get_state", function()
    it("returns the state, as it is between two messages", function()
      local pid = assert(server.start(counter, 3, { name = "spec_state" }))
      assert.are.equal(3, server.get_state(pid))
      server.cast(pid, { "add", 4 })
      assert.are.equal(7, server.get_state("spec_state"))
      assert.are.equal(7, server.get_state(pid, math.huge))
      server.stop(pid)
    end)

    it("is answered by the loop: no callback runs, none is needed", function()
      local me = mb.self()
      local pid = assert(server.start({
        init = function() return { t = { 1, 2 } } end,
        handle_info = function(msg, s) mb.send(me, { info = msg }) return s end,
      }, nil))
      assert.are.same({ t = { 1, 2 } }, server.get_state(pid))
      assert.is_nil(mb.receive(0))   -- handle_info saw nothing
      server.stop(pid)
    end)

    it("raises for a dead pid, an unknown name, a bad destination or timeout", function()
      local pid = assert(server.start(counter, 0))
      server.stop(pid)
      assert.matches("server.get_state: server " .. tostring(pid) .. " is not running (noproc)",
                     error_of(server.get_state, pid, 60000), 1, true)
      assert.matches("server.get_state: no process registered as 'spec_nobody'",
                     error_of(server.get_state, "spec_nobody"), 1, true)
      assert.matches("bad destination", error_of(server.get_state, 42), 1, true)
      assert.matches("bad destination", error_of(server.get_state, {}), 1, true)
      local live = assert(server.start(counter, 0))
      assert.matches("bad timeout", error_of(server.get_state, live, -1), 1, true)
      server.stop(live)
    end)

    it("raises on timeout when the server is busy", function()
      local pid = assert(server.start({
        handle_cast = function(_, s)
          mb.receive(function(m) return m == "go on" end, 5000)
          return s
        end,
      }, "st"))
      server.cast(pid, "hold")
      assert.matches("server.get_state: timeout after 30 ms", error_of(server.get_state, pid, 30), 1, true)
      mb.send(pid, "go on")
      assert.are.equal("st", server.get_state(pid))
      server.stop(pid)
    end)

    it("raises, and the server goes on, when the state cannot be copied", function()
      local pid = assert(server.start({
        init = function() return { co = coroutine.create(function() end) } end,
        handle_call = function(_, _, s) return type(s.co), s end,
      }, nil))
      local err = error_of(server.get_state, pid)
      assert.matches("server.get_state: the state cannot be sent", err, 1, true)
      assert.matches("coroutine", err, 1, true)
      assert.are.equal("thread", server.call(pid, "x"))
      server.stop(pid)
    end)

    it("refuses a server asking for its own state", function()
      local pid = assert(server.start({
        handle_call = function(_, _, s)
          local ok, err = pcall(server.get_state, mb.self())
          return tostring(err), s
        end,
      }, nil))
      assert.matches("cannot call itself", server.call(pid, "x"), 1, true)
      server.stop(pid)
    end)
  end)

  describe("protocol messages", function()
    -- A counter whose handle_info records what it sees.
    local function recorder()
      return {
        init = function() return { infos = {} } end,
        handle_call = function(_, _, s) return s.infos, s end,
        handle_info = function(msg, s) s.infos[#s.infos + 1] = msg return s end,
      }
    end

    it("drops garbled $call, $cast, $stop and $system messages and goes on", function()
      local pid = assert(server.start(recorder(), nil))
      local me = mb.self()
      local ref = mb.monitor(pid)
      mb.send(pid, { tag = "$call" })
      mb.send(pid, { tag = "$call", "me", ref, "x" })
      mb.send(pid, { tag = "$call", "name", ref, "x" })
      mb.send(pid, { tag = "$call", me, 12, "x" })
      mb.send(pid, { tag = "$call", me, me, "x" })
      mb.send(pid, { tag = "$call", me, ref })
      mb.send(pid, { tag = "$call", me, "tag", "x", erlang = false })
      mb.send(pid, { tag = "$call", req = "x", from = { pid = me, ref = ref } })  -- keyed
      mb.send(pid, { tag = "$cast" })
      mb.send(pid, { tag = "$cast", msg = "x" })
      mb.send(pid, { tag = "$stop" })
      mb.send(pid, { tag = "$stop", reason = "normal" })
      mb.send(pid, { tag = "$system", me, nil, "get_state" })
      mb.send(pid, { tag = "$system", me, ref })
      assert.are.same({}, server.call(pid, "infos"))
      assert.is_nil(mb.receive(0))
      server.stop(pid)
      assert.are.equal("normal", down_of(ref).reason)
    end)

    it("answers an unknown system request with an error", function()
      local pid = assert(server.start(recorder(), nil))
      local ref = mb.monitor(pid)
      mb.alias(ref)
      mb.send(pid, { tag = "$system", mb.self(), ref, "suspend" })
      local m = expect(function(m) return m[1] == ref end, "the reply")
      mb.unalias(ref)
      mb.demonitor(ref)
      assert.is_nil(m[2])
      assert.matches('unknown system request "suspend"', m[3], 1, true)
      assert.are.same({}, server.call(pid, "infos"))
      server.stop(pid)
    end)

    it("passes other $ tags to handle_info", function()
      local pid = assert(server.start(recorder(), nil))
      mb.send(pid, { tag = "$mine", n = 1 })
      assert.are.same({ { tag = "$mine", n = 1 } }, server.call(pid, "infos"))
      server.stop(pid)
    end)

    it("tells pids with mb.is_pid, not by how a value prints", function()
      -- A userdata that prints like a pid is not one.
      local fake = newproxy(true)
      getmetatable(fake).__tostring = function() return "<0.1.0>" end
      assert.matches("server.call: bad destination", error_of(server.call, fake, "x"), 1, true)
      assert.matches("server.cast: bad destination", error_of(server.cast, fake, "x"), 1, true)
      assert.matches("server.stop: bad destination", error_of(server.stop, fake), 1, true)
      assert.matches("bad 'from'", error_of(server.reply, { pid = fake, ref = fake }, 1), 1, true)
    end)
  end)

  describe("hibernation", function()
    after_each(function() S.cleanup_tmp() end)

    -- A child host's stderr without what a sanitizer build adds at exit
    -- (LeakSanitizer's list of suppressions used).
    local function sanitizer_free(err)
      return (err:gsub("%-%-%-%-%-+\nSuppressions used:.*$", ""))
    end

    local function status(pid)
      local i = mb.info(pid)
      return i and i.status
    end

    -- Waits (bounded) until pid hibernates.
    local function hibernated(pid)
      return S.eventually(function() return status(pid) == "hibernated" end)
    end

    -- The counter, telling `me` when terminate runs.
    local function counting(me)
      local cb = {}
      for k, v in pairs(counter) do cb[k] = v end
      cb.terminate = function(reason, n) mb.send(me, { terminated = reason, state = n }) end
      return cb
    end

    it("hibernates after opts.hibernate_after ms without a message and keeps its state", function()
      local pid = assert(server.start(counting(mb.self()), 0,
                                      { hibernate_after = 5, name = "spec_hib" }))
      assert.is_true(hibernated(pid))
      -- The state is gone from memory: what is left is the process's record,
      -- the continuation and the state, copied.
      local asleep = mb.info(pid).memory
      assert.is_true(asleep < 2048, "hibernated server: " .. asleep .. " bytes")
      for i = 1, 40 do
        server.cast(pid, { "add", 1 })
        mb.send(pid, { add = 1 })
        assert.are.equal(2 * i, server.call(i % 2 == 0 and pid or "spec_hib", "get"))
        assert.is_true(hibernated(pid), "cycle " .. i)
      end
      assert.are.equal(pid, mb.whereis("spec_hib"))
      assert.are.equal(80, server.get_state("spec_hib"))
      assert.is_true(hibernated(pid))
      assert.is_true(server.stop("spec_hib"))
      assert.are.same({ terminated = "normal", state = 80 },
                      expect(function(m) return m.terminated end, "terminate"))
      assert.is_nil(mb.whereis("spec_hib"))
    end)

    it("answers call, cast, info, get_state and stop sent while it hibernates", function()
      local me = mb.self()
      local pid = assert(server.start(counting(me), 10, { hibernate_after = 0 }))
      assert.is_true(hibernated(pid))
      assert.are.equal(10, server.call(pid, "get"))
      assert.is_true(hibernated(pid))
      server.cast(pid, { "add", 5 })
      assert.is_true(hibernated(pid))
      mb.send(pid, { add = 1 })
      assert.is_true(hibernated(pid))
      assert.are.equal(16, server.get_state(pid))
      assert.is_true(hibernated(pid))
      -- Many messages queued while it hibernates are all handled, in order.
      for _ = 1, 100 do server.cast(pid, { "add", 1 }) end
      assert.are.equal(116, server.call(pid, "get"))
      assert.is_true(hibernated(pid))
      local ref = mb.monitor(pid)
      assert.is_true(server.stop(pid, "shutdown"))
      assert.are.equal("shutdown", down_of(ref).reason)
      assert.are.same({ terminated = "shutdown", state = 116 },
                      expect(function(m) return m.terminated end, "terminate"))
    end)

    it("hibernates when a callback returns server.hibernate in place of the stop reason", function()
      local cb = {
        init = function(s) return s, server.hibernate end,
        handle_call = function(req, _, s)
          if req == "sleep" then return "ok", s, server.hibernate end
          return s, s
        end,
        handle_cast = function(msg, s)
          if msg == "sleep" then return s + 1, server.hibernate end
          return s + 1
        end,
        handle_info = function(msg, s)
          if msg == "sleep" then return s + 10, server.hibernate end
          return s + 10
        end,
      }
      local pid = assert(server.start(cb, 0))
      assert.is_true(hibernated(pid))               -- init's
      assert.are.equal(0, server.call(pid, "get"))  -- woken; stays awake
      -- The reply goes out before the server is back in its receive: it
      -- may still be runnable, but once waiting it stays awake.
      assert.is_true(S.eventually(function() return status(pid) == "waiting" end))
      mb.sleep(20)
      assert.are.equal("waiting", status(pid))
      assert.are.equal("ok", server.call(pid, "sleep"))
      assert.is_true(hibernated(pid))
      server.cast(pid, "sleep")
      assert.is_true(S.eventually(function() return server.get_state(pid) == 1 end))
      server.cast(pid, "sleep")
      assert.is_true(hibernated(pid))
      mb.send(pid, "sleep")
      assert.is_true(hibernated(pid))
      assert.are.equal(12, server.call(pid, "get"))
      server.stop(pid)
    end)

    it("refuses opts.hibernate_after that is not a number of ms or false", function()
      for _, bad in ipairs({ "10", -1, 0 / 0, {}, true }) do
        assert.matches("server.start: opts.hibernate_after must be a non-negative number of ms",
                       error_of(server.start, counter, 0, { hibernate_after = bad }), 1, true)
      end
      assert.is_true(nothing_new())
      -- false and math.huge mean never.
      for _, never in ipairs({ false, math.huge }) do
        local pid = assert(server.start(counter, 0, { hibernate_after = never }))
        assert.are.equal(0, server.call(pid, "get"))
        server.stop(pid)
      end
    end)

    it("treats server.hibernate as a reply or a state as a bad return value", function()
      local cb = {
        init = function(s) if s == "bad" then return server.hibernate end return s end,
        handle_call = function(_, _, s) return server.hibernate, s end,
        handle_cast = function() return server.hibernate end,
      }
      local none, err = server.start(cb, "bad")
      assert.is_nil(none)
      assert.are.equal("bad return value from init: server.hibernate", err)
      local pid = assert(server.start(cb, "st"))
      local ref = mb.monitor(pid)
      assert.matches("bad return value from handle_call: server.hibernate",
                     error_of(server.call, pid, "x"), 1, true)
      assert.are.equal("bad return value from handle_call: server.hibernate", down_of(ref).reason)
      pid = assert(server.start(cb, "st"))
      ref = mb.monitor(pid)
      server.cast(pid, "x")
      assert.are.equal("bad return value from handle_cast: server.hibernate", down_of(ref).reason)
    end)

    it("answers a call later through its alias after hibernating in between", function()
      local cb = {
        handle_call = function(req, from, s)
          if req == "later" then
            s.waiting = from
            return server.noreply, s, server.hibernate
          end
          return s.waiting ~= nil, s
        end,
        handle_cast = function(msg, s)
          server.reply(s.waiting, msg)
          s.waiting = nil
          return s, server.hibernate
        end,
      }
      local pid = assert(server.start(cb, {}, { hibernate_after = 0 }))
      local me = mb.self()
      local caller = mb.spawn(function()
        mb.send(me, { answered = server.call(pid, "later") })
      end)
      assert.is_true(S.eventually(function()
        return status(pid) == "hibernated" and server.call(pid, "waiting?")
      end))
      assert.is_true(hibernated(pid))
      server.cast(pid, "the answer")
      assert.are.equal("the answer", expect(function(m) return m.answered end, "the reply").answered)
      assert.is_true(hibernated(pid))
      -- A call that timed out while the server hibernated: the late reply
      -- is dropped by the alias and never reaches the caller.
      assert.matches("timeout after 20 ms", error_of(server.call, pid, "later", 20), 1, true)
      server.cast(pid, "too late")
      assert.is_false(server.call(pid, "waiting?"))
      assert.is_nil(mb.receive(0))
      server.stop(pid)
      assert.is_not_nil(caller)
    end)

    it("runs terminate on its parent's exit signal after a wake (trap_exit is kept)", function()
      local me = mb.self()
      local cb = counting(me)
      cb.init = function(n) mb.trap_exit(true) return n end
      local parent = mb.spawn(function()
        local pid = assert(server.start(cb, 7, { link = true, hibernate_after = 0 }))
        mb.send(me, { server = pid })
        mb.receive()
        mb.exit("parent gone")
      end)
      local pid = expect(function(m) return m.server end, "the server").server
      assert.is_true(hibernated(pid))
      local ref = mb.monitor(pid)
      mb.send(parent, "go")
      assert.are.equal("parent gone", down_of(ref).reason)
      assert.are.same({ terminated = "parent gone", state = 7 },
                      expect(function(m) return m.terminated end, "terminate"))
    end)

    it("is restarted by its supervisor when it dies hibernated or crashes after a wake", function()
      local supervisor = require "moonbeam.supervisor"
      local me = mb.self()
      local cb = counting(me)
      cb.init = function(n) mb.trap_exit(true) return n end
      local sup = assert(supervisor.start({ children = { {
        id = "sleeper",
        start = function()
          return server.start(cb, 0, { link = true, hibernate_after = 0, name = "spec_sleeper" })
        end,
      } }, max_restarts = 10 }))
      local first = mb.whereis("spec_sleeper")
      assert.is_true(hibernated(first))
      mb.exit(first, "kill")   -- cannot be trapped: it dies without waking
      local second
      assert.is_true(S.eventually(function()
        second = mb.whereis("spec_sleeper")
        return second ~= nil and second ~= first and status(second) == "hibernated"
      end))
      server.cast(second, "crash")
      local third
      assert.is_true(S.eventually(function()
        third = mb.whereis("spec_sleeper")
        return third ~= nil and third ~= second and status(third) == "hibernated"
      end))
      -- terminate ran for the crash (not for the kill).
      assert.matches("crash on cast", expect(function(m) return m.terminated end, "terminate").terminated)
      server.cast(third, { "add", 3 })
      assert.are.equal(3, server.call("spec_sleeper", "get"))
      assert.is_true(hibernated(third))
      -- Stopping the supervisor wakes the trapping child, which runs terminate.
      supervisor.stop(sup)
      assert.are.same({ terminated = "shutdown", state = 3 },
                      expect(function(m) return m.terminated end, "terminate"))
      assert.is_nil(mb.whereis("spec_sleeper"))
    end)

    it("reports a state it cannot copy once, goes on awake, and hibernates once it can", function()
      local script = S.write("uncopyable.lua", [[
        local mb = require "moonbeam"
        local server = require "moonbeam.server"
        local function status(pid)
          for _ = 1, 2500 do
            local s = mb.info(pid).status
            if s == "hibernated" then return s end
            mb.sleep(2)
          end
          return mb.info(pid).status
        end
        local pid = assert(server.start({
          init = function() return { n = 0 } end,
          handle_call = function(_, _, s) return s.n, s end,
          handle_cast = function(msg, s)
            if msg == "keep" then s.deep = { co = coroutine.create(print) } end
            if msg == "drop" then s.deep = nil end
            s.n = s.n + 1
            return s
          end,
        }, nil, { hibernate_after = 0, name = "uncopyable" }))
        print("start", status(pid))
        server.cast(pid, "keep")
        print("call", server.call(pid, "get"))
        for _ = 1, 5 do server.cast(pid, "other") end
        print("call", server.call(pid, "get"))
        mb.sleep(20)
        print("awake", mb.info(pid).status ~= "hibernated")
        server.cast(pid, "drop")
        print("after drop", status(pid))
        print("call", server.call(pid, "get"))
        server.stop(pid)
      ]])
      local code, out, err = S.moonbeam(S.q(script))
      err = sanitizer_free(err)
      assert.are.equal(0, code, err)
      assert.are.equal("start\thibernated\ncall\t1\ncall\t6\nawake\ttrue\n"
                       .. "after drop\thibernated\ncall\t7\n", out)
      local n = 0
      for _ in err:gmatch("=SERVER REPORT====") do n = n + 1 end
      assert.are.equal(1, n, err)
      assert.matches("^=SERVER REPORT==== <[%d.]+> registered as uncopyable\n"
                     .. "server callbacks: table %(init at [^\n]*uncopyable.lua:%d+%)\n"
                     .. "cannot hibernate, going on awake: state.deep.co: cannot send a coroutine\n$",
                     err)
    end)

    it("reports a crash after a wake like any crash", function()
      local script = S.write("wake_crash.lua", [[
        local mb = require "moonbeam"
        local server = require "moonbeam.server"
        local pid = server.start({
          handle_call = function(req, _, s) error("bad request " .. req.op) end,
        }, { count = 3 }, { name = "sleepy", hibernate_after = 0 })
        for _ = 1, 2500 do
          if mb.info(pid).status == "hibernated" then break end
          mb.sleep(2)
        end
        print(mb.info(pid).status)
        print(pcall(server.call, pid, { op = "explode" }))
      ]])
      local code, out, err = S.moonbeam(S.q(script))
      err = sanitizer_free(err)
      assert.are.equal(0, code, err)
      assert.matches("^hibernated\nfalse\tserver.call: server <[%d.]+> exited during the call "
                     .. '{op = "explode"}: [^\n]*wake_crash.lua:4: bad request explode\n$', out)
      assert.matches("^=SERVER REPORT==== <[%d.]+> registered as sleepy\n"
                     .. "server callbacks: table %(handle_call at [^\n]*wake_crash.lua:4%)\n"
                     .. 'last message: call {op = "explode"} from <[%d.]+>\n'
                     .. "state: {count = 3}\n"
                     .. "reason: [^\n]*wake_crash.lua:4: bad request explode\n"
                     .. "stack traceback:\n\t%[C%]: in function 'error'\n"
                     .. "\t[^\n]*wake_crash.lua:4: in function 'handle_call'\n$", err)
    end)

    it("loads a callbacks module again on wake, and ends with a report if it cannot", function()
      local dir = S.tmpdir()
      S.write("hibmod.lua", [[
        -- A module-level variable: fresh in every Lua state that loads this.
        local loads = 0
        loads = loads + 1
        local f = io.open(]] .. string.format("%q", dir .. "/broken") .. [[)
        if f then f:close() error("hibmod is broken") end
        return {
          init = function(s) return s end,
          handle_call = function(req, _, s) return { loads = loads, s = s }, s + 1 end,
        }
      ]], dir)
      local script = S.write("modwake.lua", [[
        local mb = require "moonbeam"
        local server = require "moonbeam.server"
        local function asleep(pid)
          for _ = 1, 2500 do
            if mb.info(pid).status == "hibernated" then return true end
            mb.sleep(2)
          end
        end
        local pid = assert(server.start("hibmod", 1, { hibernate_after = 0 }))
        for _ = 1, 3 do
          assert(asleep(pid))
          local r = server.call(pid, "get")
          print(r.loads, r.s)
        end
        assert(asleep(pid))
        io.open(]] .. string.format("%q", dir .. "/broken") .. [[, "w"):close()
        local ref = mb.monitor(pid)
        print(pcall(server.call, pid, "get"))
        print(mb.receive(5000).reason)
      ]], dir)
      local code, out, err = S.sh("LUA_PATH=" .. S.q(dir .. "/?.lua;;") .. " " .. S.q(S.bin)
                                  .. " " .. S.q(script))
      err = sanitizer_free(err)
      assert.are.equal(0, code, err)
      local lines = {}
      for l in out:gmatch("[^\n]+") do lines[#lines + 1] = l end
      assert.are.same({ "1\t1", "1\t2", "1\t3" }, { lines[1], lines[2], lines[3] })
      assert.matches("^false\tserver.call: server <[%d.]+> exited during the call \"get\": "
                     .. "cannot load callbacks module 'hibmod': [^\n]*hibmod is broken$", lines[4])
      assert.matches("^cannot load callbacks module 'hibmod': [^\n]*hibmod is broken$", lines[5])
      assert.matches("^=SERVER REPORT==== <[%d.]+>\nserver callbacks: module 'hibmod'\n"
                     .. "cannot wake from hibernation: cannot load callbacks module 'hibmod': "
                     .. "[^\n]*hibmod is broken\nstate: 4\n$", err)
    end)
  end)

  describe("crash reports", function()
    after_each(function() S.cleanup_tmp() end)

    it("names the server and shows the last message, the state and the error", function()
      local script = S.write("crash.lua", [[
        local mb = require "moonbeam"
        local server = require "moonbeam.server"
        local pid = server.start({
          handle_call = function(req, _, s) error("bad request " .. req.op) end,
        }, { count = 3 }, { name = "reported" })
        print(pcall(server.call, pid, { op = "explode" }))
      ]])
      local code, out, err = S.moonbeam(S.q(script))
      assert.are.equal(0, code, err)
      assert.is_true(S.has(out, "false"), out)
      assert.matches("=SERVER REPORT==== <[%d.]+> registered as reported\n"
                     .. "server callbacks: table %(handle_call at [^\n]*crash.lua:4%)\n"
                     .. 'last message: call {op = "explode"} from <[%d.]+>\n'
                     .. "state: {count = 3}\n"
                     .. "reason: [^\n]*crash.lua:4: bad request explode\n"
                     .. "stack traceback:\n", err)
      -- One block: the runtime adds no second report for the same crash.
      assert.is_nil(err:find("CRASH REPORT", 1, true), err)
    end)

    -- Runs scenarios in a child host; each ends when the server is gone,
    -- then writes "@@ name" to stderr. Returns the stderr of each scenario.
    local function scenarios()
      local script = S.write("ends.lua", [[
        local mb = require "moonbeam"
        local server = require "moonbeam.server"
        local function mark(name) io.stderr:write("@@ " .. name .. "\n") end
        local cb = {
          init = function(s) return s end,
          handle_cast = function(msg, s)
            if msg == "crash" then error("crash on cast") end
            if msg == "nothing" then return end
            return s, msg
          end,
          terminate = function(reason, s)
            if s == "bad terminate" then error("terminate raises") end
          end,
        }
        local function run(name, state, act)
          local pid = assert(server.start(cb, state))
          local ref = mb.monitor(pid)
          local ok, e = pcall(act, pid)
          local m = mb.receive(function(m) return type(m) == "table" and m.ref == ref end, 5000)
          mark(name .. " " .. tostring(m and m.reason))
        end
        run("stop", "st", function(pid) server.stop(pid) end)
        run("stop-shutdown", "st", function(pid) server.stop(pid, "shutdown") end)
        run("cast-normal", "st", function(pid) server.cast(pid, "normal") end)
        run("cast-boom", "st", function(pid) server.cast(pid, "boom") end)
        run("stop-boom", "st", function(pid) server.stop(pid, "boom") end)
        run("crash", "st", function(pid) server.cast(pid, "crash") end)
        run("crash-terminate", "bad terminate", function(pid) server.cast(pid, "crash") end)
        run("stop-terminate", "bad terminate", function(pid) server.stop(pid, "normal", 200) end)
        run("bad-return", "st", function(pid) server.cast(pid, "nothing") end)
        run("malformed", "st", function(pid)
          mb.send(pid, { tag = "$cast" })
          server.stop(pid)
        end)
        -- A server that traps exits ends with its parent's abnormal reason.
        local me = mb.self()
        local parent = mb.spawn(function()
          local pid = server.start({ init = function() mb.trap_exit(true) return 0 end }, nil, { link = true })
          mb.send(me, pid)
          mb.receive()
          mb.exit("parent gone")
        end)
        local pid = mb.receive(5000)
        local ref = mb.monitor(pid)
        mb.send(parent, "go")
        local m = mb.receive(function(m) return type(m) == "table" and m.ref == ref end, 5000)
        mark("parent " .. tostring(m and m.reason))
        print(server.start({ init = function() end }, nil))
        mark("init")
      ]])
      local code, out, err = S.moonbeam(S.q(script))
      assert.are.equal(0, code, err)
      local parts, from = {}, 1
      for name, stop in err:gmatch("@@ ([^\n]*)\n()") do
        local text = err:sub(from, stop - 1)
        parts[name] = text:sub(1, #text - #name - 4)
        from = stop
      end
      return parts, out, err
    end

    local function reports(text)
      local n = 0
      for _ in text:gmatch("=SERVER REPORT====") do n = n + 1 end
      return n
    end

    it("prints one report for each abnormal end and none for a normal one", function()
      local parts, out, err = scenarios()
      -- Normal ends: nothing.
      assert.are.equal("", parts["stop normal"], err)
      assert.are.equal("", parts["stop-shutdown shutdown"], err)
      assert.are.equal("", parts["cast-normal normal"], err)
      -- A stop reason returned by a callback.
      local p = parts["cast-boom boom"]
      assert.are.equal(1, reports(p), err)
      assert.matches("=SERVER REPORT==== <[%d.]+>\nserver callbacks: table %(init at [^\n]*\n"
                     .. 'last message: cast "boom"\nstate: "st"\nreason: boom\n$', p)
      -- server.stop with an abnormal reason.
      p = parts["stop-boom boom"]
      assert.are.equal(1, reports(p), err)
      assert.matches('last message: stop "boom"\nstate: "st"\nreason: boom\n$', p)
      -- A crash: with its traceback.
      p = parts["crash " .. (err:match("@@ crash ([^\n]*crash on cast)\n") or "?")]
      assert.are.equal(1, reports(p or ""), err)
      assert.matches("reason: [^\n]*ends.lua:%d+: crash on cast\nstack traceback:\n", p)
      -- A crash whose terminate raises too: one block, the crash stays the reason.
      p = parts["crash-terminate " .. (err:match("@@ crash%-terminate ([^\n]*)\n") or "?")]
      assert.truthy(err:find("@@ crash%-terminate [^\n]*crash on cast\n"), err)
      assert.are.equal(1, reports(p), err)
      assert.matches("reason: [^\n]*crash on cast\nstack traceback:\n.*"
                     .. "terminate failed too: [^\n]*terminate raises\nstack traceback:\n", p)
      -- A normal stop whose terminate raises: its error becomes the reason.
      local treason = err:match("@@ stop%-terminate ([^\n]*)\n")
      assert.matches("terminate raises", treason, 1, true)
      p = parts["stop-terminate " .. treason]
      assert.are.equal(1, reports(p), err)
      assert.matches("reason: [^\n]*terminate raises\n"
                     .. 'terminate failed while stopping with reason "normal"\nstack traceback:\n', p)
      -- A bad return value: what was expected, no traceback.
      p = parts["bad-return bad return value from handle_cast: nothing"]
      assert.are.equal(1, reports(p), err)
      assert.matches('last message: cast "nothing"\nstate: "st"\n'
                     .. "reason: bad return value from handle_cast: nothing\n"
                     .. "handle_cast must return state%[, stop_reason or server.hibernate%] "
                     .. "%(it returned no value%)\n$", p)
      -- A malformed protocol message: dropped with a report, then a normal stop.
      p = parts["malformed normal"]
      assert.are.equal(1, reports(p), err)
      assert.matches("dropped a malformed $cast message (no message): {tag = \"$cast\"}", p, 1, true)
      -- The parent's abnormal exit, seen by a server that traps exits.
      p = parts["parent parent gone"]
      assert.are.equal(1, reports(p), err)
      assert.matches("last message: info {[^\n]*event = \"EXIT\"[^\n]*}\n[^\n]*\nreason: parent gone\n$", p)
      -- init's bad return value: reported, and start returns the error.
      p = parts["init"]
      assert.are.equal(1, reports(p), err)
      assert.matches("init returned a bad value; argument: nil\n"
                     .. "reason: bad return value from init: nothing\n"
                     .. "init must return a state%[, server.hibernate%], or nil and an error "
                     .. "%(it returned no value%)\n$", p)
      assert.matches("nil\tbad return value from init: nothing", out, 1, true)
    end)
  end)
end)
