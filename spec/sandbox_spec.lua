-- What a process cannot do to the host: switch preemption off (debug hooks,
-- the JIT), reach raw memory (the FFI, package.loadlib, string.buffer's
-- pointers) or load bytecode, which LuaJIT does not verify - unless the host
-- is started with --allow-ffi / --allow-bytecode.
--
-- Everything here runs in a host of its own (S.moonbeam, bounded by a
-- timeout): a process that cannot be preempted stalls its scheduler for good,
-- and a memory error kills the whole host, so in the host running these specs
-- either would stop the runner itself.
local S = require "spec.support"

local LUAJIT = "/usr/bin/luajit"

-- Run a script in a new host; returns exit code, stdout, stderr.
local function run(src, opts, args, limit)
  local script = S.write("case.lua", src)
  return S.moonbeam((opts or "") .. " " .. S.q(script) .. " " .. (args or ""), nil, limit or 20)
end

-- A failed run's whole story, for assertion messages.
local function story(code, out, err)
  return "exit code " .. tostring(code)
    .. ((code == 124 or code == 137) and " (stopped by the time bound: the host stalled)" or "")
    .. ((code == 139 or code == 134) and " (the host crashed)" or "")
    .. "\nstdout: " .. out .. "\nstderr: " .. err
end

-- One scheduler, three processes: a busy one that first does something that
-- used to switch preemption off (setup, run in the busy process), a ticker
-- that sleeps five times, and the first process waiting for the ticker. If
-- the busy process cannot be preempted, the one scheduler never runs the
-- others again and the host stalls until the time bound.
local PREEMPT = [[
local mb = require "moonbeam"
local case, in_coroutine = arg[1], arg[2] == "co"
local me = mb.self()
local count = 0
local function counter() count = count + 1 end
local setups = {
  clear = function() debug.sethook() end,
  clear_thread = function() debug.sethook(coroutine.create(print)) end,
  count = function() debug.sethook(counter, "", 100) end,
  line = function() debug.sethook(counter, "l") end,
  call_return = function() debug.sethook(counter, "cr") end,
  thread = function() debug.sethook(coroutine.create(print), counter, "", 10) end,
  clear_inside = function()
    debug.sethook(function() counter() debug.sethook() end, "", 10)
  end,
  replace_inside = function()
    debug.sethook(function() debug.sethook(counter, "", 50) end, "", 10)
  end,
  block_inside = function()
    debug.sethook(function()
      local ok, err = pcall(mb.sleep, 1)
      if not ok and tostring(err):find("cannot block here", 1, true) then counter() end
    end, "", 1000)
  end,
  error_in_load = function()
    -- An error thrown from a hook and caught by a C-level protected call
    -- (load's reader) used to leave LuaJIT's hooks off for good.
    local thrown = false
    local f, err = load(function()
      debug.sethook(function()
        if not thrown then thrown = true error("from the hook") end
      end, "", 1)
      return nil
    end)
    assert(f == nil and tostring(err):find("from the hook"), "load: " .. tostring(err))
    debug.sethook(counter, "", 100)
  end,
  jit_on = function() pcall(jit.on) pcall(jit.on, true, true) end,
  jit_tricks = function()
    local function f() end
    pcall(jit.on, f, true)
    jit.off()
    jit.flush()
    jit.flush(f)
    jit.opt.start(3)
    jit.opt.start("hotloop=1", "hotexit=1")
    pcall(jit.attach, function() end, "bc")
    pcall(require, "jit.profile")
  end,
}
local counts = setups[case] ~= setups.clear and setups[case] ~= setups.clear_thread
  and case:sub(1, 3) ~= "jit"
mb.spawn(function()
  local function busy()
    setups[case]()
    local x, reported = 0, false
    while true do
      x = x + 1
      if not reported and x > 1e4 then
        reported = true
        mb.send(me, { count = count, jit = jit.status() })
      end
    end
  end
  if in_coroutine then coroutine.wrap(busy)() else busy() end
end)
mb.spawn(function()
  for _ = 1, 5 do mb.sleep(5) end
  mb.send(me, "ticked")
end)
local ticked = mb.receive(function(m) return m == "ticked" end, 10000)
local report = mb.receive(function(m) return type(m) == "table" end, 10000)
print(ticked, report and report.jit, report and (not counts or report.count > 0))
os.exit(0)
]]

describe("preemption cannot be switched off by a process", function()
  teardown(S.cleanup_tmp)

  local cases = {
    clear = "debug.sethook() (clearing the hook)",
    clear_thread = "debug.sethook(co) (clearing it through a coroutine)",
    count = "a count hook of its own",
    line = "a line hook",
    call_return = "a call and return hook",
    thread = "a hook set through a coroutine argument",
    clear_inside = "a hook that clears itself",
    replace_inside = "a hook that sets another hook",
    block_inside = "a hook that tries to block (and is refused: it cannot yield)",
    error_in_load = "a hook whose error a load reader caught",
    jit_on = "jit.on()",
    jit_tricks = "jit.on(f), jit.off, jit.flush, jit.opt.start, jit.attach, jit.profile",
  }
  for _, case in ipairs { "clear", "clear_thread", "count", "line", "call_return", "thread",
                          "clear_inside", "replace_inside", "block_inside", "error_in_load",
                          "jit_on", "jit_tricks" } do
    for _, where in ipairs { "body", "co" } do
      it("by " .. cases[case] .. (where == "co" and ", inside a coroutine" or "")
        .. ": the others on its scheduler still run, its hook still works, the JIT stays off", function()
        local code, out, err = run(PREEMPT, "--schedulers 1", case .. " " .. where)
        assert.are.equal(0, code, story(code, out, err))
        assert.are.equal("ticked\tfalse\ttrue\n", out, story(code, out, err))
      end)
    end
  end

  it("a host whose processes cleared their hooks still stops on SIGTERM", function()
    local d = S.tmpdir()
    local s = S.write("term.lua", [[
      local mb = require "moonbeam"
      for _ = 1, 4 do
        mb.spawn(function() debug.sethook() local x = 0 while true do x = x + 1 end end)
      end
      mb.sleep(50)
      local f = assert(io.open(arg[1], "w"))
      f:write("ready")
      f:close()
      mb.receive()
    ]], d)
    local ready = d .. "/ready"
    local code, out, err = S.sh(table.concat({
      S.q(S.bin) .. " --schedulers 2 " .. S.q(s) .. " " .. S.q(ready) .. " &",
      "p=$!",
      "i=0",
      "while [ ! -e " .. S.q(ready) .. " ] && [ $i -lt 300 ]; do sleep 0.02; i=$((i+1)); done",
      "kill -TERM $p",
      "i=0",
      "while kill -0 $p 2>/dev/null && [ $i -lt 500 ]; do sleep 0.02; i=$((i+1)); done",
      "kill -KILL $p 2>/dev/null",
      "wait $p",
      "echo \"rc=$?\"",
    }, "\n"))
    assert.are.equal(0, code, out .. err)
    assert.are.equal("rc=0\n", out, err)   -- the first process ended "shutdown"
  end)
end)

describe("debug hooks", function()
  teardown(S.cleanup_tmp)

  -- The same hook events as luajit -joff (the same interpreter), except that
  -- the scheduler's hook is never visible.
  local EVENTS = [[
local events = {}
local function hook(ev, line) events[#events + 1] = ev .. ":" .. tostring(line) end
local function work(n) local s = 0 for i = 1, n do s = s + i end return s end
print(debug.gethook())
debug.sethook(hook, "", 50)
work(1000)
debug.sethook()
print(#events, debug.gethook())
events = {}
debug.sethook(hook, "l")
work(3)
debug.sethook()
print(table.concat(events, " "))
events = {}
debug.sethook(hook, "cr")
work(1)
debug.sethook()
print(table.concat(events, " "))
local f = function() end
debug.sethook(f, "cl", 5)
local g, m, c = debug.gethook()
debug.sethook()
print(g == f, m, c, debug.gethook())
print(pcall(debug.sethook, hook))
print(pcall(debug.sethook, "x", "l"))
]]

  it("see the events they asked for, as in luajit; gethook shows only the user's hook", function()
    local s = S.write("events.lua", EVENTS)
    local lcode, lout, lerr = S.sh(LUAJIT .. " -joff " .. S.q(s))
    assert.are.equal(0, lcode, lerr)
    local code, out, err = S.moonbeam(S.q(s))
    assert.are.equal(0, code, err)
    assert.are.equal(lout, out)
    assert.is_true(S.has(out, "nil\t\t0\n"), out)
  end)

  it("set through a coroutine argument apply to the whole process, as in LuaJIT", function()
    local code, out, err = run([[
      local n = 0
      local co = coroutine.create(function() local s = 0 for i = 1, 1000 do s = s + i end end)
      debug.sethook(co, function() n = n + 1 end, "", 7)
      local h = debug.gethook()
      coroutine.resume(co)
      debug.sethook(co)
      print(h ~= nil, n > 100, debug.gethook())
    ]])
    assert.are.equal(0, code, err)
    assert.are.equal("true\ttrue\tnil\t\t0\n", out)
  end)
end)

describe("the FFI", function()
  teardown(S.cleanup_tmp)

  it("is a stand-in by default: ffi.cast raises instead of writing memory", function()
    local code, out, err = run([[
      local ffi = require "ffi"
      local ok, e = pcall(function() ffi.cast("int*", 16)[0] = 1 end)
      print(ok, e)
      print(pcall(function() return ffi.C.abort end))
      print(ffi.os, type(ffi.new))
    ]])
    assert.are.equal(0, code, story(code, out, err))
    assert.is_truthy(out:match("^false\t[^\n]*ffi%.cast: the FFI is off"), out)
    assert.is_true(S.has(out, "--allow-ffi"), out)
    assert.is_true(S.has(out, "ffi.C: the FFI is off"), out)
    assert.is_true(S.has(out, "Linux\tfunction"), out)
  end)

  it("that LuaJIT loads for a 64-bit literal stays hidden", function()
    local code, out, err = run([[
      local x = 1LL + loadstring("return 2LL")()
      print(tostring(x), package.loaded.ffi)
      local ffi = require "ffi"
      print(pcall(function() ffi.cast("int*", 16)[0] = 1 end))
    ]])
    assert.are.equal(0, code, story(code, out, err))
    assert.is_truthy(out:match("^3LL\tnil\nfalse\t[^\n]*ffi%.cast: the FFI is off"), out)
  end)

  it("that LuaJIT loads before the package library opened stays alive, hidden", function()
    -- LuaJIT keeps the module (and tables its C side points into) alive
    -- only through package.loaded; a crash at exit under a sanitizer's
    -- allocator if it was collected.
    local code, out, err = run([[
      local x = 5LL
      local loaded = package.loaded
      for _ = 1, 3 do collectgarbage() end
      local t = {}
      for i = 1, 1e4 do t[i] = { i } end
      print(tostring(x * 2), loaded.ffi, require("ffi").cast ~= nil)
    ]])
    assert.are.equal(0, code, story(code, out, err))
    assert.are.equal("10LL\tnil\ttrue\n", out)
  end)

  it("that a received function with 64-bit constants makes LuaJIT load stays hidden", function()
    local code, out, err = run([[
      local mb = require "moonbeam"
      local f = loadstring("return function() return 7LL end")()
      mb.spawn(function(g, parent)
        mb.send(parent, tostring(g()) .. " " .. tostring(package.loaded.ffi))
      end, f, mb.self())
      print(mb.receive(5000))
    ]])
    assert.are.equal(0, code, story(code, out, err))
    assert.are.equal("7LL nil\n", out)
  end)

  it("cannot be reached through package.loadlib", function()
    local code, out, err = run([[
      local f, msg, where = package.loadlib("libc.so.6", "abort")
      if f then f() end
      print(f, msg, where)
    ]])
    assert.are.equal(0, code, story(code, out, err))
    assert.is_truthy(out:match("^nil\tpackage.loadlib is off.*%-%-allow%-ffi.*\tabsent\n$"), out)
  end)

  it("cannot be reached through a C loader pointed at libluajit", function()
    local _, lib = S.sh("ldd " .. S.q(S.bin) .. " | awk '/libluajit/ { print $3 }'")
    lib = lib:gsub("%s+$", "")
    assert.is_true(lib ~= "", "libluajit not found in ldd " .. S.bin)
    local code, out, err = run([[
      package.cpath = arg[1]
      local ok, m = pcall(require, "x-ffi")
      if ok and type(m) == "table" and m.cast then m.cast("int*", 16)[0] = 1 end
      print(ok, m)
      ok, m = pcall(require, "x-debug")
      print(ok, m)
    ]], nil, S.q(lib))
    assert.are.equal(0, code, story(code, out, err))
    assert.is_truthy(out:match("^false\t[^\n]*LuaJIT's own library 'ffi' cannot be loaded"), out)
    assert.is_truthy(out:match("\nfalse\t[^\n]*LuaJIT's own library 'debug' cannot be loaded"), out)
  end)

  it("does not leak through string.buffer's raw pointers", function()
    local code, out, err = run([[
      local buffer = require "string.buffer"
      local b = buffer.new():put("abc")
      for _, f in ipairs {
        function() return b:ref() end,
        function() return b:reserve(8) end,
        function() return buffer.new():set(0x41414141LL, 1e6):tostring() end,
        function() return buffer.new():putcdata(0x41414141LL, 1e6):tostring() end,
      } do
        local ok, e = pcall(f)
        print(ok, (tostring(e):gsub("^.-string%.buffer", "string.buffer")))
      end
      print(buffer.new():set("xyz"):tostring(), buffer.decode(buffer.encode({ 1, "two" }))[2])
    ]])
    assert.are.equal(0, code, story(code, out, err))
    local lines = {}
    for l in out:gmatch("[^\n]+") do lines[#lines + 1] = l end
    assert.are.equal(5, #lines, out)
    for i = 1, 4 do
      assert.is_truthy(lines[i]:match("^false\tstring.buffer: raw pointers are off"), out)
    end
    assert.are.equal("xyz\ttwo", lines[5])
  end)

  it("works with --allow-ffi", function()
    local code, out, err = run([[
      local ffi = require "ffi"
      local p = ffi.new("int[2]", 5, 6)
      local f = package.loadlib("libc.so.6", "strlen")
      local b = require("string.buffer").new():put("abc")
      local ptr, len = b:ref()
      print(ffi.sizeof("int"), p[1], type(f), len, ffi.string(ptr, len))
    ]], "--allow-ffi")
    assert.are.equal(0, code, story(code, out, err))
    assert.are.equal("4\t6\tfunction\t3\tabc\n", out)
  end)
end)

describe("binary chunks", function()
  teardown(S.cleanup_tmp)

  it("are refused by every loader, with the message of Lua's mode 't'", function()
    local d = S.tmpdir()
    local code, out, err = run([[
      local dir = arg[1]
      local bc = string.dump(function() return "ran" end)
      local f = assert(io.open(dir .. "/bc.lua", "wb")) f:write(bc) f:close()
      f = assert(io.open(dir .. "/bcmod.lua", "wb")) f:write(bc) f:close()
      package.path = dir .. "/?.lua;" .. package.path
      -- One line per case (messages may hold newlines).
      local function show(...)
        local t = {}
        for i = 1, select("#", ...) do t[i] = (tostring((select(i, ...))):gsub("\n", " ")) end
        print(table.concat(t, "\t"))
      end
      local pieces = { bc:sub(1, 3), bc:sub(4) }
      show(select("#", load(bc)), (select(2, load(bc))))
      show((select(2, loadstring(bc))))
      show((select(2, load(function() return table.remove(pieces, 1) end))))
      show((select(2, load(bc, "=x", "bt"))))
      show((select(2, loadfile(dir .. "/bc.lua"))))
      show(pcall(dofile, dir .. "/bc.lua"))
      show(pcall(require, "bcmod"))
      show(load("return 'text'")())
    ]], nil, S.q(d))
    assert.are.equal(0, code, story(code, out, err))
    local lines = {}
    for l in out:gmatch("[^\n]+") do lines[#lines + 1] = l end
    assert.are.equal(8, #lines, out)
    assert.is_truthy(lines[1]:match("^2\tattempt to load a binary chunk"), out)
    for i = 2, 7 do
      assert.is_true(S.has(lines[i], "attempt to load a binary chunk"), "line " .. i .. ": " .. out)
    end
    assert.is_true(S.has(lines[7], "error loading module 'bcmod'"), out)
    assert.are.equal("text", lines[8])
  end)

  it("given as the script are refused with the same message", function()
    local d = S.tmpdir()
    local bc = S.write("mk.lua", [[
      local f = assert(io.open(arg[1], "wb"))
      f:write(string.dump(function() print("bytecode ran") end))
      f:close()
    ]], d)
    assert.are.equal(0, (S.sh(LUAJIT .. " " .. S.q(bc) .. " " .. S.q(d .. "/x.luac"))))
    local code, out, err = S.moonbeam(S.q(d .. "/x.luac"))
    assert.are.equal(1, code, story(code, out, err))
    assert.is_true(S.has(err, "attempt to load a binary chunk"), err)
    code, out, err = S.moonbeam("--allow-bytecode " .. S.q(d .. "/x.luac"))
    assert.are.equal(0, code, story(code, out, err))
    assert.are.equal("bytecode ran\n", out)
  end)

  it("with flipped bytes give an error, not a crash", function()
    local code, out, err = run([[
      local function subject(a, b)
        local t = { a, b, "str", 1.5, { x = 1 } }
        for i = 1, #t do if t[i] == b then return i end end
        return string.format("%s-%s", a, b)
      end
      local bc = string.dump(subject)
      local refused = 0
      for i = 1, #bc do
        for _, bits in ipairs { 0x01, 0x80, 0xff } do
          local bad = bc:sub(1, i - 1) .. string.char(bit.bxor(bc:byte(i), bits)) .. bc:sub(i + 1)
          local f, e = load(bad)
          if f == nil and tostring(e):find("attempt to load a binary chunk", 1, true) then
            refused = refused + 1
          elseif f then
            pcall(f, 1, 2)
          end
        end
      end
      print(#bc * 3 - refused, "not refused")
    ]])
    assert.are.equal(0, code, story(code, out, err))
    -- Every variant that still starts with the bytecode mark is refused; the
    -- ones whose first byte was flipped are text (and fail to parse).
    assert.are.equal("3\tnot refused\n", out)
  end)

  it("load with --allow-bytecode, and functions still travel in messages without it", function()
    local code, out, err = run([[
      print(load(string.dump(function() return "loaded" end))())
    ]], "--allow-bytecode")
    assert.are.equal(0, code, story(code, out, err))
    assert.are.equal("loaded\n", out)
    code, out, err = run([[
      local mb = require "moonbeam"
      local k = 41
      mb.spawn(function(parent) mb.send(parent, k + 1) end, mb.self())
      print(mb.receive(5000))
    ]])
    assert.are.equal(0, code, story(code, out, err))
    assert.are.equal("42\n", out)
  end)
end)

describe("debug.getregistry", function()
  teardown(S.cleanup_tmp)

  it("is refused (the registry holds the host's state), and allowed with --allow-ffi", function()
    local code, out, err = run([[print(pcall(debug.getregistry))]])
    assert.are.equal(0, code, story(code, out, err))
    assert.is_truthy(out:match("^false\t[^\n]*debug.getregistry is off.*%-%-allow%-ffi"), out)
    code, out, err = run([[print(type(debug.getregistry()))]], "--allow-ffi")
    assert.are.equal(0, code, story(code, out, err))
    assert.are.equal("table\n", out)
  end)
end)

describe("the JIT", function()
  teardown(S.cleanup_tmp)

  it("cannot be turned on, and says why", function()
    local code, out, err = run([[
      print(pcall(jit.on))
      print(pcall(jit.on, function() end, true))
      print(pcall(jit.attach, function() end, "bc"))
      print(pcall(require, "jit.profile"))
      jit.off() jit.flush() jit.opt.start(3)
      print(jit.status())
    ]])
    assert.are.equal(0, code, story(code, out, err))
    local lines = {}
    for l in out:gmatch("[^\n]+") do lines[#lines + 1] = l end
    assert.is_truthy(lines[1]:match("^false\t.*jit.on: the JIT is off in every Moonbeam process"), out)
    assert.is_truthy(lines[2]:match("^false\t.*jit.on: the JIT is off"), out)
    assert.is_truthy(lines[3]:match("^false\t.*jit.attach: refused"), out)
    assert.is_truthy(lines[4]:match("^false\t.*jit.profile' is off"), out)
    assert.is_truthy(lines[5]:match("^false"), out)
  end)
end)
