-- Preemption: a busy process never stops the others, wherever it is busy,
-- and preemption is invisible to it (no error, no wrong result); blocking
-- calls and mb.yield work from inside user coroutines.
local mb = require "moonbeam"
local S = require "spec.support"
local cases = require "spec.fixtures.preempt_cases"

-- More busy processes than this machine has schedulers (cores).
local BUSY = 6
local ROUNDS = 20

-- The repository root, so that processes can find spec.fixtures.*.
local ROOT = require("lfs").currentdir()

-- A busy process: runs step over and over, reports its first good result,
-- and reports and crashes on a wrong one.
local function busy(parent, step, root)
  package.path = root .. "/?.lua;" .. package.path
  local reported = false
  while true do
    local ok, detail = step()
    if not ok then
      mb.send(parent, { case_bad = mb.self(), detail = detail })
      error("wrong result: " .. tostring(detail))
    end
    if not reported then
      mb.send(parent, { case_ok = mb.self() })
      reported = true
    end
  end
end

-- Start n busy processes on step; wait until each has got one step right.
local function start_busy(step, n)
  local procs = {}
  for i = 1, n do
    local pid, ref = mb.spawn_monitor(busy, mb.self(), step, ROOT)
    procs[i] = { pid = pid, ref = ref }
  end
  for _, p in ipairs(procs) do
    local m = S.recv(function(x)
      return type(x) == "table"
        and (x.case_ok == p.pid or x.case_bad == p.pid or (x.event == "DOWN" and x.ref == p.ref))
    end, 6 * S.T, "a busy process's first result")
    assert(m.case_ok, "busy process failed: " .. tostring(m.detail or m.reason))
  end
  return procs
end

local function stop_busy(procs)
  for _, p in ipairs(procs) do mb.exit(p.pid, "kill") end
  for _, p in ipairs(procs) do
    local reason = S.await_down(p.ref, 2 * S.T)
    assert(reason == "killed" or reason == "kill",
      "busy process ended with " .. tostring(reason) .. " before it was killed")
  end
end

-- A ping-pong pair, both new processes; returns how many of `rounds` round
-- trips completed (each one bounded by 5 s).
local function ping_pong(rounds)
  local b = mb.spawn(function()
    while true do
      local m = mb.receive()
      if m == "stop" then return end
      mb.send(m.from, m.i)
    end
  end)
  local _, aref = mb.spawn_monitor(function(parent, peer, n)
    for i = 1, n do
      mb.send(peer, { from = mb.self(), i = i })
      if mb.receive(function(x) return x == i end, 5000) == nil then
        mb.send(peer, "stop")
        mb.send(parent, { pp_done = i - 1 })
        return
      end
    end
    mb.send(peer, "stop")
    mb.send(parent, { pp_done = n })
  end, mb.self(), b, rounds)
  local m = S.recv(function(x) return type(x) == "table" and x.pp_done end, (rounds + 1) * S.T)
  S.await_down(aref)
  return m.pp_done
end

