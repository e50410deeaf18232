-- examples/chat/user.lua: one connected user is one process.
--
-- DESIGN
-- The user process reads lines and handles commands in plain sequential code.
-- Its socket is in active mode, so socket data arrives as messages and one
-- receive() waits for the next line from the user and the next line from the
-- room at once. Over TCP, socket data is split into lines ("\n", "\r\n");
-- over WebSocket each text frame is one line. A line longer than MAX_LINE
-- gets an error line and the connection is closed.
--
-- The protocol (the same on both transports):
--   on connect           "* welcome guest<N>: /nick <name>, /join <room>, /who, /quit"
--   /nick <name>      -> "* you are <name>"
--   /join <room>      -> "* joined <room>"  (the old room sees "* <nick> left <room>",
--                                            the new one "* <nick> joined <room>")
--   /who              -> "* in <room>: <nick1>, <nick2>, ..."  (or "* not in a room")
--   /quit             -> "* bye", then the connection is closed
--   any other line    -> "[<room>] <nick>: <text>" to every other member of the room
--                        ("* join a room first" when not in one)
--   unknown /command  -> "* unknown command /<cmd>"
--
-- The room is found through the registry (rooms.lua), named here by its
-- registered name, so a registry restarted by the supervisor is found again.
-- The user monitors its room: if the room ends, the user is told and is in
-- no room. Everything spawned here captures only `mb` and local functions
-- (see rooms.lua for why).
local mb = require "moonbeam"

local user = {}

-- The longest line accepted, in bytes, without its line end.
local MAX_LINE = 4096
-- How long to wait for the registry or a room to answer.
local ANSWER_TIMEOUT = 5000

local WELCOME = ": /nick <name>, /join <room>, /who, /quit"

-- Nicks and room names: 1 to 32 letters, digits, '_', '-', '.' or '#'.
local function bad_name(s)
  return #s < 1 or #s > 32 or s:find("[^%w_%-%.#]") ~= nil
end

local function registry_of(st)
  return mb.whereis(st.registry)
end

local function leave(st)
  if st.room_pid then
    mb.demonitor(st.room_ref, true)
    mb.send(st.room_pid, { op = "leave", pid = mb.self() })
    st.room, st.room_pid, st.room_ref = nil, nil, nil
  end
end

local function join(st, name)
  if st.room == name then return st.out("* joined " .. name) end
  local reg = registry_of(st)
  if not reg then return st.out("* the chat is restarting, try again") end
  leave(st)
  st.tags = st.tags + 1
  local tag = st.tags
  mb.send(reg, { op = "join", room = name, pid = mb.self(), nick = st.nick, tag = tag })
  local m = mb.receive(function(x) return type(x) == "table" and x.joined == tag end, ANSWER_TIMEOUT)
  if not m then return st.out("* could not join " .. name .. ", try again") end
  st.room, st.room_pid, st.room_ref = name, m.room, mb.monitor(m.room)
  st.out("* joined " .. name)
end

-- Handle one line from the user. Sets st.done to end the session.
local function handle(st, line)
  if line:byte(1) ~= 47 then   -- not "/": a message to the room
    if line == "" then return end
    if not st.room_pid then return st.out("* join a room first") end
    mb.send(st.room_pid, { op = "say", pid = mb.self(), text = line })
    return
  end
  local cmd, rest = line:match("^/(%S*)%s*(.-)%s*$")
  if cmd == "nick" then
    if bad_name(rest) then return st.out("* usage: /nick <name> (1-32 letters, digits, _ - . #)") end
    st.nick = rest
    if st.room_pid then mb.send(st.room_pid, { op = "nick", pid = mb.self(), nick = rest }) end
    st.out("* you are " .. rest)
  elseif cmd == "join" then
    if bad_name(rest) then return st.out("* usage: /join <room> (1-32 letters, digits, _ - . #)") end
    join(st, rest)
  elseif cmd == "who" then
    if not st.room_pid then return st.out("* not in a room") end
    mb.send(st.room_pid, { op = "who", pid = mb.self() })
  elseif cmd == "quit" then
    st.out("* bye")
    st.done = true
  else
    st.out("* unknown command /" .. cmd)
  end
