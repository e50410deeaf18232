-- Specs of the chat example (examples/chat). They run inside the host:
--   busted --lua=build/moonbeam spec/chat_spec.lua
-- Each test starts a chat (its supervisor, registry, rooms and listeners are
-- processes of this host) on free ports of 127.0.0.1, talks to it with real
-- TCP (and WebSocket) clients owned by the test process, stops it, and checks
-- that no process is left. Every read has a deadline; every loop is bounded.
local mb = require "moonbeam"
local S = require "spec.support"

package.path = "examples/chat/?.lua;" .. package.path
local chat = require "chat"

local tcp_ok, tcp = pcall(require, "moonbeam.tcp")
local ws_ok, websocket = pcall(require, "moonbeam.websocket")
local http_ok = pcall(require, "moonbeam.http")

-- -- A line client over TCP ----------------------------------------------

local client = {}
client.__index = client

local function connect(info)
  local sock = assert(tcp.connect("127.0.0.1", info.tcp_port, S.T))
  return setmetatable({ sock = sock, buf = "", lines = {} }, client)
end

-- A WebSocket user's connection, and a function that reads its lines up
-- to the one wanted.
local function ws_connect(info)
  local ws = assert(websocket.connect("127.0.0.1", info.http_port, "/ws", { timeout = S.T }))
  local function skip_to(want)
    for _ = 1, 100 do
      local data, err = ws:read(S.T)
      assert(data, "websocket read: " .. tostring(err))
      if data == want then return end
    end
    error("no line " .. want)
  end
  return ws, skip_to
end

-- The next line (without its line end), or nil, err after `timeout` ms.
function client:line(timeout)
  local deadline = mb.now() + (timeout or S.T)
  while true do
    local nl = self.buf:find("\n", 1, true)
    if nl then
      local line = self.buf:sub(1, nl - 1)
      self.buf = self.buf:sub(nl + 1)
      return line
    end
    local left = math.ceil(deadline - mb.now())
    if left <= 0 then return nil, "timeout" end
    local data, err = self.sock:read(left)
    if not data then return nil, err end
    self.buf = self.buf .. data
  end
end

-- The next line, which must be `want`.
function client:expect(want, timeout)
  local got, err = self:line(timeout)
  assert.equal(want, got, "expected line " .. want .. " (" .. tostring(err) .. ")")
end

-- Skip lines until one equals `want` (at most 200 lines); fail if none does.
function client:skip_to(want, timeout)
  for _ = 1, 200 do
    local got, err = self:line(timeout)
    assert(got, "waiting for line " .. want .. ": " .. tostring(err))
    if got == want then return end
  end
  error("line " .. want .. " did not come within 200 lines")
end

function client:send(text)
  assert(self.sock:write(text))
end

-- Send a command and wait for its answer.
function client:cmd(line, answer)
  self:send(line .. "\n")
  self:skip_to(answer)
end

-- Connect, read the welcome, take a nick, optionally join a room.
local function user(info, nick, room)
  local c = connect(info)
  local welcome = assert(c:line())
  assert.truthy(welcome:match("^%* welcome guest%d+: /nick <name>, /join <room>, /who, /quit$"), welcome)
  c:cmd("/nick " .. nick, "* you are " .. nick)
  if room then c:cmd("/join " .. room, "* joined " .. room) end
  c.nick = nick
  return c
end

function client:close()
  self.sock:close()
end

-- The connection must end (the server closed it) within the bound; lines
-- before that are skipped.
function client:expect_closed(timeout)
  local deadline = mb.now() + (timeout or S.T)
  for _ = 1, 1000 do
    local left = math.ceil(deadline - mb.now())
    if left <= 0 then break end
    local data, err = self.sock:read(left)
    if not data then
      assert.equal("closed", err)
      return
    end
  end
  error("the server did not close the connection")
end

-- The members of `room` as a sorted list of nicks.
local function nicks(info, room)
  local list = assert(chat.members(info, room), "no answer from the registry")
  local out = {}
  for i, m in ipairs(list) do out[i] = m.nick end
  table.sort(out)
  return out
end

local function pid_of(info, room, nick)
  for _, m in ipairs(assert(chat.members(info, room))) do
    if m.nick == nick then return m.pid end
  end
end

-- -- The tests -------------------------------------------------------------

