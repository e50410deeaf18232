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
