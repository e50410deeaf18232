-- Reused states: the state of a process that returned or hibernated serves
-- the next spawn or wake on its scheduler (host/lib/lstate.c, "Reused
-- states"). Nothing of the old process may reach the new one. Each case
-- runs in a child host with one scheduler, so that the second process
-- takes the first one's state.
local S = require "spec.support"

local PRELUDE = [[
local mb = require "moonbeam"
-- Spawn f (with opts), wait for its end; its reason.
local function run(opts, f, ...)
  opts.monitor = true
  local _, r = mb.spawn_opt(opts, f, ...)
  local m = mb.receive(function(m) return type(m) == "table" and m.ref == r end, 10000)
  return m and m.reason
end
-- Spawn f, which answers one message: that answer.
local function ask(f)
  local me = mb.self()
  mb.spawn(function() mb.send(me, { answer = f() }) end)
  local m = mb.receive(function(m) return type(m) == "table" and m.answer ~= nil end, 10000)
  return m and m.answer
end
-- The same, then wait for its end: its state is back in the pool then (a
-- process that answered may not have ended yet when the next one spawns).
local function ask_done(f)
  local me = mb.self()
  local _, r = mb.spawn_opt({ monitor = true }, function() mb.send(me, { answer = f() }) end)
  local m = mb.receive(function(x) return type(x) == "table" and x.answer ~= nil end, 10000)
  mb.receive(function(x) return type(x) == "table" and x.ref == r end, 10000)
  return m and m.answer
end
]]

local function child(src)
  local path = S.write("reuse.lua", PRELUDE .. src)
  return S.moonbeam("--schedulers 1 " .. S.q(path), nil, 60)
end

describe("reused states", function()
  teardown(S.cleanup_tmp)

  it("are reused, and nothing of the old process reaches the new one", function()
    local code, out, err = child([[
      print("A", run({}, function()
        leaked = "global"
        local _ = tostring(mb.self())   -- the pid kind's tables made
        getmetatable("").__index.evil = "string method"
        string.upper = nil
        package.loaded.leak = true
        collectgarbage("setpause", 100000)
        collectgarbage("stop")
        local junk = string.rep("j", 8000)    -- left as garbage
        return
      end))
      local r = ask(function()
        -- what this process sees at birth: the old one's garbage, if any
        local kb = collectgarbage("count")
        local t = {
          kb = kb,
          leaked = tostring(leaked),
          evil = tostring(("x").evil),
          upper = ("x"):upper(),
          loaded = tostring(package.loaded.leak),
          -- ids' metatables and intern tables are kept: still opaque
          pid = tostring(mb.self()):match("^<%d+%.%d+%.%d+>$") ~= nil
            and mb.self() == mb.self() and getmetatable(mb.self()) == false,
        }
        -- the GC runs again: 8 MB of garbage stays bounded
        for i = 1, 100000 do local _ = { i, i } end
        t.after = collectgarbage("count")
        return t
      end)
      print(string.format("B kb=%d leaked=%s evil=%s upper=%s loaded=%s pid=%s after=%d",
        r.kb, r.leaked, r.evil, r.upper, r.loaded, tostring(r.pid), r.after))
    ]])
    assert.are.equal(0, code, err)
    assert.is_true(S.has(out, "A\tnormal"), out)
    -- reused: what A left (its libraries, an 8 KB string) is in B's state, as garbage
    local kb = tonumber(out:match("B kb=(%d+)"))
    assert.is_true(kb and kb > 30, out)
    assert.is_true(S.has(out, "leaked=nil evil=nil upper=X loaded=nil pid=true"), out)
    local after = tonumber(out:match("after=(%d+)"))
    assert.is_true(after and after < 2048, out)
  end)

  it("give the next process the base library again, in its own globals, nothing of the last one's", function()
    local code, out, err = child([[
      print("A", run({}, function()
        local _ = type(1)                 -- the base library opened (and kept)
        x = "global"
        pairs = nil
        _VERSION = "changed"
        coroutine.evil = true             -- (the coroutine table opened)
        print("A setfenv", pcall(setfenv, print, {}))
        _G.A_globals = _G
      end))
      local r = ask(function()
        local co = coroutine.wrap(function(a) coroutine.yield(a + 1) end)
        local t = {
          envs = getfenv(print) == _G and getfenv(pcall) == _G and getfenv(type) == _G
            and getfenv(coroutine.create) == _G and getfenv(loadstring) == _G,
          x = tostring(x), pairs = type(pairs), version = _VERSION,
          evil = tostring(coroutine.evil), wrap = co(1),
          loaded = package.loaded._G == _G and require("_G") == _G,
          old = tostring(A_globals),
          load = load("return 6 * 7")(),
          bytecode = select(2, loadstring(string.dump(function() end))) or "accepted",
        }
        for k in pairs(_G) do if k == "A_globals" then t.old = "reached" end end
        coroutine.evil, pairs = true, nil   -- B's state is a restored one: C's is too
        return t
      end)
      print("C", ask(function() return tostring(coroutine.evil) .. " " .. type(pairs) end))
      print(string.format("B envs=%s x=%s pairs=%s version=%s evil=%s wrap=%s loaded=%s old=%s load=%s",
        tostring(r.envs), r.x, r.pairs, r.version, r.evil, tostring(r.wrap), tostring(r.loaded),
        r.old, tostring(r.load)))
      print("B bytecode", r.bytecode)
    ]])
    assert.are.equal(0, code, err)
    assert.is_true(S.has(out, "A\tnormal"), out)
    assert.is_true(S.has(out, "A setfenv\tfalse"), out)
    assert.is_true(S.has(out, "B envs=true x=nil pairs=function version=Lua 5.1 evil=nil wrap=2 loaded=true old=nil load=42"), out)
    assert.is_false(S.has(out, "B bytecode\taccepted"), out)
    assert.is_true(S.has(out, "C\tnil function"), out)
  end)

  it("keep the string metatable, emptied: nothing a process put in it or on it stays", function()
    local code, out, err = child([[
      print("A", run({}, function()
        local smt = getmetatable("")
        smt.__add = function() return "leak" end
        smt.extra = "leak"
        setmetatable(smt, { __index = function() return "leak" end })
      end))
      print("B", ask(function()
        local smt = getmetatable("")
        return string.format("index=%s extra=%s meta=%s add=%s upper=%s",
          tostring(rawget(smt, "__index") == string), tostring(smt.extra),
          tostring(getmetatable(smt)), tostring((pcall(function() return "a" + {} end))),
          ("x"):upper())
      end))
    ]])
    assert.are.equal(0, code, err)
    assert.is_true(S.has(out, "A\tnormal"), out)
    assert.is_true(S.has(out, "B\tindex=true extra=nil meta=nil add=false upper=X"), out)
  end)

  it("give a process spawned with the same function again nothing of the last one's body", function()
    -- The state keeps the function its last body was loaded as, and its
    -- body coroutine (lstate.c, run.c): the next spawn of the same function
    -- takes them. Its upvalues, environment and thread globals are the new
    -- process's.
    local code, out, err = child([[
      local u = { "from the parent" }
      local body
      body = function(tag)
        if tag == "A" then
          u = { "left by A" }              -- the closure's upvalue
          setfenv(body, { leaked_env = true })   -- body is an upvalue of itself
          leaked = "A's global"
          return
        end
        local me = mb.self()
        mb.send(tag, string.format("u=%s env=%s thread=%s leaked=%s self=%s",
          u[1], tostring(rawget(getfenv(1), "leaked_env")),
          tostring(getfenv(0) == getfenv(1)), tostring(leaked),
          tostring(body ~= nil and mb.self() == me)))
      end
      print("A", run({}, body, "A"))
      mb.spawn(body, mb.self())
      print("B", mb.receive(function(m) return type(m) == "string" end, 10000))
    ]])
    assert.are.equal(0, code, err)
    assert.is_true(S.has(out, "A\tnormal"), out)
    assert.is_true(S.has(out, "B\tu=from the parent env=nil thread=true leaked=nil self=true"), out)
  end)

  it("are not reused after debug changed a basic type's metatable", function()
    local code, out, err = child([[
      run({}, function()
        debug.setmetatable(0, { __index = function() return "leak" end })
      end)
      print("B", ask(function()
        return tostring(select(2, pcall(function() return (1).x end)))
      end))
    ]])
    assert.are.equal(0, code, err)
    assert.is_true(S.has(out, "attempt to index a number value"), out)
    assert.is_false(S.has(out, "leak"), out)
  end)

  it("are not reused after newproxy made a finalizer", function()
    local code, out, err = child([[
      run({}, function()
        local u = newproxy(true)
        getmetatable(u).__gc = function() getmetatable("").__index.fin = "leak" end
        u = nil
      end)
      print("B", ask(function()
        collectgarbage()
        collectgarbage()
        return tostring(("x").fin)
      end))
    ]])
    assert.are.equal(0, code, err)
    assert.is_true(S.has(out, "B\tnil"), out)
  end)

  it("are not reused after a C module was loaded (its finalizers need the registry)", function()
    local code, out, err = child([[
      print("A", run({}, function()
        local lpeg = require "lpeg"     -- Debian's lua-lpeg, a C module
        local junk = string.rep("j", 8000)
        return lpeg.match(lpeg.P("a") ^ 1, "aaab")
      end))
      print("B", ask(function() return math.floor(collectgarbage("count")) end))
    ]])
    assert.are.equal(0, code, err)
    assert.is_true(S.has(out, "A	normal"), out)
    -- a fresh state: none of A's garbage (under ASan, no pattern leaks)
    local kb = tonumber(out:match("B	(%d+)"))
    assert.is_true(kb and kb < 30, out)
  end)

  it("give a process with a max_memory no garbage of the old one", function()
    local code, out, err = child([[
      run({}, function()   -- ~30 KB of garbage left
        collectgarbage("stop")
        local t = {}
        for i = 1, 300 do t[i] = {} end
      end)
      print("B", run({ max_memory = 40 * 1024 }, function()
        local t = {}
        for i = 1, 100 do t[i] = i end
      end))
    ]])
    assert.are.equal(0, code, err)
    assert.is_true(S.has(out, "B\tnormal"), out)
  end)

  it("compile source after their reserved words were let go and collected", function()
    -- A state lets its copies of Lua's reserved words be collected until
    -- something compiles source in it (host/lib/lstate.c, "Reserved
    -- words"): load, loadstring, require of a module compiled here, and a
    -- word interned meanwhile as data, on new states and reused ones.
    local dir = S.tmpdir()
    S.write("mbwords_mod.lua", [[
      local M = {}
      function M.count(n) local c = 0 repeat c = c + 1 until c >= n return c end
      return M
    ]], dir)
    local code, out, err = child(([[
      local dir = %q
      for round = 1, 3 do
        print("R" .. round, ask(function()
          collectgarbage()
          collectgarbage()
          local word = ("wh" .. "ile"):upper():lower()   -- the word as data
          local f = assert(loadstring("local n = 0 while n < 3 do n = n + 1 end " ..
            "if n == 3 and not false then return 'ok' else return 'bad' end"))
          local g = assert(load("return function(a) local t = {} for i = 1, a do " ..
            "t[#t + 1] = i end return #t end"))
          package.path = dir .. "/?.lua;" .. package.path
          local m = require "mbwords_mod"
          return table.concat({ f(), g()(4), m.count(5), word }, " ")
        end))
        collectgarbage()
      end
    ]]):format(dir))
    assert.are.equal(0, code, err)
    for round = 1, 3 do
      assert.is_true(S.has(out, "R" .. round .. "\tok 4 5 while"), out)
    end
  end)

  it("run a module's kept chunk anew for the next process: its own upvalues, globals and table", function()
    -- A state keeps the main chunk of a module it loaded from the module
    -- cache (host/lib/modcache.c, "Chunks kept in a reused state"); a later
    -- process in that state that requires the module runs that chunk
    -- again. Each process gets its own module: fresh upvalues, a fresh
    -- table, the chunk's globals in its own _G; what the last one did to
    -- the chunk (its environment) is gone.
    local dir = S.tmpdir()
    S.write("mbkept_mod.lua", [[
      local n = 0
      required_here = (required_here or 0) + 1
      local M = { tag = "fresh" }
      function M.inc() n = n + 1 return n end
      return M
    ]], dir)
    local code, out, err = child(([[
      local dir = %q
      local function use(tag)
        package.path = dir .. "/?.lua;" .. package.path
        local m = require "mbkept_mod"
        local first = m.inc()
        for _ = 1, 4 do m.inc() end
        local loader = package.loaders[2]("mbkept_mod")
        local env_ok = getfenv(loader) == _G
        m.tag = tag .. "'s"
        setfenv(loader, { evil = true })      -- left so for the next process
        return table.concat({ first, tostring(required_here), tostring(env_ok),
          tostring(loader) }, " ")
      end
      print("0", ask_done(function() return use("0") end))   -- compiles it, caches the dump
      print("A", ask_done(function() return use("A") end))   -- loads the dump, keeps the chunk
      print("B", ask_done(function() return use("B") end))   -- runs the kept chunk
      print("C", ask_done(function()
        package.path = dir .. "/?.lua;" .. package.path
        local m = require "mbkept_mod"
        return m.tag .. " " .. tostring(rawget(_G, "evil"))
      end))
    ]]):format(dir))
    assert.are.equal(0, code, err)
    for _, tag in ipairs({ "0", "A", "B" }) do
      assert.is_true(S.has(out, tag .. "\t1 1 true function: "), out)
    end
    -- B ran the very function A kept
    local a = out:match("A\t1 1 true (function: %S+)")
    local b = out:match("B\t1 1 true (function: %S+)")
    assert.is_truthy(a, out)
    assert.are.equal(a, b)
    assert.is_true(S.has(out, "C\tfresh nil"), out)
  end)

  it("keep moonbeam.http_parser's metatables, out of a process's reach, and make its module anew", function()
    -- A connection process per connection opens the module: its parsers'
    -- metatable (with their methods) is kept in a reused state
    -- (lib_http.c, mb_lib_http_parser_open), the module table is not.
    local code, out, err = child([[
      local function use(tag)
        local hp = require "moonbeam.http_parser"
        local fresh = type(hp.new) == "function" and hp.extra == nil
        local p = hp.new()
        local k, _, _, _, _, url = p:next("GET /" .. tag .. " HTTP/1.1\r\nHost: h\r\n\r\n")
        local hidden = getmetatable(p) == "http parser" and not pcall(setmetatable, p, {})
        hp.new, hp.extra = "tampered", true     -- left so for the next process
        local q = hp.guard_new ~= nil and require("moonbeam.http_parser")
        return table.concat({ tostring(fresh), k .. url, tostring(hidden), tostring(q == hp),
          tostring(p.next) }, " ")
      end
      print("A", ask_done(function() return use("a") end))
      print("B", ask_done(function() return use("b") end))
    ]])
    assert.are.equal(0, code, err)
    local a = out:match("A\ttrue head/a true true (function: %S+)")
    local b = out:match("B\ttrue head/b true true (function: %S+)")
    assert.is_truthy(a and b, out)
    assert.are.equal(a, b)   -- the very methods A's state made: the state was reused
  end)

  it("let go of the kept module chunks a process does not use, once it is idle", function()
    -- A process that requires none of the kept modules would otherwise carry
    -- their prototypes (idle memory): its first collection drops them.
    local dir = S.tmpdir()
    local parts = { "local M = {}" }
    for i = 1, 300 do
      parts[#parts + 1] = ("function M.f%d(x) return x .. 'constant string number %d of this module' end"):format(i, i)
    end
    parts[#parts + 1] = "return M"
    S.write("mbkept_big.lua", table.concat(parts, "\n"), dir)
    local code, out, err = child(([[
      local dir = %q
      local function use()
        package.path = dir .. "/?.lua;" .. package.path
        local m = require "mbkept_big"
        return m.f300("x")
      end
      print("0", ask_done(use))   -- compiles it
      print("A", ask_done(use))   -- keeps the chunk
      print("K", ask_done(function()
        collectgarbage()
        return string.format("%%d", collectgarbage("count"))
      end))
      print("I", ask_done(function()
        mb.receive(50)         -- idle: its first full collection
        collectgarbage()
        return string.format("%%d", collectgarbage("count"))
      end))
    ]]):format(dir))
    assert.are.equal(0, code, err)
    assert.is_true(S.has(out, "A\txconstant string number 300 of this module"), out)
    local kept = tonumber(out:match("K\t(%d+)"))
    local idle = tonumber(out:match("I\t(%d+)"))
    assert.is_truthy(kept and idle, out)
    -- the module's prototypes are ~50 KB: kept while not let go, gone after
    -- (the rest the state holds here, ~125 KB that full collections do not
    -- free, is there on the tree before the chunks were kept too)
    assert.is_true(kept - idle > 30, out)
  end)

  it("serve a hibernating process's wake without the spawn's globals", function()
    local code, out, err = child([[
      local function loop(n)
        local m = mb.receive()
        mb.send(m.from, { n = n, g = tostring(mine) })
        if n < 50 then mb.hibernate(loop, n + 1) end
      end
      local h = mb.spawn(function() mine = "set before hibernating"; mb.hibernate(loop, 1) end)
      local ok = 0
      for i = 1, 50 do
        -- a short process between wakes, leaving a global of its own
        run({}, function() mine = "other process" end)
        mb.send(h, { from = mb.self() })
        local m = mb.receive(function(m) return type(m) == "table" and m.n ~= nil end, 5000)
        if m and m.n == i and m.g == "nil" then ok = ok + 1 end
      end
      print("ok", ok)
    ]])
    assert.are.equal(0, code, err)
    assert.is_true(S.has(out, "ok\t50"), out)
  end)
end)