describe("the chat example", function()
  if not tcp_ok then
    it("needs moonbeam.tcp", function() error("moonbeam.tcp: " .. tostring(tcp)) end)
    return
  end

  local before, info, clients

  before_each(function()
    before = S.snapshot()
    clients = {}
    info = assert(chat.start({ host = "127.0.0.1", tcp_port = 0, http_port = false }))
    assert.is_number(info.tcp_port)
  end)

  after_each(function()
    for _, c in ipairs(clients) do c:close() end
    chat.stop(info)
    S.check_clean(before)
  end)

  local function new_user(nick, room)
    local c = user(info, nick, room)
    clients[#clients + 1] = c
    return c
  end

  it("greets a user and answers the commands outside a room", function()
    local c = new_user("ann")
    c:cmd("/who", "* not in a room")
    c:cmd("hello?", "* join a room first")
    c:cmd("/dance", "* unknown command /dance")
    c:cmd("/nick", "* usage: /nick <name> (1-32 letters, digits, _ - . #)")
    c:cmd("/nick two words", "* usage: /nick <name> (1-32 letters, digits, _ - . #)")
    c:cmd("/join", "* usage: /join <room> (1-32 letters, digits, _ - . #)")
    c:cmd("/nick anne\r", "* you are anne")   -- "\r\n" line ends are accepted
  end)

  it("gives every connection its own guest number", function()
    local a, b = connect(info), connect(info)
    clients[1], clients[2] = a, b
    local na = assert(a:line()):match("^%* welcome guest(%d+):")
    local nb = assert(b:line()):match("^%* welcome guest(%d+):")
    assert.truthy(na and nb)
    assert.are_not.equal(na, nb)
  end)

  it("lets two users in a room see each other's messages, not their own", function()
    local a = new_user("ann", "lobby")
    local b = new_user("bob", "lobby")
    a:expect("* bob joined lobby")
    a:send("hi bob\n")
    b:expect("[lobby] ann: hi bob")
    b:send("hi ann\n")
    a:expect("[lobby] bob: hi ann")
    -- Nothing of their own came back: the next line each reads is /who's answer.
    a:send("/who\n")
    a:expect("* in lobby: ann, bob")
    b:send("/who\n")
    b:expect("* in lobby: ann, bob")
    assert.same({ "ann", "bob" }, nicks(info, "lobby"))
  end)

  it("renames a member of a room", function()
    local a = new_user("ann", "lobby")
    local b = new_user("bob", "lobby")
    a:expect("* bob joined lobby")
    b:cmd("/nick robert", "* you are robert")
    b:send("it is robert now\n")
    a:expect("[lobby] robert: it is robert now")
    a:cmd("/who", "* in lobby: ann, robert")
  end)

  it("moves a user between rooms with /join", function()
    local a = new_user("ann", "one")
    local b = new_user("bob", "one")
    local c = new_user("cid", "two")
    a:expect("* bob joined one")
    a:cmd("/join two", "* joined two")
    b:expect("* ann left one")
    c:expect("* ann joined two")
    a:send("over here\n")
    c:expect("[two] ann: over here")
    b:send("anyone?\n")
    b:send("/who\n")
    b:expect("* in one: bob")
    a:send("/who\n")                    -- ann did not get bob's line: the next one is the answer
    a:expect("* in two: cid, ann")
    a:cmd("/join two", "* joined two")  -- joining the room one is in changes nothing
    a:cmd("/who", "* in two: cid, ann")
  end)

  it("closes the connection on /quit, and the room sees the user leave", function()
    local a = new_user("ann", "lobby")
    local b = new_user("bob", "lobby")
    a:expect("* bob joined lobby")
    b:send("/quit\n")
    b:expect("* bye")
    b:expect_closed()
    a:expect("* bob left lobby")
    a:cmd("/who", "* in lobby: ann")
  end)

  it("handles many users in many rooms", function()
    local N, ROOMS = 50, 5
    local users = {}
    for i = 1, N do
      users[i] = new_user("u" .. i, "r" .. (i % ROOMS))
    end
    -- Every user says one line; each hears the others of its room only.
    for i = 1, N do users[i]:send("from u" .. i .. "\n") end
    for i = 1, N do
      local room = "r" .. (i % ROOMS)
      local heard, want = {}, {}
      for j = 1, N do
        if j ~= i and j % ROOMS == i % ROOMS then want[#want + 1] = "[" .. room .. "] u" .. j .. ": from u" .. j end
      end
      for _ = 1, 4 * N do
        if #heard == #want then break end
        local line = assert(users[i]:line())
        if line:sub(1, 1) == "[" then heard[#heard + 1] = line end
      end
      table.sort(heard)
      table.sort(want)
      assert.same(want, heard)
      users[i]:send("/who\n")
      -- After the messages, only join notices may come before the answer.
      for _ = 1, N do
        local line = assert(users[i]:line())
        if line:match("^%* in ") then break end
        assert.truthy(line:match("^%* u%d+ joined r%d$"), line)
      end
    end
    for r = 0, ROOMS - 1 do
      assert.equal(N / ROOMS, #nicks(info, "r" .. r))
    end
  end)

  it("creates a room once when many users join it at the same moment", function()
    local N = 20
    local users = {}
    for i = 1, N do users[i] = new_user("u" .. i) end
    for i = 1, N do users[i]:send("/join same\n") end
    for i = 1, N do users[i]:skip_to("* joined same") end
    assert.equal(N, #nicks(info, "same"))
    assert.same({ "same" }, chat.rooms(info))
  end)

  it("closes an empty room, and opens it again on the next join", function()
    local a = new_user("ann", "lobby")
    a:cmd("/join elsewhere", "* joined elsewhere")
    assert.truthy(S.eventually(function()
      local list = chat.rooms(info)
      return list and #list == 1 and list[1] == "elsewhere"
    end), "the empty room did not close")
    local b = new_user("bob", "lobby")
    a:cmd("/join lobby", "* joined lobby")
    b:expect("* ann joined lobby")
    b:cmd("/who", "* in lobby: bob, ann")
  end)

  it("removes a user process that crashes from its room", function()
    local a = new_user("ann", "lobby")
    local b = new_user("bob", "lobby")
    a:expect("* bob joined lobby")
    local pid = assert(pid_of(info, "lobby", "bob"))
    local ref = mb.monitor(pid)
    mb.exit(pid, "kill")
    assert.equal("killed", S.await_down(ref))
    a:expect("* bob left lobby")
    b:expect_closed()   -- its socket died with its owner
    a:cmd("/who", "* in lobby: ann")
    -- The server goes on: a new user still gets in.
    local c = new_user("cid", "lobby")
    a:expect("* cid joined lobby")
    c:send("still here\n")
    a:expect("[lobby] cid: still here")
  end)

  it("ignores garbled messages to a room and to the registry", function()
    local a = new_user("ann", "lobby")
    local b = new_user("bob", "lobby")
    a:expect("* bob joined lobby")
    local room = assert(chat.room(info, "lobby"))
    local reg = assert(chat.registry(info))
    local ann = assert(pid_of(info, "lobby", "ann"))
    for _, m in ipairs({
      { op = "say", pid = ann }, { op = "say", pid = ann, text = {} }, { op = "join" },
      { op = "join", pid = "ann", nick = "x" }, { op = "join", pid = mb.self() },
      { op = "nick", pid = ann, nick = 5 }, { op = "who", pid = "ann" }, { op = "members" }, 42,
    }) do mb.send(room, m) end
    for _, m in ipairs({
      { op = "join", pid = mb.self() }, { op = "join", room = "x", pid = "me" }, { op = "guest" },
      { op = "members", room = "lobby" }, { op = "rooms" }, { op = "room", room = "lobby" }, "hello",
    }) do mb.send(reg, m) end
    b:send("still one room\n")
    a:expect("[lobby] bob: still one room")
    assert.equal(room, chat.room(info, "lobby"))
    assert.equal(reg, chat.registry(info))
    a:cmd("/who", "* in lobby: ann, bob")
  end)

  it("lets users join again after the registry crashed and was restarted", function()
    local a = new_user("ann", "lobby")
    local b = new_user("bob", "lobby")
    a:expect("* bob joined lobby")
    local reg = assert(chat.registry(info))
    mb.exit(reg, "kill")
    -- The rooms are linked to the registry and end with it; their members see it.
    a:expect("* the room lobby has closed")
    b:expect("* the room lobby has closed")
    assert.truthy(S.eventually(function()
      local now = chat.registry(info)
      return now ~= nil and now ~= reg
    end), "the supervisor did not restart the registry")
    a:cmd("/who", "* not in a room")
    a:cmd("/join lobby", "* joined lobby")
    b:cmd("/join lobby", "* joined lobby")
    a:expect("* bob joined lobby")
    b:send("back again\n")
    a:expect("[lobby] bob: back again")
  end)

  it("survives a disconnect in the middle of a line", function()
    local a = new_user("ann", "lobby")
    local b = connect(info)
    assert(b:line())
    b:send("/nick bob\n/join lobby\nthis line never ends")
    a:expect("* bob joined lobby")
    b:close()
    a:expect("* bob left lobby")
    a:cmd("/who", "* in lobby: ann")
    local c = new_user("cid", "lobby")
    a:expect("* cid joined lobby")
  end)

  it("puts lines together across reads and splits several lines in one read", function()
    local a = new_user("ann", "lobby")
    local b = new_user("bob", "lobby")
    a:expect("* bob joined lobby")
    b:send("hel")
    mb.sleep(20)
    b:send("lo\r")
    mb.sleep(20)
    b:send("\nsecond\nthird\n")
    a:expect("[lobby] bob: hello")
    a:expect("[lobby] bob: second")
    a:expect("[lobby] bob: third")
  end)

  it("refuses a line over the limit and closes the connection", function()
    local a = new_user("ann", "lobby")
    local b = new_user("bob", "lobby")
    a:expect("* bob joined lobby")
    b:send(string.rep("x", 5000))
    b:expect("* error: line too long (more than 4096 bytes)")
    b:expect_closed()
    a:expect("* bob left lobby")
    -- A line of exactly the limit is fine.
    local c = new_user("cid", "lobby")
    a:expect("* cid joined lobby")
    c:send(string.rep("y", 4096) .. "\n")
    a:expect("[lobby] cid: " .. string.rep("y", 4096))
  end)
end)

describe("the chat example with idle users and rooms hibernating", function()
  if not (tcp_ok and http_ok and ws_ok) then
    it("needs moonbeam.tcp, moonbeam.http and moonbeam.websocket", function() error("not available") end)
    return
  end

  -- Short enough for a test, long compared with a line's round trip.
  local HIB = 50
  local before, info, clients

  before_each(function()
    before = S.snapshot()
    clients = {}
    info = assert(chat.start({ host = "127.0.0.1", tcp_port = 0, http_port = 0, hibernate_after = HIB }))
  end)

  after_each(function()
    for _, c in ipairs(clients) do c:close() end
    chat.stop(info)
    S.check_clean(before)
  end)

  local function new_user(nick, room)
    local c = user(info, nick, room)
    clients[#clients + 1] = c
    c.pid = room and pid_of(info, room, nick)
    return c
  end

  -- Waits (bounded) until every pid in the list hibernates.
  local function all_hibernate(pids)
    return S.eventually(function()
      for _, p in ipairs(pids) do
        local i = mb.info(p)
        if not i or i.status ~= "hibernated" then return false end
      end
      return true
    end)
  end

  it("hibernates idle users and rooms; the chat goes on as before", function()
    local a = new_user("ann", "lobby")
    local b = new_user("bob", "lobby")
    a:expect("* bob joined lobby")
    local room = assert(chat.room(info, "lobby"))
    local all = { a.pid, b.pid, room }
    assert.is_true(all_hibernate(all))
    -- What is left of each is its process record, its continuation and its
    -- data (an awake user holds a whole Lua state: tens of KB).
    for _, p in ipairs(all) do
      local m = mb.info(p).memory
      assert.is_true(m < 4096, tostring(p) .. " hibernated in " .. m .. " bytes")
    end
    -- A user's continuation names its module and leaves out the default
    -- limits (user.lua): with its record, under 1 KB (it was 1.2).
    for _, p in ipairs({ a.pid, b.pid }) do
      local m = mb.info(p).memory
      assert.is_true(m < 1024, tostring(p) .. " hibernated in " .. m .. " bytes")
    end
    a:send("hi bob\n")
    b:expect("[lobby] ann: hi bob")
    assert.is_true(all_hibernate(all))
    b:cmd("/nick robert", "* you are robert")
    assert.is_true(all_hibernate(all))
    b:send("it is robert now\n")
    a:expect("[lobby] robert: it is robert now")
    assert.is_true(all_hibernate(all))
    a:cmd("/who", "* in lobby: ann, robert")
    assert.is_true(all_hibernate(all))
    -- Lines that come in pieces, across a hibernation of their user.
    a:send("hel")
    assert.is_true(all_hibernate(all))
    a:send("lo\r\nsecond\n")
    b:expect("[lobby] ann: hello")
    b:expect("[lobby] ann: second")
    assert.is_true(all_hibernate(all))
    a:cmd("/join other", "* joined other")
    b:expect("* ann left lobby")
    local other = assert(chat.room(info, "other"))
    assert.is_true(all_hibernate({ a.pid, b.pid, room, other }))
    a:cmd("/join lobby", "* joined lobby")
    b:expect("* ann joined lobby")
    assert.is_true(all_hibernate({ a.pid, b.pid, room }))
    b:send("/quit\n")
    b:expect("* bye")
    b:expect_closed()
    a:expect("* robert left lobby")
    a:cmd("/who", "* in lobby: ann")
  end)

  it("takes out of its room a user that disconnects or is killed while hibernated", function()
    local a = new_user("ann", "lobby")
    local b = new_user("bob", "lobby")
    local c = new_user("cid", "lobby")
    a:expect("* bob joined lobby")
    a:expect("* cid joined lobby")
    local room = assert(chat.room(info, "lobby"))
    assert.is_true(all_hibernate({ a.pid, b.pid, c.pid, room }))
    -- The socket's close wakes bob's process, which leaves its room.
    b:close()
    a:expect("* bob left lobby")
    assert.is_true(all_hibernate({ a.pid, c.pid, room }))
    -- A kill ends cid's process unwoken; the room's monitor sees it.
    local ref = mb.monitor(c.pid)
    mb.exit(c.pid, "kill")
    assert.equal("killed", S.await_down(ref))
    a:expect("* cid left lobby")
    c:expect_closed()
    a:cmd("/who", "* in lobby: ann")
  end)

  it("tells hibernated users that their room closed when the registry dies", function()
    local a = new_user("ann", "lobby")
    local b = new_user("bob", "lobby")
    a:expect("* bob joined lobby")
    local room = assert(chat.room(info, "lobby"))
    local reg = assert(chat.registry(info))
    assert.is_true(all_hibernate({ a.pid, b.pid, room }))
    -- The room is linked to the registry: it dies unwoken, and the DOWN of
    -- its monitor wakes each user.
    local ref = mb.monitor(room)
    mb.exit(reg, "kill")
    assert.equal("killed", S.await_down(ref))
    a:expect("* the room lobby has closed")
    b:expect("* the room lobby has closed")
    assert.truthy(S.eventually(function()
      local now = chat.registry(info)
      return now ~= nil and now ~= reg
    end), "the supervisor did not restart the registry")
    a:cmd("/join lobby", "* joined lobby")
    b:cmd("/join lobby", "* joined lobby")
    a:expect("* bob joined lobby")
  end)

  it("lets a WebSocket user talk with hibernated TCP users", function()
    local t = new_user("term", "lobby")
    local ws, ws_skip_to = ws_connect(info)
    assert(ws:write("/nick web"))
    assert(ws:write("/join lobby"))
    ws_skip_to("* joined lobby")
    t:expect("* web joined lobby")
    local room = assert(chat.room(info, "lobby"))
    assert.is_true(all_hibernate({ t.pid, room }))
    assert(ws:write("hello from the browser"))
    t:expect("[lobby] web: hello from the browser")
    assert.is_true(all_hibernate({ t.pid, room }))
    t:send("hello from the terminal\n")
    ws_skip_to("[lobby] term: hello from the terminal")
    ws:close()
    t:expect("* web left lobby")
  end)

  it("refuses a bad hibernate_after, and takes 0 or false for never", function()
    for _, bad in ipairs({ "soon", -1, 0 / 0 }) do
      local ok, err = pcall(chat.start, { tcp_port = 0, http_port = false, hibernate_after = bad })
      assert.is_false(ok)
      assert.truthy(S.has(err, "chat.start: hibernate_after must be a number of ms >= 0 or false"), err)
    end
    for _, never in ipairs({ 0, false }) do
      local other = assert(chat.start({ host = "127.0.0.1", tcp_port = 0, http_port = false,
                                        hibernate_after = never }))
      local c = user(other, "ann", "lobby")
      local pid = pid_of(other, "lobby", "ann")
      c:cmd("/who", "* in lobby: ann")
      -- Idle for many times HIB, it stays awake (a slow machine only makes
      -- this pass more easily, never fail).
      mb.sleep(4 * HIB)
      assert.are_not.equal("hibernated", mb.info(pid).status)
      assert.are_not.equal("hibernated", mb.info(assert(chat.room(other, "lobby"))).status)
      c:close()
      chat.stop(other)
    end
  end)
end)

describe("the chat example with slow users", function()
  if not (tcp_ok and http_ok and ws_ok) then
    it("needs moonbeam.tcp, moonbeam.http and moonbeam.websocket", function() error("not available") end)
    return
  end

  -- Every wait below is bounded: the flood by FLOOD_MAX bytes and, like
  -- everything else, by DEADLINE ms.
  local FLOOD_MAX = 64 * 1024 * 1024
  local DEADLINE = 60000
  local LINE = string.rep("x", 1000)

  local before, info, extra

  before_each(function()
    before = S.snapshot()
    extra = {}
  end)

  after_each(function()
    for _, p in ipairs(extra) do mb.exit(p, "kill") end
    if info then chat.stop(info) end
    info = nil
    S.check_clean(before)
  end)

  local function start(opts)
    opts.host, opts.tcp_port, opts.http_port = "127.0.0.1", 0, 0
    info = assert(chat.start(opts))
  end

  -- A user in its own process that joins `room` as `nick` and reads
  -- everything (active mode, so it never falls behind), counting bytes and
  -- watching for the lines in `watch`. It answers {query = pid} with
  -- {bytes = n, seen = {line = true...}}.
  local function reader(nick, room, watch)
    local me = mb.self()
    local pid = mb.spawn(function(port)
      local tcp = require "moonbeam.tcp"
      local sock = assert(tcp.connect("127.0.0.1", port, 5000))
      assert(sock:write("/nick " .. nick .. "\n/join " .. room .. "\n"))
      sock:set_active(true)
      local bytes, seen, tail = 0, {}, ""
      local deadline = mb.now() + 60000
      while mb.now() < deadline do
        local m = mb.receive(1000)
        if type(m) == "table" and m.event == "tcp" then
          bytes = bytes + #m.data
          local s = tail .. m.data
          for _, w in ipairs(watch) do
            if s:find("\n" .. w .. "\n", 1, true) then seen[w] = true end
          end
          tail = s:sub(-200)
        elseif type(m) == "table" and m.query then
          mb.send(m.query, { bytes = bytes, seen = seen, reader = mb.self() })
        elseif type(m) == "table" and m.event then
          break
        end
      end
    end, info.tcp_port)
    extra[#extra + 1] = pid
    return pid
  end

  local function ask(pid)
    mb.send(pid, { query = mb.self() })
    return S.recv(function(m) return type(m) == "table" and m.reader == pid end)
  end

  -- A process that joins `room` as `nick`, then sends lines of LINE, 32
  -- every 5 ms (6 MB/s: far more than a client that never reads takes,
  -- little enough for the reader to keep up on a loaded machine), until
  -- FLOOD_MAX bytes are sent, or it is told "stop". It never reads.
  local function flooder(nick, room)
    local pid = mb.spawn(function(port, line, max)
      local tcp = require "moonbeam.tcp"
      local sock = assert(tcp.connect("127.0.0.1", port, 5000))
      assert(sock:write("/nick " .. nick .. "\n/join " .. room .. "\n"))
      local chunk = string.rep(line .. "\n", 32)
      local sent = 0
      while sent < max and mb.receive(5) ~= "stop" do
        if not sock:write(chunk) then break end
        sent = sent + #chunk
      end
      sock:close()
    end, info.tcp_port, LINE, FLOOD_MAX)
    extra[#extra + 1] = pid
    return pid
  end

  -- The pid of member `nick` of `room`, once it is there.
  local function member(room, nick)
    local pid
    assert.truthy(S.eventually(function()
      pid = pid_of(info, room, nick)
      return pid ~= nil
    end), nick .. " did not join " .. room)
    return pid
  end

  -- Samples mb.info of the processes in `procs` ({name = pid}) every 10 ms
  -- until done() is true (or DEADLINE); returns the largest mailbox and
  -- memory seen for each name.
  local function watch(procs, done)
    local most = {}
    for name in pairs(procs) do most[name] = { mailbox = 0, memory = 0 } end
    local deadline = mb.now() + DEADLINE
    while not done() and mb.now() < deadline do
      for name, pid in pairs(procs) do
        local i = mb.info(pid)
        if i then
          most[name].mailbox = math.max(most[name].mailbox, i.mailbox)
          most[name].memory = math.max(most[name].memory, i.memory)
        end
      end
      mb.sleep(10)
    end
    return most
  end

  -- Everything a client that never read gets now, until the server's close;
  -- returns the last line and the byte count.
  local function read_rest(read)
    local tail, total = "", 0
    for _ = 1, 100000 do
      local d, err = read()
      if not d then
        assert.equal("closed", err)
        break
      end
      total = total + #d
      tail = (tail .. d):sub(-300)
    end
    return tail:match("([^\n]*)\n?$"), total
  end

  it("drops a TCP user that never reads while another floods its room; the room goes on", function()
    start({})
    local d = require("user").DEFAULTS
    local slow = user(info, "slow", "lobby")
    local r = reader("reader", "lobby", { "* slow left lobby", "[lobby] late: still here" })
    local reader_pid = member("lobby", "reader")
    local f = flooder("flood", "lobby")
    local flood_pid = member("lobby", "flood")
    local slow_pid = member("lobby", "slow")
    local room = assert(chat.room(info, "lobby"))
    local most = watch({ room = room, slow = slow_pid, reader = reader_pid, flood = flood_pid },
                       function() return mb.info(slow_pid) == nil end)
    assert.is_nil(mb.info(slow_pid), "the slow user was not dropped")
    -- The room lives on, with the others; they saw the slow user leave.
    assert.equal(room, chat.room(info, "lobby"))
    assert.truthy(S.eventually(function() return ask(r).seen["* slow left lobby"] end, DEADLINE))
    assert.same({ "flood", "reader" }, nicks(info, "lobby"))
    mb.send(f, "stop")
    -- The slow client reads at last: its lines, then why it was dropped.
    local last, total = read_rest(function() return slow.sock:read(S.T) end)
    local n = tonumber(last:match("^%* disconnected: too slow %((%d+) messages behind%)$"))
    assert.truthy(n, "last line: " .. last)
    assert.is_true(n > d.max_behind)
    assert.is_true(total > 0)
    slow:close()
    -- Nothing grew without bound: mailboxes stayed near their limits (the
    -- slow user's by what a flood adds between two looks), heaps small.
    assert.is_true(most.slow.mailbox < d.max_behind + 2000, "slow user's mailbox " .. most.slow.mailbox)
    assert.is_true(most.room.mailbox < d.room_backlog + 2000, "room's mailbox " .. most.room.mailbox)
    assert.is_true(most.reader.mailbox < d.max_behind + 2000, "reader's mailbox " .. most.reader.mailbox)
    for name, m in pairs(most) do
      assert.is_true(m.memory < 4 * 1024 * 1024, name .. "'s memory " .. m.memory)
    end
    -- And it still serves: a new user talks to the reader.
    local late = user(info, "late", "lobby")
    late:send("still here\n")
    assert.truthy(S.eventually(function() return ask(r).seen["[lobby] late: still here"] end, DEADLINE))
    late:close()
  end)

  it("holds back a user who talks faster than the room can send, never the room", function()
    -- The room is made slow by many members (a send to each per line): 40
    -- processes that join through the registry and count what they get.
    start({ room_backlog = 50 })
    local N, LINES = 40, 10000
    local me, registry = mb.self(), assert(chat.registry(info))
    local members = {}
    for i = 1, N do
      members[i] = mb.spawn(function()
        mb.send(registry, { op = "join", room = "lobby", pid = mb.self(), nick = "m" .. i, tag = i })
        local got, deadline = 0, mb.now() + 60000
        while mb.now() < deadline do
          local m = mb.receive(1000)
          if type(m) == "string" and m:find("^%[lobby%] flood: ") then
            got = got + 1
          elseif m == "count?" then
            mb.send(me, { counted = got, member = i })
          elseif m == "stop" then
            return
          end
        end
      end)
      extra[#extra + 1] = members[i]
    end
    member("lobby", "m" .. N)
    local room = assert(chat.room(info, "lobby"))
    -- One client sends all its lines at once, as fast as TCP takes them.
    local f = mb.spawn(function(port)
      local tcp = require "moonbeam.tcp"
      local sock = assert(tcp.connect("127.0.0.1", port, 5000))
      assert(sock:write("/nick flood\n/join lobby\n"))
      local chunk = string.rep("a line from the flood\n", 500)
      for _ = 1, LINES / 500 do
        if not sock:write(chunk) then break end
      end
      mb.receive(60000)
    end, info.tcp_port)
    extra[#extra + 1] = f
    local function counted()
      mb.send(members[N], "count?")
      return S.recv(function(m) return type(m) == "table" and m.counted end).counted
    end
    local most = watch({ room = room }, function() return counted() == LINES end)
    assert.equal(LINES, counted())
    -- The room stayed near room_backlog (plus what one talker sends between
    -- two looks at it), yet every line reached every member.
    assert.is_true(most.room.mailbox < 50 + 200, "room's mailbox " .. most.room.mailbox)
    for i = 1, N do mb.send(members[i], "stop") end
  end)

  -- A line longer than max_output (a /who of a big room) could never fit
  -- under it: the user who asked was dropped as too slow after max_stall,
  -- though it read everything (red team). It goes out on an empty queue.
  it("sends a line longer than max_output to a user who keeps up", function()
    start({ max_output = 8192, max_stall = 300 })
    local members = {}
    for i = 1, 260 do   -- (32-byte nicks: /who's line is ~8.8 KB)
      members[i] = user(info, string.format("member%026d", i), "big")
    end
    local asker = user(info, "asker", "big")
    asker:send("/who\n")
    local line
    for _ = 1, 400 do
      line = assert(asker:line())
      if line:find("^%* in big: ") or line:find("^%* disconnected") then break end
    end
    assert.truthy(line:find("^%* in big: "), line:sub(1, 200))
    assert.truthy(#line > 8192, #line)
    asker:cmd("/who", "* in big: " .. line:sub(11))   -- still connected, and served again
    asker:close()
    for _, m in ipairs(members) do m:close() end
  end)

  it("drops a user whose output stays over max_output for max_stall ms", function()
    start({ max_behind = 1e9, max_stall = 200 })
    local slow = user(info, "slow", "lobby")
    reader("reader", "lobby", {})
    member("lobby", "reader")
    local f = flooder("flood", "lobby")
    local slow_pid = member("lobby", "slow")
    watch({ slow = slow_pid }, function() return mb.info(slow_pid) == nil end)
    assert.is_nil(mb.info(slow_pid), "the slow user was not dropped")
    mb.send(f, "stop")
    local last = read_rest(function() return slow.sock:read(S.T) end)
    assert.equal("* disconnected: too slow (more than 32768 bytes unread for 200 ms)", last)
    slow:close()
  end)

  it("drops a WebSocket user that never reads, closing with 1008", function()
    start({ max_behind = 200 })
    local ws = assert(websocket.connect("127.0.0.1", info.http_port, "/ws", { timeout = S.T }))
    assert(ws:write("/nick web"))
    assert(ws:write("/join lobby"))
    local ws_pid = member("lobby", "web")
    local f = flooder("flood", "lobby")
    watch({ web = ws_pid }, function() return mb.info(ws_pid) == nil end)
    assert.is_nil(mb.info(ws_pid), "the slow WebSocket user was not dropped")
    mb.send(f, "stop")
    local last
    for _ = 1, 1000000 do
      local data, err = ws:read(S.T)
      if not data then
        assert.equal("closed", err)
        break
      end
      last = data
    end
    assert.truthy(last:match("^%* disconnected: too slow %(%d+ messages behind%)$"), last)
    ws:close()
  end)

  it("drops a hibernated user that never reads once a flood wakes it", function()
    start({ hibernate_after = 50 })
    local slow = user(info, "slow", "lobby")
    local r = reader("reader", "lobby", { "* slow left lobby" })
    member("lobby", "reader")
    local slow_pid = member("lobby", "slow")
    local room = assert(chat.room(info, "lobby"))
    assert.truthy(S.eventually(function()
      return mb.info(slow_pid).status == "hibernated" and mb.info(room).status == "hibernated"
    end), "the slow user and the room did not hibernate")
    local f = flooder("flood", "lobby")
    local most = watch({ slow = slow_pid }, function() return mb.info(slow_pid) == nil end)
    assert.is_nil(mb.info(slow_pid), "the slow user was not dropped")
    assert.truthy(S.eventually(function() return ask(r).seen["* slow left lobby"] end, DEADLINE))
    mb.send(f, "stop")
    local last = read_rest(function() return slow.sock:read(S.T) end)
    assert.truthy(last:match("^%* disconnected: too slow %(.+%)$"), "last line: " .. last)
    slow:close()
    assert.is_true(most.slow.mailbox < 1000 + 2000, "slow user's mailbox " .. most.slow.mailbox)
  end)

  -- A hibernated user leaves out the limits that are the defaults and gets
  -- them back when it wakes; the others it keeps.
  it("keeps a user's own limits and the defaults across its hibernations", function()
    start({ hibernate_after = 50, max_behind = 1e9, max_stall = 300 })
    local slow = user(info, "slow", "lobby")
    reader("reader", "lobby", {})
    member("lobby", "reader")
    local slow_pid = member("lobby", "slow")
    assert.truthy(S.eventually(function() return mb.info(slow_pid).status == "hibernated" end),
                  "the slow user did not hibernate")
    local f = flooder("flood", "lobby")
    watch({ slow = slow_pid }, function() return mb.info(slow_pid) == nil end)
    assert.is_nil(mb.info(slow_pid), "the slow user was not dropped")
    mb.send(f, "stop")
    local last = read_rest(function() return slow.sock:read(S.T) end)
    -- max_output is the default's, max_stall this chat's.
    assert.equal("* disconnected: too slow (more than 32768 bytes unread for 300 ms)", last)
    slow:close()
  end)

  it("holds back a fast talker and wakes it by its timer when it hibernates meanwhile", function()
    -- hibernate_after = 1: a talker held back hibernates while it waits
    -- ROOM_WAIT ms for its room, and its own READ_MORE timer wakes it; the
    -- room and the talker hibernate whenever the flood pauses.
    start({ room_backlog = 50, hibernate_after = 1 })
    local N, LINES = 40, 5000
    local me, registry = mb.self(), assert(chat.registry(info))
    local members = {}
    for i = 1, N do
      members[i] = mb.spawn(function()
        mb.send(registry, { op = "join", room = "lobby", pid = mb.self(), nick = "m" .. i, tag = i })
        local got, deadline = 0, mb.now() + 60000
        while mb.now() < deadline do
          local m = mb.receive(1000)
          if type(m) == "string" and m:find("^%[lobby%] flood: ") then
            got = got + 1
          elseif m == "count?" then
            mb.send(me, { counted = got, member = i })
          elseif m == "stop" then
            return
          end
        end
      end)
      extra[#extra + 1] = members[i]
    end
    member("lobby", "m" .. N)
    local room = assert(chat.room(info, "lobby"))
    local f = mb.spawn(function(port)
      local tcp = require "moonbeam.tcp"
      local sock = assert(tcp.connect("127.0.0.1", port, 5000))
      assert(sock:write("/nick flood\n/join lobby\n"))
      local chunk = string.rep("a line from the flood\n", 500)
      for _ = 1, LINES / 500 do
        if not sock:write(chunk) then break end
      end
      mb.receive(60000)
    end, info.tcp_port)
    extra[#extra + 1] = f
    local function counted()
      mb.send(members[N], "count?")
      return S.recv(function(m) return type(m) == "table" and m.counted end).counted
    end
    local most = watch({ room = room }, function() return counted() == LINES end)
    assert.equal(LINES, counted())
    assert.is_true(most.room.mailbox < 50 + 200, "room's mailbox " .. most.room.mailbox)
    for i = 1, N do mb.send(members[i], "stop") end
  end)

  it("refuses bad limits", function()
    local function err_of(opts)
      opts.tcp_port, opts.http_port = 0, false
      local ok, err = pcall(chat.start, opts)
      assert.is_false(ok)
      return tostring(err)
    end
    assert.truthy(S.has(err_of({ max_behind = 0 }), "chat.start: max_behind must be a number > 0, got 0"))
    assert.truthy(S.has(err_of({ max_stall = "soon" }), "chat.start: max_stall must be a number > 0, got soon"))
    assert.truthy(S.has(err_of({ room_backlog = 0 / 0 }), "chat.start: room_backlog must be a number > 0"))
    assert.truthy(S.has(err_of({ max_output = 1e6 }), "chat.start: max_output must be from 8192 to 57344 bytes"))
  end)
end)

describe("the chat command (examples/chat/main.lua)", function()
  teardown(function() S.cleanup_tmp() end)

  it("prints where to connect", function()
    -- It runs until stopped: stop it once it says it runs (or after 20 s).
    local dir = S.tmpdir()
    local o, e = S.q(dir .. "/out"), S.q(dir .. "/err")
    local _, out, err = S.sh(S.q(S.bin) .. " examples/chat/main.lua --tcp 0 --http 0 >" .. o .. " 2>" .. e ..
      " & pid=$!; i=0; while [ $i -lt 200 ] && ! grep -q 'chat: running' " .. o ..
      "; do sleep 0.1; i=$((i+1)); done; kill $pid; wait $pid; cat " .. o .. "; cat " .. e .. " >&2", nil, 30)
    assert.truthy(out:match("chat: TCP  on 127%.0%.0%.1:%d+   connect with: nc 127%.0%.0%.1 %d+"), out .. err)
    assert.truthy(out:match("chat: HTTP on 127%.0%.0%.1:%d+   open http://127%.0%.0%.1:%d+/ in a browser"), out .. err)
  end)

  it("explains its options, and refuses bad ones", function()
    local code, out = S.moonbeam("examples/chat/main.lua --help")
    assert.equal(0, code)
    assert.truthy(out:find("--tcp PORT", 1, true))
    local code2, _, err2 = S.moonbeam("examples/chat/main.lua --tcp seventy")
    assert.equal(2, code2)
    assert.truthy(err2:find("bad TCP port 'seventy'", 1, true), err2)
    assert.truthy(out:find("--max-behind N", 1, true))
    local code3, _, err3 = S.moonbeam("examples/chat/main.lua --max-stall never")
    assert.equal(2, code3)
    assert.truthy(err3:find("chat: bad value 'never' for --max-stall", 1, true), err3)
    local code4, _, err4 = S.moonbeam("examples/chat/main.lua --max-output 100")
    assert.equal(2, code4)
    assert.truthy(err4:find("chat: max_output must be from 8192 to 57344 bytes", 1, true), err4)
  end)

  it("takes --hibernate-after MS, and refuses a bad one", function()
    local code, out = S.moonbeam("examples/chat/main.lua --help")
    assert.equal(0, code)
    assert.truthy(out:find("--hibernate-after MS", 1, true), out)
    local code2, _, err2 = S.moonbeam("examples/chat/main.lua --hibernate-after soon")
    assert.equal(2, code2)
    assert.truthy(err2:find("chat: bad value 'soon' for --hibernate-after", 1, true), err2)
    local code3, _, err3 = S.moonbeam("examples/chat/main.lua --hibernate-after -5")
    assert.equal(2, code3)
    assert.truthy(err3:find("chat: hibernate_after must be a number of ms >= 0 or false", 1, true), err3)
  end)

  it("says when a port is taken", function()
    local lsock = assert(tcp.listen("127.0.0.1", 0))
    local code, _, err = S.moonbeam("examples/chat/main.lua --http off --tcp " .. lsock:port())
    lsock:close()
    assert.equal(1, code)
    assert.truthy(err:find("chat: could not start", 1, true), err)
  end)
end)

describe("the chat example over WebSocket", function()
  if not (tcp_ok and http_ok and ws_ok) then
    it("needs moonbeam.tcp, moonbeam.http and moonbeam.websocket", function()
      error("not available: " .. table.concat({
        tcp_ok and "" or "moonbeam.tcp", http_ok and "" or "moonbeam.http",
        ws_ok and "" or "moonbeam.websocket" }, " "))
    end)
    return
  end

  local before, info

  before_each(function()
    before = S.snapshot()
    info = assert(chat.start({ host = "127.0.0.1", tcp_port = 0, http_port = 0 }))
    assert.is_number(info.http_port)
  end)

  after_each(function()
    chat.stop(info)
    S.check_clean(before)
  end)

  -- The body of the page, over plain HTTP/1.1 on a TCP socket.
  local function http_get(path)
    local sock = assert(tcp.connect("127.0.0.1", info.http_port, S.T))
    assert(sock:write("GET " .. path .. " HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"))
    local parts = {}
    for _ = 1, 1000 do
      local data = sock:read(S.T)
      if not data then break end
      parts[#parts + 1] = data
    end
    sock:close()
    return table.concat(parts)
  end

  it("serves the page", function()
    local resp = http_get("/")
    assert.truthy(resp:match("^HTTP/1%.1 200"), resp:sub(1, 200))
    assert.truthy(resp:find("new WebSocket", 1, true))
  end)

  it("puts a WebSocket user and a TCP user in the same room", function()
    local ws = assert(websocket.connect("127.0.0.1", info.http_port, "/ws", { timeout = S.T }))
    local function ws_line()
      local data, err = ws:read(S.T)
      assert(data, "websocket read: " .. tostring(err))
      return data
    end
    local function ws_skip_to(want)
      for _ = 1, 100 do
        if ws_line() == want then return end
      end
      error("no line " .. want)
    end
    assert.truthy(ws_line():match("^%* welcome guest%d+:"))
    assert(ws:write("/nick web"))
    ws_skip_to("* you are web")
    assert(ws:write("/join lobby"))
    ws_skip_to("* joined lobby")
    local t = user(info, "term", "lobby")
    ws_skip_to("* term joined lobby")
    assert(ws:write("hello from the browser"))
    t:expect("[lobby] web: hello from the browser")
    t:send("hello from the terminal\n")
    ws_skip_to("[lobby] term: hello from the terminal")
    assert(ws:write("/who"))
    ws_skip_to("* in lobby: web, term")
    assert(ws:write("/quit"))
    ws_skip_to("* bye")
    t:expect("* web left lobby")
    ws:close()
    t:close()
  end)

  -- A TCP user may send any bytes; a WebSocket text message must be UTF-8.
  -- Such a line took every WebSocket user of the room off the chat (its
  -- write failed, and a failed write ended the session).
  it("gives a WebSocket user a TCP user's line that is not UTF-8, cleaned, and keeps it", function()
    local ws, ws_skip_to = ws_connect(info)
    for _, line in ipairs({ "/nick web", "/join lobby" }) do assert(ws:write(line)) end
    ws_skip_to("* joined lobby")
    local t = user(info, "term", "lobby")
    ws_skip_to("* term joined lobby")
    -- Latin-1, a lone continuation byte, a cut sequence, a surrogate,
    -- then valid two-, three- and four-byte ones.
    t:send("caf\233 \128 \226\130 \237\160\128 \195\169\226\130\172\240\159\152\128\n")
    ws_skip_to("[lobby] term: caf? ? ?? ??? \195\169\226\130\172\240\159\152\128")
    t:send("still here\n")
    ws_skip_to("[lobby] term: still here")
    assert(ws:write("/quit"))
    ws_skip_to("* bye")
    ws:close()
    t:close()
  end)

  it("removes a WebSocket user that disconnects or is killed", function()
    local t = user(info, "term", "lobby")
    local function ws_user(nick)
      local ws = assert(websocket.connect("127.0.0.1", info.http_port, "/ws", { timeout = S.T }))
      for _, line in ipairs({ "/nick " .. nick, "/join lobby" }) do assert(ws:write(line)) end
      t:expect("* " .. nick .. " joined lobby")
      return ws
    end
    local w1 = ws_user("w1")
    w1:close()
    t:expect("* w1 left lobby")
    local w2 = ws_user("w2")
    local pid = assert(pid_of(info, "lobby", "w2"))
    mb.exit(pid, "kill")
    t:expect("* w2 left lobby")
    -- Its connection ends (after the lines it had not read yet).
    local data, err
    for _ = 1, 10 do
      data, err = w2:read(S.T)
      if not data then break end
    end
    assert.is_nil(data)
    assert.equal("closed", err)
    w2:close()
    t:cmd("/who", "* in lobby: term")
    t:close()
  end)
end)

describe("the chat across hosts (two nodes)", function()
  if not tcp_ok then
    it("needs moonbeam.tcp", function() error("moonbeam.tcp: " .. tostring(tcp)) end)
    return
  end
  local p = io.popen("hostname -s")
  local HOST = p:read("*l")
  p:close()
  local COOKIE = "chat_spec_cookie"
  local STAMP = string.format("%x%x", os.time() % 0x100000, math.floor(mb.now()) % 0x10000)
  local nodes = {}

  -- Start examples/chat/main.lua as node `name` in the background (bounded
  -- to 60 s); returns {name = node, port = TCP port, ...} once it runs.
  local function start(name, extra)
    local dir = S.tmpdir()
    local node = { name = name .. STAMP .. "@" .. HOST, dir = dir }
    os.execute(string.format("(timeout -s KILL 60 %s --sname %s --cookie %s examples/chat/main.lua " ..
      "--tcp 0 --http off %s >%s/out 2>%s/err </dev/null & echo $! >%s/tpid) 2>/dev/null",
      S.q(S.bin), name .. STAMP, COOKIE, extra or "", dir, dir, dir))
    nodes[#nodes + 1] = node
    local out
    S.eventually(function()
      local f = io.open(dir .. "/out")
      out = f and f:read("*a") or ""
      if f then f:close() end
      return out:find("chat: running", 1, true) ~= nil
    end, 20000)
    local f = io.open(dir .. "/tpid")
    node.tpid = f and f:read("*l")
    if f then f:close() end
    node.port = tonumber(out:match("chat: TCP  on 127%.0%.0%.1:(%d+)"))
    if not node.port then
      local e = io.open(dir .. "/err")
      error("the chat node did not start: " .. out .. (e and e:read("*a") or ""))
    end
    return node
  end

  -- SIGKILL the node's moonbeam (the child of its `timeout`).
  local function kill(node)
    if node.tpid then
      os.execute("kill -9 $(pgrep -P " .. node.tpid .. ") " .. node.tpid .. " 2>/dev/null")
      node.tpid = nil
    end
  end

  after_each(function()
    for i, n in ipairs(nodes) do kill(n) nodes[i] = nil end
  end)
  teardown(function() S.cleanup_tmp() end)

  it("puts users of two hosts in the same rooms; when one host is killed its users leave", function()
    local a = start("chatA")
    local b = start("chatB", "--join " .. a.name)
    local out_b = io.open(b.dir .. "/out"):read("*a")
    assert.truthy(out_b:find("the rooms are on " .. a.name, 1, true), out_b)
    local ann = user({ tcp_port = a.port }, "ann", "lobby")
    local bob = user({ tcp_port = b.port }, "bob", "lobby")
    ann:expect("* bob joined lobby")
    bob:send("hi from host B\n")
    ann:expect("[lobby] bob: hi from host B")
    ann:send("hello from host A\n")
    bob:expect("[lobby] ann: hello from host A")
    -- Guest numbers come from the one registry: they differ across hosts.
    local c1 = connect({ tcp_port = a.port })
    local c2 = connect({ tcp_port = b.port })
    local g1, g2 = c1:line(), c2:line()
    assert.are_not.equal(g1:match("guest%d+"), g2:match("guest%d+"))
    c1:close()
    c2:close()
    -- A second room, reached from host B first.
    local cid = user({ tcp_port = b.port }, "cid", "dev")
    ann:cmd("/join dev", "* joined dev")
    cid:expect("* ann joined dev")
    bob:cmd("/who", "* in lobby: bob")
    cid:send("only in dev\n")
    ann:expect("[dev] cid: only in dev")
    -- Host B dies: its users leave the rooms on host A with the usual line.
    kill(b)
    ann:expect("* cid left dev", 15000)
    ann:cmd("/who", "* in dev: ann")
    ann:cmd("/join lobby", "* joined lobby")
    ann:cmd("/who", "* in lobby: ann")
    ann:close()
    bob:close()
    cid:close()
  end)

  it("tells the users of a host that their room closed when the rooms' host is killed", function()
    local a = start("chatC")
    local b = start("chatD", "--join " .. a.name)
    local bob = user({ tcp_port = b.port }, "bob", "lobby")
    kill(a)
    bob:expect("* the room lobby has closed", 15000)
    bob:cmd("/who", "* not in a room")
    bob:close()
  end)

  it("refuses --join without a node name or an unreachable node", function()
    local code, _, err = S.moonbeam("examples/chat/main.lua --tcp 0 --http off --join x@" .. HOST)
    assert.equal(2, code)
    assert.truthy(err:find("--join needs this host to be a node", 1, true), err)
    local code2, _, err2 = S.moonbeam("--sname lone" .. STAMP .. " --cookie " .. COOKIE ..
      " examples/chat/main.lua --tcp 0 --http off --join nobody" .. STAMP .. "@" .. HOST, nil, 30)
    assert.equal(1, code2)
    assert.truthy(err2:find("cannot reach the node", 1, true), err2)
    local code3, _, err3 = S.moonbeam("examples/chat/main.lua --sname x")
    assert.equal(2, code3)
    assert.truthy(err3:find("is an option of the host", 1, true), err3)
  end)
end)
