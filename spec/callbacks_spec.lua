-- Lua that table.sort and string.gsub call (host/lib/tablib.c, strmatch.c):
-- a comparator, an element's __lt, a replacement function or table; and a
-- module's top level, which require runs (host/lib/lstate.c), also for a
-- process spawned by module name (lib_mb.c). They give LuaJIT's results,
-- in LuaJIT's order of calls, and its errors at the same lines; and the
-- process can be preempted, wait and be killed in the Lua they call, as
-- anywhere else. The cases that would hang a host without that run in a
-- child host, bounded in time.
local mb = require "moonbeam"
local S = require "spec.support"

local child = S.child

-- The same text from the host and from luajit, line by line.
local function same_as_luajit(src, args, limit)
  local path = S.write("differential.lua", src)
  local c1, mine, e1 = S.moonbeam(S.q(path) .. " " .. (args or ""), nil, limit or 120)
  local c2, theirs, e2 = S.sh("luajit -joff " .. S.q(path) .. " " .. (args or ""), nil, limit or 120)
  assert.are.equal(0, c1, e1)
  assert.are.equal(0, c2, e2)
  local a = mine:gmatch("[^\n]*")
  for l2 in theirs:gmatch("[^\n]*") do assert.are.equal(l2, a()) end
  assert.is_nil(a())
  return mine
end

