-- Preemption: a busy process never stops the others, wherever it is busy,
-- and preemption is invisible to it (no error, no wrong result); blocking
-- calls and mb.yield work from inside user coroutines.
local mb = require "moonbeam"
local S = require "spec.support"
local cases = require "spec.fixtures.preempt_cases"

-- The repository root, so that processes can find spec.fixtures.*.
local ROOT = require("lfs").currentdir()

-- Each preemption case runs in a host of its own: if a busy process could not
-- be preempted it would hold its scheduler for good, and in the host running
-- these specs that would stop the runner itself.
--
-- The script starts `busy` processes that run the case's step over and over,
-- each counting its steps in a file, and waits until each got one step right.
-- Then a ping-pong pair does ROUNDS round trips, and the script measures how
-- many steps any busy process completed during one round trip: work, not
-- time. A step is several scheduler slices of CPU (a slice is some 200,000
-- VM instructions by default), so a host that preempts at the first safe
-- point after the slice lets a busy process finish at most a step or two per
-- turn, and a round trip waits for a couple of turns: a handful of steps.
-- More than LIMIT means the preemption did not happen when it became safe.
-- Exit code 0: all done; 2: the ping-pong stalled; 3: a step gave a wrong
-- result (or raised an error); 4: a busy process ran more than LIMIT steps
-- during one round trip.
local ROUNDS, LIMIT = 10, 8
-- Where the preemption must wait for a C callback to return (cases.deferred),
-- a step is one uninterruptible C call, and the bound is looser.
local DEFERRED_LIMIT = 64
-- A load reader is the extreme: the step is almost all reader, and the safe
-- gap between two loads is a few instructions, which the deferred check
-- (every 100 instructions) rarely hits. Still bounded: the process yields.
local LOAD_LIMIT = 1000
local SCRIPT = [[
local root, kind, busy, rounds, limit, dir =
  arg[1], arg[2], tonumber(arg[3]), tonumber(arg[4]), tonumber(arg[5]), arg[6]
package.path = root .. "/?.lua;" .. package.path
local mb = require "moonbeam"
local step = require("spec.fixtures.preempt_cases")[kind].step
local me = mb.self()
for b = 1, busy do
  mb.spawn(function()
    local n = 0
    while true do
      local ran, ok, detail = pcall(step)
      if not (ran and ok) then mb.send(me, { bad = tostring(ran and detail or ok) }) return end
      n = n + 1
      local f = io.open(dir .. "/" .. b, "w")
      if f then f:write(n) f:close() end
      if n == 1 then mb.send(me, "first") end
    end
  end)
end
local function fail(code, ...)
  io.stderr:write(table.concat({ ... }, " "), "\n")
  os.exit(code)
end
local function check(m)
  if type(m) == "table" and m.bad then fail(3, "wrong result:", tostring(m.bad)) end
  return m
end
for i = 1, busy do
  if check(mb.receive(10000)) == nil then fail(2, "only", i - 1, "busy processes got a step done") end
end
local function counts()
  local c = {}
  for b = 1, busy do
    local f = io.open(dir .. "/" .. b)
    if f then c[b] = tonumber(f:read("*a")) f:close() end
  end
  return c
end
local echo = mb.spawn(function()
  while true do
    local m = mb.receive()
    mb.send(m.from, m.i)
  end
end)
local worst = 0
for i = 1, rounds do
  local c0 = counts()
  mb.send(echo, { from = me, i = i })
  if mb.receive(function(x) return x == i end, 5000) == nil then fail(2, "stalled at round", i) end
  local c1 = counts()
  for b = 1, busy do
    if c0[b] and c1[b] and c1[b] - c0[b] > worst then worst = c1[b] - c0[b] end
  end
  if worst > limit then
    fail(4, "a busy process completed", worst, "steps during round trip", i)
  end
end
check(mb.receive(function(m) return type(m) == "table" and m.bad end, 0))
print("ping-pong done")
io.stderr:write("at most ", worst, " steps of a busy process per round trip\n")
os.exit(0)
]]

-- Each process of `starts` (Lua source: a list of functions, which see
-- `spin`, a bare loop, and `churn`, a loop that allocates) gets into code
-- LuaJIT runs with hooks held off and loops there, on one scheduler. Others
-- must still run, and each must end with an error that contains `want`.
-- Lua source: `rounds` short processes one after another, each of which
-- must end within 5 s (else "stalled in round k" and exit 1); then "others
-- ran".
local function others_run(rounds)
  return string.format([[
    for round = 1, %d do
      local _, ref = mb.spawn_monitor(function() mb.sleep(1) end)
      if not mb.receive(function(m) return m.ref == ref end, 5000) then
        print("stalled in round " .. round) os.exit(1)
      end
    end
    print("others ran")
  ]], rounds)
