-- Where a process behaves as luajit does (compared with /usr/bin/luajit
-- where it can be): coroutines, the main chunk, strings' metatable; and
-- what a process gets of its own: its random sequence, write_file's clean-up
-- of a killed host's temporary files.
local mb = require "moonbeam"
local S = require "spec.support"

local LUAJIT = "/usr/bin/luajit"

-- Run src as a script under luajit and under moonbeam; return both results.
local function both(src)
  local s = S.write("both.lua", src)
  local lc, lo, le = S.sh(LUAJIT .. " " .. S.q(s))
  local mc, mo, me = S.moonbeam(S.q(s))
  return { code = lc, out = lo, err = le }, { code = mc, out = mo, err = me }
end

describe("as in luajit", function()
  local before
  before_each(function() before = S.snapshot() end)
  after_each(function() S.check_clean(before) end)
  teardown(S.cleanup_tmp)

  it("coroutine.resume and wrap refuse running, normal and dead coroutines", function()
    local lj, m = both([[
      local co; co = coroutine.create(function() print("self", coroutine.resume(co)) end)
      print("outer", coroutine.resume(co))
      local a; a = coroutine.create(function()
        local b = coroutine.create(function() print("normal", coroutine.resume(a)) end)
        print("b", coroutine.resume(b))
      end)
      print("a", coroutine.resume(a))
      local w; w = coroutine.wrap(function() local x = w(); return x end)
      print("wrap self", pcall(w))
      local e = coroutine.create(function() error("x", 0) end)
      print("error", coroutine.resume(e))
      print("after error", coroutine.resume(e))
      local d = coroutine.wrap(function() end)
      d()
      print("dead wrap", pcall(d))
      local g = coroutine.wrap(function(x) local y = coroutine.yield(x + 1) return y * 2 end)
      print("values", g(1), g(5))
      print("bad", pcall(function() local ok, e = coroutine.resume(42) return ok, e end))
    ]])
    assert.are.equal(0, lj.code, lj.err)
    assert.are.equal(0, m.code, m.err)
    assert.are.equal(lj.out, m.out)
  end)

  it("the main chunk is not a coroutine: running() is nil, yield raises", function()
    local lj, m = both([[
      print("running", coroutine.running())
      print("yield", pcall(coroutine.yield, 1))
      print("hook", debug.gethook())
      coroutine.yield()
      print("not reached")
    ]])
    assert.are.equal(1, lj.code)
    assert.are.equal(1, m.code)
    assert.are.equal(lj.out, m.out)
    local want = lj.err:match("^[^:]*luajit: ([^\n]*)")
    assert.is_truthy(want, lj.err)
    assert.is_true(S.has(m.err, want), m.err)
  end)

  it("a process body is a main chunk too", function()
    local ok, r = S.probe(function()
      local inner = coroutine.wrap(function() return coroutine.running() ~= nil end)()
      local yok, yerr = pcall(coroutine.yield)
      return coroutine.running() == nil, inner, yok, yerr, select("#", debug.gethook())
    end)
    assert.is_true(ok, tostring(r))
    assert.are.same({ true, true, false, "attempt to yield across C-call boundary", 3 }, r)
  end)

  it("strings index the string table from the start", function()
    local lj, m = both([[
      local mt = getmetatable("")
      print(type(mt.__index), rawequal(mt.__index, string))
      getmetatable("").__index.shout = function(s) return s:upper() .. "!" end
      print(("hi"):shout(), string.shout ~= nil, rawequal(getmetatable("").__index, string))
    ]])
    assert.are.equal(0, lj.code, lj.err)
    assert.are.equal(0, m.code, m.err)
    assert.are.equal(lj.out, m.out)
    local ok, r = S.probe(function()
      local t = getmetatable("").__index
      return type(t), rawequal(t, string), ("x"):rep(3), rawequal(getmetatable("").__index, t)
    end)
    assert.is_true(ok, tostring(r))
    assert.are.same({ "table", true, "xxx", true }, r)
  end)

  it("print converts as luajit's, and writes each line whole though processes print at once", function()
    local src = [[
      print(1, nil, true, "x", 2.5, "")
      print()
      print(setmetatable({}, {__tostring = function() return "obj" end}))
      print(pcall(print, setmetatable({}, {__tostring = function() return 1 end})))
      print(pcall(print, setmetatable({}, {__tostring = function() return {} end})))
      local t = {} for i = 1, 7000 do t[i] = i end
      print(unpack(t, 1, 300))
      print(unpack(t))
      tostring = function(v) return "<" .. type(v) .. ">" end
      print(1, "a")
    ]]
    local lj, m = both(src)
    assert.are.equal(0, lj.code, lj.err)
    assert.are.equal(0, m.code, m.err)
    assert.are.equal(lj.out, m.out)
    -- Two schedulers, four processes printing lines of many pieces: each
    -- line comes out whole (LuaJIT's print writes piece by piece).
    local code, out, err = S.moonbeam("--schedulers 2 " .. S.q(S.write("prints.lua", [[
      local mb = require "moonbeam"
      local me = mb.self()
      for p = 1, 4 do
        mb.spawn(function()
          for i = 1, 5000 do print("line", p, i, "a", "b", "c", "d", "end") end
          mb.send(me, p)
        end)
      end
      for _ = 1, 4 do mb.receive(10000) end
    ]])), nil, 60)
    assert.are.equal(0, code, err)
    local n = 0
    for line in out:gmatch("[^\n]*\n") do
      n = n + 1
      assert.is_truthy(line:match("^line\t%d\t%d+\ta\tb\tc\td\tend\n$"), line)
    end
    assert.are.equal(20000, n)
  end)
end)

describe("each process", function()
  local before
  before_each(function() before = S.snapshot() end)
  after_each(function() S.check_clean(before) end)
  teardown(S.cleanup_tmp)

  it("draws its own math.random sequence, and math.randomseed(x) gives luajit's", function()
    local me = mb.self()
    for i = 1, 20 do
      mb.spawn(function(parent, n)
        local r = math.random(1, 1e9)
        math.randomseed(42)
        mb.send(parent, { rnd = n, first = r, seeded = math.random(1, 1e9) })
      end, me, i)
    end
    local firsts, seeded = {}, {}
    for _ = 1, 20 do
      local m = S.recv(function(x) return type(x) == "table" and x.rnd end)
      firsts[m.first] = true
      seeded[m.seeded] = true
    end
    local distinct = 0
    for _ in pairs(firsts) do distinct = distinct + 1 end
    assert.are.equal(20, distinct)
    local _, want = S.sh(LUAJIT .. " -e 'math.randomseed(42) print(math.random(1, 1e9))'")
    local only = next(seeded)
    assert.is_nil(next(seeded, only))
    assert.are.equal(want, tostring(only) .. "\n")
  end)

  it("removes a killed host's stale temporaries beside the path it writes", function()
    local fs = require "moonbeam.fs"
    local dir = S.tmpdir()
    local _, dead = S.sh("sh -c 'echo $$'")
    dead = tonumber(dead)
    local names = {
      stale = "data.tmp." .. dead .. ".1",       -- writer gone, old: removed
      fresh = "data.tmp." .. dead .. ".2",       -- writer gone, just written: kept
      live = "data.tmp.1.3",                     -- writer alive (pid 1): kept
      other = "other.tmp." .. dead .. ".1",      -- another path's: kept
      odd = "data.tmp." .. dead .. ".x",         -- not write_file's name: kept
    }
    for _, n in pairs(names) do assert(fs.write_file(dir .. "/" .. n, "old")) end
    for _, k in ipairs { "stale", "live", "other", "odd" } do
      assert.are.equal(0, (S.sh("touch -d '-2 minutes' " .. S.q(dir .. "/" .. names[k]))))
    end
    assert.is_true(fs.write_file(dir .. "/data", "new"))
    local left = {}
    for _, n in ipairs(assert(fs.list_dir(dir))) do left[n] = true end
    assert.is_nil(left[names.stale])
    for _, k in ipairs { "fresh", "live", "other", "odd" } do
      assert.is_true(left[names[k]], k .. " should stay")
    end
    assert.are.equal("new", fs.read_file(dir .. "/data"))
  end)
end)