-- Random sorts: arrays with ties and holes, comparators right and wrong
-- (one draws from the same generator, so any difference in the order of
-- the calls shows), elements with __lt, tables with metatables; each one's
-- outcome, error and resulting array (after an error too).
local sorts = [=[
local seed, N = tonumber(arg[1]), tonumber(arg[2])
local x = seed
local function rnd(n) x = x * 16807 % 2147483647; return x % n + 1 end
local lt = {__lt = function(a, b) return a.v < b.v end}
local gt = {__lt = function(a, b) return a.v > b.v end}
local comps = {
  function(a, b) return a < b end,
  function(a, b) return a > b end,
  function(a, b) return a <= b end,
  function() return true end,
  function() return false end,
  function(a, b) return a % 3 < b % 3 end,
  function() return rnd(2) == 1 end,
  function(a, b) return (a or -1) < (b or -1) end,
  function(a, b) if a == 7 then error("seven") end return a < b end,
  function(a, b) return a < b and 1 or nil end,
}
local function show(t, n)
  local o = {}
  for i = 1, n do
    local v = rawget(t, i)
    o[i] = type(v) == "table" and "o" .. tostring(v.v) or tostring(v)
  end
  return table.concat(o, " ")
end
for case = 1, N do
  local n, kind = rnd(12) - 1, rnd(6)
  local t, comp = {}, nil
  for i = 1, n do t[i] = rnd(9) end
  if kind <= 3 then
    comp = comps[rnd(#comps)]
    if kind == 3 and n > 2 then t[rnd(n)] = nil end
  elseif kind == 4 then
    for i = 1, n do t[i] = setmetatable({v = t[i]}, lt) end
  elseif kind == 5 then
    for i = 1, n do t[i] = setmetatable({v = t[i]}, rnd(4) == 1 and gt or lt) end
  else
    comp = comps[rnd(3)]
    setmetatable(t, {__index = function() return 0 end, __newindex = function() error("set") end})
  end
  local ok, err = pcall(function() table.sort(t, comp) end)
  err = tostring(err):gsub("^table%.sort:%d+: ", "")   -- see below
  print(case, ok, ok or err, show(t, n))
end
]=]

describe("Lua called by table.sort and string.gsub", function()
  teardown(S.cleanup_tmp)

  it("sorts as LuaJIT does: the same calls, results and errors", function()
    -- The one difference: comparing elements without a comparator raises
    -- in table.sort's own Lua where an element's __lt is a Lua function
    -- ("table.sort:0: attempt to compare ..."); LuaJIT's message has no
    -- position. The script strips that prefix.
    local out = same_as_luajit(sorts, "11 4000")
    assert.is_true(S.has(out, "invalid order function for sorting"))
    assert.is_true(S.has(out, "seven"))
    assert.is_true(S.has(out, "attempt to compare"))
  end)

  it("raise LuaJIT's errors at the caller's line", function()
    same_as_luajit([[
      local function try(f) print(select(2, pcall(f))) end
      try(function() table.sort({3, 2, 1}, function() return true end) end)
      try(function() table.sort({5, 4, 3, 2, 1}, function() return true end) end)
      try(function() table.sort(nil) end)
      try(function() table.sort({2, 1}, 3) end)
      try(function() local sort = table.sort; sort({2, 1}, {}) end)
      try(function() table.sort({{}, {}}) end)
      try(function() local r = ("abc"):gsub("%w", function() return {} end) end)
      try(function() local r = ("abc"):gsub("%w", {a = true}) end)
      try(function() local r = ("abc"):gsub("(%w", function() end) end)
      try(function() local r = ("abc"):gsub("[a", {}) end)
      try(function() local r = string.gsub(nil, "x", function() end) end)
      try(function() local r = string.gsub("x", "x", function() end, "n") end)
      try(function() local r = string.gsub("x", "x", function() error("mine") end) end)
      try(function()
        local r = string.gsub("x", "x", function()
          error(setmetatable({}, {__tostring = function() return "an object" end}))
        end)
      end)
      print(("a b c"):gsub("%w", function(c) if c ~= "b" then return c:upper() end end, 2))
      print(string.gsub(123, 2, {["2"] = 5}))
      print(string.gsub(123, 2, function() return 5 end))
      print(("ab"):gsub("%w", function(c)   -- a gsub inside one
        return (c:rep(2):gsub("%w", function(d) return d:upper() end))
      end))
      print(("a1b2"):gsub("%d", setmetatable({}, {__index = function(_, k) return k + 1 end})))
      print(("x"):rep(300):gsub("x", function() return "yy" end))   -- past the first buffer
    ]])
  end)

  it("let the comparator or replacement wait, and run the rest in its place", function()
    local code, out, err = child([[
      local mb = require "moonbeam"
      local me = mb.self()
      local dict = mb.spawn(function()
        while true do
          local m = mb.receive()
          mb.send(m.from, m.word:upper())
        end
      end)
      local t = {5, 1, 4, 2, 3}
      table.sort(t, function(a, b) mb.sleep(0) return a < b end)
      print("sorted", table.concat(t, " "))
      local objs = {}
      local mt = {__lt = function(a, b) mb.yield() return a.v < b.v end}
      for i = 1, 6 do objs[i] = setmetatable({v = (i * 5) % 7}, mt) end
      table.sort(objs)
      local vs = {}
      for i, o in ipairs(objs) do vs[i] = o.v end
      print("by __lt", table.concat(vs, " "))
      print("asked", (("one two three"):gsub("%a+", function(w)
        mb.send(dict, {from = me, word = w})
        return mb.receive(5000)
      end)))
      print("looked up", (("a-b"):gsub("%a", setmetatable({}, {__index = function(_, k)
        mb.send(dict, {from = me, word = k})
        return mb.receive(5000)
      end}))))
      local co = coroutine.wrap(function()   -- a user coroutine's yield, where LuaJIT raises
        local u = {3, 1, 2}
        table.sort(u, function(a, b) coroutine.yield("in sort") return a < b end)
        return table.concat(u, " ")
      end)
      local r repeat r = co() until r ~= "in sort"
      print("yielded", r)
      os.exit(0)
    ]], "--schedulers 1", 60)
    assert.are.equal(0, code, out .. err)
    assert.is_true(S.has(out, "sorted\t1 2 3 4 5\n"), out)
    assert.is_true(S.has(out, "by __lt\t1 2 3 4 5 6\n"), out)
    assert.is_true(S.has(out, "asked\tONE TWO THREE\n"), out)
    assert.is_true(S.has(out, "looked up\tA-B\n"), out)
    assert.is_true(S.has(out, "yielded\t1 2 3\n"), out)
  end)

  it("leave the scheduler to others while the Lua they call loops, and end at kill", function()
    -- One scheduler: the echo answers only if the loops are preempted.
    local code, out, err = child([[
      local mb = require "moonbeam"
      local function spin() while true do end end
      local bodies = {
        comparator = function() table.sort({3, 2, 1}, spin) end,
        lt = function()
          local mt = {__lt = spin}
          table.sort({setmetatable({}, mt), setmetatable({}, mt)})
        end,
        gsub_function = function() string.gsub("abc", "%w", spin) end,
        gsub_table = function() string.gsub("abc", "%w", setmetatable({}, {__index = spin})) end,
        pcall_inside = function()
          table.sort({3, 2, 1}, function() while true do pcall(spin) end end)
        end,
      }
      local refs = {}
      for name, body in pairs(bodies) do refs[name] = {mb.spawn_monitor(body)} end
      ]] .. S.PONGS .. [[
      pongs(20)
      for name, r in pairs(refs) do
        mb.exit(r[1], "kill")
        local m = mb.receive(function(m) return type(m) == "table" and m.ref == r[2] end, 10000)
        print(name, m and m.reason or "still running")
      end
      os.exit(0)
    ]], "--schedulers 1", 60)
    assert.are.equal(0, code, out .. err)
    assert.is_true(S.has(out, "pongs\t20\n"), out .. err)
    for _, name in ipairs({"comparator", "lt", "gsub_function", "gsub_table", "pcall_inside"}) do
      assert.is_true(S.has(out, name .. "\tkilled\n"), out .. err)
    end
    assert.is_false(S.has(err, "WATCHDOG"), err)
  end)

  it("are given, with what they make, to each process anew", function()
    -- The process before on the same state (one scheduler) reached the
    -- Lua sort's own functions (level 2 from the comparator) and gsub's.
    local code, out, err = child([[
      local mb = require "moonbeam"
      local function run(f)
        local _, r = mb.spawn_opt({monitor = true}, f)
        return mb.receive(function(m) return type(m) == "table" and m.ref == r end, 10000).reason
      end
      print("first", run(function()
        table.sort({3, 2, 1}, function(a, b)
          getfenv(2).leak = "sort"
          setfenv(2, {})
          return a < b
        end)
        string.gsub("a", "a", function() getfenv(2).leak2 = "gsub" end)
        setfenv(table.sort, {})
        setfenv(string.gsub, {})
        setfenv(require, {})
      end))
      local me = mb.self()
      mb.spawn(function()
        local seen = {}
        table.sort({3, 2, 1}, function(a, b)
          seen[#seen + 1] = tostring(getfenv(2) == _G) .. tostring(getfenv(2).leak)
          return a < b
        end)
        string.gsub("a", "a", function() seen[#seen + 1] = tostring(getfenv(2).leak2) end)
        seen[#seen + 1] = tostring(getfenv(table.sort) == _G and getfenv(string.gsub) == _G and
                                   getfenv(require) == _G)
        mb.send(me, seen[1] .. " " .. seen[#seen - 1] .. " " .. seen[#seen])
      end)
      print("second", mb.receive(10000))
      os.exit(0)
    ]], "--schedulers 1", 60)
    assert.are.equal(0, code, out .. err)
    assert.is_true(S.has(out, "first\tnormal\n"), out .. err)
    assert.is_true(S.has(out, "second\ttruenil nil true\n"), out .. err)
  end)
end)

describe("require", function()
  teardown(S.cleanup_tmp)

  -- Modules in the child's directory (./?.lua is on the default path).
  local dir
  before_each(function() dir = S.tmpdir() end)
  local function modules(list)
    for name, src in pairs(list) do S.write(name .. ".lua", src, dir) end
  end
  local function run(src, opts)
    local path = S.write("child.lua", src, dir)
    return S.moonbeam((opts or "") .. " " .. S.q(path), dir, 60)
  end

  it("is named in a traceback through it, before and after the package library opens", function()
    local code, out, err = run([[
      local mb = require "moonbeam"
      local me = mb.self()
      mb.spawn(function()   -- a new process: require's light path, then the library
        local _, tb = xpcall(function() require "mbspec_no_such_module" end, debug.traceback)
        mb.send(me, tb)
      end)
      print(mb.receive(5000))
      local _, tb = xpcall(function() require(nil) end, debug.traceback)
      print(tb)
    ]])
    assert.are.equal(0, code, err)
    local _, n = out:gsub("%[C%]: in function 'require'", "")
    assert.are.equal(2, n, out)
    assert.is_nil(out:find("in function ''", 1, true), out)
  end)

  it("gives LuaJIT's results and errors, before and after the package library opens", function()
    modules({
      loopa = 'return require "loopb"',
      loopb = 'local r = require "loopa"; return r',
      bad = 'error("bad module")',
      nilret = 'x_loaded = (x_loaded or 0) + 1',
      selfset = 'package.loaded[...] = "set by itself"',
      args = 'return {...}',
      twice = 'return "first", "second"',
    })
    local src = [[
      local function try(f) local r = {pcall(f)} for i = 1, #r do r[i] = tostring(r[i]) end print(table.concat(r, " | ")) end
      local function cases(phase)
        print(phase)
        try(function() local r = require() return r end)
        try(function() local r = require(nil) return r end)
        try(function() local r = require({}) return r end)
        try(function() local r = require("loopa" .. phase) return r end)
        try(function() local r = require("bad" .. phase) return r end)
        try(function() local r = require("bad" .. phase) return r end)
        try(function() return require("nilret" .. phase), require("nilret" .. phase), x_loaded end)
        try(function() return require("selfset" .. phase) end)
        try(function() local t = require("args" .. phase) return #t, t[1], t[2] end)
        try(function() return require("twice" .. phase) end)
        try(function() return require("string") == string, require("os") == os end)
        x_loaded = nil
      end
      cases("")
      package.path = "./?.lua"   -- opens the package library
      for _, m in ipairs({"loopa", "loopb", "bad", "nilret", "selfset", "args", "twice"}) do
        local f = io.open(m .. ".lua") local s = f:read("*a") f:close()
        f = io.open(m .. "2.lua", "w") f:write((s:gsub('"loop(%a)"', '"loop%\1" .. "2"'))) f:close()
      end
      cases("2")
      try(function() local r = require("nosuch") return r end)
      try(function() local r = require(5) return r end)
      local loaders = package.loaders
      package.loaders = nil
      try(function() local r = require("zzz") return r end)
      package.loaders = {
        function(n) return "\n\tfirst " .. n end,
        function() return 42 end,
        function(n) return function(...) return "loaded " .. select("#", ...) .. " " .. tostring(...) end end,
      }
      try(function() local r = require("zzz") return r end)
      package.loaders = loaders
      try(function() return require("zzz") end)
    ]]
    local path = S.write("differential.lua", src, dir)
    local c1, mine, e1 = S.moonbeam(S.q(path), dir, 60)
    local c2, theirs, e2 = S.sh("luajit -joff " .. S.q(path), dir, 60)
    assert.are.equal(0, c1, e1)
    assert.are.equal(0, c2, e2)
    assert.are.equal(theirs, mine)
    assert.is_true(S.has(mine, "loop or previous error loading module 'loopa'"), mine)
    assert.is_true(S.has(mine, "module 'nosuch' not found:"), mine)
    assert.is_true(S.has(mine, "loaded 1 zzz"), mine)
  end)

  it("runs a module's top level as the process's Lua: it waits, is preempted and is killed", function()
    modules({
      waiting = [[
        local mb = require "moonbeam"
        return {got = mb.receive(10000)}
      ]],
      waiting_body = [[
        local mb = require "moonbeam"
        local got = mb.receive(10000)
        return function(parent, x) mb.send(parent, {body = got, x = x}) end
      ]],
      spinning = "while true do end",
      not_a_function = "return 42",
    })
    -- One scheduler: the echo answers only if the loops are preempted.
    local code, out, err = run([[
      local mb = require "moonbeam"
      local me = mb.self()
      local w = mb.spawn(function() mb.send(me, {mod = require("waiting").got}) end)
      local b = mb.spawn("waiting_body", me, 7)
      mb.sleep(20)
      mb.send(w, "to the module")
      mb.send(b, "to the body's module")
      print("required", mb.receive(function(m) return m.mod end, 10000).mod)
      local r = mb.receive(function(m) return m.body end, 10000)
      print("spawned", r.body, r.x)
      local spins = {
        {mb.spawn_monitor(function() require "spinning" end)},
        {mb.spawn_monitor("spinning")},
        {mb.spawn_monitor(function() pcall(require, "spinning") end)},
      }
      ]] .. S.PONGS .. [[
      pongs(20)
      for i, s in ipairs(spins) do
        mb.exit(s[1], "kill")
        local m = mb.receive(function(m) return type(m) == "table" and m.ref == s[2] end, 10000)
        print("spin", i, m and m.reason or "still running")
      end
      local _, ref = mb.spawn_monitor("not_a_function")
      print("bad", mb.receive(function(m) return type(m) == "table" and m.ref == ref end, 10000).reason)
      os.exit(0)
    ]], "--schedulers 1")
    assert.are.equal(0, code, out .. err)
    assert.is_true(S.has(out, "required\tto the module\n"), out .. err)
    assert.is_true(S.has(out, "spawned\tto the body's module\t7\n"), out .. err)
    assert.is_true(S.has(out, "pongs\t20\n"), out .. err)
    for i = 1, 3 do assert.is_true(S.has(out, "spin\t" .. i .. "\tkilled\n"), out .. err) end
    assert.is_true(S.has(out, "bad\tspawn: module 'not_a_function' returned number, not a function\n"),
                   out .. err)
    assert.is_false(S.has(err, "WATCHDOG"), err)
  end)
end)
