-- The host's stop on SIGTERM (Erlang's init:stop): the first process and
-- the processes spawned graceful get the exit signal "shutdown", what their
-- ends take down stops in its order, and the host halts once they have
-- ended, within --shutdown-timeout. Each case runs a child host and signals
-- it; every wait is bounded.
local mb = require "moonbeam"
local S = require "spec.support"

-- What each script starts with: mb, and ready(), which tells the shell
-- that the script is ready for its signals.
local PRELUDE = [[
local mb = require "moonbeam"
local ready_path = arg[1]
local function ready()
  local f = assert(io.open(ready_path, "w"))
  f:write("ready")
  f:close()
end
]]

-- Run src (after PRELUDE; it calls ready() once it is ready) in a child
-- host with the options opts; once it is ready send it each signal of sigs
-- in turn ("TERM", or a number: seconds to sleep). Returns the host's exit
-- code, its stdout and its stderr.
local function signalled(src, opts, sigs)
  local d = S.tmpdir()
  local script = S.write("stop.lua", PRELUDE .. src, d)
  local ready = d .. "/ready"
  local lines = {
    S.q(S.bin) .. " " .. (opts or "") .. " " .. S.q(script) .. " " .. S.q(ready) .. " &",
    "p=$!",
    "i=0",
    "while [ ! -e " .. S.q(ready) .. " ] && [ $i -lt 500 ]; do sleep 0.02; i=$((i+1)); done",
  }
  for _, s in ipairs(sigs or { "TERM" }) do
    lines[#lines + 1] = type(s) == "number" and ("sleep " .. s) or ("kill -" .. s .. " $p")
  end
  lines[#lines + 1] = "wait $p"
  lines[#lines + 1] = "echo \"rc=$?\""
  local code, out, err = S.sh(table.concat(lines, "\n"), nil, 30)
  assert.are.equal(0, code, out .. err)
  local rc = tonumber(out:match("rc=(%d+)\n$"))
  assert(rc, out .. err)
  return rc, out:gsub("rc=%d+\n$", ""), err
end


describe("SIGTERM", function()
  after_each(function() S.cleanup_tmp() end)

  it("gives a first process that traps exits the EXIT 'shutdown' from itself, and exits 0 when it ends", function()
    local rc, out, err = signalled([[
      mb.trap_exit(true)
      print("stopping before", mb.stopping())
      ready()
      local m = mb.receive()
      print(m.event, m.reason, m.pid == mb.self(), "stopping", mb.stopping())
      mb.sleep(100)   -- its own clean-up
      print("cleaned up")
    ]])
    assert.are.equal(0, rc, err)
    assert.are.equal("stopping before\tfalse\nEXIT\tshutdown\ttrue\tstopping\ttrue\ncleaned up\n",
                     out, err)
  end)

  it("stops a supervisor tree linked to the first process in reverse start order, then ends the other processes", function()
    local rc, out, err = signalled([[
      local supervisor = require "moonbeam.supervisor"
      local server = require "moonbeam.server"
      io.stdout:setvbuf("line")
      local function worker(n)
        return { id = n, start = function()
          return server.start({
            init = function() mb.trap_exit(true) return n end,
            terminate = function(r, st) mb.sleep(50) print("terminate", st, r) end,
          }, n, { link = true })
        end }
      end
      assert(supervisor.start { link = true, children = { worker(1), worker(2), worker(3) } })
      for _ = 1, 3 do mb.spawn(function() while true do mb.receive() end end) end
      mb.spawn(function() while true do end end)   -- computes for ever
      ready()
      mb.receive()
    ]], "--schedulers 2")
    assert.are.equal(0, rc, err)
    assert.are.equal("terminate\t3\tshutdown\nterminate\t2\tshutdown\nterminate\t1\tshutdown\n",
                     out, err)
  end)

  it("waits for a trapping process linked to the first one to finish its clean-up", function()
    local rc, out, err = signalled([[
      mb.spawn_link(function()
        mb.trap_exit(true)
        local m = mb.receive()
        mb.sleep(300)
        print("linked one got", m.reason, "and cleaned up")
      end)
      ready()
      mb.receive()
    ]])
    assert.are.equal(0, rc, err)
    assert.are.equal("linked one got\tshutdown\tand cleaned up\n", out, err)
  end)

  it("stops a graceful process after the first one ended", function()
    local rc, out, err = signalled([[
      mb.spawn_opt({ graceful = true }, function(ready)
        mb.trap_exit(true)
        ready()
        local m = mb.receive()
        mb.sleep(100)
        print("graceful one got", m.event, m.reason, m.pid == mb.self())
      end, ready)
      mb.spawn(function() mb.receive() end)   -- not graceful: ended by the halt
    ]])
    assert.are.equal(0, rc, err)
    assert.are.equal("graceful one got\tEXIT\tshutdown\ttrue\n", out, err)
  end)

  it("runs the terminate of a graceful server that traps exits", function()
    local rc, out, err = signalled([[
      local server = require "moonbeam.server"
      assert(server.start({
        init = function() mb.trap_exit(true) return "state" end,
        terminate = function(reason, st) mb.sleep(100) print("terminate", reason, st) end,
      }, nil, { graceful = true }))
      ready()
    ]])
    assert.are.equal(0, rc, err)
    assert.are.equal("terminate\tshutdown\tstate\n", out, err)
  end)

  it("sends 'shutdown' at once to a process spawned graceful while the host stops", function()
    local rc, out, err = signalled([[
      mb.trap_exit(true)
      ready()
      mb.receive()
      local pid, ref = mb.spawn_opt({ graceful = true, monitor = true }, function()
        mb.sleep(5000)
      end)
      local down = mb.receive(function(m) return m.ref == ref end, 5000)
      print("late one ended", down and down.reason)
    ]])
    assert.are.equal(0, rc, err)
    assert.are.equal("late one ended\tshutdown\n", out, err)
  end)

  it("does not let a supervisor restart a child the stop ended", function()
    local rc, out, err = signalled([[
      local supervisor = require "moonbeam.supervisor"
      io.stdout:setvbuf("line")
      -- The child is graceful: the stop reaches it as soon as its supervisor.
      local child = { id = "g", start = function()
        print("started")
        return mb.spawn_opt({ link = true, graceful = true }, function()
          mb.trap_exit(true)
          mb.receive()
        end)
      end }
      assert(supervisor.start { link = true, children = { child } })
      ready()
      mb.receive()
    ]])
    assert.are.equal(0, rc, err)
    assert.are.equal("started\n", out, err)
    assert.is_false(S.has(err, "SUPERVISOR REPORT"), err)
  end)

  it("halts with 143 and names who held it up when the stop runs past --shutdown-timeout", function()
    local rc, out, err = signalled([[
      mb.trap_exit(true)
      mb.register("stubborn")
      ready()
      while true do mb.receive() end
    ]], "--shutdown-timeout 300")
    assert.are.equal(143, rc, out .. err)
    assert.is_true(S.has(err, "stopping: 1 process had not ended after 300 ms (--shutdown-timeout): <"),
                   err)
  end)

  it("halts at once on a second SIGTERM, or with --shutdown-timeout 0", function()
    local src = [[
      mb.trap_exit(true)
      ready()
      while true do mb.receive() end
    ]]
    local rc, out, err = signalled(src, nil, { "TERM", 0.2, "TERM" })
    assert.are.equal(143, rc, out .. err)
    assert.is_false(S.has(err, "had not ended"), err)
    rc, out, err = signalled(src, "--shutdown-timeout 0")
    assert.are.equal(143, rc, out .. err)
    assert.are.equal("", err)
  end)

  it("is not SIGINT's: SIGINT halts at once with 130", function()
    local rc, out, err = signalled([[
      mb.trap_exit(true)
      ready()
      while true do mb.receive() end
    ]], nil, { "INT" })
    assert.are.equal(130, rc, out .. err)
  end)

  it("exits 1 when the first process crashes while the host stops", function()
    local rc, out, err = signalled([[
      mb.trap_exit(true)
      ready()
      mb.receive()
      error("clean-up failed")
    ]])
    assert.are.equal(1, rc, out .. err)
    assert.is_true(S.has(err, "clean-up failed"), err)
  end)

  it("drains an HTTP server: the request in progress is answered, idle connections close, new ones are refused", function()
    -- The server would wait 60 s for connections it asked to stop; the
    -- host's stop is given 5: a server that waited for the idle one would
    -- be halted (143).
    local rc, out, err = signalled([[
      local http = require "moonbeam.http"
      local tcp = require "moonbeam.tcp"
      io.stdout:setvbuf("line")
      local srv = assert(http.listen("127.0.0.1", 0, function(req, res)
        if req.path == "/slow" then mb.sleep(1000) end
        res:send(req.path .. " answered\n")
      end, { shutdown_timeout = 60000 }))
      local port = srv:port()
      -- Clients in this host, one with its request in the handler when the
      -- stop comes, one idle on a keep-alive connection.
      mb.spawn_opt({ graceful = true }, function(port, ready)
        mb.trap_exit(true)
        local idle = assert(tcp.connect("127.0.0.1", port))
        assert(idle:write("GET /fast HTTP/1.1\r\nHost: x\r\n\r\n"))
        assert(idle:read(5000):find("/fast answered", 1, true))
        local busy = assert(tcp.connect("127.0.0.1", port))
        assert(busy:write("GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"))
        mb.sleep(200)
        ready()
        local got = ""
        for _ = 1, 20 do
          local data = busy:read(5000)
          if not data then break end
          got = got .. data
          if got:find("answered\n", 1, true) then break end
        end
        print("answer", got:match("^HTTP/1.1 (%d+)"), got:match("\r\n\r\n(.*)$"))
        print("idle keep-alive connection", idle:read(5000) == nil and "closed" or "open")
        local again = tcp.connect("127.0.0.1", port)
        print("new connection", again and "accepted" or "refused")
      end, port, ready)
      mb.receive()
    ]], "--shutdown-timeout 5000")
    assert.are.equal(0, rc, err)
    assert.are.equal("answer\t200\t/slow answered\n\nidle keep-alive connection\tclosed\n" ..
                     "new connection\trefused\n", out, err)
  end)

  it("closes a WebSocket whose handler does not trap exits going away (1001)", function()
    local rc, out, err = signalled([[
      local http = require "moonbeam.http"
      local websocket = require "moonbeam.websocket"
      local srv = assert(http.listen("127.0.0.1", 0, function(req, res)
        local ws = assert(websocket.upgrade(req, res))
        while ws:read() do end
      end))
      mb.spawn_opt({ graceful = true }, function(port, ready)
        mb.trap_exit(true)
        local websocket = require "moonbeam.websocket"
        local ws = assert(websocket.connect("127.0.0.1", port, "/", { timeout = 5000 }))
        ws:set_active(true)
        ready()
        local m = mb.receive(function(m) return type(m) == "table" and m.event == "ws_closed" end, 5000)
        print("closed", m and m.code)
      end, srv:port(), ready)
    ]])
    assert.are.equal(0, rc, err)
    assert.are.equal("closed\t1001\n", out, err)
  end)

  it("stops the chat example with a user connected: exit code 0, no report, the user disconnected", function()
    local d = S.tmpdir()
    -- A user who joins a room (a user process, a room, the registry), then
    -- reads until the chat closes the connection.
    local client = S.write("client.lua", [[
      local tcp = require "moonbeam.tcp"
      local c = assert(tcp.connect("127.0.0.1", tonumber(arg[1])))
      assert(c:write("alice\n/join lobby\nhello\n"))
      for _ = 1, 100 do if c:read(10000) == nil then break end end
      print("the chat closed the connection")
    ]], d)
    local o, e = S.q(d .. "/out"), S.q(d .. "/err")
    local code, out, err = S.sh(table.concat({
      S.q(S.bin) .. " examples/chat/main.lua --tcp 0 --http 0 >" .. o .. " 2>" .. e .. " &",
      "p=$!",
      "i=0",
      "while ! grep -qs 'chat: running' " .. o .. " && [ $i -lt 500 ]; do sleep 0.02; i=$((i+1)); done",
      "port=$(sed -n 's/^chat: TCP  on [^:]*:\\([0-9]*\\) .*/\\1/p' " .. o .. ")",
      S.q(S.bin) .. " " .. S.q(client) .. " $port >" .. S.q(d .. "/client") .. " &",
      "c=$!",
      "sleep 0.5",
      "kill -TERM $p",
      "wait $p",
      "echo \"rc=$?\"",
      "wait $c",
      "cat " .. S.q(d .. "/client"),
      "cat " .. e .. " >&2",
    }, "\n"), nil, 30)
    assert.are.equal(0, code, out .. err)
    assert.are.equal("rc=0\nthe chat closed the connection\n", out, err)
    assert.are.equal("", err)
  end)

  -- A signal sent to the process goes to a thread that does not block it;
  -- a thread other than the main one that took SIGTERM ended the host by
  -- its default action (the thread pool's, started before the mask was
  -- set, did).
  it("is taken by the main thread alone: every other thread blocks it", function()
    local code, out, err = S.child([[
      local mb = require "moonbeam"
      local fs = require "moonbeam.fs"
      fs.read_file("/proc/self/stat")   -- the pool has started
      local pid = io.open("/proc/self/stat"):read("*l"):match("^(%d+)")
      local ls = io.popen("ls /proc/" .. pid .. "/task")
      local threads, taking = 0, {}
      for tid in ls:lines() do
        local status = io.open("/proc/" .. pid .. "/task/" .. tid .. "/status")
        local blk = status and status:read("*a"):match("SigBlk:%s*(%x+)")
        if status then status:close() end
        if blk and tid ~= pid then
          threads = threads + 1
          -- SIGTERM is 15: bit 14 of the mask.
          local low = tonumber(blk:sub(-8), 16)
          if math.floor(low / 2^14) % 2 == 0 then taking[#taking + 1] = tid end
        end
      end
      ls:close()
      print(threads > 16, #taking)
    ]])
    assert.are.equal(0, code, err)
    assert.are.equal("true\t0\n", out, err)
  end)

  it("takes --shutdown-timeout as a whole number of ms", function()
    for _, bad in ipairs { "-1", "soon", "" } do
      local code, _, err = S.moonbeam("--shutdown-timeout " .. S.q(bad) .. " -e 'print(1)'")
      assert.are.equal(1, code, bad)
      assert.is_true(S.has(err, "--shutdown-timeout needs a whole number >= 0"), err)
    end
    local code, out = S.moonbeam("--shutdown-timeout=0 -e 'print(1)'")
    assert.are.equal(0, code)
    assert.are.equal("1\n", out)
  end)

  it("checks the graceful option of server.start and supervisor.start", function()
    local server = require "moonbeam.server"
    local supervisor = require "moonbeam.supervisor"
    assert.has_error(function() server.start({}, nil, { graceful = "yes" }) end,
                     "server.start: opts.graceful must be a boolean, got string")
    assert.has_error(function() supervisor.start { graceful = 1 } end,
                     "supervisor.start: graceful must be a boolean, got number")
    assert.is_false(mb.stopping())
  end)
end)
