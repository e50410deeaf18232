-- moonbeam.fs: files on libuv's thread pool; the calling process blocks,
-- its scheduler does not.
local mb = require "moonbeam"
local fs = require "moonbeam.fs"
local S = require "spec.support"

describe("moonbeam.fs", function()
  local before, dir
  before_each(function()
    before = S.snapshot()
    dir = S.tmpdir()
  end)
  after_each(function() S.check_clean(before) end)
  teardown(S.cleanup_tmp)

  it("writes and reads back binary data", function()
    local data = "head\0\1\2\255tail" .. ("z"):rep(100000)
    assert.is_true(fs.write_file(dir .. "/a", data))
    assert.are.equal(data, fs.read_file(dir .. "/a"))
  end)

  it("reads an empty file as an empty string", function()
    assert.is_true(fs.write_file(dir .. "/empty", ""))
    assert.are.equal("", fs.read_file(dir .. "/empty"))
  end)

  it("replaces a file atomically and leaves no temporary file", function()
    assert.is_true(fs.write_file(dir .. "/f", "old"))
    assert.is_true(fs.write_file(dir .. "/f", "new contents"))
    assert.are.equal("new contents", fs.read_file(dir .. "/f"))
    assert.are.same({ "f" }, fs.list_dir(dir))
  end)

  it("appends, creating the file", function()
    assert.is_true(fs.append_file(dir .. "/log", "one\n"))
    assert.is_true(fs.append_file(dir .. "/log", "two\n"))
    assert.are.equal("one\ntwo\n", fs.read_file(dir .. "/log"))
  end)

  it("stats files and directories", function()
    fs.write_file(dir .. "/s", "12345")
    local st = fs.stat(dir .. "/s")
    assert.are.equal(5, st.size)
    assert.are.equal("file", st.type)
    assert.is_number(st.mtime)
    assert.is_true(st.mtime > 0)
    assert.are.equal("directory", fs.stat(dir).type)
  end)

  it("lists a directory, sorted, without . and ..", function()
    for _, n in ipairs { "c", "a", "b" } do fs.write_file(dir .. "/" .. n, n) end
    assert.are.same({ "a", "b", "c" }, fs.list_dir(dir))
  end)

  it("removes files", function()
    fs.write_file(dir .. "/gone", "x")
    assert.is_true(fs.remove(dir .. "/gone"))
    local ok, err, code = fs.remove(dir .. "/gone")
    assert.is_nil(ok)
    assert.are.equal("ENOENT", code)
    assert.is_truthy(err:find("gone: no such file or directory", 1, true))
  end)

  it("returns nil, message, code for expected failures", function()
    local ok, err, code = fs.read_file(dir .. "/missing")
    assert.is_nil(ok)
    assert.are.equal("ENOENT", code)
    assert.are.equal(dir .. "/missing: no such file or directory", err)
    ok, err, code = fs.read_file(dir)
    assert.is_nil(ok)
    assert.are.equal("EISDIR", code)
    ok, err, code = fs.write_file(dir .. "/no/such/dir/f", "x")
    assert.is_nil(ok)
    assert.are.equal("ENOENT", code)
    ok, err, code = fs.list_dir(dir .. "/missing")
    assert.is_nil(ok)
    assert.are.equal("ENOENT", code)
    assert.is_nil(fs.stat(dir .. "/missing"))
  end)

  it("raises on misuse", function()
    for _, f in ipairs { "read_file", "stat", "list_dir", "remove" } do
      local ok, err = pcall(fs[f], nil)
      assert.is_false(ok)
      assert.is_truthy(err:find("bad argument #1", 1, true), err)
      ok, err = pcall(fs[f], "")
      assert.is_false(ok)
      assert.is_truthy(err:find("non-empty path", 1, true), err)
      ok, err = pcall(fs[f], "a\0b")
      assert.is_false(ok)
    end
    local ok, err = pcall(fs.write_file, dir .. "/x", {})
    assert.is_false(ok)
    assert.is_truthy(err:find("bad argument #2", 1, true), err)
  end)

  it("cannot block inside a C callback, and says so", function()
    fs.write_file(dir .. "/c", "x")
    local f, err = load(function()   -- load's reader: C calls it
      fs.read_file(dir .. "/c")
    end)
    assert.is_nil(f)
    assert.is_truthy(err:find("cannot block here", 1, true), err)
  end)

  it("blocks only the caller: other processes run meanwhile", function()
    -- A reader of a big file and a ping-pong pair at the same time.
    local path = dir .. "/big"
    assert.is_true(fs.write_file(path, ("b"):rep(20e6)))
    local me = mb.self()
    mb.spawn(function(p, parent)
      local f = require "moonbeam.fs"
      for _ = 1, 3 do assert(#f.read_file(p) == 20e6) end
      mb.send(parent, "read done")
    end, path, me)
    local pong = mb.spawn(function()
      for _ = 1, 20 do local m = mb.receive(5000); mb.send(m, "pong") end
    end)
    for _ = 1, 20 do
      mb.send(pong, me)
      assert.are.equal("pong", S.recv(function(m) return m == "pong" end))
    end
    assert.are.equal("read done", S.recv(function(m) return m == "read done" end))
  end)

  it("works from inside a user coroutine", function()
    fs.write_file(dir .. "/co", "inside")
    local gen = coroutine.wrap(function()
      coroutine.yield(fs.read_file(dir .. "/co"))
      return fs.stat(dir .. "/co").size
    end)
    assert.are.equal("inside", gen())
    assert.are.equal(6, gen())
  end)

  it("a process killed while it waits on a file ends at once", function()
    local path = dir .. "/big2"
    fs.write_file(path, ("k"):rep(30e6))
    local pid, ref = mb.spawn_monitor(function(p)
      local f = require "moonbeam.fs"
      while true do f.read_file(p) end
    end, path)
    mb.sleep(20)
    mb.exit(pid, "kill")
    assert.are.equal("killed", S.await_down(ref))
  end)

  -- A FIFO made in dir; its path.
  local function fifo_at(name)
    local path = dir .. "/" .. name
    assert.are.equal(0, S.sh("mkfifo " .. S.q(path)))
    return path
  end

  -- A FIFO's open waits for the other end and a read for input. On the
  -- thread pool (the host's, for every process's file operations and name
  -- lookups) that took a thread for good, even from a process killed
  -- meanwhile: six reads of a FIFO without a writer stopped every file
  -- operation of the host, and its exit. In a child host, bounded in time.
  it("reads and appends to a FIFO, and a killed reader or writer gives its thread back", function()
    local fifo = fifo_at("fifo")
    local script = S.write("fifo.lua", [=[
      local mb = require "moonbeam"
      local fs = require "moonbeam.fs"
      local fifo, sh_q = ...
      local me = mb.self()
      local function later(cmd) os.execute("(" .. cmd .. ") >/dev/null 2>&1 &") end
      mb.spawn(function() mb.send(me, { fs.read_file(fifo) }) end)
      mb.sleep(200)
      later("sleep 0.2; (printf 'a'; sleep 0.2; printf 'bc') > " .. sh_q)
      local m = mb.receive(10000)
      print("read", m and m[1], m and m[2])
      mb.spawn(function() mb.send(me, { fs.append_file(fifo, ("y"):rep(200000)) }) end)
      later("sleep 0.3; wc -c < " .. sh_q .. " > " .. sh_q .. ".count")
      m = mb.receive(10000)
      mb.sleep(300)
      print("appended", m and m[1], m and m[2], fs.read_file(fifo .. ".count"))
      local pids = {}
      for i = 1, 40 do   -- more than the pool's threads (16)
        pids[i] = mb.spawn(function(w)
          if w then fs.append_file(fifo, "never read") else fs.read_file(fifo) end
        end, i % 2 == 0)
      end
      mb.sleep(300)
      for _, p in ipairs(pids) do mb.exit(p, "kill") end
      local t0 = mb.now()
      mb.spawn(function() mb.send(me, { fs.read_file(fifo .. ".count") }) end)
      m = mb.receive(5000)
      print("after", m and m[1], mb.now() - t0 < 2000)
    ]=])
    local code, out, err = S.moonbeam(S.q(script) .. " " .. S.q(fifo) .. " " .. S.q(S.q(fifo)), nil, 30)
    assert.are.equal(0, code, err)
    assert.is_truthy(S.has(out, "read\tabc\tnil"), out)
    assert.is_truthy(S.has(out, "appended\ttrue\tnil\t200000"), out)
    assert.is_truthy(S.has(out, "after\t200000\n\ttrue"), out)
  end)

  -- libuv's pool has 4 threads: four processes waiting on FIFOs (or four
  -- name lookups whose resolver does not answer) held back every other
  -- file operation of the host while they waited. The host's pool has 16;
  -- UV_THREADPOOL_SIZE still decides when set, and stays out of the
  -- environment of the programs processes run when not.
  it("leaves room on the thread pool while processes wait on FIFOs", function()
    local fifo = fifo_at("fifo_room")
    local script = S.write("room.lua", [=[
      local mb = require "moonbeam"
      local fs = require "moonbeam.fs"
      local fifo, plain = ...
      local me = mb.self()
      local pids = {}
      for i = 1, 8 do pids[i] = mb.spawn(function() fs.read_file(fifo) end) end
      mb.sleep(300)
      mb.spawn(function() mb.send(me, { fs.read_file(plain) }) end)
      local m = mb.receive(3000)
      print("read", m and m[1] or "held back")
      print("env", os.getenv("UV_THREADPOOL_SIZE"))
      for _, p in ipairs(pids) do mb.exit(p, "kill") end
    ]=])
    local plain = S.write("plain.txt", "plain")
    local args = S.q(script) .. " " .. S.q(fifo) .. " " .. S.q(plain)
    local code, out, err = S.moonbeam(args, nil, 30)
    assert.are.equal(0, code, err)
    assert.are.equal("read\tplain\nenv\tnil\n", out, err)
    code, out, err = S.sh("UV_THREADPOOL_SIZE=4 " .. S.q(S.bin) .. " " .. args, nil, 30)
    assert.are.equal(0, code, err)
    assert.are.equal("read\theld back\nenv\t4\n", out, err)
  end)

  it("gives the thread of a read_line that awaits a line back when its process ends", function()
    -- Standard input a FIFO open at both ends: no line ever comes. The
    -- halt waited the 3 s it gives the pool, then exited without cleaning
    -- up (Ctrl-C at the prompt did the same).
    local fifo = fifo_at("fifo_await")
    local script = S.write("await.lua", [=[
      local mb = require "moonbeam"
      local fs = require "moonbeam.fs"
      local pid = mb.spawn(function() fs.read_line() end)
      mb.sleep(200)
      mb.exit(pid, "kill")
      mb.sleep(300)
      print("read_file", fs.read_file(arg[1]))   -- the pool goes on
      os.exit(3)
    ]=])
    local code, out, err = S.moonbeam(S.q(script) .. " " .. S.q(script) .. " 0<> " .. S.q(fifo),
                                      nil, 20)
    assert.are.equal(3, code, err)
    assert.is_truthy(S.has(out, "read_file\t"), out)
    assert.are.equal("", err)
  end)

  it("exits, if late, while a thread-pool job never ends", function()
    -- read_line on a standard input that is a FIFO open at both ends, with
    -- half a line in it: the rest of the line never comes. The halt waits
    -- for it 3 s, then exits.
    local fifo = fifo_at("fifo_stdin")
    local script = S.write("stuck.lua", [=[
      local mb = require "moonbeam"
      local f = assert(io.open(arg[1], "w"))
      f:write("half a line")
      f:close()
      mb.spawn(function() require("moonbeam.fs").read_line() end)
      mb.sleep(200)
      print("halting")
      os.exit(3)
    ]=])
    local code, out, err = S.moonbeam(S.q(script) .. " " .. S.q(fifo) .. " 0<> " .. S.q(fifo),
                                      nil, 20)
    assert.are.equal(3, code, err)
    assert.is_truthy(S.has(out, "halting"), out)
    assert.is_truthy(S.has(err, "work on the thread pool"), err)
  end)

  it("many processes write and read at once", function()
    local me = mb.self()
    for i = 1, 40 do
      mb.spawn(function(d, n, parent)
        local f = require "moonbeam.fs"
        assert(f.write_file(d .. "/p" .. n, ("x"):rep(n)))
        mb.send(parent, #f.read_file(d .. "/p" .. n))
      end, dir, i, me)
    end
    local sum = 0
    for _ = 1, 40 do sum = sum + S.recv() end
    assert.are.equal(40 * 41 / 2, sum)
    assert.are.equal(40, #fs.list_dir(dir))
  end)

  it("reads standard input line by line without blocking the others", function()
    local script = S.write("lines.lua", [[
      local mb = require "moonbeam"
      local fs = require "moonbeam.fs"
      -- A ticker proves the scheduler is free while read_line waits.
      local me = mb.self()
      mb.spawn(function() for _ = 1, 3 do mb.sleep(5) end mb.send(me, "ticked") end)
      local lines = {}
      while true do
        local l = fs.read_line()
        if l == nil then break end
        lines[#lines + 1] = "[" .. l .. "]"
      end
      print(table.concat(lines, ","), mb.receive(5000))
    ]], dir)
    local input = S.write("input.txt", "one\ntwo\n\nlast without newline", dir)
    local code, out, err = S.moonbeam(S.q(script) .. " < " .. S.q(input), nil, 20)
    assert.are.equal(0, code, err)
    assert.are.equal("[one],[two],[],[last without newline]\tticked\n", out)
  end)

  -- What a call buffers outside the heap (a read, a line, a listing, a
  -- write's copy) counts toward max_memory and --max-memory. Before, a
  -- reader of /dev/zero with max_memory 10 MB took the host to 1 GB (four
  -- of them aborted it: "out of host memory") and an endless line on stdin
  -- grew without end. The cases that could take a host down run in a child
  -- host, bounded in time and, but under a sanitizer (whose shadow memory
  -- is one huge mapping), in address space.
  describe("memory", function()
    local sanitized = os.getenv("ASAN_OPTIONS") ~= nil or os.getenv("TSAN_OPTIONS") ~= nil
    do
      local f = io.open("/proc/self/maps")
      if f then sanitized = sanitized or f:read("*a"):find("lib[at]san%.so") ~= nil; f:close() end
    end
    -- Run src in a child host: stdin from `input` (a shell command) if given.
    local function child(src, args, input, limit)
      local path = S.write("child.lua", src)
      local cmd = S.q(S.bin) .. " " .. (args or "") .. " " .. S.q(path)
      if input then cmd = input .. " | " .. cmd end
      if not sanitized then cmd = "ulimit -v 3000000; " .. cmd end
      return S.sh(cmd, nil, limit or 30)
    end

    it("fails a read of /dev/zero at the reader's max_memory, and the host goes on", function()
      local code, out, err = child([[
        local mb = require "moonbeam"
        local refs = {}
        for i = 1, 4 do
          local _, r = mb.spawn_opt({ max_memory = 10e6, monitor = true }, function()
            local fs = require "moonbeam.fs"
            local d, e, c = fs.read_file("/dev/zero")
            print("reader", d, e, c)
          end)
          refs[r] = true
        end
        for _ = 1, 4 do
          local m = mb.receive(function(m) return type(m) == "table" and refs[m.ref] end, 20000)
          print("down", m and m.reason)
        end
      ]], "--max-memory 200M")
      assert.are.equal(0, code, err)
      local n = 0
      for line in out:gmatch("reader[^\n]*") do
        n = n + 1
        assert.are.equal("reader\tnil\t/dev/zero: not enough memory (over the process's max_memory)\tENOMEM", line)
      end
      assert.are.equal(4, n, out .. err)
      assert.are.equal(4, select(2, out:gsub("down\tnormal", "")), out)
    end)

    it("fails it at --max-memory for a reader without max_memory", function()
      local code, out, err = child([[
        local fs = require "moonbeam.fs"
        local mb = require "moonbeam"
        local d, e, c = fs.read_file("/dev/zero")
        print(d, e, c, mb.info(mb.self()).memory < 16e6)
      ]], "--max-memory 64M")
      assert.are.equal(0, code, err)
      assert.are.equal("nil\t/dev/zero: not enough memory (over the host's --max-memory)\tENOMEM\ttrue\n", out)
      assert.is_false(S.has(err, "=MEMORY REPORT===="), err)
    end)

    it("reads a pipe that fits max_memory, and refuses one that does not", function()
      local src = [[
        local mb = require "moonbeam"
        local _, r = mb.spawn_opt({ max_memory = 10e6, monitor = true }, function()
          local fs = require "moonbeam.fs"
          local d, e, c = fs.read_file("/dev/stdin")
          print(d and #d, e, c)
        end)
        local m = mb.receive(function(m) return type(m) == "table" and m.ref == r end, 20000)
        print("down", m and m.reason)
      ]]
      local code, out, err = child(src, nil, "head -c 3000000 /dev/zero")
      assert.are.equal(0, code, err)
      assert.are.equal("3000000\tnil\tnil\ndown\tnormal\n", out)
      code, out, err = child(src, nil, "head -c 12000000 /dev/zero")
      assert.are.equal(0, code, err)
      assert.are.equal("nil\t/dev/stdin: not enough memory (over the process's max_memory)\tENOMEM\ndown\tnormal\n", out)
    end)

    it("cuts a line longer than read_line's maximum and loses nothing after it", function()
      local input = S.write("long.txt", ("x"):rep(2.5 * 1048576) .. "\nnext\n" ..
                            ("y"):rep(3e6) .. "\nlast\n")
      local code, out, err = child([[
        local fs = require "moonbeam.fs"
        for _ = 1, 4 do
          local l, e, c, part = fs.read_line()
          print(l and #l, e, c, part and #part, (l or part):match("^x*$") ~= nil)
        end
        local l = fs.read_line(4e6)
        print(#l, l == ("y"):rep(3e6))
        print(fs.read_line(), fs.read_line())
      ]], nil, "cat " .. S.q(input))
      assert.are.equal(0, code, err)
      assert.are.equal(table.concat({
        "nil\tstdin: line longer than 1048576 bytes\tEMSGSIZE\t1048576\ttrue",
        "nil\tstdin: line longer than 1048576 bytes\tEMSGSIZE\t1048576\ttrue",
        "524288\tnil\tnil\tnil\ttrue",
        "4\tnil\tnil\tnil\tfalse",
        "3000000\ttrue",
        "last\tnil",
      }, "\n") .. "\n", out)
    end)

    it("bounds an endless line by max_memory, and by default by 1 MiB", function()
      local code, out, err = child([[
        local mb = require "moonbeam"
        local fs = require "moonbeam.fs"
        local l, e, c, part = fs.read_line()
        print(l, e, c, #part)
        local _, r = mb.spawn_opt({ max_memory = 4e6, monitor = true }, function()
          local fs = require "moonbeam.fs"
          local l, e, c, part = fs.read_line(1e9)
          print(l, e, c, #part > 1e6 and #part < 4e6)
        end)
        local m = mb.receive(function(m) return type(m) == "table" and m.ref == r end, 20000)
        print("down", m and m.reason)
        os.exit(0)
      ]], "--max-memory 200M", "head -c 3000000000 /dev/zero", 40)
      assert.are.equal(0, code, err)
      assert.are.equal("nil\tstdin: line longer than 1048576 bytes\tEMSGSIZE\t1048576\n" ..
                       "nil\tstdin: not enough memory (over the process's max_memory)\tENOMEM\ttrue\n" ..
                       "down\tnormal\n", out)
    end)

    it("fails a listing that does not fit max_memory, instead of the process", function()
      local big = S.tmpdir()
      assert.are.equal(0, (S.sh("cd " .. S.q(big) .. " && awk 'BEGIN { for (i = 1; i <= 20000; i++) " ..
                                "printf \"%0200d\\n\", i }' | xargs touch", nil, 60)))
      local ok, res = S.probe(function(d)
        local f = require "moonbeam.fs"
        return { f.list_dir(d) }
      end, big)
      assert.is_true(ok, res)
      assert.are.equal(20000, #res[1][1])
      local _, r = mb.spawn_opt({ max_memory = 2e6, monitor = true }, function(d, parent)
        local f = require "moonbeam.fs"
        mb.send(parent, { f.list_dir(d) })
      end, big, mb.self())
      local m = S.recv(function(m) return type(m) == "table" and (m[2] or m.ref == r) end)
      assert.are.same({ nil, big .. ": not enough memory (over the process's max_memory)", "ENOMEM" }, m)
      assert.are.equal("normal", S.await_down(r))
    end)

    it("counts a write's copy of its data in --max-memory", function()
      local code, out, err = child([[
        local fs = require "moonbeam.fs"
        local d = ]] .. string.format("%q", dir) .. [[

        local data = ("w"):rep(40e6)
        print(fs.write_file(d .. "/big", data))
        print(fs.append_file(d .. "/big2", data))
        data = nil
        collectgarbage()
        print(fs.write_file(d .. "/small", ("s"):rep(10e6)))
      ]], "--max-memory 64M")
      assert.are.equal(0, code, err)
      assert.is_truthy(out:match("^nil\t.*/big: not enough memory %(over the host's %-%-max%-memory%)\tENOMEM\n" ..
                                 "nil\t.*/big2: not enough memory %(over the host's %-%-max%-memory%)\tENOMEM\n" ..
                                 "true\n$"), out .. err)
    end)
  end)
end)
