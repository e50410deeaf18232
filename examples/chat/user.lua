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
-- registered name, so a registry restarted by the supervisor is found again;
-- on a node that joined another one (chat.start's join), the registry is
-- that node's, named {name, node}, and the rooms live there: the messages
-- below cross nodes unchanged (tables with string keys, strings, pids).
-- The user monitors its room: if the room ends, the user is told and is in
-- no room. Everything spawned here captures only `mb` and local functions
-- (see rooms.lua for why).
--
-- Slow consumers. A room sends its lines with mb.send, which never waits, so
-- a user whose client does not read must not be allowed to make the server
-- hold its lines without bound: its mailbox would grow for as long as the
-- room talks. So the user process never waits on its socket either: before
-- each write it asks how much output is still queued (sock:queued(); a
-- write over the socket's 64 KiB mark would suspend it). Over `max_output`
-- it stops taking room lines and polls, with backoff, until the queue
-- drains; if that takes longer than `max_stall` ms, or its mailbox goes over
-- `max_behind` messages meanwhile (also checked every CHECK_EVERY room lines
-- in the normal flow), the user is dropped: it writes
-- "* disconnected: too slow (<why>)", leaves its room and closes (the close
-- flushes what is queued for up to 5 s, so a client that reads late still
-- gets the line). Output stays under the 64 KiB mark, so even that last
-- write never waits. The rest of the room goes on.
--
-- Fast talkers. A user that floods its room could grow the room's mailbox
-- instead. Every SAY_CHECK lines it sends, a user looks at its room's
-- mailbox; over `room_backlog` it holds the rest of its input back (at most
-- one read, 64 KiB), reads no more (TCP flow control then holds its client
-- back) and looks again ROOM_WAIT ms later, taking room lines meanwhile. The
-- room itself never waits.
--
-- The bounds are chat.start's options (user.DEFAULTS): per user, its
-- mailbox stays near max_behind messages and its socket's queue under
-- max_output bytes; per room, the mailbox stays near room_backlog messages
-- plus SAY_CHECK per talking user.
--
-- Idle users hibernate. Most connected users are silent most of the time,
-- and an awake user process holds a Lua state (tens of KB) while it waits.
-- A TCP user that got no message for `hibernate_after` ms (chat.start's
-- option) calls mb.hibernate: its Lua state is dropped and only its session
-- table is kept, copied, with tcp_wake as the continuation. The socket is in
-- active mode, so the user's next line arrives as a message and wakes it,
-- like a room's next line, a DOWN of its room or its own READ_MORE timer;
-- tcp_wake requires this module again, makes st.out again (a closure over
-- st, dropped rather than copied) and goes back into the loop, which finds
-- the message queued. What a hibernated user keeps is small on purpose (a
-- big chat has many): the continuation names this module instead of
-- carrying the nineteen functions that tcp_loop reaches, and the session
-- leaves out what it can make again (the limits that are the defaults).
-- WebSocket users run in moonbeam.http's connection process, whose idle
-- hibernation is moonbeam.http's business: ws_user does not hibernate.
local mb = require "moonbeam"

local user = {}

-- The longest line accepted, in bytes, without its line end.
local MAX_LINE = 4096
-- How long to wait for the registry or a room to answer.
local ANSWER_TIMEOUT = 5000

-- The limits on slow users, as documented in README.md. (A local, not a
-- field of `user`: the spawned functions must not capture this module.)
local DEFAULTS = {
  max_behind = 1000,        -- room lines waiting in a user's mailbox
  max_output = 32 * 1024,   -- bytes queued on a user's socket
  max_stall = 5000,         -- ms that the socket's queue may stay over max_output
  room_backlog = 1000,      -- messages in a room's mailbox before its talkers wait
}
user.DEFAULTS = DEFAULTS
-- The socket's backpressure mark (README, moonbeam.tcp): a write that takes
-- the queue over it waits. max_output must leave room under it for the
-- longest room line and the last line.
local WRITE_HIGH = 64 * 1024
user.MAX_OUTPUT = WRITE_HIGH - 2 * MAX_LINE
user.MIN_OUTPUT = 2 * MAX_LINE
-- A user checks its mailbox every CHECK_EVERY room lines (mb.info costs a
-- lock and a table; per line it would be a noticeable part of a line's cost).
local CHECK_EVERY = 32
-- While its output is over max_output, a user polls the queue at first
-- after 1 ms, then doubling up to this many ms.
local STALL_POLL_MAX = 16
-- A talking user looks at its room's mailbox every SAY_CHECK lines it says,
-- and when the room is behind, looks again after ROOM_WAIT ms.
local SAY_CHECK = 16
local ROOM_WAIT = 5
-- The message a waiting talker sends itself to look again.
local READ_MORE = { chat_read_more = true }

local WELCOME = ": /nick <name>, /join <room>, /who, /quit"

-- Nicks and room names: 1 to 32 letters, digits, '_', '-', '.' or '#'.
local function bad_name(s)
  return #s < 1 or #s > 32 or s:find("[^%w_%-%.#]") ~= nil
end

-- Where to send to the registry: its pid, {name, node} on another node,
-- or nil while there is none here.
local function registry_of(st)
  if type(st.registry) == "table" then return st.registry end
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
    st.says = st.says + 1
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

-- -- Slow consumers and fast talkers (see DESIGN) ---------------------------

-- Ends the session because the client does not keep up: the last line says
-- why. The socket's queue is under max_output, so this write never waits.
local function drop(st, why)
  local line = "* disconnected: too slow (" .. why .. ")"
  local data = st.ws and line or line .. "\n"
  local q = st.sock:queued()
  if q and q + #data <= WRITE_HIGH then st.sock:write(data) end
  st.done, st.dropped = true, why
  return false
end

local function behind(st)
  local info = mb.info(mb.self())
  return info and info.mailbox or 0
end

-- Whether n more bytes fit in a queue of q under max_output. A line longer
-- than max_output (a /who of a thousand members) goes out once the queue
-- is empty: it would never fit, and its reader was dropped as too slow.
local function fits(st, q, n)
  return q + n <= st.max_output or q == 0
end

-- True once n more bytes fit in the socket's queue; false when the socket
-- is closed or the user was dropped meanwhile.
local function room_for(st, n)
  -- The bytes queued after the last write bound what is queued now (only
  -- this process writes, and the queue only drains meanwhile): most lines
  -- need no queued() call.
  if st.queued and fits(st, st.queued, n) then return true end
  local q = st.sock:queued()
  if q == nil then st.done = true return false end
  if fits(st, q, n) then return true end
  local start, pause = mb.now(), 1
  repeat
    mb.sleep(pause)
    if pause < STALL_POLL_MAX then pause = pause * 2 end
    q = st.sock:queued()
    if q == nil then st.done = true return false end
    if fits(st, q, n) then return true end
    local b = behind(st)
    if b > st.max_behind then return drop(st, b .. " messages behind") end
  until mb.now() - start >= st.max_stall
  return drop(st, "more than " .. st.max_output .. " bytes unread for " .. st.max_stall .. " ms")
end

-- A WebSocket text message must be UTF-8, and a TCP user may send any
-- bytes: for a WebSocket user, each byte that does not start a valid UTF-8
-- sequence becomes "?" (the line keeps its length, so room_for's count
-- holds). Only for a line the write refused: the common one is not scanned.
local function utf8_clean(s)
  local out, i, n = {}, 1, #s
  while i <= n do
    local c, len, lo, hi = s:byte(i), 0, 0x80, 0xBF
    if c < 0x80 then len = 1
    elseif c >= 0xC2 and c <= 0xDF then len = 2
    elseif c >= 0xE0 and c <= 0xEF then
      len = 3
      if c == 0xE0 then lo = 0xA0 elseif c == 0xED then hi = 0x9F end
    elseif c >= 0xF0 and c <= 0xF4 then
      len = 4
      if c == 0xF0 then lo = 0x90 elseif c == 0xF4 then hi = 0x8F end
    end
    local ok = len > 0 and i + len - 1 <= n
    for k = 1, len - 1 do
      local b = ok and s:byte(i + k)
      if not b or b < (k == 1 and lo or 0x80) or b > (k == 1 and hi or 0xBF) then ok = false end
    end
    if ok then
      out[#out + 1] = s:sub(i, i + len - 1)
      i = i + len
    else
      out[#out + 1] = "?"
      i = i + 1
    end
  end
  return table.concat(out)
end

-- Writes one line to the client, never waiting on it (see room_for).
local function write_line(st, line)
  if st.done then return end
  local ws = st.ws
  if room_for(st, ws and #line or #line + 1) then
    local ok, q
    if ws then
      ok, q = st.sock:write(line)
      if not ok and tostring(q):find("UTF-8", 1, true) then ok, q = st.sock:write(utf8_clean(line)) end
    else
      ok, q = st.sock:write(line, "\n")
    end
    if not ok then st.done = true end
    st.queued = q
  end
end

-- Whether the user should hold its input back because its room is behind.
-- Looks at the room only every SAY_CHECK lines said.
local function room_busy(st)
  if st.says < SAY_CHECK then return false end
  local room = st.room_pid and mb.info(st.room_pid)
  if room and room.mailbox > st.room_backlog then return true end
  st.says = 0
  return false
end

-- After the client's input was handled: lets the next input in (re-arms the
-- socket), or, when lines are held back, looks again ROOM_WAIT ms later.
local function read_more(st)
  if st.held then
    mb.send_after(ROOM_WAIT, mb.self(), READ_MORE)
  else
    st.sock:set_active("once")
  end
end

-- -- Messages -------------------------------------------------------------

-- A message that is not socket data: a line from a room, the end of the room.
local function other(st, msg)
  if type(msg) == "string" then             -- a line from the room
    st.lines = st.lines + 1
    if st.lines >= CHECK_EVERY then
      st.lines = 0
      local b = behind(st)
      if b > st.max_behind then return drop(st, b .. " messages behind") end
    end
    return write_line(st, msg)
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

-- Gives session st its st.out(line).
local function with_out(st)
  st.out = function(line) return write_line(st, line) end
  return st
end

-- A session over `sock` (ws: whether it is a WebSocket, one line per
-- message) with the limits of chat.start (nil fields: user.DEFAULTS).
local function new_session(registry, sock, ws, limits)
  limits = limits or {}
  local st = { registry = registry, sock = sock, ws = ws or nil, nick = "guest", tags = 0,
               lines = 0, says = 0, rest = "" }
  for k, v in pairs(DEFAULTS) do
    if limits[k] ~= nil then v = limits[k] end
    st[k] = v
  end
  with_out(st)
  local reg = registry_of(st)
  if reg then
    mb.send(reg, { op = "guest", pid = mb.self() })
    local m = mb.receive(function(x) return type(x) == "table" and x.guest end, ANSWER_TIMEOUT)
    if m then st.nick = "guest" .. m.guest end
  end
  st.out("* welcome " .. st.nick .. WELCOME)
  return st
end

-- Split data into lines and handle them; returns the unfinished rest, or nil
-- when the session must end (quit, line too long). When the room is behind
-- (room_busy) it stops early and sets st.held: the rest then holds the
-- lines not handled yet.
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
    if room_busy(st) then
      st.held = true
      break
    end
  end
  if st.done then return nil end
  rest = pos == 1 and s or s:sub(pos)
  if not st.held and #rest > MAX_LINE then
    st.out("* error: line too long (more than " .. MAX_LINE .. " bytes)")
    return nil
  end
  return rest
end

-- On READ_MORE: if the room has caught up, goes on with the lines held
-- back. Returns false when the session must end.
local function resume(st)
  if not room_busy(st) then
    st.held = false
    st.rest = take_lines(st, st.rest, "")
    if not st.rest then return false end
  end
  read_more(st)
  return true
end

-- -- A TCP user -------------------------------------------------------------

local tcp_loop

-- Where a hibernated TCP user goes on, in its new Lua state: this module,
-- required again (from the host's module cache; the process keeps the
-- package.path it had, on which it was found). A function of no upvalues:
-- the continuation is one function, the session and its hibernate_after
-- (an argument rather than a field: it then hibernates in fewer bytes).
local function tcp_wake(hibernate_after, st)
  st.hibernate_after = hibernate_after
  return require("user").tcp_resume(st)
end

-- The session's fields that hibernate as nil while they hold these values
-- (the limits, when they are the defaults, and idle counters): tcp_resume
-- puts them back.
local PACKED = { lines = 0, says = 0, rest = "" }
for k, v in pairs(DEFAULTS) do PACKED[k] = v end

-- The session as it hibernates, without what tcp_resume makes again.
local function session_pack(st)
  st.out = nil
  for k, v in pairs(PACKED) do
    if st[k] == v then st[k] = nil end
  end
end

local function session_unpack(st)
  for k, v in pairs(PACKED) do
    if st[k] == nil then st[k] = v end
  end
  return with_out(st)
end

function user.tcp_resume(st)
  return tcp_loop(session_unpack(st))
end

-- Hibernates the user (see DESIGN): never returns, unless its session
-- cannot be copied, which would be a bug of this file; then the user says
-- so on stderr and goes on awake, never hibernating again.
local function hibernate(st)
  local after = st.hibernate_after
  session_pack(st)
  st.hibernate_after = nil
  local _, err = pcall(mb.hibernate, tcp_wake, after, st)
  session_unpack(st)
  st.hibernate_after = nil
  io.stderr:write("chat: user " .. tostring(mb.self()) .. " cannot hibernate: "
                  .. tostring(err) .. "\n")
end

-- The next message of a TCP user; hibernates while none comes.
local function next_message(st)
  if not st.hibernate_after then return mb.receive() end
  local msg = mb.receive(st.hibernate_after)
  if msg ~= nil then return msg end
  hibernate(st)
  return mb.receive()
end

-- The TCP user's loop, until the session ends; its socket is in active
-- mode, armed for the next read.
tcp_loop = function(st)
  local sock = st.sock
  while not st.done do
    local msg = next_message(st)
    local ev = type(msg) == "table" and msg.event
    if ev == "tcp" then
      st.rest = take_lines(st, st.rest, msg.data)
      if not st.rest then break end
      read_more(st)
    elseif ev == "tcp_closed" or ev == "tcp_error" then
      break
    elseif type(msg) == "table" and msg.chat_read_more then
      if not resume(st) then break end
    else
      other(st, msg)
    end
  end
  leave(st)
  sock:close()
end

-- The body of a TCP user process. The acceptor makes this process the
-- socket's owner, then sends it {tcp_socket = sock}. limits: chat.start's,
-- with hibernate_after (ms, or nil for never).
local function tcp_user(registry, limits)
  local m = mb.receive(function(x) return type(x) == "table" and x.tcp_socket end, ANSWER_TIMEOUT)
  if not m then return end
  local st = new_session(registry, m.tcp_socket, false, limits)
  st.hibernate_after = limits and limits.hibernate_after
  st.sock:set_active("once")
  return tcp_loop(st)
end

-- The body of a WebSocket user: runs in the HTTP connection's process, which
-- owns `ws` (a socket switched to WebSocket framing). limits: chat.start's.
local function ws_user(ws, registry, limits)
  local st = new_session(registry, ws, true, limits)
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
        st.rest = take_lines(st, "", data .. "\n")
        if not st.rest then break end
      else
        if data:byte(-1) == 13 then data = data:sub(1, -2) end
        handle(st, data)
        if room_busy(st) then st.held = true end
      end
      if st.done then break end
      read_more(st)
    elseif ev == "ws_closed" or ev == "tcp_closed" or ev == "tcp_error" then
      break
    elseif type(msg) == "table" and msg.chat_read_more then
      if not resume(st) then break end
    else
      other(st, msg)
    end
  end
  leave(st)
  -- 1008, policy violation: the close frame says why too.
  if st.dropped then ws:close(1008, "too slow") else ws:close() end
end

user.tcp_user = tcp_user
user.ws_user = ws_user
user.MAX_LINE = MAX_LINE

return user
