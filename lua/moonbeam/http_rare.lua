-- moonbeam.http_rare: the parts of moonbeam.http's connection processes
-- that a plain request never needs (internal): streamed responses
-- (res:write, res:finish), upgrades, error answers, and the wait and
-- hibernation of an idle connection.
--
-- DESIGN
-- A connection process loads moonbeam.http_conn, and this module only when
-- it first needs one of these (a process per connection pays for every
-- function it loads: see moonbeam.http_conn). Everything here builds on
-- moonbeam.http_conn's internals, which it exports for this module alone.
local mb = require "moonbeam"
local conn = require "moonbeam.http_conn"

local rare = {}

local started, finished, bodiless = conn.started, conn.finished, conn.bodiless
local build_head, check_open, report = conn.build_head, conn.check_open, conn.report
local reason_phrase, ceil = conn.reason, conn.ceil
local KILL_WAIT = conn.KILL_WAIT

-- After an error response, the connection reads and drops what the client
-- still sends, for at most this long or this many bytes, before it closes:
-- closing with unread input makes TCP reset the connection, and a reset can
-- destroy the response before the client read it.
local LINGER_MS = 1000
local LINGER_BYTES = 1024 * 1024

-- -- Streamed responses and upgrades ------------------------------------------

local Response = {}
rare.Response = Response

