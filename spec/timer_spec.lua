-- Time: sleep, send_after, cancel_timer, now, and receive timeouts.
--
-- Timing never decides a test: where a duration is checked it is a lower
-- bound (a timer must not fire early), with a few ms of slack for clock
-- granularity; upper bounds exist only to keep a broken host from hanging.
local mb = require "moonbeam"
local S = require "spec.support"

local SLACK = 5

describe("timers", function()
  local before
  before_each(function() before = S.snapshot() end)
  after_each(function() S.check_clean(before) end)

  describe("mb.now", function()
    it("is a number of milliseconds that never goes back", function()
      local prev = mb.now()
      assert.is_number(prev)
      for _ = 1, 10000 do
        local t = mb.now()
        assert(t >= prev, "now() went back from " .. prev .. " to " .. t)
        prev = t
      end
    end)

    it("advances across a sleep", function()
      local t0 = mb.now()
      mb.sleep(20)
      assert.is_true(mb.now() - t0 >= 20 - SLACK)
    end)

    it("is the same clock in every process", function()
      local t0 = mb.now()
      mb.spawn(function(parent) mb.send(parent, { t = mb.now() }) end, mb.self())
      local t = S.recv(function(m) return type(m) == "table" and m.t end).t
      assert.is_true(t >= t0 - 1, "child's now " .. t .. " before parent's " .. t0)
      assert.is_true(mb.now() >= t - 1)
    end)
  end)

  describe("mb.sleep", function()
    it("waits at least the given time", function()
      local t0 = mb.now()
      mb.sleep(50)
      local dt = mb.now() - t0
      assert.is_true(dt >= 50 - SLACK, "slept " .. dt .. " ms")
    end)

    it("returns at once for 0", function()
      assert.has_no.errors(function() mb.sleep(0) end)
    end)

    it("does not consume or lose messages", function()
      mb.send(mb.self(), "before")
      mb.spawn(function(parent) mb.send(parent, "during") end, mb.self())
      mb.sleep(30)
      assert.are.equal("before", S.recv())
      assert.are.equal("during", S.recv())
    end)

    it("blocks only the sleeping process", function()
      local sleeper, sref = mb.spawn_monitor(function() mb.sleep(200) end)
      mb.spawn(function(parent) mb.send(parent, "not blocked") end, mb.self())
      assert.are.equal("not blocked", S.recv())
      assert.is_true(S.eventually(function()
        local i = mb.info(sleeper)
        return i == nil or i.status == "waiting"
      end))
      assert.are.equal("normal", S.await_down(sref))
    end)

    it("can be ended by an exit signal", function()
      local pid, ref = mb.spawn_monitor(function() mb.sleep(60000) end)
      mb.exit(pid, "wake and die")
      assert.are.equal("wake and die", S.await_down(ref))
    end)
  end)

  describe("mb.send_after", function()
    it("delivers the message after the delay", function()
      local t0 = mb.now()
      local timer = mb.send_after(30, mb.self(), "tick")
      assert.is_not_nil(timer)
      assert.are.equal("tick", S.recv())
      assert.is_true(mb.now() - t0 >= 30 - SLACK, "arrived after " .. (mb.now() - t0) .. " ms")
    end)

    it("delivers a copy of a table message to another process", function()
      local pid = mb.spawn(function(parent)
        local m = mb.receive(5000)
        mb.send(parent, { got = m })
      end, mb.self())
      local msg = { n = 1 }
      mb.send_after(10, pid, msg)
      msg.n = 2
      assert.are.same({ n = 1 }, S.recv(function(m) return type(m) == "table" and m.got end).got)
    end)

    it("delivers to a registered name", function()
      mb.register("spec_timer_me")
      mb.send_after(5, "spec_timer_me", "by name")
      assert.are.equal("by name", S.recv())
      mb.unregister("spec_timer_me")
    end)

    it("delivers timers in order of their deadlines", function()
      mb.send_after(120, mb.self(), "third")
      mb.send_after(10, mb.self(), "first")
      mb.send_after(60, mb.self(), "second")
      assert.are.equal("first", S.recv())
      assert.are.equal("second", S.recv())
      assert.are.equal("third", S.recv())
    end)

    it("to a dead pid is dropped silently", function()
      local pid, ref = mb.spawn_monitor(function() end)
      S.await_down(ref)
      assert.has_no.errors(function() mb.send_after(1, pid, "void") end)
      mb.sleep(10)
    end)

    it("refuses a message that cannot be copied, or nil", function()
      assert.has_error(function() mb.send_after(1, mb.self(), coroutine.create(print)) end)
      assert.has_error(function() mb.send_after(1, mb.self(), nil) end)
      assert.is_nil(mb.receive(20))
    end)

    it("still fires when the sender has died", function()
      mb.spawn(function(parent) mb.send_after(20, parent, "from the dead") end, mb.self())
      assert.are.equal("from the dead", S.recv())
    end)
  end)

  describe("mb.cancel_timer", function()
    it("stops a timer that has not fired", function()
      local timer = mb.send_after(50, mb.self(), "cancelled")
      mb.cancel_timer(timer)
      mb.send_after(100, mb.self(), "control")
      -- The control timer is due later than the cancelled one.
      assert.are.equal("control", S.recv())
      assert.is_nil(mb.receive(0))
    end)

    it("is harmless on a timer that has fired, and twice", function()
      local timer = mb.send_after(1, mb.self(), "fired")
      assert.are.equal("fired", S.recv())
      assert.has_no.errors(function() mb.cancel_timer(timer) end)
      assert.has_no.errors(function() mb.cancel_timer(timer) end)
    end)
  end)

  describe("receive timeouts", function()
    it("receive(0) returns nil at once on an empty mailbox", function()
      assert.is_nil(mb.receive(0))
    end)

    it("receive(ms) waits at least ms and returns nil", function()
      local t0 = mb.now()
      assert.is_nil(mb.receive(40))
      assert.is_true(mb.now() - t0 >= 40 - SLACK)
    end)

    it("receive(ms) returns a message that comes before the timeout", function()
      mb.send_after(10, mb.self(), "in time")
      assert.are.equal("in time", mb.receive(S.T))
    end)

    it("a selective receive times out while other messages keep coming", function()
      -- The sender would go on for 5 s: a timeout restarted by every message
      -- that does not match would not end before it stops.
      local pid, ref = mb.spawn_monitor(function(parent)
        for i = 1, 1000 do
          mb.send(parent, i)
          mb.sleep(5)
        end
      end, mb.self())
      local t0 = mb.now()
      assert.is_nil(mb.receive(function(m) return m == "never" end, 40))
      local dt = mb.now() - t0
      mb.exit(pid, "kill")
      S.await_down(ref)
      assert.is_true(dt >= 40 - SLACK, "timed out after " .. dt)
      assert.is_true(dt < 4000, "timed out after " .. dt .. " ms: restarted by each message?")
    end)
  end)
end)