end

local function held_stops(name, starts, want)
  local s = S.write(name, [[
    local mb = require "moonbeam"
    local spin = function() while true do end end
    local function churn() while true do local t = {} for j = 1, 100 do t[j] = {j} end end end
    local starts = ]] .. starts .. [[

    local refs = {}
    for i, start in ipairs(starts) do
      local _, ref = mb.spawn_monitor(start)
      refs[i] = ref
    end
  ]] .. others_run(20) .. [[
    for _, r in ipairs(refs) do
      local d = mb.receive(function(x) return x.ref == r end, 5000)
      print(d and d.reason or "no DOWN")
    end
    print(#refs)
    os.exit(0)
  ]])
  local code, out, err = S.moonbeam("--schedulers 1 " .. S.q(s), nil, 30)
  assert.are.equal(0, code, out .. err)
  local lines = {}
  for l in out:gmatch("[^\n]+") do lines[#lines + 1] = l end
  assert.are.equal("others ran", lines[1], out .. err)
  local n = tonumber(lines[#lines])
  assert.are.equal(n + 2, #lines, out .. err)
  for i = 2, n + 1 do
    assert.is_true(S.has(lines[i], want), out .. err)
  end
end

describe("preemption", function()
  local before
  before_each(function() before = S.snapshot() end)
  after_each(function() S.check_clean(before) end)
  teardown(S.cleanup_tmp)

  local script
  setup(function() script = S.write("preempt.lua", SCRIPT) end)

  for _, host in ipairs {
    { opts = "", busy = 6, what = "while 6 processes are busy (default schedulers)" },
    { opts = "--schedulers 1 ", busy = 2, what = "while 2 processes are busy on one scheduler" },
  } do
    describe(host.what, function()
      for _, kind in ipairs(cases.order) do
        local case = cases[kind]
        local limit = kind == "load" and LOAD_LIMIT
          or cases.deferred[kind] and DEFERRED_LIMIT or LIMIT
        it("inside " .. case.desc .. ": results stay right, and a ping-pong round trip "
          .. "waits for at most " .. limit .. " steps of a busy process", function()
          local code, out, err = S.moonbeam(table.concat({ host.opts .. S.q(script), S.q(ROOT),
            kind, host.busy, ROUNDS, limit, S.q(S.tmpdir()) }, " "), nil, 20)
          assert.are.equal(0, code, "exit code " .. tostring(code)
            .. ((code == 124 or code == 137) and " (stopped after 20 s: the host stalled)" or "") .. "\n" .. out .. err)
          assert.are.equal("ping-pong done\n", out, err)
        end)
      end
    end)
  end

  describe("with one scheduler (moonbeam --schedulers 1)", function()
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
      local code, out, err = S.moonbeam("--schedulers 1 " .. S.q(s), nil, 15)
      assert.are.equal(0, code, out .. err)
      assert.is_true(S.has(out, "others ran"), out .. err)
    end)

    -- A receive's match function runs inside a C call, where the hook cannot
    -- yield: a loop in it held its scheduler, here the host's only one, for
    -- ever, and no kill could reach it. Past its slice it now has
    -- MB_MATCH_HOOKS hooks' worth of instructions (~20-40 ms), then receive
    -- raises; for a message that came while the receive waited, the process
    -- ends with that error.
    it("a loop in a receive's match function holds the others only a bounded time", function()
      local s = S.write("loop_match.lua", [[
        local mb = require "moonbeam"
        local _, lref = mb.spawn_monitor(function()
          mb.send(mb.self(), "bait")
          mb.receive(function(m) while true do end end)
        end)
        local waiter, wref = mb.spawn_monitor(function()
          mb.receive(function(m) while m == "go" do end return true end)
        end)
        mb.send(waiter, "go")   -- a second looping match, woken by a message
        local _, ref = mb.spawn_monitor(function() mb.sleep(10) end)
        local m = mb.receive(function(x) return x.ref == ref end, 5000)
        print(m and m.event == "DOWN" and "others ran" or "stalled")
        for _, r in ipairs { lref, wref } do
          local d = mb.receive(function(x) return x.ref == r end, 5000)
          print(d and d.reason or "no DOWN")
        end
        os.exit(0)
      ]])
      local code, out, err = S.moonbeam("--schedulers 1 " .. S.q(s), nil, 15)
      assert.are.equal(0, code, out .. err)
      local ran, r1, r2 = out:match("^(.-)\n(.-)\n(.-)\n$")
      assert.are.equal("others ran", ran, out .. err)
      for _, r in ipairs { r1, r2 } do
        assert.is_true(S.has(r, "receive: the match function ran past its slice"), out .. err)
      end
    end)
    -- The match's stop is an error at a hook: a pcall inside the match
    -- caught each one, and the loop around it went on for good. Past its
    -- budget the hook now throws at every instruction, so the error gets
    -- out at the first instruction outside the pcall.
    it("a match function that catches its own stop still ends", function()
      local s = S.write("loop_match_pcall.lua", [[
        local mb = require "moonbeam"
        local spin = function() while true do end end
        local _, lref = mb.spawn_monitor(function()
          mb.send(mb.self(), "bait")
          mb.receive(function(m) while true do pcall(spin) end end)
        end)
        local _, ref = mb.spawn_monitor(function() mb.sleep(10) end)
        local m = mb.receive(function(x) return x.ref == ref end, 5000)
        print(m and m.event == "DOWN" and "others ran" or "stalled")
        local d = mb.receive(function(x) return x.ref == lref end, 5000)
        print(d and d.reason or "no DOWN")
        os.exit(0)
      ]])
      local code, out, err = S.moonbeam("--schedulers 1 " .. S.q(s), nil, 15)
      assert.are.equal(0, code, out .. err)
      local ran, r = out:match("^(.-)\n(.-)\n$")
      assert.are.equal("others ran", ran, out .. err)
      assert.is_true(S.has(r, "receive: the match function ran past its slice"), out .. err)
    end)

    -- LuaJIT runs a __gc finalizer with hooks held off: one that looped
    -- held its scheduler, here the host's only one, for good (only the
    -- watchdog's report, then SIGTERM). The preemption now lets the hook
    -- into it; it cannot yield there, so past a budget it is stopped with
    -- an error, raised where the collection ran. The second process
    -- computes first, so that its slices count (the ticker then pokes it
    -- only after a stall); the third catches its stop inside the finalizer.
    it("a __gc finalizer that loops holds the others only a bounded time", function()
      held_stops("loop_gc.lua", [[{
        function() getmetatable(newproxy(true)).__gc = spin churn() end,
        function()
          local x = 0 for k = 1, 2e6 do x = x + k end
          getmetatable(newproxy(true)).__gc = spin
          churn()
        end,
        function()
          getmetatable(newproxy(true)).__gc = function() while true do pcall(spin) end end
          churn()
        end,
      }]], "a __gc finalizer ran past its slice")
    end)

    -- The host runs a process's finalizers outside its slices too: the
    -- collection when it first waits, its crash report, closing its state
    -- at its end (lua_close finalizes every userdata, live or not). The
    -- ticker times that work as a slice, so a looping finalizer there is
    -- stopped the same way (its error is the host's to drop).
    it("a __gc finalizer that loops when the host collects or closes the state is stopped", function()
      local s = S.write("loop_gc_host.lua", [[
        local mb = require "moonbeam"
        local spin = function() while true do end end
        local _, r1 = mb.spawn_monitor(function()       -- closed at its end
          KEEP = newproxy(true)
          getmetatable(KEEP).__gc = spin
        end)
        local waiter, r2 = mb.spawn_monitor(function()  -- collected as it waits
          getmetatable(newproxy(true)).__gc = spin
          mb.receive()
        end)
        local _, r3 = mb.spawn_monitor(function()       -- its crash report
          KEEP = setmetatable({}, { __tostring = function()
            getmetatable(newproxy(true)).__gc = spin
            local t = {} for i = 1, 1e5 do t[i] = {} end
            return "late"
          end })
          error(KEEP)
        end)
      ]] .. others_run(20) .. [[
        mb.exit(waiter, "kill")
        for _, r in ipairs { r1, r2, r3 } do
          local d = mb.receive(function(x) return x.ref == r end, 5000)
          print(d and (type(d.reason) == "string" and d.reason or "an error object") or "no DOWN")
        end
        os.exit(0)
      ]])
      local code, out, err = S.moonbeam("--schedulers 1 " .. S.q(s), nil, 30)
      assert.are.equal(0, code, out .. err)
      assert.are.equal("others ran\nnormal\nkilled\nan error object\n", out, err)
    end)

    -- A debug hook function runs with hooks held off too, and looped for
    -- good the same way; it gets the same budget, and its error is raised
    -- where the hook fired.
    it("a debug hook function that loops holds the others only a bounded time", function()
      held_stops("loop_uhook.lua", [[{
        function() debug.sethook(spin, "", 1) churn() end,
        function() debug.sethook(function() while true do pcall(spin) end end, "", 1) churn() end,
      }]], "a debug hook function ran past its slice")
    end)

    -- Lua that a C function calls cannot yield either: an xpcall handler,
    -- load's reader, a __tostring that print or string.format calls, a
    -- package.loaders function. One that looped held its scheduler for good
    -- (with a process per scheduler doing so, the whole host). Past its
    -- slice it now gets MB_OWED_MS (100 ms), then an error where it runs;
    -- the process goes on from there.
    it("Lua called from C that loops holds the others only a bounded time", function()
      local s = S.write("loop_from_c.lua", [[
        local mb = require "moonbeam"
        local me = mb.self()
        local spin = function() while true do end end
        -- (tostring itself calls __tostring as Lua, which is preempted.)
        local function obj() return setmetatable({}, { __tostring = spin }) end
        local cases = {
          xpcall = function() return xpcall(error, spin) end,
          print = function() return pcall(print, obj()) end,
          format = function() return pcall(string.format, "%s", obj()) end,
          load = function() return load(spin) end,
          loader = function()
            table.insert(package.loaders, 1, spin)
            return pcall(require, "mbspec_anything")
          end,
        }
        for name, case in pairs(cases) do
          mb.spawn(function()
            local a, b = case()
            mb.send(me, { name = name, a = tostring(a), b = tostring(b) })
          end)
        end
      ]] .. others_run(20) .. [[
        local got = {}
        for _ = 1, 5 do
          local m = mb.receive(function(x) return type(x) == "table" and x.name end, 10000)
          if m then got[#got + 1] = m.name .. " " .. m.a .. " " .. m.b end
        end
        table.sort(got)
        print(table.concat(got, "\n"))
        os.exit(0)
      ]])
      local code, out, err = S.moonbeam("--schedulers 1 " .. S.q(s), nil, 60)
      assert.are.equal(0, code, out .. err)
      assert.is_true(S.has(out, "others ran"), out .. err)
      local past = "ran past its slice by over 100 ms"
      for _, name in ipairs { "format false", "load nil", "loader false", "print false" } do
        local line = out:match("\n(" .. name .. " [^\n]*)")
        assert.is_truthy(line, out .. err)
        assert.is_true(S.has(line, past), out .. err)
      end
      -- An error in the handler: LuaJIT's own message for it.
      assert.is_true(S.has(out, "\nxpcall false "), out .. err)
    end)

    -- Each caught error clears a flag in LuaJIT's hook mask, a read, a
    -- change and a write of a byte that the preemption also writes. The
    -- ticker wrote it from its own thread: a poke the owner's write undid
    -- was lost for good (the hook function stayed set, so it was never armed
    -- again), and the loop held the host's only scheduler until the
    -- watchdog halted the host, in every run. The poke is now made on the
    -- owner's thread, and a lost one is armed again.
    it("a loop whose pcall catches an error at every turn does not stop the others", function()
      local s = S.write("loop_pcall.lua", [[
        local mb = require "moonbeam"
        mb.spawn(function() local e = error while true do pcall(e, "x") end end)
      ]] .. others_run(300) .. [[
        os.exit(0)
      ]])
      local code, out, err = S.moonbeam("--schedulers 1 " .. S.q(s), nil, 60)
      assert.are.equal(0, code, out .. err)
      assert.is_true(S.has(out, "others ran"), out .. err)
    end)

  end)

  describe("with two schedulers (moonbeam --schedulers 2)", function()
    -- LuaJIT sets and clears flags in the hook mask around every __gc
    -- finalizer. The ticker's poke, written from its own thread over that,
    -- could leave the finalizer's "in a hook" flag set after it ended: the
    -- next mb.sleep was then taken for a hook's yield and resumed into a
    -- frame that was not there. This crashed the host (SIGSEGV) in every
    -- run of 3 s (6 of 6). The poke is now made on the owner's thread.
    it("processes that free userdata with __gc while they compute are preempted without harm", function()
      local s = S.write("gc_poke.lua", [[
        local mb = require "moonbeam"
        local me = mb.self()
        local N, MS = 16, 5000
        for i = 1, N do
          mb.spawn(function()
            local freed = 0
            local fin = function() freed = freed + 1 end
            local t0 = mb.now()
            while mb.now() - t0 < MS do
              local t1 = mb.now()
              repeat   -- a millisecond of work, longer than a slice
                for _ = 1, 500 do getmetatable(newproxy(true)).__gc = fin end
              until mb.now() - t1 >= 1
              mb.sleep(1)   -- blocks: its next slice starts without the hook
            end
            collectgarbage()
            mb.send(me, freed)
          end)
        end
        local freed = 0
        for _ = 1, N do
          local n = mb.receive(MS + 10000)
          if type(n) ~= "number" then print("no result") os.exit(1) end
          freed = freed + n
        end
        print(freed > 0 and "all done" or "nothing freed")
        os.exit(0)
      ]])
      local code, out, err = S.moonbeam("--schedulers 2 " .. S.q(s), nil, 60)
      assert.are.equal(0, code, out .. err)
      assert.is_true(S.has(out, "all done"), out .. err)
    end)

    -- An exit signal reaches a process in a looping __gc finalizer or
    -- debug hook function, as it reaches a Lua loop, and a pcall there
    -- does not keep it in. The kill goes as the looping starts; the budget
    -- (2 million VM instructions past its slice) is far longer, and would
    -- end the process with another reason.
    it("an exit signal ends a process looping in a __gc finalizer or a debug hook", function()
      local s = S.write("kill_gc.lua", [[
        local mb = require "moonbeam"
        local me = mb.self()
        local spin = function() while true do end end
        local function held() mb.send(me, "in") while true do pcall(spin) end end
        for round = 1, 6 do
          local pid, ref = mb.spawn_monitor(function()
            if round % 2 == 1 then
              getmetatable(newproxy(true)).__gc = held
              collectgarbage()
            else
              debug.sethook(held, "", 1)
              local x = 0
            end
          end)
          if mb.receive(function(m) return m == "in" end, 5000) ~= "in" then
            print("no finalizer in round " .. round) os.exit(1)
          end
          mb.exit(pid, "kill")
          local d = mb.receive(function(m) return type(m) == "table" and m.ref == ref end, 5000)
          if not (d and d.reason == "killed") then
            print("round " .. round .. ": " .. tostring(d and d.reason)) os.exit(1)
          end
        end
        print("all killed")
        os.exit(0)
      ]])
      local code, out, err = S.moonbeam("--schedulers 2 " .. S.q(s), nil, 30)
      assert.are.equal(0, code, out .. err)
      assert.is_true(S.has(out, "all killed"), out .. err)
    end)

    it("a socket's owner queued behind a slice stuck in a C call runs on the other", function()
      local s = S.write("stuck_homed.lua", [[
        local mb = require "moonbeam"
        local tcp = require "moonbeam.tcp"
        local me = mb.self()
        local l = assert(tcp.listen("127.0.0.1", 0))
        local holders, clients = {}, {}
        for i = 1, 16 do
          clients[i] = assert(tcp.connect("127.0.0.1", l:port(), 5000))
          local c = assert(l:accept(5000))
          holders[i] = mb.spawn(function()
            while true do mb.send(mb.receive(), "pong") end
          end)
          assert(c:set_owner(holders[i]))
        end
        local worst = 0
        for _ = 1, 3 do
          mb.spawn(function()
            mb.send(me, "stuck")
            string.find(("a"):rep(23), ("a?"):rep(23) .. ("a"):rep(23))
            mb.send(me, "unstuck")
          end)
          assert(mb.receive(function(m) return m == "stuck" end, 5000))
          mb.sleep(20)
          for _ = 1, 5 do
            for i = 1, 16 do
              local t0 = mb.now()
              mb.send(holders[i], me)
              if not mb.receive(function(m) return m == "pong" end, 10000) then
                print("no pong") os.exit(1)
              end
              worst = math.max(worst, mb.now() - t0)
            end
          end
          assert(mb.receive(function(m) return m == "unstuck" end, 30000))
        end
        print(("worst %.1f ms"):format(worst))
        os.exit(0)
      ]])
      local code, out, err = S.moonbeam("--schedulers 2 " .. S.q(s), nil, 60)
      assert.are.equal(0, code, out .. err)
      local worst = tonumber(out:match("worst ([%d.]+) ms"))
      assert.is_truthy(worst, out .. err)
      assert.is_true(worst < 200, out .. err)
    end)
  end)

  -- A slice starts without the count hook and the ticker thread arms it
  -- once the slice has run its time; a process preempted so counts its
  -- slices until one ends by blocking (README "Preemption and what blocks").
  describe("the ticker (--schedulers 1)", function()
    it("preempts a computing process in its first slice, after a quiet spell", function()
      -- 20 processes each compute ~100 slices' worth and end, while a pinger
      -- plays ping-pong. Their first slice runs without the count hook: only
      -- the ticker can preempt it. Preempted, they let the pinger's round
      -- trips through between their slices (thousands); not preempted, each
      -- would hold the only scheduler until it ends, and the round trips
      -- would only pass between them (a few dozen at most).
      local s = S.write("first_slice.lua", [[
        local mb = require "moonbeam"
        local me = mb.self()
        mb.sleep(100)   -- nothing runs: the ticker parks
        local echo = mb.spawn(function()
          while true do local m = mb.receive() mb.send(m.from, m.i) end
        end)
        local pinger = mb.spawn(function()
          local n, self = 0, mb.self()
          while not mb.receive(function(m) return m == "report" end, 0) do
            mb.send(echo, { from = self, i = n })
            mb.receive(function(x) return x == n end)
            n = n + 1
          end
          mb.send(me, { trips = n })
        end)
        local refs = {}
        for i = 1, 20 do
          local _, ref = mb.spawn_monitor(function()
            local x = 0
            for j = 1, 3000000 do x = (x * 3 + j) % 1000003 end
          end)
          refs[ref] = true
        end
        for _ = 1, 20 do
          local m = mb.receive(function(m) return type(m) == "table" and refs[m.ref] end, 20000)
          if m == nil then print("stalled") os.exit(1) end
        end
        mb.send(pinger, "report")
        local r = mb.receive(function(m) return type(m) == "table" and m.trips end, 10000)
        print("round trips: " .. (r and r.trips or "none"))
        os.exit(0)
      ]])
      local code, out, err = S.moonbeam("--schedulers 1 " .. S.q(s), nil, 60)
      assert.are.equal(0, code, out .. err)
      local trips = tonumber(out:match("round trips: (%d+)"))
      assert.is_truthy(trips, out .. err)
      assert.is_true(trips >= 200, out .. err)
    end)

    it("an idle host wakes no thread while its process sleeps", function()
      -- The threads' voluntary context switches over 300 ms of sleep: the
      -- scheduler's loop wakes for the timer, the main thread's watchdog
      -- every 100 ms; a ticker that did not park would add one every 2 ms.
      local s = S.write("idle_threads.lua", [[
        local mb = require "moonbeam"
        local stat = io.open("/proc/self/stat")
        local pid = stat:read("*a"):match("^(%d+)")
        stat:close()
        -- The threads are listed once, before: io.popen's own waits (for
        -- ls, on this scheduler's thread) counted 20-60 switches under ASan.
        local tids = {}
        local function list()
          local ls = io.popen("ls /proc/" .. pid .. "/task")
          for tid in ls:lines() do tids[#tids + 1] = tid end
          ls:close()
        end
        local function switches()
          local n = 0
          for _, tid in ipairs(tids) do
            local f = io.open("/proc/" .. pid .. "/task/" .. tid .. "/status")
            if f then
              n = n + tonumber(f:read("*a"):match("\nvoluntary_ctxt_switches:%s*(%d+)"))
              f:close()
            end
          end
          return n
        end
        mb.sleep(100)
        list()
        local a = switches()
        mb.sleep(300)
        print("switches: " .. (switches() - a))
        os.exit(0)
      ]])
      local code, out, err = S.moonbeam("--schedulers 1 " .. S.q(s), nil, 15)
      assert.are.equal(0, code, out .. err)
      local n = tonumber(out:match("switches: (%d+)"))
      assert.is_truthy(n, out .. err)
      assert.is_true(n < 60, out .. err)
    end)
  end)

  -- A computing process with nothing queued behind it on its scheduler is
  -- neither counted nor preempted every slice: the ticker lets it run for
  -- up to 2 ms at a time, and preempts it sooner as soon as the scheduler
  -- has something else to do: a process pushed there, I/O on its loop, a
  -- timer due (README "Preemption and what blocks"). The timer and I/O
  -- cases ran ~2 ms a turn with that mechanism taken out; their bounds sit
  -- between. The push is counted in messages instead (no time involved).
  describe("a computing process alone on its scheduler (--schedulers 1)", function()
    local function run(name, body)
      local s = S.write(name, [[
        local mb = require "moonbeam"
        local fs = require "moonbeam.fs"
        local me = mb.self()
        local function hog(rounds)
          return mb.spawn(function()
            local x = 0
            for _ = 1, rounds do
              for j = 1, 100000 do x = (x * 3 + j) % 1000003 end
              if mb.receive(function(m) return m == "stop" end, 0) then return end
            end
          end)
        end
        local function median(d)
          table.sort(d)
          return d[math.ceil(#d / 2)]
        end
        -- The median time of n calls of f, in ms, beside a lone loop.
        local function timed(n, f)
          local h = hog(100000)
          mb.sleep(20)
          local d = {}
          for i = 1, n do
            local t0 = mb.now()
            f()
            d[i] = mb.now() - t0
          end
          mb.send(h, "stop")
          return median(d)
        end
      ]] .. body .. [[
        os.exit(0)
      ]])
      local code, out, err = S.moonbeam("--schedulers 1 " .. S.q(s), nil, 30)
      assert.are.equal(0, code, out .. err)
      local v = tonumber(out:match("median (%S+) ms"))
      assert.is_truthy(v, out .. err)
      return v, out .. err
    end

    it("lets a timer of its scheduler fire on time", function()
      -- 1 ms sleeps: ~1.0 ms each; 2.1 ms with the timers not looked at.
      local v, all = run("alone_timer.lua", [[
        print("median " .. timed(150, function() mb.sleep(1) end) .. " ms")
      ]])
      assert.is_true(v < 1.6, all)
    end)

    it("gives way at once to a process it wakes", function()
      -- The loop sends every 30,000 iterations (a few slices' worth of
      -- instructions, under the 2 ms it may run alone) to a process
      -- waiting on the same scheduler. Given way to at once, that process
      -- finds one message each time it runs; let run on alone, it found
      -- 3-4 most times (measured with the push's poke taken out). Counted
      -- in messages, not time: the poke comes from the pushing thread
      -- itself (no ticker to wait for, busy or not). The first send may
      -- come before the ticker has seen the loop's first slice, which the
      -- ticker then cuts at its usual time: not counted.
      local s = S.write("alone_push.lua", [[
        local mb = require "moonbeam"
        local me = mb.self()
        local receiver = mb.spawn(function()
          local self, found, done = mb.self(), {}, false
          while not done do
            if mb.receive() == "stop" then break end
            found[#found + 1] = 1 + mb.info(self).mailbox
            for _ = 2, found[#found] do done = done or mb.receive(0) == "stop" end
          end
          mb.send(me, found)
        end)
        mb.sleep(20)
        mb.spawn(function()
          local x = 0
          for _ = 1, 150 do
            for j = 1, 30000 do x = (x * 3 + j) % 1000003 end
            mb.send(receiver, true)
          end
          for j = 1, 30000 do x = (x * 3 + j) % 1000003 end
          mb.send(receiver, "stop")
        end)
        local found = mb.receive(20000)
        local got, more = found[1] or 0, 0
        for i = 2, #found do
          got = got + found[i]
          if found[i] > 1 then more = more + 1 end
        end
        print(("messages %d, wakes after the first with more than one %d: %s"):format(got,
          more, table.concat(found, " ")))
        os.exit(0)
      ]])
      local code, out, err = S.moonbeam("--schedulers 1 " .. S.q(s), nil, 60)
      assert.are.equal(0, code, out .. err)
      local got, more = out:match("messages (%d+), wakes after the first with more than one (%d+)")
      assert.is_truthy(got, out .. err)
      assert.are.equal(150, tonumber(got), out .. err)
      assert.are.equal(0, tonumber(more), out .. err)
    end)

    it("lets I/O on its scheduler's loop through within a slice", function()
      -- A file operation's completion (libuv's thread pool) wakes the
      -- loop: ~0.3 ms a stat; 2.1 ms with the loop not watched.
      local v, all = run("alone_io.lua", [[
        print("median " .. timed(150, function() assert(fs.stat("/")) end) .. " ms")
      ]])
      assert.is_true(v < 1.2, all)
    end)
  end)

  it("an exit signal stops a busy process at once, before its first preemption", function()
    local s = S.write("kill_busy.lua", [[
      local mb = require "moonbeam"
      local me = mb.self()
      for round = 1, 20 do
        local pid, ref = mb.spawn_monitor(function()
          mb.send(me, "go")
          local x = 0
          while true do x = (x * 3 + 1) % 1000003 end
        end)
        mb.receive(function(m) return m == "go" end, 5000)
        mb.exit(pid, "stop")
        local m = mb.receive(function(m) return type(m) == "table" and m.ref == ref end, 5000)
        if not (m and m.reason == "stop") then print("no DOWN in round " .. round) os.exit(1) end
      end
      print("all stopped")
      os.exit(0)
    ]])
    local code, out, err = S.moonbeam(S.q(s), nil, 30)
    assert.are.equal(0, code, out .. err)
    assert.are.equal("all stopped\n", out, err)
  end)

  it("mb.halt ends a host whose processes all compute", function()
    local s = S.write("halt_busy.lua", [[
      local mb = require "moonbeam"
      for _ = 1, 4 do mb.spawn(function() local x = 0 while true do x = x + 1 end end) end
      mb.sleep(50)
      mb.halt(7)
    ]])
    local code, out, err = S.moonbeam(S.q(s), nil, 15)
    assert.are.equal(7, code, out .. err)
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
        mb.send(parent, { first = gen() })
        mb.send(parent, { second = gen() })
      end, mb.self())
      -- Wait until the process blocks; if it died instead, say why.
      local function blocks(what)
        local ok = S.eventually(function()
          local i = mb.info(pid)
          return i == nil or i.status == "waiting"
        end)
        local down = mb.receive(S.down_of(ref), 0)
        assert(ok and not down and mb.info(pid),
          "the process should block in " .. what .. "; it ended with: " .. tostring(down and down.reason))
      end
      blocks("the first receive")
      mb.send(pid, "x")
      assert.are.equal("got x", S.recv(S.field("first", "got x"), nil, "the first value").first)
      blocks("the second receive")
      mb.send(pid, "y")
      local m = S.recv(function(x) return type(x) == "table" and x.second end, nil, "the second value")
      assert.are.equal("then y", m.second)
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
      -- Let it block in receive first.
      S.eventually(function() local i = mb.info(pid) return i == nil or i.status == "waiting" end)
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
      S.eventually(function() local i = mb.info(pid) return i == nil or i.status == "waiting" end)
      mb.send(pid, "a")
      mb.send(pid, "b")
      local m = S.recv(function(x) return type(x) == "table" and x.nested_result end)
      assert.are.same({ "inner a", "outer", "inner true b", "inner done" }, m.nested_result)
      assert.are.equal("normal", S.await_down(ref))
    end)

    it("a generator that sleeps between values yields them all, in order", function()
      local ok, r = S.probe(function()
        local t0 = mb.now()
        local gen = coroutine.wrap(function()
          for i = 1, 5 do
            mb.sleep(5)
            coroutine.yield(i)
          end
        end)
        local got = {}
        for i = 1, 5 do got[i] = gen() end
        return got, mb.now() - t0
      end)
      assert.is_true(ok, tostring(r))
      assert.are.same({ 1, 2, 3, 4, 5 }, r[1])
      assert.is_true(r[2] >= 25 - 5, "slept " .. tostring(r[2]) .. " ms in all")
    end)

    it("a selective receive inside a coroutine leaves the other messages queued", function()
      local ok, r = S.probe(function()
        mb.send(mb.self(), "first")
        mb.spawn(function(p) mb.sleep(10) mb.send(p, "wanted") end, mb.self())
        local got = coroutine.wrap(function()
          return mb.receive(function(m) return m == "wanted" end, 5000)
        end)()
        return got, mb.receive(0)
      end)
      assert.is_true(ok, tostring(r))
      assert.are.same({ "wanted", "first" }, r)
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
      local ok, r = S.probe(function()
        local gen = coroutine.wrap(function()
          mb.yield()
          coroutine.yield(1)
          mb.yield()
          mb.yield()
          coroutine.yield(2)
          mb.yield()
          return 3
        end)
        return gen(), gen(), gen()
      end)
      assert.is_true(ok, tostring(r))
      assert.are.same({ 1, 2, 3 }, r)
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