end

-- A message that is not socket data: a line from a room, the end of the room.
local function other(st, msg)
  if type(msg) == "string" then             -- a line from the room
    return st.out(msg)
  end
  if type(msg) ~= "table" then return end   -- not ours: ignore it
  if msg.event == "DOWN" then
    if msg.ref == st.room_ref then
      st.out("* the room " .. st.room .. " has closed")
      st.room, st.room_pid, st.room_ref = nil, nil, nil
    end
  elseif msg.joined and msg.room then
    -- A join answered after we gave up waiting: leave that room again.
    mb.send(msg.room, { op = "leave", pid = mb.self() })
  end
end

local function new_session(registry, out)
  local st = { registry = registry, out = out, nick = "guest", tags = 0 }
  local reg = mb.whereis(registry)
  if reg then
    mb.send(reg, { op = "guest", pid = mb.self() })
    local m = mb.receive(function(x) return type(x) == "table" and x.guest end, ANSWER_TIMEOUT)
    if m then st.nick = "guest" .. m.guest end
  end
  out("* welcome " .. st.nick .. WELCOME)
  return st
end

-- Split data into lines and handle them; returns the unfinished rest, or nil
-- when the session must end (quit, line too long).
local function take_lines(st, rest, data)
  local s = rest == "" and data or rest .. data
  local pos = 1
  while not st.done do
    local nl = s:find("\n", pos, true)
    if not nl then break end
    local stop = nl - 1
    if stop >= pos and s:byte(stop) == 13 then stop = stop - 1 end
    if stop - pos + 1 > MAX_LINE then
      st.out("* error: line too long (more than " .. MAX_LINE .. " bytes)")
      return nil
    end
    handle(st, s:sub(pos, stop))
    pos = nl + 1
  end
  if st.done then return nil end
  rest = pos == 1 and s or s:sub(pos)
  if #rest > MAX_LINE then
    st.out("* error: line too long (more than " .. MAX_LINE .. " bytes)")
    return nil
  end
  return rest
end

-- The body of a TCP user process. The acceptor makes this process the
-- socket's owner, then sends it {tcp_socket = sock}.
local function tcp_user(registry)
  local m = mb.receive(function(x) return type(x) == "table" and x.tcp_socket end, ANSWER_TIMEOUT)
  if not m then return end
  local sock = m.tcp_socket
  local st
  st = new_session(registry, function(line)
    if not sock:write(line .. "\n") then st.done = true end
  end)
  local rest = ""
  sock:set_active("once")
  while not st.done do
    local msg = mb.receive()
    local ev = type(msg) == "table" and msg.event
    if ev == "tcp" then
      rest = take_lines(st, rest, msg.data)
      if not rest then break end
      sock:set_active("once")
    elseif ev == "tcp_closed" or ev == "tcp_error" then
      break
    else
      other(st, msg)
    end
  end
  leave(st)
  sock:close()
end

-- The body of a WebSocket user: runs in the HTTP connection's process, which
-- owns `ws` (a socket switched to WebSocket framing).
local function ws_user(ws, registry)
  local st
  st = new_session(registry, function(line)
    if not ws:write(line) then st.done = true end
  end)
  ws:set_active("once")
  while not st.done do
    local msg = mb.receive()
    local ev = type(msg) == "table" and msg.event
    if ev == "ws" then
      local data = msg.data
      if #data > MAX_LINE + 2 then
        st.out("* error: line too long (more than " .. MAX_LINE .. " bytes)")
        break
      end
      -- One line per frame; a frame with line breaks in it is several lines.
      if data:find("\n", 1, true) then
        if take_lines(st, "", data .. "\n") == nil then break end
      else
        if data:byte(-1) == 13 then data = data:sub(1, -2) end
        handle(st, data)
      end
      if st.done then break end
      ws:set_active("once")
    elseif ev == "ws_closed" or ev == "tcp_closed" or ev == "tcp_error" then
      break
    else
      other(st, msg)
    end
  end
  leave(st)
  ws:close()
end

user.tcp_user = tcp_user
user.ws_user = ws_user
user.MAX_LINE = MAX_LINE

return user