describe("preemption", function()
  local before
  before_each(function() before = S.snapshot() end)
  after_each(function() S.check_clean(before, 2 * S.T) end)
  teardown(S.cleanup_tmp)

  describe("while " .. BUSY .. " processes are busy", function()
    for _, kind in ipairs(cases.order) do
      local case = cases[kind]
      it("inside " .. case.desc .. ", results stay right and a ping-pong pair completes", function()
        local procs = start_busy(case.step, BUSY)
        local done = ping_pong(ROUNDS)
        -- No busy process found a wrong result or died meanwhile.
        local bad = mb.receive(function(x)
          return type(x) == "table" and (x.case_bad or x.event == "DOWN")
        end, 0)
        stop_busy(procs)
        assert.are.equal(ROUNDS, done)
        assert.is_nil(bad and (bad.detail or bad.reason))
      end)
    end
  end)

  describe("with one scheduler (moonbeam --schedulers 1)", function()
    local script
    setup(function()
      script = S.write("preempt1.lua", [[
        local root, kind = arg[1], arg[2]
        package.path = root .. "/?.lua;" .. package.path
        local mb = require "moonbeam"
        local step = require("spec.fixtures.preempt_cases")[kind].step
        for _ = 1, 2 do
          mb.spawn(function()
            while true do
              local ok, detail = step()
              if not ok then
                io.stderr:write("wrong result: ", tostring(detail), "\n")
                os.exit(3)
              end
            end
          end)
        end
        local echo = mb.spawn(function()
          while true do
            local m = mb.receive()
            mb.send(m.from, m.i)
          end
        end)
        for i = 1, 20 do
          mb.send(echo, { from = mb.self(), i = i })
          if mb.receive(function(x) return x == i end, 5000) == nil then
            print("stalled at round " .. i)
            os.exit(2)
          end
        end
        print("ping-pong done")
        os.exit(0)
      ]])
    end)

    for _, kind in ipairs(cases.order) do
      local case = cases[kind]
      it("inside " .. case.desc .. ", a ping-pong pair completes", function()
        local code, out, err = S.moonbeam("--schedulers 1 " .. S.q(script) .. " "
          .. S.q(ROOT) .. " " .. kind)
        assert.are.equal(0, code, "exit code " .. tostring(code) .. "\n" .. out .. err)
        assert.is_true(S.has(out, "ping-pong done"), out .. err)
      end)
    end

    it("a plain infinite loop does not stop the others", function()
      local s = S.write("loop1.lua", [[
        local mb = require "moonbeam"
        mb.spawn(function() while true do end end)
        mb.spawn(function() local t = {} while true do t[#t % 100 + 1] = {} end end)
        local _, ref = mb.spawn_monitor(function() mb.sleep(10) end)
        local m = mb.receive(5000)
        print(m and m.event == "DOWN" and m.ref == ref and "others ran" or "stalled")
        os.exit(0)
      ]])
      local code, out, err = S.moonbeam("--schedulers 1 " .. S.q(s))
      assert.are.equal(0, code, out .. err)
      assert.is_true(S.has(out, "others ran"), out .. err)
    end)
  end)

  describe("blocking calls inside user coroutines", function()
    it("receive inside coroutine.wrap blocks the process and resumes it correctly", function()
      local pid, ref = mb.spawn_monitor(function(parent)
        local gen = coroutine.wrap(function()
          local m = mb.receive(5000)
          coroutine.yield("got " .. tostring(m))
          local m2 = mb.receive(5000)
          return "then " .. tostring(m2)
        end)
        local a = gen()
        local b = gen()
        mb.send(parent, { wrap_result = { a, b } })
      end, mb.self())
      local function waiting()
        return S.eventually(function()
          local i = mb.info(pid)
          return i ~= nil and i.status == "waiting"
        end)
      end
      assert.is_true(waiting(), "the process should block in receive")
      mb.send(pid, "x")
      assert.is_true(waiting(), "the process should block in the second receive")
      mb.send(pid, "y")
      local m = S.recv(function(x) return type(x) == "table" and x.wrap_result end)
      assert.are.same({ "got x", "then y" }, m.wrap_result)
      assert.are.equal("normal", S.await_down(ref))
    end)

    it("receive and sleep inside coroutine.resume keep the values passed both ways", function()
      local pid, ref = mb.spawn_monitor(function(parent)
        local co = coroutine.create(function(a)
          local m = mb.receive(5000)
          local r = coroutine.yield(a + m)
          mb.sleep(10)
          return r * 2
        end)
        local ok1, v1 = coroutine.resume(co, 1)
        local ok2, v2 = coroutine.resume(co, 21)
        mb.send(parent, { resume_result = { ok1, v1, ok2, v2, coroutine.status(co) } })
      end, mb.self())
      mb.send(pid, 41)
      local m = S.recv(function(x) return type(x) == "table" and x.resume_result end)
      assert.are.same({ true, 42, true, 42, "dead" }, m.resume_result)
      assert.are.equal("normal", S.await_down(ref))
    end)

    it("receive and sleep in a coroutine nested two deep", function()
      local pid, ref = mb.spawn_monitor(function(parent)
        local out = {}
        local outer = coroutine.wrap(function()
          local inner = coroutine.create(function()
            local m = mb.receive(5000)
            coroutine.yield("inner " .. tostring(m))
            mb.sleep(10)
            local ok, m2 = pcall(mb.receive, 5000)
            coroutine.yield("inner " .. tostring(ok) .. " " .. tostring(m2))
            return "inner done"
          end)
          local _, v = coroutine.resume(inner)
          coroutine.yield(v)
          coroutine.yield("outer")
          _, v = coroutine.resume(inner)
          coroutine.yield(v)
          _, v = coroutine.resume(inner)
          return v
        end)
        for i = 1, 4 do out[i] = outer() end
        mb.send(parent, { nested_result = out })
      end, mb.self())
      mb.send(pid, "a")
      mb.send(pid, "b")
      local m = S.recv(function(x) return type(x) == "table" and x.nested_result end)
      assert.are.same({ "inner a", "outer", "inner true b", "inner done" }, m.nested_result)
      assert.are.equal("normal", S.await_down(ref))
    end)

    it("a generator that sleeps between values yields them all, in order", function()
      local t0 = mb.now()
      local gen = coroutine.wrap(function()
        for i = 1, 5 do
          mb.sleep(5)
          coroutine.yield(i)
        end
      end)
      for i = 1, 5 do assert.are.equal(i, gen()) end
      assert.is_true(mb.now() - t0 >= 25 - 5)
    end)

    it("a selective receive inside a coroutine leaves the other messages queued", function()
      mb.send(mb.self(), "first")
      mb.send(mb.self(), "wanted")
      local got = coroutine.wrap(function()
        return mb.receive(function(m) return m == "wanted" end, S.T)
      end)()
      assert.are.equal("wanted", got)
      assert.are.equal("first", mb.receive(0))
    end)
  end)

  describe("mb.yield", function()
    it("returns and the process goes on", function()
      local n = 0
      for _ = 1, 100 do
        mb.yield()
        n = n + 1
      end
      assert.are.equal(100, n)
    end)

    it("inside a user coroutine does not yield that coroutine", function()
      local gen = coroutine.wrap(function()
        mb.yield()
        coroutine.yield(1)
        mb.yield()
        mb.yield()
        coroutine.yield(2)
        mb.yield()
        return 3
      end)
      assert.are.equal(1, gen())
      assert.are.equal(2, gen())
      assert.are.equal(3, gen())
    end)

    it("lets another process run on a single scheduler", function()
      local s = S.write("yield1.lua", [[
        local mb = require "moonbeam"
        mb.spawn(function(parent) mb.send(parent, "hi") end, mb.self())
        local got, spins = nil, 0
        while not got and spins < 100000 do
          mb.yield()
          got = mb.receive(0)
          spins = spins + 1
        end
        print(got)
      ]])
      local code, out, err = S.moonbeam("--schedulers 1 " .. S.q(s))
      assert.are.equal(0, code, out .. err)
      assert.are.equal("hi\n", out)
    end)
  end)
end)