-- res:write(chunk) -> true | nil, err   (streams the body, chunked)
function Response:write(chunk)
  check_open(self, "write")
  chunk = tostring(chunk)
  local out
  if not self.started then
    started(self)
    self.started, self.streaming = true, true
    if bodiless(self.code) then
      self.head_only = true
      out = build_head(self, nil)
    elseif self.http10 then
      -- HTTP/1.0 knows no chunks: the body runs to the end of the connection.
      self.close = true
      out = build_head(self, nil)
    else
      self.chunked = true
      out = build_head(self, true)
    end
  else
    out = ""
  end
  if #chunk > 0 and not self.head_only then
    if self.chunked then
      out = out .. string.format("%x\r\n", #chunk) .. chunk .. "\r\n"
    else
      out = out .. chunk
    end
  end
  if out == "" then return true end
  local ok, err = self.sock:write(out)
  if not ok then self.close = true; self.broken = true end
  return ok, err
end

-- res:finish([chunk]) -> true | nil, err   (ends a streamed response)
function Response:finish(chunk)
  if chunk ~= nil and chunk ~= "" then
    local ok, err = self:write(chunk)
    if not ok then return nil, err end
  end
  if not self.started then return self:send("") end
  check_open(self, "finish")
  self.done = true
  local ok, err = true, nil
  if self.chunked and not self.head_only then
    ok, err = self.sock:write("0\r\n\r\n")
    if not ok then self.close = true; self.broken = true end
  end
  finished(self)
  return ok, err
end

-- res:upgrade() -> sock, pending | nil, err
-- Sends the 101 Switching Protocols head (status and headers set with
-- res:header) and gives the connection to the caller: the HTTP loop stops
-- once the handler returns. `pending` is what the client sent past the
-- request head. Used by moonbeam.websocket.
function Response:upgrade()
  check_open(self, "upgrade")
  if self.started then error("res:upgrade: the response head was already sent", 2) end
  if not self.can_upgrade then return nil, "not an upgrade request" end
  -- A WebSocket is long-lived and has its own close: no timer, no exit on
  -- the peer's FIN.
  started(self)
  finished(self)
  self.code = 101
  self.close = false
  self.keep_alive_10 = false
  self.started, self.done, self.upgraded = true, true, true
  local ok, err = self.sock:write(build_head(self, nil))
  if not ok then return nil, err end
  return self.sock, self.pending or ""
end

-- -- Errors -------------------------------------------------------------------

-- Read and drop what the client still sends (bounded), then close.
local function linger_close(c)
  local deadline, got = mb.now() + LINGER_MS, 0
  while got < LINGER_BYTES do
    local left = deadline - mb.now()
    if left <= 0 then break end
    local data = c.sock:read(ceil(left))
    if not data then break end
    got = got + #data
  end
  c.sock:close()
end

-- The whole response of an error status, with Connection: close.
local function error_response(code, extra)
  local body = code .. " " .. reason_phrase(code) .. "\n"
  local head = { "HTTP/1.1 ", code, " ", reason_phrase(code), "\r\n",
                 "Content-Type: text/plain\r\n",
                 "Content-Length: ", #body, "\r\n", "Connection: close\r\n" }
  if extra then head[#head + 1] = extra end
  head[#head + 1] = "\r\n"
  return table.concat(head) .. body
end

-- Answer with an error status and close the connection.
local function fail(c, code, extra)
  if c.sock:write(error_response(code, extra)) then linger_close(c) else c.sock:close() end
end

-- -- Waiting between requests, and hibernating -----------------------------

-- The messages of an idle connection: its socket's (active "once"), the
-- idle timer's, and the acceptor's EXIT (when it traps exits).
local function idle_match(sock, acceptor)
  return function(m)
    if type(m) ~= "table" then return false end
    if m.socket == sock then
      return m.event == "tcp" or m.event == "tcp_closed" or m.event == "tcp_error"
    end
    return m.tag == "$http_idle" or (m.event == "EXIT" and m.pid == acceptor)
  end
end

-- What a socket message of an idle connection means: data, or nil and why.
-- The acceptor's EXIT (server:close() when the process traps exits) ends
-- the connection and the process.
local function from_message(sock, m)
  if m.event == "tcp" then return m.data end
  if m.event == "tcp_closed" then return nil, "closed" end
  if m.event == "tcp_error" then return nil, m.reason end
  if m.event == "EXIT" then
    sock:close()
    mb.exit(m.reason)
  end
  return nil, "timeout"   -- the idle timer
end

-- Stop the idle timer; if it fired already, take its message.
local function cancel_idle(timer)
  if timer and not mb.cancel_timer(timer) then
    mb.receive(function(m) return type(m) == "table" and m.tag == "$http_idle" end, KILL_WAIT)
  end
end

-- Wait up to `left` ms for bytes, seeing the acceptor's EXIT too: the wait
-- of a connection that traps exits (a passive read would not see it).
local function await_bytes(c, left)
  c.sock:set_active("once")
  local m = mb.receive(idle_match(c.sock, c.acceptor), ceil(left))
  if not m then
    c.sock:set_active(false)
    -- One may have been sent before the switch: it is here now.
    m = mb.receive(idle_match(c.sock, c.acceptor), 0)
    if not m then return nil, "timeout" end
  end
  return from_message(c.sock, m)
end

-- Hibernate an idle connection (see DESIGN); does not return unless it
-- cannot, and then returns whether a socket message came meanwhile and
-- what it meant.
local wake

local function hibernate(c)
  -- A new parser must be able to take the stream on where this one is (not
  -- after half of a CRLF, say), and nothing may wait in the mailbox.
  if not c.parser:resting() then return false end
  if mb.info(mb.self()).mailbox > 0 then return false end
  local st = {
    sock = c.sock, opts = c.opts, acceptor = c.acceptor, handler = c.handler_spec,
    deadline = c.deadline, first = c.first,
  }
  st.timer = mb.send_after(math.max(0, math.ceil(c.deadline - mb.now())), mb.self(),
                           { tag = "$http_idle" })
  c.sock:set_active("once")
  local _, err = pcall(mb.hibernate, wake, st)
  -- Not possible: the handler holds a value that cannot be copied (its
  -- upvalues go with the continuation). Stay awake from now on.
  c.no_hibernate = true
  report(c.me, { "cannot hibernate the idle connection: " .. tostring(err),
                 "(it stays awake; see hibernate_after)" })
  c.sock:set_active(false)
  cancel_idle(st.timer)
  local m = mb.receive(idle_match(c.sock, c.acceptor), 0)
  if m then return true, from_message(c.sock, m) end
  return false
end

-- A hibernated connection woke, in a new state: by its socket's message,
-- its idle timer, or the acceptor's EXIT. Other messages that woke it stay
-- for the next handler, and it waits awake.
function wake(st)
  local m = mb.receive(idle_match(st.sock, st.acceptor))
  if m.tag == "$http_idle" then
    st.sock:close()   -- idle_timeout: closed quietly
    return
  end
  cancel_idle(st.timer)
  local data = from_message(st.sock, m)
  if not data then
    st.sock:close()
    return
  end
  local c = conn.new_conn(st.sock, st.handler, st.opts, st.acceptor)
  c.pending, c.resume_deadline = data, st.deadline
  conn.serve_conn(c, st.first)
end

-- The rest of an idle connection's wait once hibernate_after has passed
-- (read_head in moonbeam.http_conn): it hibernates, or, when it cannot,
-- waits on awake till its deadline.
local function idle(c, traps)
  local got, d, e = hibernate(c)
  if got then return d, e end
  local left = c.deadline - mb.now()
  if left <= 0 then return nil, "timeout" end
  if traps then return await_bytes(c, left) end
  return c.sock:read(ceil(left))
end

rare.fail = fail
rare.idle = idle
rare.error_response = error_response
rare.await_bytes = await_bytes
rare.hibernate = hibernate

return rare
