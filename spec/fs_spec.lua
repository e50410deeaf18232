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
    local ok, err = pcall(table.sort, { 1, 2 }, function(a, b)
      fs.read_file(dir .. "/c")
      return a < b
    end)
    assert.is_false(ok)
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
end)
