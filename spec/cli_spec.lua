-- The moonbeam command, run as a subprocess: a drop-in for luajit (arg,
-- options, LUA_INIT, the prompt, #!, errors, exit codes), host options,
-- signals, when the host exits, installing it, and Lua modules installed by
-- Debian.
local mb = require "moonbeam"
local S = require "spec.support"

local LUAJIT = "/usr/bin/luajit"
-- The repository root (specs run from it), for spec/fixtures.
local ROOT = require("lfs").currentdir()

-- A script that prints arg from its lowest index, and the script's varargs.
local DUMP = [[
local lo = 0
while arg[lo - 1] ~= nil do lo = lo - 1 end
for i = lo, #arg do print(i, i == lo and "<interpreter>" or arg[i]) end
print("interpreter", arg[lo])
print("varargs", select("#", ...), ...)
]]

-- Run `args` under both interpreters from directory dir; return both outputs
-- with the interpreter's own name taken out.
local function both(dir, args)
  local c1, o1, e1 = S.sh(LUAJIT .. " " .. args, dir)
  local c2, o2, e2 = S.moonbeam(args, dir)
  local function strip(o)
    return (o:gsub("interpreter\t[^\n]*\n", "")), o:match("interpreter\t([^\n]*)\n")
  end
  local s1, i1 = strip(o1)
  local s2, i2 = strip(o2)
  return { code = c1, out = s1, err = e1, interp = i1 },
         { code = c2, out = s2, err = e2, interp = i2 }
end

describe("the moonbeam command", function()
  local before, dir
  setup(function()
    dir = S.tmpdir()
    S.write("dump.lua", DUMP, dir)
  end)
  teardown(S.cleanup_tmp)
  before_each(function() before = S.snapshot() end)
  after_each(function() S.check_clean(before) end)

  it("can be found", function()
    local f = io.open(S.bin, "rb")
    assert.is_not_nil(f, "no binary at " .. S.bin)
    f:close()
  end)

  describe("sets arg exactly like luajit", function()
    for _, args in ipairs {
      "dump.lua a 'b c' ''",
      "dump.lua",
      "./dump.lua -x --y",
      "-e 'X = 1' dump.lua a",
      "-- dump.lua -e x",
      "-l lfs dump.lua",
      "-e 'X = 1' -e 'Y = 2' -- dump.lua 1 2 3",
    } do
      it("for: " .. args, function()
        local lj, m = both(dir, args)
        assert.are.equal(0, lj.code, lj.err)
        assert.are.equal(0, m.code, m.err)
        assert.are.equal(lj.out, m.out)
        assert.are.equal(LUAJIT, lj.interp)
        -- The interpreter slot holds the command as it was invoked.
        assert.are.equal(S.bin, m.interp)
      end)
    end
  end)

  describe("options", function()
    it("-e runs a chunk", function()
      local code, out, err = S.moonbeam("-e 'print(1 + 1)'")
      assert.are.equal(0, code, err)
      assert.are.equal("2\n", out)
    end)

    it("-e runs before the script, in the same process", function()
      local s = S.write("x.lua", "print(X, Y)")
      local code, out, err = S.moonbeam("-e 'X = 5' -e 'Y = 6' " .. S.q(s))
      assert.are.equal(0, code, err)
      assert.are.equal("5\t6\n", out)
    end)

    it("-l loads a module as luajit does", function()
      local args = "-l lfs -e 'print(type(lfs), package.loaded.lfs ~= nil)'"
      local _, expected = S.sh(LUAJIT .. " " .. args)
      local code, out, err = S.moonbeam(args)
      assert.are.equal(0, code, err)
      assert.are.equal(expected, out)
    end)

    it("-v shows the version and exits 0", function()
      local code, out, err = S.moonbeam("-v")
      assert.are.equal(0, code, err)
      local text = (out .. err):lower()
      assert.is_truthy(text:find("moonbeam") or text:find("luajit"), out .. err)
    end)

    it("-h lists the options, including the host's --schedulers", function()
      local _, out, err = S.moonbeam("-h")
      local text = out .. err
      for _, opt in ipairs { "--schedulers", "-e", "-l", "-v", "--", "--net-ticktime",
                             "--net-setuptime" } do
        assert.is_true(S.has(text, opt), "-h does not mention " .. opt .. ":\n" .. text)
      end
    end)

    it("--schedulers N runs the script with its own arguments", function()
      local s = S.write("s.lua", "print(arg[0], arg[1], #arg)")
      for _, n in ipairs { "1", "2", "4" } do
        local code, out, err = S.moonbeam("--schedulers " .. n .. " " .. S.q(s) .. " x")
        assert.are.equal(0, code, err)
        assert.are.equal(s .. "\tx\t1\n", out)
      end
    end)

    it("a bad --schedulers, --net-ticktime or --net-setuptime value is refused", function()
      local s = S.write("s.lua", "print('ran')")
      for _, bad in ipairs { "--schedulers abc", "--net-ticktime 0", "--net-setuptime 0",
                             "--net-setuptime 2s" } do
        local code, out, err = S.moonbeam(bad .. " " .. S.q(s))
        assert.are_not.equal(0, code)
        assert.are_not.equal(124, code)
        assert.is_false(S.has(out, "ran"))
        assert.is_true(S.has(err, bad:match("^(%-%-[%a-]+)")), err)
      end
    end)

    it("- runs the script from stdin", function()
      local s = S.write("in.lua", "print(42, ...)")
      local code, out, err = S.sh(S.q(S.bin) .. " - a b < " .. S.q(s))
      assert.are.equal(0, code, err)
      assert.are.equal("42\ta\tb\n", out)
    end)
  end)

  describe("scripts", function()
    it("skip a #! first line", function()
      local s = S.write("sb.lua", "#!/usr/bin/env moonbeam\nprint('shebang ok')\n")
      local code, out, err = S.moonbeam(S.q(s))
      assert.are.equal(0, code, err)
      assert.are.equal("shebang ok\n", out)
    end)

    it("that end normally exit 0", function()
      local s = S.write("ok.lua", "local x = 1")
      assert.are.equal(0, (S.moonbeam(S.q(s))))
    end)

    it("that raise an error exit 1 and print it like luajit", function()
      local s = S.write("err.lua", "local function f() error('boom') end\nf()\n")
      local code, out, err = S.moonbeam(S.q(s))
      local _, _, ljerr = S.sh(LUAJIT .. " " .. S.q(s))
      assert.are.equal(1, code)
      assert.are.equal("", out)
      -- luajit: "luajit: <script>:1: boom" then "stack traceback:".
      assert.is_true(S.has(ljerr, s .. ":1: boom"))
      assert.is_true(S.has(err, s .. ":1: boom"), err)
      assert.is_true(S.has(err, "stack traceback:"), err)
      assert.is_truthy(err:match("^[^\n]*" .. s:gsub("%p", "%%%0") .. ":1: boom"), err)
    end)

    it("that raise error() with no value exit 1 and print nothing, like luajit", function()
      local s = S.write("nil_err.lua", "error()\n")
      local ljcode, ljout, ljerr = S.sh(LUAJIT .. " " .. S.q(s))
      local code, out, err = S.moonbeam(S.q(s))
      assert.are.equal(1, ljcode)
      assert.are.equal(1, code)
      assert.are.equal(ljout, out)
      assert.are.equal(ljerr, err)
    end)

    it("with a syntax error exit 1 with the message", function()
      local s = S.write("syn.lua", "x = = 1\n")
      local code, _, err = S.moonbeam(S.q(s))
      assert.are.equal(1, code)
      assert.is_true(S.has(err, s .. ":1:"), err)
    end)

    it("that do not exist exit 1 naming the file", function()
      local code, _, err = S.moonbeam("/tmp/mbspec-no-such-script.lua")
      assert.are.equal(1, code)
      assert.is_true(S.has(err, "mbspec-no-such-script.lua"), err)
    end)

    it("with an error in -e exit 1", function()
      local code, _, err = S.moonbeam("-e 'error(\"e boom\")'")
      assert.are.equal(1, code)
      assert.is_true(S.has(err, "e boom"), err)
    end)
  end)

  describe("exit codes and halting", function()
    it("os.exit(3) exits 3", function()
      assert.are.equal(3, (S.moonbeam("-e 'os.exit(3)'")))
    end)

    it("os.exit(code) in a spawned process halts the host with that code", function()
      local s = S.write("exit5.lua", [[
        local mb = require "moonbeam"
        mb.spawn(function() mb.sleep(20) os.exit(5) end)
        mb.receive()
      ]])
      assert.are.equal(5, (S.moonbeam(S.q(s))))
    end)

    it("mb.halt(4) exits 4", function()
      local s = S.write("halt4.lua", [[
        local mb = require "moonbeam"
        mb.spawn(function() mb.receive() end)
        mb.halt(4)
      ]])
      assert.are.equal(4, (S.moonbeam(S.q(s))))
    end)

    -- SIGTERM: the first process ends with "shutdown" (exit code 0), the
    -- halt ends the others (spec/stop_spec.lua has the rest of the stop).
    for _, sig in ipairs { { "TERM", 0, "" }, { "TERM", 143, "--shutdown-timeout 0 " },
                           { "INT", 130, "" } } do
      it("SIG" .. sig[1] .. " " .. sig[3] .. "stops the host with exit code " .. sig[2], function()
        local d = S.tmpdir()
        local s = S.write("wait.lua", [[
          local mb = require "moonbeam"
          for _ = 1, 3 do mb.spawn(function() mb.receive() end) end
          mb.spawn(function() while true do end end)
          local f = assert(io.open(arg[1], "w"))
          f:write("ready")
          f:close()
          mb.receive()
        ]], d)
        local ready = d .. "/ready"
        local code, out, err = S.sh(table.concat({
          S.q(S.bin) .. " " .. sig[3] .. S.q(s) .. " " .. S.q(ready) .. " &",
          "p=$!",
          "i=0",
          "while [ ! -e " .. S.q(ready) .. " ] && [ $i -lt 300 ]; do sleep 0.02; i=$((i+1)); done",
          "kill -" .. sig[1] .. " $p",
          "wait $p",
          "echo \"rc=$?\"",
        }, "\n"))
        assert.are.equal(0, code, out .. err)
        assert.are.equal("rc=" .. sig[2] .. "\n", out, err)
      end)
    end

    it("the host exits when no process is left, after the first one ended", function()
      local s = S.write("children.lua", [[
        local mb = require "moonbeam"
        for i = 1, 3 do
          mb.spawn(function(n) mb.sleep(30 * n) print("child " .. n) end, i)
        end
      ]])
      local code, out, err = S.moonbeam(S.q(s))
      assert.are.equal(0, code, err)
      assert.are.equal("child 1\nchild 2\nchild 3\n", out)
    end)

    it("exits 1 when the first process crashed, after the others ended", function()
      local s = S.write("crash_first.lua", [[
        local mb = require "moonbeam"
        mb.spawn(function() mb.sleep(50) print("child done") end)
        error("first boom")
      ]])
      local code, out, err = S.moonbeam(S.q(s))
      assert.are.equal(1, code)
      assert.are.equal("child done\n", out)
      assert.is_true(S.has(err, "first boom"), err)
    end)

    it("exits 0 when only another process crashed, with a crash report on stderr", function()
      local s = S.write("crash_child.lua", [[
        local mb = require "moonbeam"
        local function inner() error("kaboom in child") end
        local function outer() inner() end
        local _, ref = mb.spawn_monitor(function() outer() end)
        local m = mb.receive(5000)
        print(m and m.ref == ref and "got DOWN")
      ]])
      local code, out, err = S.moonbeam(S.q(s))
      assert.are.equal(0, code, err)
      assert.are.equal("got DOWN\n", out)
      assert.is_true(S.has(err, "kaboom in child"), err)
      assert.is_true(S.has(err:lower(), "traceback"), err)
      -- The traceback names the functions the error passed through.
      assert.is_true(S.has(err, "inner"), err)
    end)
  end)

  describe("as luajit: LUA_INIT, -E, -j, -O, -i", function()
    local function env_both(env, args)
      local lc, lo, le = S.sh(env .. " " .. LUAJIT .. " " .. args)
      local mc, mo, me = S.sh(env .. " " .. S.q(S.bin) .. " " .. args)
      return { code = lc, out = lo, err = le }, { code = mc, out = mo, err = me }
    end

    it("LUA_INIT runs first, in the first process (a chunk or @file)", function()
      local f = S.write("init.lua", "INIT = 'from file' print('file init', arg and arg[1])")
      for _, case in ipairs {
        { "LUA_INIT='print(\"init\") X = 5'", "-e 'print(X)'" },
        { "LUA_INIT=@" .. S.q(f), "-e 'print(INIT)'" },
        { "LUA_INIT=@" .. S.q(f), S.q(f) .. " a" },
      } do
        local lj, m = env_both(case[1], case[2])
        assert.are.equal(0, lj.code, lj.err)
        assert.are.equal(0, m.code, m.err)
        assert.are.equal(lj.out, m.out)
      end
    end)

    it("LUA_INIT errors end the host with status 1, as in luajit", function()
      for _, env in ipairs { "LUA_INIT='error(\"init boom\")'", "LUA_INIT='x = = 1'",
                             "LUA_INIT=@/tmp/mbspec-no-such-init.lua" } do
        local lj, m = env_both(env, "-e 'print(\"ran\")'")
        assert.are.equal(1, lj.code)
        assert.are.equal(1, m.code, m.out .. m.err)
        assert.are.equal(lj.out, m.out)
        local want = lj.err:match("^[^:]*luajit: ([^\n]*)")
        assert.is_true(S.has(m.err, want), m.err)
      end
    end)

    it("-E ignores LUA_INIT, LUA_PATH and LUA_CPATH", function()
      local env = "LUA_INIT='print(\"init\")' LUA_PATH='/mbspec-nonexist/?.lua;;' "
        .. "LUA_CPATH='/mbspec-nonexist/?.so;;'"
      local args = "-E -e 'print(package.path:find(\"mbspec\"), package.cpath:find(\"mbspec\"))'"
      local lj, m = env_both(env, args)
      assert.are.equal(0, m.code, m.err)
      assert.are.equal(lj.out, m.out)
      assert.are.equal("nil\tnil\n", m.out)
      local _, with = env_both(env, "-e 'print(package.path:find(\"mbspec\") ~= nil)'")
      assert.are.equal("init\ntrue\n", with.out)
    end)

    it("-joff, -jflush and -O flags are accepted (the JIT is always off)", function()
      for _, opts in ipairs { "-joff", "-j off", "-jflush", "-O", "-O3", "-O-fold", "-Ohotloop=1" } do
        local code, out, err = S.moonbeam(opts .. " -e 'print(jit.status())'")
        assert.are.equal(0, code, opts .. ": " .. err)
        assert.is_truthy(out:match("^false"), opts .. ": " .. out)
      end
    end)

    it("-jon and other JIT commands are refused, saying why", function()
      for _, opts in ipairs { "-jon", "-j on", "-jv", "-jdump", "-jp" } do
        local code, out, err = S.moonbeam(opts .. " -e 'print(\"ran\")'")
        assert.are.equal(1, code, opts)
        assert.are.equal("", out)
        assert.is_true(S.has(err, "the JIT is always off"), err)
      end
      local code, _, err = S.moonbeam("-b x.lua x.out")
      assert.are.equal(1, code)
      assert.is_true(S.has(err, "luajit -b"), err)
    end)

    it("-h lists the host's --allow-ffi, --allow-bytecode and -i", function()
      local _, out = S.moonbeam("-h")
      for _, opt in ipairs { "--allow-ffi", "--allow-bytecode", "-i ", "-E ", "-joff" } do
        assert.is_true(S.has(out, opt), "-h does not mention " .. opt .. ":\n" .. out)
      end
    end)

    it("-i reads lines as luajit does: =expr, continued statements, errors", function()
      local input = S.write("input.txt", table.concat({
        "=1 + 1", "function f(x)", "return x * 2", "end", "=f(21)", "error('boom')",
        "x = = 1", "=nil", "local t = {", "1, 2}", "print(#t)", "",
      }, "\n"))
      local s = S.write("pre.lua", "PRE = 'script ran first' print(PRE)")
      local lc, lo, le = S.sh(LUAJIT .. " -i " .. S.q(s) .. " < " .. S.q(input))
      local mc, mo, me = S.sh(S.q(S.bin) .. " -i " .. S.q(s) .. " < " .. S.q(input))
      assert.are.equal(0, lc, le)
      assert.are.equal(0, mc, me)
      -- All but the banner and the JIT's status line.
      local function body(o)
        return (o:gsub("^[^\n]*LuaJIT[^\n]*\n", ""):gsub("\nJIT: [^\n]*\n", "\n"))
      end
      assert.are.equal(body(lo), body(mo))
      assert.is_true(S.has(me, "stdin:1: boom"), me)
      assert.is_true(S.has(me, "unexpected symbol near '='"), me)
    end)

    it("with no script on a terminal, the prompt runs as a process (spawn, receive)", function()
      if S.sh("command -v python3") ~= 0 then return pending("no python3") end
      local lines = table.concat({
        "mb = require 'moonbeam'",
        "mb.spawn(function(p) require('moonbeam').send(p, 'pong') end, mb.self())",
        "=mb.receive(5000)",
        "for i = 1, 2 do",
        "print('line ' .. i)",
        "end",
        "=mb.self() == mb.self()",
      }, "\n")
      local input = S.write("tty.txt", lines .. "\n")
      local code, out, err = S.sh("python3 spec/fixtures/pty_run.py 15 '(?:^|\\n)>>? ' "
        .. S.q(S.bin) .. " < " .. S.q(input), ROOT)
      assert.are.equal(0, code, out .. err)
      assert.is_true(S.has(out, "Moonbeam"), out)
      assert.is_truthy(out:match("\npong\r?\n"), out)
      assert.is_truthy(out:match("\n>> print%('line ' %.%. i%)"), out)
      assert.is_truthy(out:match("line 1\r?\nline 2\r?\n"), out)
      assert.is_truthy(out:match("\ntrue\r?\n"), out)
    end)
  end)

  describe("installed with cmake --install", function()
    it("runs from another directory and finds its Lua modules beside itself", function()
      local build = S.bin:match("^(.*)/[^/]+$")
      local f = io.open(build .. "/cmake_install.cmake")
      if not f then return pending("no CMake build directory at " .. build) end
      f:close()
      local prefix = S.tmpdir() .. "/prefix"
      local code, out, err = S.sh("cmake --install " .. S.q(build) .. " --prefix " .. S.q(prefix))
      assert.are.equal(0, code, out .. err)
      local elsewhere = S.tmpdir()
      code, out, err = S.sh(S.q(prefix .. "/bin/moonbeam") .. " -e '"
        .. "print(package.path:match(\"^[^;]*\")) "
        .. "print(type(require(\"moonbeam.server\").start), type(require(\"moonbeam.supervisor\").start))'",
        elsewhere)
      assert.are.equal(0, code, out .. err)
      assert.are.equal(prefix .. "/share/moonbeam/lua/?.lua\nfunction\tfunction\n", out)
    end)
  end)

  describe("Lua modules installed by Debian", function()
    it("C modules (lfs, lpeg) load in a spawned process", function()
      local _, ref = mb.spawn_monitor(function(parent)
        local lfs = require "lfs"
        local lpeg = require "lpeg"
        mb.send(parent, {
          debian = true,
          dir = lfs.currentdir(),
          match = lpeg.match(lpeg.P("a") ^ 1, "aaab"),
        })
      end, mb.self())
      local m = S.recv(S.field("debian", true))
      assert.are.equal(require("lfs").currentdir(), m.dir)
      assert.are.equal(4, m.match)
      assert.are.equal("normal", S.await_down(ref))
    end)

    it("C and Lua modules load in the first process of a new host", function()
      local code, out, err = S.moonbeam(
        "-e 'print(type(require(\"lpeg\").match), type(require(\"dkjson\").encode), "
        .. "type(require(\"lfs\").attributes))'")
      assert.are.equal(0, code, err)
      assert.are.equal("function\tfunction\tfunction\n", out)
    end)
  end)
end)
