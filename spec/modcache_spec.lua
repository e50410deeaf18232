-- require's host-wide module cache (host/lib/modcache.c): a module file is
-- compiled once and loaded from its bytecode by every later process.
local mb = require "moonbeam"
local S = require "spec.support"

-- require(name) in a fresh process with dir on package.path; returns what
-- the module returned (copied back), or false and the error.
local function require_in_new_process(dir, name)
  local ok, res = S.probe(function(d, n)
    package.path = d .. "/?.lua;" .. package.path
    local ok2, v = pcall(require, n)
    return ok2, v
  end, dir, name)
  assert.is_true(ok, tostring(res))
  return res[1], res[2]
end

describe("the module cache", function()
  local before
  before_each(function() before = S.snapshot() end)
  after_each(function() S.check_clean(before) end)
  teardown(S.cleanup_tmp)

  it("gives every process the module, compiled once", function()
    local dir = S.tmpdir()
    S.write("cached_mod.lua", [[
      local M = {}
      function M.point(x, y) return { x = x, y = y, sum = x + y } end
      return M
    ]], dir)
    for _ = 1, 5 do
      local ok, p = S.probe(function(d)
        package.path = d .. "/?.lua;" .. package.path
        local m = require "cached_mod"
        local pt = m.point(2, 3)
        return pt.x, pt.y, pt.sum
      end, dir)
      assert.is_true(ok)
      assert.are.same({ 2, 3, 5 }, p)
    end
  end)

  it("sees a changed file within a second or so", function()
    local dir = S.tmpdir()
    S.write("changing_mod.lua", "return 'first'", dir)
    local ok, v = require_in_new_process(dir, "changing_mod")
    assert.is_true(ok)
    assert.are.equal("first", v)
    S.write("changing_mod.lua", "return 'second version'", dir)
    assert.is_true(S.eventually(function()
      local _, v2 = require_in_new_process(dir, "changing_mod")
      return v2 == "second version"
    end, 5000))
  end)

  it("finds a module made after a require of it failed, within a second or so", function()
    -- (that a name resolved to no file is remembered, as a file found is)
    local dir = S.tmpdir()
    local ok = require_in_new_process(dir, "made_late_mod")
    assert.is_false(ok)
    S.write("made_late_mod.lua", "return { late = true }", dir)
    assert.is_true(S.eventually(function()
      local ok2, v = require_in_new_process(dir, "made_late_mod")
      return ok2 and type(v) == "table" and v.late
    end, 5000))
  end)

  it("reports a missing module and a syntax error as require does", function()
    local dir = S.tmpdir()
    local ok, err = require_in_new_process(dir, "no_such_module_here")
    assert.is_false(ok)
    assert.is_true(S.has(err, "module 'no_such_module_here' not found"), err)
    assert.is_true(S.has(err, "no file '" .. dir .. "/no_such_module_here.lua'"), err)
    S.write("broken_mod.lua", "return {", dir)
    ok, err = require_in_new_process(dir, "broken_mod")
    assert.is_false(ok)
    assert.is_true(S.has(err, "error loading module 'broken_mod' from file"), err)
    assert.is_true(S.has(err, "broken_mod.lua"), err)
    -- Fixed, it loads (a failed compile caches nothing).
    S.write("broken_mod.lua", "return { fixed = true }", dir)
    assert.is_true(S.eventually(function()
      local ok2, v = require_in_new_process(dir, "broken_mod")
      return ok2 and type(v) == "table" and v.fixed
    end, 5000))
  end)

  it("keeps the file's name in tracebacks of cached code", function()
    local dir = S.tmpdir()
    S.write("erring_mod.lua", "return function() error('from the module') end", dir)
    for _ = 1, 2 do
      local ok, res = S.probe(function(d)
        package.path = d .. "/?.lua;" .. package.path
        local f = require "erring_mod"
        local ok2, e = pcall(f)
        return e
      end, dir)
      assert.is_true(ok)
      assert.is_true(S.has(res[1], "erring_mod.lua:1: from the module"), res[1])
    end
  end)
  it("serves require before the package library opens, as require would", function()
    -- A process that has not touched `package` requires through the module
    -- cache on the default package.path (./?.lua here: the child host runs
    -- in dir) without opening the package library (host/lib/lstate.c,
    -- "require before the package library").
    local dir = S.tmpdir()
    S.write("lr_a.lua", "local name = ... return { name = name, b = require 'lr_b' }", dir)
    S.write("lr_b.lua", "return nil", dir)
    S.write("lr_c.lua", "return require 'lr_d'", dir)
    S.write("lr_d.lua", "return require 'lr_c'", dir)
    assert.are.equal(0, S.sh("mkdir " .. S.q(dir .. "/sub")))
    S.write("lr_e.lua", "return 'found on the new path'", dir .. "/sub")
    S.write("main.lua", [[
      local mb = require "moonbeam"
      mb.spawn(function(parent)
        local out = {}
        local function put(k, v) out[#out + 1] = k .. "=" .. tostring(v) end
        local req = require
        local a = require "lr_a"
        put("a", a.name .. "," .. tostring(a.b))
        put("tcp", type(require("moonbeam.tcp").connect))
        put("same_mb", require "moonbeam" == mb)
        local ok, err = pcall(require, "lr_c")
        put("loop", not ok and err:match("loop or previous error loading module 'lr_c'") ~= nil)
        local _ = table.insert     -- the table library adds table.new to preload
        put("preload", type(require "table.new"))
        put("no_package", rawget(_G, "package") == nil)
        -- Now anything else opens the library, and its require answers.
        put("string", require "string" == string)
        ok, err = pcall(require, "lr_nope")
        put("missing", not ok and err:match("module 'lr_nope' not found:") ~= nil)
        put("loaded", package.loaded.lr_a == a and package.loaded.lr_b == true)
        package.path = "./sub/?.lua;" .. package.path
        put("new_path", req "lr_e")
        mb.send(parent, table.concat(out, " "))
      end, mb.self())
      print(mb.receive(10000))
    ]], dir)
    local code, out, err = S.moonbeam("main.lua", dir, 60)
    assert.are.equal(0, code, err)
    for _, want in ipairs({ "a=lr_a,true", "tcp=function", "same_mb=true", "loop=true",
                            "preload=function", "no_package=true", "string=true",
                            "missing=true", "loaded=true", "new_path=found on the new path" }) do
      assert.is_true(S.has(out, want), want .. " in: " .. out)
    end
  end)
  it("finds a module among many templates, and lists them all when it is missing", function()
    -- The list of files tried outgrows one buffer of the C search (8 KB).
    local dir = S.tmpdir()
    S.write("far_mod.lua", "return 'found last'", dir)
    local ok, res = S.probe(function(d)
      local t = {}
      for i = 1, 300 do t[i] = "/nonexistent/moonbeam-spec-template-" .. i .. "/?.lua" end
      t[#t + 1] = d .. "/?.lua"
      package.path = table.concat(t, ";")
      local ok1, v = pcall(require, "far_mod")
      local ok2, e = pcall(require, "far_mod_missing")
      return ok1, v, ok2, e
    end, dir)
    assert.is_true(ok, tostring(res))
    assert.are.same({ true, "found last", false }, { res[1], res[2], res[3] })
    local err = res[4]
    assert.is_true(#err > 8192, #err)
    assert.is_true(S.has(err, "no file '/nonexistent/moonbeam-spec-template-1/far_mod_missing.lua'"), err)
    assert.is_true(S.has(err, "no file '/nonexistent/moonbeam-spec-template-300/far_mod_missing.lua'"), err)
    assert.is_true(S.has(err, "no file '" .. dir .. "/far_mod_missing.lua'"), err)
  end)

  it("loads a cached module, or a loaded C module, with every file descriptor taken", function()
    -- A server at its limit of connections: its processes' require of a
    -- module already compiled, or of a C module the host has loaded, must
    -- not need a descriptor (it found nothing when the search opened each
    -- candidate); one not compiled or loaded yet says why it cannot be
    -- read. A child host with a limit of 64 descriptors.
    local dir = S.tmpdir()
    S.write("fd_mod.lua", "return { answer = 42 }", dir)
    S.write("fd_new.lua", "return 'compiled late'", dir)
    S.write("main.lua", [[
      local mb = require "moonbeam"
      package.path = ]] .. string.format("%q", dir .. "/?.lua;") .. [[ .. package.path
      local function in_process(name)
        local ok, down = mb.spawn_monitor(function(parent, n)
          local ok1, v = pcall(require, n)
          mb.send(parent, { ok = ok1, v = type(v) == "table" and (v.answer or "table") or v })
        end, mb.self(), name)
        local m = mb.receive(function(m) return type(m) == "table" and m.ok ~= nil end, 10000)
        return m and tostring(m.ok) .. ":" .. tostring(m.v) or "none"
      end
      print("before", in_process("fd_mod"))
      print("c_before", in_process("lfs"))   -- lua-filesystem, a dependency of busted
      local files = {}
      for i = 1, 1000 do
        local f = io.open("/dev/null")
        if not f then break end
        files[i] = f
      end
      print("full", io.open("/dev/null") == nil)
      print("searchpath", package.searchpath("fd_mod", package.path) ~= nil,
            package.searchpath("lfs", package.cpath) ~= nil)
      print("cached", in_process("fd_mod"))
      mb.sleep(1200)   -- past the second a resolved name is trusted
      print("cached_later", in_process("fd_mod"))
      print("missing", in_process("fd_absent"))
      print("uncompiled", in_process("fd_new"))
      print("c_loaded", in_process("lfs"))
      print("c_unloaded", in_process("term.core"))   -- lua-term's, not loaded yet
      for _, f in ipairs(files) do f:close() end
      print("after", in_process("fd_new"))
    ]], dir)
    local code, out, err = S.sh("ulimit -n 64; " .. S.q(S.bin) .. " main.lua", dir, 60)
    assert.are.equal(0, code, err)
    for _, want in ipairs({ "before\ttrue:42", "full\ttrue", "searchpath\ttrue\ttrue", "cached\ttrue:42",
                            "cached_later\ttrue:42", "after\ttrue:compiled late",
                            "c_before\ttrue:table", "c_loaded\ttrue:table",
                            "c_unloaded\tfalse:error loading module 'term.core' from file '" }) do
      assert.is_true(S.has(out, want), want .. " in: " .. out)
    end
    assert.is_true(S.has(out, "missing\tfalse:module 'fd_absent' not found:"), out)
    assert.is_true(S.has(out, "uncompiled\tfalse:"), out)
    assert.is_true(S.has(out, "fd_new.lua: Too many open files"), out)
  end)
end)
