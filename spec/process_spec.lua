-- Processes: spawn and its variants, self, exit, info, processes, halt.
local mb = require "moonbeam"
local S = require "spec.support"

local MiB = 1024 * 1024

describe("processes", function()
  local before
  before_each(function() before = S.snapshot() end)
  after_each(function() S.check_clean(before) end)
  teardown(S.cleanup_tmp)

  describe("mb.spawn", function()
    it("runs a function in a new process and returns its pid", function()
      local pid = mb.spawn(function(parent)
        mb.send(parent, { hello = mb.self() })
      end, mb.self())
      assert.is_not_nil(pid)
      assert.are_not.equal(mb.self(), pid)
      local m = S.recv(S.field("hello", pid))
      assert.are.equal(pid, m.hello)
    end)

    it("passes arguments, nils included, as copies", function()
      local t = { x = 1, inner = { y = 2 } }
      local pid = mb.spawn(function(parent, a, b, c, d)
        -- Wait until the parent has changed its own table.
        mb.receive(function(m) return m == "go" end, 5000)
        d.inner.y = 99
        mb.send(parent, { n = select("#", a, b, c, d), a = a, b = b, c = c,
                          x = d.x, y = d.inner.y })
      end, mb.self(), nil, "two", nil, t)
      t.x = 2
      mb.send(pid, "go")
      local m = S.recv(S.field("n", 4))
      assert.is_nil(m.a)
      assert.are.equal("two", m.b)
      assert.is_nil(m.c)
      assert.are.equal(1, m.x)      -- the child's copy did not see t.x = 2
      assert.are.equal(99, m.y)
      assert.are.equal(2, t.inner.y) -- and the parent's table did not see y = 99
    end)

    it("passes trailing nil arguments", function()
      mb.spawn(function(parent, ...)
        mb.send(parent, { argc = select("#", ...) })
      end, mb.self(), 1, nil, nil)
      assert.are.equal(3, S.recv(S.field("argc", 3)).argc)
    end)

    it("copies upvalues by value", function()
      local counter = { n = 1 }
      local label = "label"
      local function twice(x) return 2 * x end
      mb.spawn(function(parent)
        counter.n = counter.n + 1
        mb.send(parent, { upvals = true, n = counter.n, label = label, t = twice(21) })
      end, mb.self())
      local m = S.recv(S.field("upvals", true))
      assert.are.equal(2, m.n)
      assert.are.equal("label", m.label)
      assert.are.equal(42, m.t)
      assert.are.equal(1, counter.n)
    end)

    it("re-requires an upvalue that is a loaded module instead of copying it", function()
      local lfs = require "lfs"       -- a C module: a table of C functions
      local json = require "dkjson"   -- a Lua module
      local strlib = string           -- package.loaded.string
      mb.spawn(function(parent)
        mb.send(parent, {
          modules = true,
          mb = mb == require "moonbeam",
          lfs = lfs == require "lfs",
          json = json == require "dkjson",
          string = strlib == require "string",
          dir = type(lfs.currentdir()),
          encoded = json.encode({ 1, 2 }),
          rep = strlib.rep("ab", 2),
        })
      end, mb.self())
      local m = S.recv(S.field("modules", true))
      assert.is_true(m.mb)
      assert.is_true(m.lfs)
      assert.is_true(m.json)
      assert.is_true(m.string)
      assert.are.equal("string", m.dir)
      assert.are.equal("[1,2]", m.encoded)
      assert.are.equal("abab", m.rep)
    end)

    it("re-requires a captured module without making the receiver's require, or with its own", function()
      -- The decoder requires in C (require is a Lua function of the
      -- host's, ~850 bytes of a state that touches it); a process that
      -- replaced require gets its own called.
      local lfs, json = require "lfs", require "dkjson"   -- (dkjson's top level requires)
      mb.spawn(function(parent)
        mb.send(parent, { made = rawget(_G, "require") ~= nil, ok = type(lfs.currentdir()) == "string" })
      end, mb.self())
      local m = S.recv(S.field("ok", true))
      assert.is_false(m.made)
      local child = mb.spawn(function(parent)
        local asked = {}
        local real = require
        require = function(name) asked[#asked + 1] = name return real(name) end
        mb.send(parent, { replaced = true })
        local f = mb.receive(5000)
        mb.send(parent, { works = f() == "[2]", asked = table.concat(asked, " ") })
      end, mb.self())
      S.recv(S.field("replaced", true))
      mb.send(child, function() return json.encode({ 2 }) end)
      local r = S.recv(S.field("works", true))
      assert.are.equal("dkjson", r.asked:match("^%S+"))   -- (then what its top level requires)
    end)

    it("gives one moonbeam table, captured, required or received, in either order", function()
      local me = mb.self()
      -- Captured only (no package library), then required.
      mb.spawn(function(parent)
        local first = mb
        mb.send(parent, { order = "captured first", same = first == require "moonbeam" })
      end, me)
      -- Required first, then a function capturing it arrives in a message.
      local child = mb.spawn(function(parent)
        local req = require "moonbeam"
        req.send(parent, { ready = req.self() })
        local f = req.receive(5000)
        req.send(parent, { order = "required first", same = f() == req })
      end, me)
      local m1 = S.recv(S.field("order", "captured first"))
      assert.is_true(m1.same)
      S.recv(S.field("ready", child))
      mb.send(child, function() return mb end)
      local m2 = S.recv(S.field("order", "required first"))
      assert.is_true(m2.same)
    end)

    it("sends the captured moonbeam module and its functions on, from a process without the package library", function()
      mb.spawn(function(parent)
        local send = mb.send     -- a C function: travels as a field of the module
        mb.spawn(function(p)
          send(p, { grandchild = true, mb = type(mb.self) })
        end, parent)
      end, mb.self())
      local m = S.recv(S.field("grandchild", true))
      assert.are.equal("function", m.mb)
    end)

    it("runs the contract's example: mb.spawn(function() mb.receive() end)", function()
      local pid = mb.spawn(function() mb.receive() end)
      local ref = mb.monitor(pid)
      mb.send(pid, "wake up")
      assert.are.equal("normal", S.await_down(ref))
    end)

    it("fails naming an upvalue that cannot be copied", function()
      local my_coroutine_upvalue = coroutine.create(function() end)
      local ok, err = pcall(mb.spawn, function() return my_coroutine_upvalue end)
      assert.is_false(ok)
      assert.is_true(S.has(err, "my_coroutine_upvalue"), err)
      assert.is_true(S.has(err, "coroutine"), err)
    end)

    it("fails naming where a nested uncopyable upvalue sits", function()
      local settings = { handlers = { 1, io.stdout } }
      local ok, err = pcall(mb.spawn, function() return settings end)
      assert.is_false(ok)
      assert.is_true(S.has(err, "settings"), err)
      assert.is_true(S.has(err, "handlers[2]"), err)
      assert.is_true(S.has(err, "userdata"), err)
    end)

    it("fails on an argument that cannot be copied, and starts nothing", function()
      local n = #mb.processes()
      local ok, err = pcall(mb.spawn, function() end, 1, coroutine.create(print))
      assert.is_false(ok)
      assert.is_true(S.has(err, "coroutine"), err)
      assert.are.equal(n, #mb.processes())
    end)

    it("spawns a module by name, passing the arguments", function()
      local pid = mb.spawn("spec.fixtures.echo_mod", mb.self(), "a", nil, 3)
      local m = S.recv(S.field("from_module", pid))
      assert.are.equal(3, m.n)
      assert.are.equal("a", m.args[1])
      assert.is_nil(m.args[2])
      assert.are.equal(3, m.args[3])
    end)

    for _, case in ipairs {
      { what = "a missing module", name = "spec.fixtures.no_such_module" },
      { what = "a module that does not return a function", name = "spec.fixtures.not_a_function_mod" },
    } do
      it("fails cleanly when spawned from " .. case.what, function()
        local ok, pid, ref = pcall(mb.spawn_monitor, case.name)
        if not ok then
          -- Refused at spawn: the error names the module.
          assert.is_true(S.has(pid, case.name), pid)
        else
          -- Or the new process crashes, and says why.
          local reason = S.await_down(ref)
          assert.are_not.equal("normal", reason)
          assert.is_string(reason)
        end
        -- Either way the caller goes on.
        local p2, r2 = mb.spawn_monitor(function() end)
        assert.are.equal("normal", S.await_down(r2))
        assert.is_not_nil(p2)
      end)
    end

    it("rejects what is neither a function nor a module name", function()
      assert.has_error(function() mb.spawn(42) end)
      assert.has_error(function() mb.spawn({}) end)
      assert.has_error(function() mb.spawn() end)
    end)
  end)

  describe("mb.spawn_link", function()
    it("links the new process: a crash arrives as an EXIT message when trapping", function()
      local ok, r = S.probe(function()
        mb.trap_exit(true)
        local pid = mb.spawn_link(function() error("linked boom") end)
        local m = mb.receive(function(x) return type(x) == "table" and x.event == "EXIT" end, 5000)
        return m and m.pid == pid, m and m.reason
      end)
      assert.is_true(ok, r)
      assert.is_true(r[1])
      assert.is_true(S.has(r[2], "linked boom"), tostring(r[2]))
    end)

    it("links the new process: its crash kills a caller that does not trap", function()
      local ok, reason = S.probe(function()
        mb.spawn_link(function() error("chain boom") end)
        mb.receive(function() return false end, 5000)
        return "survived"
      end)
      assert.is_false(ok)
      assert.is_true(S.has(reason, "chain boom"), tostring(reason))
    end)
  end)

  describe("mb.spawn_monitor", function()
    it("returns pid and ref; DOWN says normal when the process returns", function()
      local pid, ref = mb.spawn_monitor(function() end)
      assert.is_not_nil(pid)
      assert.is_not_nil(ref)
      local reason, m = S.await_down(ref)
      assert.are.equal("normal", reason)
      assert.are.equal(pid, m.pid)
    end)

    it("DOWN carries the error of a crash", function()
      local _, ref = mb.spawn_monitor(function() error("monitored boom") end)
      assert.is_true(S.has(S.await_down(ref), "monitored boom"))
    end)
  end)

  describe("mb.spawn_opt", function()
    it("with link = true links the new process", function()
      local ok, r = S.probe(function()
        mb.trap_exit(true)
        local pid = mb.spawn_opt({ link = true }, function(x) error("opt boom " .. x) end, 7)
        local m = mb.receive(function(x) return type(x) == "table" and x.event == "EXIT" end, 5000)
        return m and m.pid == pid, m and m.reason
      end)
      assert.is_true(ok, r)
      assert.is_true(r[1])
      assert.is_true(S.has(r[2], "opt boom 7"), tostring(r[2]))
    end)

    it("with monitor = true returns pid and ref", function()
      local pid, ref = mb.spawn_opt({ monitor = true }, function(parent, x)
        mb.send(parent, { opt_arg = x })
      end, mb.self(), "x")
      assert.are.equal("x", S.recv(S.field("opt_arg", "x")).opt_arg)
      local reason, m = S.await_down(ref)
      assert.are.equal("normal", reason)
      assert.are.equal(pid, m.pid)
    end)

    it("with name registers the new process", function()
      local pid, ref = mb.spawn_opt({ name = "spec_opt_named", monitor = true }, function()
        mb.receive(function(m) return m == "stop" end, 5000)
      end)
      assert.are.equal(pid, mb.whereis("spec_opt_named"))
      assert.are.equal("spec_opt_named", mb.info(pid).name)
      mb.send("spec_opt_named", "stop")
      assert.are.equal("normal", S.await_down(ref))
      assert.is_nil(mb.whereis("spec_opt_named"))
    end)

    it("refuses a max_memory that is not a positive number, NaN among them; math.huge is no limit", function()
      for _, bad in ipairs { 0, -1, 0.5, -math.huge, 0 / 0, "100", true, {} } do
        local ok, err = pcall(mb.spawn_opt, { max_memory = bad }, function() end)
        assert.is_false(ok, tostring(bad))
        assert.is_true(S.has(err, "opts.max_memory must be a positive number of bytes"), err)
      end
      for _, none in ipairs { math.huge, 1e300, 2 ^ 64 } do
        local _, ref = mb.spawn_opt({ monitor = true, max_memory = none }, function()
          local t = {}
          for i = 1, 100 do t[i] = ("x"):rep(1000) .. i end
        end)
        assert.are.equal("normal", S.await_down(ref))
      end
    end)

    it("with max_memory lets a process live within its limit", function()
      local _, ref = mb.spawn_opt({ monitor = true, max_memory = 4 * MiB }, function()
        local t = {}
        for i = 1, 100 do t[i] = ("x"):rep(1000) .. i end
      end)
      assert.are.equal("normal", S.await_down(ref))
    end)

    it("with max_memory kills a process that exceeds it, with reason 'out of memory'", function()
      local _, ref = mb.spawn_opt({ monitor = true, max_memory = 4 * MiB }, function(parent)
        -- Bounded (64 MiB) in case the limit is not enforced.
        local t = {}
        for i = 1, 64 do t[i] = ("x"):rep(MiB - 64) .. i end
        mb.send(parent, "spec_oom_survived")
      end, mb.self())
      assert.are.equal("out of memory", S.await_down(ref))
      assert.is_nil(mb.receive(function(m) return m == "spec_oom_survived" end, 0))
      -- The host and the caller go on, and new processes work.
      local _, r2 = mb.spawn_monitor(function() local t = {} for i = 1, 1000 do t[i] = i end end)
      assert.are.equal("normal", S.await_down(r2))
    end)

    it("with max_memory kills the process even when the allocation is inside pcall", function()
      local _, ref = mb.spawn_opt({ monitor = true, max_memory = 2 * MiB }, function(parent)
        local ok = pcall(function()
          local t = {}
          for i = 1, 64 do t[i] = ("y"):rep(MiB - 64) .. i end
        end)
        mb.send(parent, { spec_oom_pcall = ok })
      end, mb.self())
      assert.are.equal("out of memory", S.await_down(ref))
      assert.is_nil(mb.receive(S.field("spec_oom_pcall", false), 0))
    end)

    it("with max_memory kills a waiting process whose incoming message exceeds it", function()
      local pid, ref = mb.spawn_opt({ monitor = true, max_memory = 2 * MiB }, function()
        local m = mb.receive(5000)
        return #m
      end)
      mb.sleep(50)   -- it waits in receive: the message is decoded on wake-up
      mb.send(pid, ("z"):rep(8 * MiB))
      assert.are.equal("out of memory", S.await_down(ref))
    end)

    it("with max_memory kills a process whose message receive exceeds it", function()
      local pid, ref = mb.spawn_opt({ monitor = true, max_memory = 2 * MiB }, function()
        local m = mb.receive(5000)
        return #m
      end)
      mb.send(pid, ("z"):rep(8 * MiB))
      assert.are.equal("out of memory", S.await_down(ref))
    end)
  end)

  describe("mb.self", function()
    it("gives interned ids: one value per id, held weakly", function()
      -- 20,000 refs made and dropped: with a strong intern table they
      -- would stay (~1.3 MB); held weakly, only the table's slots do.
      mb.spawn(function(parent)
        collectgarbage()
        local base = collectgarbage("count")
        local keep = mb.alias()
        for _ = 1, 20000 do mb.unalias(mb.alias()) end
        collectgarbage()
        collectgarbage()
        local grown = collectgarbage("count") - base
        mb.send(mb.self(), keep)
        mb.send(parent, { interned = mb.receive(5000) == keep, grown_kb = grown })
      end, mb.self())
      local m = S.recv(S.field("interned", true))
      assert.is_true(m.grown_kb < 600, tostring(m.grown_kb))
    end)

    it("is a pid that prints like <0.N> and is not a number", function()
      local me = mb.self()
      assert.are_not.equal("number", type(me))
      -- Readable, like <0.42> (the host may add fields, as Erlang does: <0.42.0>).
      assert.is_truthy(tostring(me):match("^<%d+%.%d+[%.%d]*>$"), tostring(me))
      assert.are.equal(me, mb.self())
    end)

    it("gives pids that are equal to the spawned pid and work as table keys", function()
      local seen = {}
      local pids = {}
      for i = 1, 5 do
        pids[i] = mb.spawn(function(parent) mb.send(parent, { me = mb.self() }) end, mb.self())
        seen[pids[i]] = i
      end
      for _ = 1, 5 do
        local m = S.recv(function(x) return type(x) == "table" and x.me ~= nil end)
        assert.is_not_nil(seen[m.me])
        assert.are.equal(pids[seen[m.me]], m.me)
        seen[m.me] = nil
      end
      assert.is_nil(next(seen))
    end)
  end)

  describe("mb.exit", function()
    it("with no reason ends the caller with 'normal', and nothing after it runs", function()
      local _, ref = mb.spawn_monitor(function(parent)
        mb.exit()
        mb.send(parent, "spec_after_exit")
      end, mb.self())
      assert.are.equal("normal", S.await_down(ref))
      -- Anything it had sent would have arrived before its DOWN.
      assert.is_nil(mb.receive(function(m) return m == "spec_after_exit" end, 0))
    end)

    it("with a reason ends the caller with that reason, from deep in the stack", function()
      local _, ref = mb.spawn_monitor(function()
        local function deep(n) if n == 0 then mb.exit("bye") end return deep(n - 1) end
        deep(50)
      end)
      assert.are.equal("bye", S.await_down(ref))
    end)
  end)

  describe("mb.info", function()
    it("describes the caller as running", function()
      local i = mb.info(mb.self())
      assert.is_table(i)
      assert.is_number(i.memory)
      assert.is_true(i.memory > 0)
      assert.is_number(i.reductions)
      assert.is_number(i.mailbox)
      assert.are.equal("running", i.status)
    end)

    it("counts queued messages and shows a blocked process as waiting", function()
      local pid, ref = mb.spawn_monitor(function()
        mb.receive(function(m) return m == "stop" end, 5000)
      end)
      for i = 1, 3 do mb.send(pid, i) end
      assert.is_true(S.eventually(function()
        local i = mb.info(pid)
        return i and i.mailbox == 3 and i.status == "waiting"
      end), "expected mailbox 3 and status waiting")
      mb.send(pid, "stop")
      assert.are.equal("normal", S.await_down(ref))
    end)

    it("counts the memory a process holds", function()
      local idle = mb.spawn(function() mb.receive(function(m) return m == "stop" end, 5000) end)
      local big = mb.spawn(function(parent)
        local s = ("m"):rep(4 * MiB)
        mb.send(parent, { big_ready = true })
        mb.receive(function(m) return m == "stop" end, 5000)
        return #s
      end, mb.self())
      S.recv(S.field("big_ready", true))
      assert.is_true(S.eventually(function()
        local i = mb.info(idle)
        return i and i.status == "waiting"
      end))
      local small, large = mb.info(idle).memory, mb.info(big).memory
      assert.is_true(small > 0)
      assert.is_true(small < 2 * MiB, "idle process uses " .. small .. " bytes")
      assert.is_true(large > 4 * MiB, "process holding 4 MiB reports " .. large .. " bytes")
      mb.send(idle, "stop")
      mb.send(big, "stop")
    end)

    it("counts reductions: many for a process that computes, few for one that waits", function()
      -- 1e7 iterations are dozens of slices: preempted first by the
      -- ticker (a whole slice, 500), then counting its own.
      -- The waiting one is measured from when it waits: its start may
      -- cost whole slices (500 each) when the ticker preempts it, as on a
      -- slow (TSan) build; waiting costs nothing.
      local idle = mb.spawn(function(parent)
        mb.send(parent, "waiting")
        mb.receive(function(m) return m == "stop" end, 5000)
      end, mb.self())
      S.recv(function(m) return m == "waiting" end)
      local q0 = mb.info(idle).reductions
      local pid = mb.spawn(function(parent)
        local x = 0
        for i = 1, 1e7 do x = (x + i) % 1000003 end
        mb.send(parent, { burned = x })
        mb.receive(function(m) return m == "stop" end, 5000)
      end, mb.self())
      S.recv(function(m) return type(m) == "table" and m.burned ~= nil end)
      local r, q = mb.info(pid).reductions, mb.info(idle).reductions
      assert.is_true(r >= 1000, "reductions: " .. tostring(r))
      assert.is_true(q0 >= 1, "a new process's reductions: " .. tostring(q0))
      assert.is_true(q - q0 <= 2, "a waiting process's reductions: " .. tostring(q0) .. " -> " .. tostring(q))
      mb.send(pid, "stop")
      mb.send(idle, "stop")
    end)

    it("gives the registered name, and nil for an unnamed process", function()
      assert.is_nil(mb.info(mb.self()).name)
      mb.register("spec_info_name")
      assert.are.equal("spec_info_name", mb.info(mb.self()).name)
      mb.unregister("spec_info_name")
    end)

    it("returns nil for a dead process", function()
      local pid, ref = mb.spawn_monitor(function() end)
      S.await_down(ref)
      assert.is_nil(mb.info(pid))
    end)
  end)

  describe("mb.processes", function()
    it("lists the live processes as pids", function()
      local pid, ref = mb.spawn_monitor(function() mb.receive(5000) end)
      local found, me = false, false
      for _, p in ipairs(mb.processes()) do
        assert.are_not.equal("number", type(p))
        if p == pid then found = true end
        if p == mb.self() then me = true end
      end
      assert.is_true(found)
      assert.is_true(me)
      mb.send(pid, "go")
      S.await_down(ref)
      for _, p in ipairs(mb.processes()) do assert.are_not.equal(pid, p) end
    end)
  end)

  -- A process starts with the package.path and package.cpath of the one
  -- that spawned it, and a hibernated one wakes with its own (codepath.h).
  -- Each case runs in a child host whose first process puts a directory of
  -- its own on package.path, as a main script does for its modules.
  describe("package paths", function()
    -- A child host's script: `dir` holds modules; the script runs `body`
    -- after `local mb = require "moonbeam"` and `DIR = <dir>`.
    local function run(body, modules, limit)
      local dir = S.tmpdir()
      for name, src in pairs(modules or {}) do S.write(name .. ".lua", src, dir) end
      S.write("wmod.lua", "return { where = function() return 'wmod in " .. dir .. "' end }", dir)
      local code, out, err = S.child("local mb = require 'moonbeam'\nlocal DIR = " .. string.format("%q", dir)
        .. "\n" .. body, "", limit)
      return code, out, err, dir
    end

    it("are the parent's: a spawned function's captured module and a module spawned by name are found", function()
      local code, out, err, dir = run([[
        package.path = DIR .. "/?.lua;" .. package.path
        package.cpath = DIR .. "/?.so;" .. package.cpath
        local wmod = require "wmod"
        local me = mb.self()
        mb.spawn(function() mb.send(me, wmod.where()) end)
        print("captured", mb.receive(5000))
        mb.spawn("worker", me)
        print("by name", mb.receive(5000))
        mb.spawn(function()
          mb.send(me, { path = package.path, cpath = package.cpath })
        end)
        local m = mb.receive(5000)
        print("same path", m.path == package.path, m.cpath == package.cpath)
      ]], { worker = "local mb = require 'moonbeam'\nreturn function(to) mb.send(to, 'worker ran') end" })
      assert.are.equal(0, code, err)
      assert.is_true(S.has(out, "captured\twmod in " .. dir), out .. err)
      assert.is_true(S.has(out, "by name\tworker ran"), out .. err)
      assert.is_true(S.has(out, "same path\ttrue\ttrue"), out .. err)
    end)

    it("pass through a process that never opened the package library, and a change goes to its own children only", function()
      local code, out, err = run([[
        package.path = DIR .. "/?.lua;" .. package.path
        local me, base = mb.self(), package.path
        -- A middle process spawns a grandchild without touching `package`.
        mb.spawn(function()
          mb.spawn(function() mb.send(me, { g = package.path }) end)
        end)
        print("grandchild", mb.receive(5000).g == base)
        -- A child that changes its path: its children get the change, its
        -- parent and its siblings do not.
        mb.spawn(function()
          package.path = "/nowhere/?.lua;" .. package.path
          local mine = package.path
          mb.spawn(function() mb.send(me, { c = package.path == mine }) end)
        end)
        print("changed", mb.receive(5000).c)
        mb.spawn(function() mb.send(me, { s = package.path }) end)
        print("sibling", mb.receive(5000).s == base, package.path == base)
      ]])
      assert.are.equal(0, code, err)
      assert.is_true(S.has(out, "grandchild\ttrue"), out .. err)
      assert.is_true(S.has(out, "changed\ttrue"), out .. err)
      assert.is_true(S.has(out, "sibling\ttrue\ttrue"), out .. err)
    end)

    it("are the host's default for a process whose parent kept it, or set paths that are not strings", function()
      local code, out, err = run([[
        local me = mb.self()
        local default, cdefault = package.path, package.cpath
        mb.spawn(function() mb.send(me, { package.path, package.cpath }) end)
        local m = mb.receive(5000)
        print("default", m[1] == default, m[2] == cdefault)
        package.path, package.cpath = 42, nil
        mb.spawn(function() mb.send(me, { package.path, package.cpath }) end)
        m = mb.receive(5000)
        print("not strings", m[1] == default, m[2] == cdefault)
        -- A module of DIR, which is not on the default path, is not found.
        package.path = default
        local _, ref = mb.spawn_monitor(function() require "wmod" end)
        local d = mb.receive(function(x) return type(x) == "table" and x.ref == ref end, 5000)
        print("down", tostring(d.reason):find("module 'wmod' not found", 1, true) ~= nil)
      ]])
      assert.are.equal(0, code, err)
      assert.is_true(S.has(out, "default\ttrue\ttrue"), out .. err)
      assert.is_true(S.has(out, "not strings\ttrue\ttrue"), out .. err)
      assert.is_true(S.has(out, "down\ttrue"), out .. err)
    end)

    it("are kept by a hibernated process: it wakes into a module of its directory", function()
      local code, out, err = run([[
        package.path = DIR .. "/?.lua;" .. package.path
        local me = mb.self()
        local pid = mb.spawn(function()
          -- Its own path, set before it hibernates; the module is not
          -- loaded yet.
          package.path = DIR .. "/sub/?.lua;" .. package.path
          mb.hibernate("waker", me, package.path)
        end)
        mb.sleep(50)
        mb.send(pid, "wake")
        local m = mb.receive(5000)
        print("woke", m and m.got, m and m.same)
        -- Hibernated twice, with no package library in between.
        mb.send(pid, "again")
        m = mb.receive(5000)
        print("again", m and m.got, m and m.same)
        mb.exit(pid, "kill")
      ]], { waker = [[
        local mb = require "moonbeam"
        local function waker(me, path)
          local got = mb.receive()
          mb.send(me, { got = got, same = package.path == path })
          mb.hibernate("waker", me, path)
        end
        return waker
      ]] })
      assert.are.equal(0, code, err)
      assert.is_true(S.has(out, "woke\twake\ttrue"), out .. err)
      assert.is_true(S.has(out, "again\tagain\ttrue"), out .. err)
    end)

    it("are bounded: 65,535 different pairs in use at once, each freed with its last process", function()
      local code, out, err = run([[
        local me = mb.self()
        local base = package.path
        -- 65,535 hibernated processes, each with a path of its own.
        local pids = {}
        for i = 1, 65535 do
          package.path = base .. ";/p" .. i .. "/?.lua"
          pids[i] = mb.spawn(function() mb.hibernate(function() mb.receive() end) end)
        end
        package.path = base .. ";/one-more/?.lua"
        local ok, e = pcall(mb.spawn, function() end)
        print("full", ok, e)
        -- The same path as one in use shares its entry.
        package.path = base .. ";/p7/?.lua"
        print("shared", (pcall(mb.spawn, function() end)))
        package.path = base   -- the default needs no entry
        print("default", (pcall(mb.spawn, function() end)))
        for i = 1, #pids do mb.exit(pids[i], "kill") end
        local last = pids[#pids]
        while mb.info(last) do mb.sleep(10) end
        -- Freed: as many new ones again, one process at a time.
        local n = 0
        for i = 1, 70000 do
          package.path = base .. ";/q" .. i .. "/?.lua"
          local _, ref = mb.spawn_monitor(function() end)
          mb.receive(function(x) return type(x) == "table" and x.ref == ref end, 5000)
          n = n + 1
        end
        print("again", n)
      ]], nil, 120)
      assert.are.equal(0, code, err)
      assert.is_true(S.has(out, "full\tfalse\t"), out .. err)
      assert.is_true(S.has(out, "spawn: out of memory for package paths (65535 different pairs"),
                     out .. err)
      assert.is_true(S.has(out, "shared\ttrue"), out .. err)
      assert.is_true(S.has(out, "default\ttrue"), out .. err)
      assert.is_true(S.has(out, "again\t70000"), out .. err)
    end)

    it("are bounded in bytes: 64 MB of paths in use at once", function()
      local code, out, err = run([[
        local big = string.rep("/x", 2 * 1024 * 1024)   -- 4 MB
        local pids = {}
        for i = 1, 20 do
          package.path = big .. i
          local ok, pid = pcall(mb.spawn, function() mb.receive() end)
          if not ok then print("refused", i, pid) break end
          pids[#pids + 1] = pid
        end
        -- hibernate refuses a new path too, and the process goes on
        package.path = big .. "h"
        print("hibernate", pcall(mb.hibernate, function() end))
        for _, p in ipairs(pids) do mb.exit(p, "kill") end
        while mb.info(pids[#pids]) do mb.sleep(10) end
        package.path = big .. "again"
        local _, ref = mb.spawn_monitor(function() end)
        print("after", mb.receive(function(x) return type(x) == "table" and x.ref == ref end, 5000) ~= nil)
      ]])
      assert.are.equal(0, code, err)
      assert.is_true(S.has(out, "refused\t16\tspawn: out of memory for package paths"), out .. err)
      assert.is_true(S.has(out, "hibernate\tfalse\thibernate: out of memory for package paths"), out .. err)
      assert.is_true(S.has(out, "after\ttrue"), out .. err)
    end)
  end)

  describe("mb.halt (in a separate host)", function()
    it("halts the host with the code from any process, stopping the others", function()
      local script = S.write("halt.lua", [[
        local mb = require "moonbeam"
        mb.spawn(function() mb.receive() end)          -- would block forever
        mb.spawn(function() mb.sleep(50) mb.halt(7) end)
        mb.receive()                                   -- so would this
      ]])
      local code = S.moonbeam(S.q(script))
      assert.are.equal(7, code)
    end)

    it("halts with code 0 by default", function()
      local script = S.write("halt0.lua", [[
        local mb = require "moonbeam"
        mb.spawn(function() mb.receive() end)
        mb.halt()
      ]])
      assert.are.equal(0, (S.moonbeam(S.q(script))))
    end)
  end)
end)
