-- Hibernation: mb.hibernate(fn, ...) drops the process's Lua state and keeps
-- only its continuation; the next message or signal rebuilds a state there.
local mb = require "moonbeam"
local S = require "spec.support"

-- A process body that hibernates between messages, counting them and
-- keeping what it was sent: {op = "get", from = pid} answers its state.
local function counter(n, seen)
  local m = mb.receive()
  if type(m) == "table" and m.op == "get" then
    mb.send(m.from, { n = n, seen = seen, status = "awake" })
  elseif type(m) == "table" and m.op == "stop" then
    return
  else
    seen[#seen + 1] = m
    n = n + 1
  end
  mb.hibernate(counter, n, seen)
end

-- Does pid hibernate within S.T? If not: false and what mb.info says.
local function hibernated(pid)
  local i
  local ok = S.eventually(function()
    i = mb.info(pid)
    return i ~= nil and i.status == "hibernated"
  end)
  return ok, string.format("%s: %s", tostring(pid), i == nil and "gone"
    or ("status " .. i.status .. ", mailbox " .. i.mailbox .. ", reductions " .. i.reductions))
end

describe("mb.hibernate", function()
  local before
  before_each(function() before = S.snapshot() end)
  after_each(function() S.check_clean(before) end)
  teardown(S.cleanup_tmp)

  it("drops the state and keeps the continuation across many cycles", function()
    local pid = mb.spawn(function(f) mb.hibernate(f, 0, {}) end, counter)
    assert.is_true(hibernated(pid))
    local info = mb.info(pid)
    assert.are.equal("hibernated", info.status)
    -- A hibernated process holds its record and continuation, no state.
    assert.is_true(info.memory < 2048, "memory " .. info.memory)
    for i = 1, 200 do mb.send(pid, i) end
    mb.send(pid, { op = "get", from = mb.self() })
    local m = S.recv(S.field("status", "awake"))
    assert.are.equal(200, m.n)
    for i = 1, 200 do assert.are.equal(i, m.seen[i]) end
    assert.is_true(hibernated(pid))
    mb.send(pid, { op = "stop" })
  end)

  it("receives messages that came while it hibernated, in order, selectively", function()
    local pid = mb.spawn(function(parent)
      mb.hibernate(function(p)
        -- Woken by the first message; take "b" first, then the rest in order.
        local b = mb.receive(function(m) return m == "b" end, 5000)
        local rest = {}
        for _ = 1, 3 do rest[#rest + 1] = mb.receive(5000) end
        mb.send(p, { b = b, rest = rest })
      end, parent)
    end, mb.self())
    assert.is_true(hibernated(pid))
    for _, v in ipairs({ "a", "b", "c", "d" }) do mb.send(pid, v) end
    local m = S.recv(S.field("b", "b"))
    assert.are.same({ "a", "c", "d" }, m.rest)
  end)

  it("wakes at once when a message is already queued", function()
    local pid = mb.spawn(function(parent)
      mb.send(parent, { ready = mb.self() })
      mb.receive(function(m) return m == "go" end, 5000)   -- "first" waits behind it
      mb.hibernate(function(p) mb.send(p, { woke = mb.receive(0) }) end, parent)
    end, mb.self())
    S.recv(S.field("ready", pid))
    mb.send(pid, "first")
    mb.send(pid, "go")
    assert.are.equal("first", S.recv(S.field("woke", "first")).woke)
  end)

  it("keeps its registered name, links and monitors", function()
    local pid = mb.spawn(function(f) mb.register("spec_hib_name") mb.hibernate(f, 0, {}) end, counter)
    assert.is_true(hibernated(pid))
    assert.are.equal(pid, mb.whereis("spec_hib_name"))
    mb.send("spec_hib_name", "x")
    mb.send("spec_hib_name", { op = "get", from = mb.self() })
    assert.are.equal(1, S.recv(S.field("status", "awake")).n)
    assert.is_true(hibernated(pid))
    -- A monitor set while it hibernates fires when it dies.
    local ref = mb.monitor(pid)
    mb.send(pid, { op = "stop" })
    assert.are.equal("normal", S.await_down(ref))
    assert.is_nil(mb.whereis("spec_hib_name"))
  end)

  it("dies of an untrapped exit signal or kill without waking", function()
    for _, reason in ipairs({ "boom", "kill" }) do
      local pid, ref = mb.spawn_monitor(function()
        mb.hibernate(function() error("woke, but should not have") end)
      end)
      assert.is_true(hibernated(pid))
      mb.exit(pid, reason)
      assert.are.equal(reason == "kill" and "killed" or "boom", S.await_down(ref))
    end
    -- "normal" is ignored by a process that does not trap exits: it stays.
    local pid, ref = mb.spawn_monitor(function(f) mb.hibernate(f, 0, {}) end, counter)
    assert.is_true(hibernated(pid))
    mb.exit(pid, "normal")
    assert.is_true(hibernated(pid))
    mb.send(pid, { op = "get", from = mb.self() })
    assert.are.equal(0, S.recv(S.field("status", "awake")).n)
    mb.send(pid, { op = "stop" })
    assert.are.equal("normal", S.await_down(ref))
  end)

  it("wakes for a trapped exit signal and for a linked process's death", function()
    local pid = mb.spawn(function(parent)
      mb.trap_exit(true)
      local friend = mb.spawn_link(function() mb.receive(5000) error("friend fails") end)
      mb.hibernate(function(p, fr)
        local m = mb.receive(5000)
        mb.send(p, { got = m.event, from_friend = m.pid == fr, reason = m.reason })
      end, parent, friend)
    end, mb.self())
    assert.is_true(hibernated(pid))
    local friend
    for _, p in ipairs(mb.processes()) do
      if p ~= pid and not before[p] and p ~= mb.self() then friend = p end
    end
    mb.send(friend, "die now")
    local m = S.recv(S.field("got", "EXIT"))
    assert.is_true(m.from_friend)
    assert.is_true(S.has(m.reason, "friend fails"), m.reason)
  end)

  it("is woken by a DOWN and by a timer it kept", function()
    local pid = mb.spawn(function(parent)
      local target = mb.spawn(function() mb.receive(5000) end)
      local ref = mb.monitor(target)
      local t = mb.send_after(60000, mb.self(), "late")
      mb.send_after(30, mb.self(), "tick")
      mb.hibernate(function(p, tg, r, timer)
        local tick = mb.receive(function(m) return m == "tick" end, 5000)
        -- The timer value survived hibernation: cancel it from the new state.
        local left = mb.cancel_timer(timer)
        mb.exit(tg, "kill")
        mb.hibernate(function()
          local down = mb.receive(5000)
          mb.send(p, { tick = tick, left = left, down = down.event, same = down.ref == r })
        end)
      end, parent, target, ref, t)
    end, mb.self())
    local m = S.recv(S.field("tick", "tick"))
    assert.is_true(type(m.left) == "number" and m.left > 1000, tostring(m.left))
    assert.are.equal("DOWN", m.down)
    assert.is_true(m.same)
    assert.is_not_nil(pid)
  end)

  it("is woken by an active socket, and no byte is lost", function()
    local tcp = require "moonbeam.tcp"
    local l = assert(tcp.listen("127.0.0.1", 0))
    local port = l:port()
    local pid = mb.spawn(function(parent, listener)
      -- Only the owner accepts: wait until the listener is this process's.
      mb.receive(function(m) return m == "yours" end, 5000)
      local s = assert(listener:accept(5000))
      s:set_active(true)
      local function loop(sock, got, p)
        local m = mb.receive(5000)
        if m and m.event == "tcp" then
          got = got .. m.data
          if #got >= 3000 then mb.send(p, { data = got }) return end
          mb.hibernate(loop, sock, got, p)
        end
        mb.send(p, { data = got, ended = m and m.event })
      end
      mb.hibernate(loop, s, "", parent)
    end, mb.self(), l)
    l:set_owner(pid)
    mb.send(pid, "yours")
    local c = assert(tcp.connect("127.0.0.1", port, 5000))
    assert.is_true(hibernated(pid))
    local sent = {}
    for i = 1, 30 do
      local chunk = string.rep(string.char(64 + i % 26), 100)
      sent[#sent + 1] = chunk
      assert(c:write(chunk))
      if i % 10 == 0 then mb.sleep(5) end
    end
    local m = S.recv(function(x) return type(x) == "table" and x.data ~= nil end)
    assert.are.equal(table.concat(sent), m.data)
    c:close()
  end)

  it("raises in the caller for an uncopyable argument, and the process goes on", function()
    local ok, res = S.probe(function()
      local co = coroutine.create(function() end)
      local ok2, err = pcall(mb.hibernate, function() end, co)
      return ok2, err, "still here"
    end)
    assert.is_true(ok)
    assert.is_false(res[1])
    assert.is_true(S.has(res[2], "hibernate: arg 1: cannot send a coroutine"), res[2])
    assert.are.equal("still here", res[3])
    local ok3, res3 = S.probe(function()
      local ok2, err = pcall(mb.hibernate, 42)
      return ok2, err
    end)
    assert.is_true(ok3)
    assert.is_true(S.has(res3[2], "function or module name expected"), res3[2])
  end)

  it("raises inside a C callback, where it cannot drop the stack", function()
    local ok, res = S.probe(function()
      local f, err = load(function()   -- load's reader: C calls it
        mb.hibernate(function() end)
      end)
      return f ~= nil, err
    end)
    assert.is_true(ok)
    assert.is_false(res[1])
    assert.is_true(S.has(res[2], "hibernate: cannot block here"), res[2])
  end)

  it("works inside pcall and inside a user coroutine (the stack is dropped)", function()
    local parent = mb.self()
    local a = mb.spawn(function(p)
      pcall(function()
        mb.hibernate(function(q) mb.send(q, { from = "pcall", msg = mb.receive(5000) }) end, p)
      end)
      mb.send(p, { from = "pcall", msg = "returned from hibernate!" })
    end, parent)
    local b = mb.spawn(function(p)
      local co = coroutine.wrap(function()
        mb.hibernate(function(q) mb.send(q, { from = "coroutine", msg = mb.receive(5000) }) end, p)
      end)
      co()
      mb.send(p, { from = "coroutine", msg = "returned from hibernate!" })
    end, parent)
    assert.is_true(hibernated(a))
    assert.is_true(hibernated(b))
    mb.send(a, "hello a")
    mb.send(b, "hello b")
    assert.are.equal("hello a", S.recv(S.field("from", "pcall")).msg)
    assert.are.equal("hello b", S.recv(S.field("from", "coroutine")).msg)
  end)

  -- Copying a large continuation outlasts a slice: the preemption then
  -- lands as the hibernate's yield passes up through the coroutine, and
  -- must wait for it (it once took its place: hibernate returned).
  it("inside a user coroutine, holds when preempted on its way up", function()
    local big = {}
    for i = 1, 20000 do big[i] = { i, "x" .. i } end
    local function cycle(parent, data, n)
      local m = mb.receive()
      if m == "stop" then return end
      mb.send(parent, { woke = n, size = #data })
      coroutine.wrap(function() mb.hibernate(cycle, parent, data, n + 1) end)()
      mb.send(parent, { woke = "returned from hibernate", n = n })
    end
    local pid, ref = mb.spawn_monitor(function(p, d) mb.hibernate(cycle, p, d, 1) end, mb.self(), big)
    for round = 1, 100 do
      mb.send(pid, "go")
      local m = S.recv(function(x) return type(x) == "table" and x.woke ~= nil end)
      assert.are.same({ woke = round, size = 20000 }, m)
    end
    mb.send(pid, "stop")
    assert.are.equal("normal", S.await_down(ref))
  end)

  -- The same place, with a kill arriving during the copy: the process must
  -- die there, not hibernate with the signal already taken.
  it("inside a user coroutine, dies of a kill that comes on its way up", function()
    local big = {}
    for i = 1, 100000 do big[i] = { i, "x" .. i } end
    for _ = 1, 5 do
      local pid, ref = mb.spawn_monitor(function(p, d)
        coroutine.wrap(function()
          mb.send(p, "copying")
          mb.hibernate(function() end, d)
        end)()
        mb.send(p, "returned from hibernate")
      end, mb.self(), big)
      assert.are.equal("copying", S.recv(function(m) return m == "copying" end))
      mb.exit(pid, "kill")
      assert.are.equal("killed", S.await_down(ref))
    end
  end)

  it("reports memory and status in mb.info, and max_memory applies after a wake", function()
    local pid, ref = mb.spawn_opt({ monitor = true, max_memory = 256 * 1024 }, function()
      mb.hibernate(function()
        mb.receive()
        local t = {}
        for i = 1, 1e7 do t[i] = ("x"):rep(100) .. i end
      end)
    end)
    assert.is_true(hibernated(pid))
    local info = mb.info(pid)
    assert.are.equal(0, info.mailbox)
    local before_msg = info.memory
    mb.send(pid, string.rep("y", 10))
    assert.are.equal("out of memory", S.await_down(ref))
    assert.is_true(before_msg > 0)
  end)

  it("counts queued messages in mb.info memory while hibernated", function()
    -- Hibernate behind a receive that never matches, so messages stay queued.
    local pid = mb.spawn(function()
      mb.hibernate(function() mb.receive(function() return false end) end)
    end)
    assert.is_true(hibernated(pid))
    local m0 = mb.info(pid).memory
    mb.send(pid, string.rep("z", 10000))
    assert.is_true(S.eventually(function() return mb.info(pid).mailbox == 1 end))
    -- It woke for the message and waits in its receive, the message queued.
    assert.is_true(mb.info(pid).memory >= 10000)
    assert.is_true(m0 < 2048)
    mb.exit(pid, "kill")
  end)

  it("names the function it woke into when it crashes after a wake", function()
    local path = S.write("hib_crash.lua", [[
      local mb = require "moonbeam"
      local function woke_here(x)
        mb.receive()
        error("crash after wake " .. x)
      end
      local pid, ref = mb.spawn_monitor(function() mb.hibernate(woke_here, 7) end)
      mb.sleep(50)
      mb.send(pid, "wake up")
      local m = mb.receive(5000)
      print(m.event, m.reason)
    ]])
    local code, out, err = S.moonbeam(S.q(path))
    assert.are.equal(0, code)
    assert.is_true(S.has(out, "DOWN"), out)
    assert.is_true(S.has(out, "crash after wake 7"), out)
    assert.is_true(S.has(err, "CRASH REPORT"), err)
    assert.is_true(S.has(err, "woke from hibernation into function at"), err)
    assert.is_true(S.has(err, "hib_crash.lua:2"), err)
  end)

  it("hibernates into a module by name", function()
    local pid = mb.spawn(function(p)
      -- The module's function sends {from_module = self(), ...} to p.
      mb.hibernate("spec.fixtures.echo_mod", p)
    end, mb.self())
    assert.is_true(hibernated(pid))
    mb.send(pid, "wake up")
    local m = S.recv(S.field("from_module", pid))
    assert.are.equal(0, m.n)
    assert.is_true(S.eventually(function() return mb.info(pid) == nil end))
  end)

  it("scales: 100,000 hibernated processes all wake and answer", function()
    local N = 100000
    local function loop(k)
      local m = mb.receive()
      mb.send(m, k)
      mb.hibernate(loop, k)
    end
    local pids = {}
    for i = 1, N do
      pids[i] = mb.spawn(function(f, k) mb.hibernate(f, k) end, loop, i)
      if i % 2000 == 0 then mb.sleep(0) end
    end
    assert.is_true(S.eventually(function() return mb.info(pids[N]).status == "hibernated" end, 30000))
    local me, sum, got = mb.self(), 0, 0
    for i = 1, N do
      mb.send(pids[i], me)
      if i % 1000 == 0 then
        while got < i do sum = sum + S.recv(nil, 30000) got = got + 1 end
      end
    end
    while got < N do sum = sum + S.recv(nil, 30000) got = got + 1 end
    assert.are.equal(N * (N + 1) / 2, sum)
    for i = 1, N do mb.exit(pids[i], "kill") end
  end)
end)
