-- moonbeam.http: an HTTP/1.1 server where each connection is its own
-- process, a static file handler, and a small client.
--
-- DESIGN
-- http.listen spawns an acceptor process that owns the listening socket, in
-- active mode: accepted connections come to it as messages (tcp_accept), so
-- it is one receive loop over those, the EXITs of the processes linked to
-- it, sockets left to it (tcp_heir) and its own requests - it never polls,
-- and an idle server never wakes up. The listener bounds the tcp_accept
-- messages not yet received (moonbeam.tcp), so a slow acceptor holds
-- clients back in the kernel's backlog, not in its mailbox. For every
-- connection it spawns a connection process (linked to it), hands the
-- socket over (sock:set_owner, then a message carrying the socket). The
-- acceptor traps exits, so a connection process that dies, however it
-- dies, leaves it running.
-- server:close() (or the EXIT of another process linked to the acceptor,
-- such as a supervisor) shuts down in order, as a supervisor does: close
-- the listener, send every connection process the exit signal "shutdown",
-- wait up to shutdown_timeout for them to end, kill the rest, then end.
--
-- Hibernation. A keep-alive connection waiting for its next request costs
-- a whole Lua state (tens of KB); after hibernate_after ms without a byte
-- it hibernates instead (mb.hibernate): its socket is put in active "once"
-- mode, so that the next bytes (or the peer's close) come as a message and
-- wake it, and idle_timeout is kept by a send_after timer, a value that
-- survives hibernation. Woken, it builds a new parser (the old one was
-- between two requests, so a new one is the same) and serves on exactly
-- as before. It stays awake when it cannot hibernate: pending bytes or
-- events (pipelined requests), a CR that may be half of a CRLF, messages
-- in its mailbox (they would wake it at once), or a handler holding a
-- value that cannot be copied (reported once).
--
-- A connection process reads the socket in passive mode (sock:read with a
-- deadline) and feeds the bytes to moonbeam.http_parser, which does the
-- parsing and enforces the head limits in C; its events (head, body, done,
-- upgrade, error) are consumed here in order, one request at a time, so
-- pipelined requests are answered in order. A request's body is read whole
-- (up to max_body) before the handler runs. The handler runs in the
-- connection process under xpcall: an error becomes a 500 (or closes the
-- connection when the response had started) and a report on stderr, never
-- a crash of the server.
--
-- While a handler runs it does not read the socket, so the connection is
-- guarded (guard/unguard): the socket ends the process when the client goes
-- (sock:set_exit_on_close: on its FIN too after a keep-alive request; only on
-- a reset after an HTTP/1.0 or "Connection: close" request, whose client may
-- half-close once it has sent it); the acceptor is the socket's heir
-- (sock:set_heir) until the response starts, so that it can still answer a
-- connection whose process died (500, or 503 after handler_timeout); and a
-- timer tells the acceptor to kill a handler that has not started its
-- response within handler_timeout. A WebSocket handler is none of these
-- after the upgrade: it is long-lived, and its close handshake tells it
-- when the peer goes.
--
-- Timeouts: a new connection must send a whole request head within
-- head_timeout (if it sent nothing at all it is closed quietly); between keep-alive requests it may stay idle idle_timeout,
-- after which it is closed silently; once a request's first byte came, the
-- rest of its head must come within head_timeout (else 408 and close); each
-- read of a body must come within idle_timeout.
--
-- Like moonbeam.server, most functions here run in other processes: spawn
-- copies the process bodies with their upvalues, so standard functions are
-- read as globals rather than cached in locals.
local mb = require "moonbeam"
local tcp = require "moonbeam.tcp"
local hp = require "moonbeam.http_parser"

local http = {}

-- Defaults of http.listen's options (times in ms, sizes in bytes).
local DEFAULTS = {
  max_body = 8 * 1024 * 1024,   -- a larger request body gets 413
  max_head = 8192,              -- request line and headers: 431
  max_headers = 100,            -- 431
  max_url = 4096,               -- 414
  head_timeout = 10000,         -- a request head must arrive within: 408
  idle_timeout = 60000,         -- a keep-alive connection may idle this long
  -- A handler must start its response (send, write or upgrade) within
  -- this, or it is killed and the client gets 503: long enough for slow
  -- work behind a request (nginx waits 60 s for an upstream's answer), and
  -- a handler that hangs or spins still ends. Once the response has
  -- started, the handler is not timed: a large download or a stream takes
  -- what it takes, and the client's leaving still ends it.
  handler_timeout = 60000,
  backlog = 511,
  -- A keep-alive connection idle this long hibernates (false: never). An
  -- idle connection costs a Lua state, tens of KB, and a hibernated one a
  -- few hundred bytes; waking costs a new state (tens of us) on its next
  -- request. 15 s is Phoenix's hibernate_after for its channels and
  -- sockets: a client that comes back within 15 s (a page's next fetches,
  -- a poller) never pays the wake, and one that idles longer saves the
  -- memory for the rest of its idle_timeout.
  hibernate_after = 15000,
  -- server:close() waits this long for the connection processes to end
  -- after the exit signal "shutdown", then kills the rest (a supervisor's
  -- default shutdown time; math.huge: wait for them).
  shutdown_timeout = 5000,
  -- The memory of each connection process (bytes; math.huge: no limit).
  -- Above it the process dies "out of memory" and only its connection is
  -- lost. 64 MiB leaves a handler room for a max_body request (8 MiB),
  -- the copies it makes (the body string, its pieces, a response built from
  -- it) and the garbage LuaJIT collects late (a limit counts garbage too),
  -- while a handler that allocates without bound stops long before it can
  -- take the host's memory. An idle connection uses about 75 KB awake,
  -- 1.5 KB hibernated.
  max_memory = 64 * 1024 * 1024,
}
-- How long the acceptor stops accepting after accept failed (out of
-- descriptors): the open connections go on meanwhile.
local ACCEPT_BACKOFF = 100
-- How long to wait for the EXIT of a process that was killed (the kill
-- cannot be trapped: this only guards against a runtime bug).
local KILL_WAIT = 5000
-- How long http.listen waits for the acceptor to report the listening port.
local START_TIMEOUT = 5000
-- After an error response, the connection reads and drops what the client
-- still sends, for at most this long or this many bytes, before it closes:
-- closing with unread input makes TCP reset the connection, and a reset can
-- destroy the response before the client read it.
local LINGER_MS = 1000
local LINGER_BYTES = 1024 * 1024
-- The client's default timeout for a whole request.
local CLIENT_TIMEOUT = 30000

-- -- Helpers shared by server and client ------------------------------------

-- math.ceil of a number of ms, and math.huge, without the math library: a
-- connection process would open it (lazily, at a cost) for these alone.
local HUGE = 1 / 0
local function ceil(x)
  local f = x % 1
  if f > 0 then return x - f + 1 end
  return x
end

local function reason_phrase(code)
  return hp.reason(code) or "Unknown"
end

-- Does the comma-separated header value contain token (case-insensitive)?
local function has_token(value, token)
  if not value then return false end
  for part in string.gmatch(string.lower(value), "[^,]+") do
    if string.match(part, "^%s*(.-)%s*$") == token then return true end
  end
  return false
end

-- The next parser event, as parser:next gives it (kind, a, b, more; see
-- moonbeam.http_parser), reading the socket until c.deadline (ms, mb.now()
-- time; false: no limit) while none is ready. nil, why when none came:
-- "timeout", "closed" or the socket's error. ready == false: the caller
-- knows that no event is queued (the last one said so), so it reads first.
local function next_event(c, ready)
  local parser = c.parser
  local kind, a, b, more
  if ready ~= false then kind, a, b, more = parser:next() end
  while not kind do
    local deadline = c.deadline
    local left = deadline and deadline - mb.now()
    if left and left <= 0 then return nil, "timeout" end
    local data, err
    if c.pending then
      -- Bytes that woke a hibernated connection.
      data, c.pending = c.pending, false
    elseif c.wait_request and not c.head_started then
      -- A server between requests: the wait that may hibernate.
      data, err = c.wait_request(c, left)
    else
      data, err = c.sock:read(left and ceil(left))
    end
    if data then
      kind, a, b, more = parser:next(data)
      -- The first byte of a request head starts its head_timeout (a head
      -- that came whole needs no timing).
      if not kind and c.watch_head and not c.head_started and parser:in_message() then
        c.head_started = true
        local d = mb.now() + c.opts.head_timeout
        if d < deadline then c.deadline = d end
      end
    elseif err == "closed" and parser:in_message() then
      -- The stream ended: a response read to the end of the connection
      -- completes; anything else is cut short.
      kind, a, b, more = parser:next(true)
      if kind ~= "done" then return nil, "closed" end
    else
      return nil, err
    end
  end
  return kind, a, b, more
end

-- -- Responses --------------------------------------------------------------

local Response = {}
Response.__index = Response

-- Status codes whose responses carry no body.
local function bodiless(code)
  return code < 200 or code == 204 or code == 304
end

-- The response head (and body, when given: one string, one write), built
-- in C; `framing` is the Content-Length, true for chunked, or nil.
local function build_head(res, framing, body)
  return hp.head(res.code, res.hlist or nil, framing, res.close, res.keep_alive_10, body)
end

local function check_open(res, what)
  if res.upgraded then error("res:" .. what .. ": the connection was upgraded", 3) end
  if res.done then error("res:" .. what .. ": the response was already sent", 3) end
end

-- The response starts: the handler is no longer timed, and the acceptor
-- could not answer for it any more (the head is going out).
local function started(res)
  if res.guard ~= 1 then return end
  res.guard = 2
  local timer = res.timer
  res.timer = false
  if not hp.started(res.sock, timer) then
    -- Too late: the acceptor was told to kill this process, and answers
    -- 503 for it. Wait for the kill rather than send half an answer.
    mb.receive(function() return false end, START_TIMEOUT)
  end
end

-- The response is complete (or the connection upgraded): what the handler
-- does now is its own business, not its client's, so the client's leaving
-- no longer ends it. (Always after started.)
local function finished(res)
  if res.guard ~= 2 then return end
  res.guard = 3
  hp.finished(res.sock)
end

-- res:status(code) -> res
function Response:status(code)
  if type(code) ~= "number" or code < 100 or code > 999 or code % 1 ~= 0 then
    error("res:status: bad status code (an integer from 100 to 999 expected)", 2)
  end
  if self.started then error("res:status: the response head was already sent", 2) end
  self.code = code
  return self
end

-- res:header(name, value) -> res   (adds a header; call again to repeat it)
function Response:header(name, value)
  if type(name) ~= "string" or not string.match(name, "^[!#$%%&'*+%-.^_`|~%w]+$") then
    error("res:header: bad header name " .. tostring(name), 2)
  end
  value = tostring(value)
  if string.find(value, "[\r\n]") then error("res:header: line break in the value of " .. name, 2) end
  if self.started then error("res:header: the response head was already sent", 2) end
  local lname = string.lower(name)
  if lname == "content-length" or lname == "transfer-encoding" then
    error("res:header: " .. name .. " is set by send and write", 2)
  end
  if lname == "connection" then
    -- "close" is added by the framing code (and ends the connection);
    -- other values (Upgrade) go out as given, in place of keep-alive.
    if has_token(value, "close") then self.close = true return self end
    self.keep_alive_10 = false
  end
  local hs = self.hlist
  if not hs then
    hs = {}
    self.hlist = hs
  end
  hs[#hs + 1] = name
  hs[#hs + 1] = value
  return self
end

-- res:send([body]) -> true | nil, err   (the whole response, with Content-Length)
function Response:send(body)
  if self.started or self.done or self.upgraded then
    check_open(self, "send")
    error("res:send: the response was started with res:write", 2)
  end
  if type(body) ~= "string" then body = body == nil and "" or tostring(body) end
  started(self)
  self.started, self.done = true, true
  local out
  if bodiless(self.code) then
    out = build_head(self, nil)
  else
    out = build_head(self, #body, not self.head_only and body or nil)
  end
  local ok, err = self.sock:write(out)
  if not ok then self.close = true; self.broken = true end
  finished(self)
  return ok, err
end

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

-- -- The connection process ---------------------------------------------------

-- who: the process's pid as text, taken beforehand (a process over its
-- max_memory may make no moonbeam call, mb.self() included).
local function report(who, lines)
  io.stderr:write("=HTTP REPORT==== " .. who .. "\n" .. table.concat(lines, "\n") .. "\n")
end

-- The handler's error and traceback, without the frames of this module.
local function traceback(e)
  local lines = {}
  for line in string.gmatch(debug.traceback("", 2):sub(2), "[^\n]+") do
    if string.find(line, "^%s*%[C%]: in function 'xpcall'") then break end
    lines[#lines + 1] = line
  end
  return { err = e, traceback = table.concat(lines, "\n") }
end

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

-- Wait for the next request head (ready: as for next_event). Returns the
-- request (see push_message in lib_http.c), its framing (Content-Length,
-- true for chunked, or nil) and whether more events are queued; or nil
-- and what to do: "closed"/"idle" (close quietly), or a status to answer.
local function read_head(c, first, ready)
  local o = c.opts
  -- (A woken connection goes on with the deadline it hibernated with.)
  c.deadline = c.resume_deadline or mb.now() + (first and o.head_timeout or o.idle_timeout)
  c.resume_deadline = false
  c.first = first
  -- A connection that never sent a byte is closed quietly: browsers open
  -- spare connections they may never use.
  c.head_started = false
  c.watch_head = true
  while true do
    local kind, a, b, more = next_event(c, ready)
    if kind == "head" then
      c.watch_head = false
      return a, b, more
    elseif not kind then
      c.watch_head = false
      if a == "timeout" then
        if c.head_started then return nil, 408 end
        return nil, "idle"
      end
      return nil, "closed"
    elseif kind == "error" then
      c.watch_head = false
      return nil, a
    end
    -- Nothing else can come before a head; skip it if it does.
    ready = more
  end
end

-- Read the body of req into req.body (ready: as for next_event). Returns
-- true and whether more events are queued, or nil and a status to answer
-- (or "closed").
local function read_body(c, req, ready)
  local o = c.opts
  local body, parts, size = nil, nil, 0
  while true do
    local kind, a, _, more
    -- (A request without a body is complete already: its "done" is queued.)
    if ready then kind, a, _, more = c.parser:next() end
    if not kind then
      c.deadline = mb.now() + o.idle_timeout
      kind, a, _, more = next_event(c, false)
      if not kind then
        if a == "timeout" then return nil, 408 end
        return nil, "closed"
      end
    end
    ready = more
    if kind == "body" then
      size = size + #a
      if size > o.max_body then return nil, 413 end
      if parts then
        parts[#parts + 1] = a
      elseif body then
        parts = { body, a }
      else
        body = a
      end
    elseif kind == "done" then
      if parts then
        req.body = table.concat(parts)
      elseif body then
        req.body = body
      end
      if not a then req.keep_alive = false end
      return true, more
    elseif kind == "error" then
      return nil, a
    end
  end
end

-- Guard the connection while the handler runs (see DESIGN): the socket
-- ends the process if the client goes (on its FIN too after a keep-alive
-- request), the acceptor is its heir, and a timer tells the acceptor when
-- handler_timeout has passed (http_parser.guard does all three).
local function guard(c, req, res)
  res.guard = 1
  local ms = c.opts.handler_timeout
  if ms ~= HUGE then
    -- (A string, made once per connection, is the cheapest message to
    -- send; the acceptor looks the pid up by it only when it comes.)
    local msg = c.overtime
    if not msg then
      msg = "$http_overtime " .. c.me
      c.overtime = msg
    end
    res.timer = hp.guard(c.sock, req.keep_alive, c.acceptor, ms, msg)
  else
    hp.guard(c.sock, req.keep_alive, c.acceptor)
  end
end

local function unguard(c, res)
  started(res)
  finished(res)
end

-- A new response object. (The fields every response sets are in the
-- constructor with a constant value: a constructor in dumped bytecode keeps
-- only those keys, so the table is made at its size and the stores below
-- only fill slots. guard: 0 none, 1 guarded, 2 response started, 3 done.)
local function new_response(c, req)
  local res = {
    sock = false, code = 200, hlist = false, close = false, keep_alive_10 = false,
    http10 = false, head_only = false, started = false, done = false,
    upgraded = false, broken = false, guard = 0, timer = false,
  }
  res.sock = c.sock
  local v10 = req.version == "1.0"
  local keep = req.keep_alive
  res.http10 = v10
  res.head_only = req.method == "HEAD"
  res.close = not keep
  res.keep_alive_10 = v10 and keep
  return setmetatable(res, Response)
end

-- Handle one request. Returns true to go on with the next one.
local function serve_one(c, handler, first, ready)
  local o = c.opts
  local req, framing, more = read_head(c, first, ready)
  if not req then
    if type(framing) == "number" then fail(c, framing) else c.sock:close() end
    return false
  end
  req.socket = c.sock
  if framing and framing ~= true and framing > o.max_body then
    fail(c, 413)
    return false
  end
  local expect = req.headers.expect
  if expect then
    if string.lower(expect) ~= "100-continue" then
      fail(c, 417)
      return false
    end
    if req.version == "1.1" and (framing == true or (framing or 0) > 0) then
      if not c.sock:write("HTTP/1.1 100 Continue\r\n\r\n") then c.sock:close() return false end
    end
  end
  local ok, status = read_body(c, req, more)
  if not ok then
    if type(status) == "number" then fail(c, status) else c.sock:close() end
    return false
  end
  local res = new_response(c, req)
  local upgrade = req.upgrade
  if upgrade then
    -- The parser stopped at the head: what follows belongs to the new
    -- protocol. It is the next event (after "done").
    if status then
      local kind, rest = c.parser:next()
      if kind == "upgrade" then res.pending = rest end
    end
    res.can_upgrade = true
    -- (for moonbeam.websocket: the defaults of websocket.loop)
    res.hibernate_after = o.hibernate_after
    res.acceptor = c.acceptor
  end
  guard(c, req, res)
  local okh, caught = xpcall(handler, traceback, req, res)
  if not okh then
    -- A refused allocation skips the message handler: the error is the bare
    -- string. The process then dies at its next moonbeam call (unguard,
    -- below) and the acceptor, heir of its socket, answers 500 for it.
    if type(caught) ~= "table" then
      local why = tostring(caught)
      if why == "not enough memory" then
        why = "out of memory (the connection went over its max_memory)"
      end
      caught = { err = why }
    end
    report(c.me, { "request: " .. req.method .. " " .. req.url,
             "reason: " .. tostring(caught.err), caught.traceback })
  end
  unguard(c, res)
  if res.upgraded then
    -- The handler owned the connection; it is over now. A WebSocket the
    -- handler left open gets a normal closure (1000) rather than a bare
    -- TCP close (closing one already closed does nothing).
    if res.websocket then c.sock:close(1000) else c.sock:close() end
    return false
  end
  if not okh then
    if not res.started then
      fail(c, 500)
    else
      c.sock:close()
    end
    return false
  end
  if not res.done then
    local fok
    if res.started then fok = res:finish() else fok = res:send("") end
    if not fok then c.sock:close() return false end
  end
  if res.close or res.broken or upgrade then
    c.sock:close()
    return false
  end
  return true, status
end

-- -- Waiting between requests, and hibernating -----------------------------

-- Does the process trap exits? (A handler may have turned it on.)
local function trapping()
  local t = mb.trap_exit(true)
  mb.trap_exit(t)
  return t
end

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

local serve, wake

-- Hibernate an idle connection (see DESIGN); does not return unless it
-- cannot, and then returns whether a socket message came meanwhile and
-- what it meant.
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

-- The wait for the first bytes of a request (c.wait_request, called by
-- next_event): a read, then hibernation once idle for hibernate_after.
local function wait_request(c, left)
  local hib = c.opts.hibernate_after
  -- (hibernate checks that nothing is pending: next_event reads only once
  -- the events are used up, and a request begun would have set
  -- head_started.)
  local can = hib and hib < left and not c.no_hibernate
  local traps = trapping()
  local t = can and hib or left
  local data, err
  if traps then data, err = await_bytes(c, t) else data, err = c.sock:read(ceil(t)) end
  if data or err ~= "timeout" or not can then return data, err end
  local got, d, e = hibernate(c)
  if got then return d, e end
  left = c.deadline - mb.now()
  if left <= 0 then return nil, "timeout" end
  if traps then return await_bytes(c, left) end
  return c.sock:read(ceil(left))
end

-- The state of a connection process. (Every field is in the constructor
-- with a constant value, as in new_response.)
local function new_conn(sock, handler, opts, acceptor)
  local c = {
    sock = false, opts = false, acceptor = false, me = false, handler_spec = false,
    handler = false, parser = false, wait_request = false, overtime = false,
    deadline = false, resume_deadline = false, first = false, pending = false,
    head_started = false, watch_head = false, no_hibernate = false,
  }
  c.sock, c.opts, c.acceptor, c.handler_spec = sock, opts, acceptor, handler
  c.me = tostring(mb.self())
  c.handler = type(handler) == "string" and require(handler) or handler
  c.parser = hp.new({ max_head = opts.max_head, max_headers = opts.max_headers,
                      max_url = opts.max_url })
  c.wait_request = wait_request
  return c
end

-- Serve requests until the connection ends.
function serve(c, first)
  local handler = c.handler
  local go, ready = serve_one(c, handler, first)
  while go do go, ready = serve_one(c, handler, false, ready) end
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
  local c = new_conn(st.sock, st.handler, st.opts, st.acceptor)
  c.pending, c.resume_deadline = data, st.deadline
  serve(c, st.first)
end

-- The body of a connection process: wait for the socket, then serve
-- requests until the connection ends.
function http._connection(handler, opts, acceptor)
  local m = mb.receive(function(x) return type(x) == "table" and x.tag == "$http_sock" end, START_TIMEOUT)
  if not m then return end
  serve(new_conn(m.sock, handler, opts, acceptor), true)
end

-- What the acceptor spawns: a function without upvalues, so that a spawn
-- copies only it (spawn copies a function's upvalues, and with them every
-- function they reach); the connection process then takes the rest from
-- the module, which `require` loads from the host's module cache.
local function connection(handler, opts, acceptor)
  return require("moonbeam.http")._connection(handler, opts, acceptor)
end

-- -- The acceptor -------------------------------------------------------------

local function acceptor(parent, host, port, handler, opts)
  mb.trap_exit(true)
  local l, err = tcp.listen(host, port, { backlog = opts.backlog })
  if not l then
    mb.send(parent, { tag = "$http_listen", err = err })
    return
  end
  l:set_active(true)
  mb.send(parent, { tag = "$http_listen", port = l:port() })
  local me = mb.self()
  local spawn_opts = { link = true, max_memory = opts.max_memory }
  local conns = {}   -- the connection processes, linked to this one
  local heirs = {}   -- pid -> the socket it left to this process (tcp_heir)
  local overtime = {}   -- pid -> true: killed for handler_timeout
  local closing = false   -- shutting down (see DESIGN)
  local paused = false    -- not accepting for ACCEPT_BACKOFF after an error
  -- While shutting down: monitor ref -> connection process. (The exit
  -- signal "shutdown" breaks the process's link to this one, so its end
  -- comes as a DOWN, not an EXIT.)
  local watching = {}

  -- A connection process ended. One that died before its response started
  -- left its socket here (tcp_heir, just before its EXIT): its client gets
  -- 503 (handler_timeout, or shut down) or 500 from here, unless it has
  -- gone itself.
  local function ended(pid, reason)
    if not conns[pid] then return end
    conns[pid] = nil
    local hs = heirs[pid]
    heirs[pid] = nil
    if hs then
      local code = (overtime[pid] or closing) and 503
        or (reason ~= "normal" and reason ~= "peer closed" and 500)
      if code then hs:write(error_response(code)) end
      hs:close()
    end
    overtime[pid] = nil
  end

  -- One message. Returns a reason when the server is to shut down: its
  -- own close, or the EXIT of another linked process (a supervisor) that
  -- died, which it follows as it would without trapping exits.
  local function handle(m)
    if type(m) == "string" then
      -- A connection process's handler_timeout ("$http_overtime <pid>"):
      -- it dies at once; its tcp_heir and EXIT follow.
      for pid in pairs(conns) do
        if m == "$http_overtime " .. tostring(pid) then
          overtime[pid] = true
          mb.exit(pid, "kill")
          break
        end
      end
      return
    end
    if type(m) ~= "table" then return end
    local ev = m.event
    if ev == "tcp_accept" and m.socket == l then
      if closing then m.conn:close() return end
      local pid = mb.spawn_opt(spawn_opts, connection, handler, opts, me)
      conns[pid] = true
      if m.conn:set_owner(pid) then
        mb.send(pid, { tag = "$http_sock", sock = m.conn })
      else
        m.conn:close()
      end
    elseif ev == "EXIT" then
      if conns[m.pid] then
        ended(m.pid, m.reason)
      elseif m.reason ~= "normal" then
        return m.reason
      end
    elseif ev == "DOWN" and watching[m.ref] then
      ended(watching[m.ref], m.reason)
      watching[m.ref] = nil
    elseif ev == "tcp_heir" then
      if conns[m.from] then heirs[m.from] = m.socket else m.socket:close() end
    elseif ev == "tcp_error" and m.socket == l then
      -- Out of file descriptors, say: keep serving the open connections
      -- and accept again shortly rather than end the server. (Errors sent
      -- before the pause are only reported.)
      io.stderr:write("=HTTP REPORT==== " .. tostring(me) .. "\naccept failed: "
                      .. tostring(m.reason) .. "\n")
      if not paused then
        paused = true
        l:set_active(false)
        mb.send_after(ACCEPT_BACKOFF, me, { tag = "$http_accept_again" })
      end
    elseif m.tag == "$http_accept_again" then
      paused = false
      if not closing then l:set_active(true) end
    elseif m.tag == "$http_close" then
      return "normal"
    end
  end

  local reason
  repeat reason = handle(mb.receive()) until reason
  -- Shut down in order: stop accepting, ask, wait, then kill.
  closing = true
  l:close()
  for pid in pairs(conns) do
    watching[mb.monitor(pid)] = pid
    mb.exit(pid, "shutdown")
  end
  local limit = opts.shutdown_timeout
  local deadline = limit ~= math.huge and mb.now() + limit or nil
  while next(conns) do
    local left = deadline and deadline - mb.now()
    if left and left <= 0 then break end
    local m = mb.receive(left and math.ceil(left))
    if m == nil then break end
    handle(m)
  end
  for pid in pairs(conns) do mb.exit(pid, "kill") end
  while next(conns) do
    local m = mb.receive(KILL_WAIT)
    if m == nil then break end
    handle(m)
  end
  mb.exit(reason)
end

local Server = {}
Server.__index = Server

-- server:port() -> the port it listens on
function Server:port() return self.listen_port end

-- server:close() -> true
-- Shuts the server down in order (see DESIGN) and returns once every
-- connection process has ended: those that trap exits get the EXIT
-- "shutdown" and shutdown_timeout ms to end, the others end at once.
function Server:close()
  if self.closed then return true end
  self.closed = true
  local ref = mb.monitor(self.pid)
  local function down(x) return type(x) == "table" and x.event == "DOWN" and x.ref == ref end
  mb.send(self.pid, { tag = "$http_close" })
  local limit = self.shutdown_timeout
  if not mb.receive(down, limit ~= math.huge and limit + KILL_WAIT or nil) then
    mb.exit(self.pid, "kill")
    mb.receive(down, KILL_WAIT)
  end
  return true
end

-- http.listen(host, port, handler[, opts]) -> server | nil, err
-- handler(req, res) is a function (copied into each connection process) or
-- the name of a module that returns one.
function http.listen(host, port, handler, opts)
  if type(host) ~= "string" then error("http.listen: bad host (a string expected)", 2) end
  if type(port) ~= "number" then error("http.listen: bad port (a number expected)", 2) end
  if type(handler) ~= "function" and type(handler) ~= "string" then
    error("http.listen: bad handler (a function or a module name expected)", 2)
  end
  if opts ~= nil and type(opts) ~= "table" then error("http.listen: bad opts (a table expected)", 2) end
  local o = {}
  for k, v in pairs(DEFAULTS) do
    local given = opts and opts[k]
    if given == nil then
      o[k] = v
    elseif k == "hibernate_after" and given == false then
      o[k] = false
    elseif k == "hibernate_after" or k == "shutdown_timeout" then
      if type(given) ~= "number" or not (given >= 0) then
        error("http.listen: bad option " .. k .. " (a number >= 0 expected"
              .. (k == "hibernate_after" and ", or false)" or ")"), 2)
      end
      o[k] = given
    elseif type(given) ~= "number" or not (given > 0) then
      error("http.listen: bad option " .. k .. " (a positive number expected)", 2)
    else
      o[k] = given
    end
  end
  if o.max_memory == math.huge then o.max_memory = nil end
  local pid, ref = mb.spawn_monitor(acceptor, mb.self(), host, port, handler, o)
  local m = mb.receive(function(x)
    return type(x) == "table" and ((x.tag == "$http_listen")
      or (x.event == "DOWN" and x.ref == ref))
  end, START_TIMEOUT)
  mb.demonitor(ref, true)
  if not m then
    mb.exit(pid, "kill")
    return nil, "http.listen: the acceptor did not start"
  end
  if m.event == "DOWN" then return nil, "http.listen: " .. tostring(m.reason) end
  if m.err then return nil, m.err end
  return setmetatable({ pid = pid, listen_port = m.port,
                        shutdown_timeout = o.shutdown_timeout }, Server)
end

-- -- Static files ---------------------------------------------------------------

local MIME = {
  html = "text/html; charset=utf-8", htm = "text/html; charset=utf-8",
  js = "text/javascript; charset=utf-8", mjs = "text/javascript; charset=utf-8",
  css = "text/css; charset=utf-8", json = "application/json",
  txt = "text/plain; charset=utf-8", svg = "image/svg+xml", png = "image/png",
  jpg = "image/jpeg", jpeg = "image/jpeg", gif = "image/gif", ico = "image/x-icon",
  webp = "image/webp", wasm = "application/wasm", woff2 = "font/woff2",
}

-- Percent-decoding of a path; nil if it is malformed or decodes to a zero byte.
local function unescape(s)
  if string.find(s, "%%%X") or string.find(s, "%%%x%X") or string.find(s, "%%.?$") then
    return nil
  end
  s = string.gsub(s, "%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end)
  if string.find(s, "\0", 1, true) then return nil end
  return s
end

local function plain(res, code)
  res:status(code)
  res:header("Content-Type", "text/plain; charset=utf-8")
  return res:send(code .. " " .. reason_phrase(code) .. "\n")
end

-- http.static(root[, opts]) -> handler
-- opts: index = "index.html" (served for a directory), types = {ext = mime}
-- (added to the built-in table).
function http.static(root, opts)
  if type(root) ~= "string" or root == "" then error("http.static: bad root (a path expected)", 2) end
  opts = opts or {}
  local index = opts.index or "index.html"
  local types = {}
  for k, v in pairs(MIME) do types[k] = v end
  for k, v in pairs(opts.types or {}) do types[k] = v end
  root = string.gsub(root, "/+$", "")
  if root == "" then root = "/" end
  return function(req, res)
    local fs = require "moonbeam.fs"
    if req.method ~= "GET" and req.method ~= "HEAD" then
      res:header("Allow", "GET, HEAD")
      return plain(res, 405)
    end
    local path = unescape(req.path)
    if not path or string.sub(path, 1, 1) ~= "/" then return plain(res, 400) end
    for seg in string.gmatch(path, "[^/]+") do
      if seg == ".." then return plain(res, 403) end
    end
    local full = (root == "/" and "" or root) .. path
    local st = fs.stat(full)
    if st and st.type == "directory" then
      if string.sub(path, -1) ~= "/" then
        res:status(301)
        res:header("Location", req.path .. "/" .. (req.query and ("?" .. req.query) or ""))
        return res:send("")
      end
      full = full .. index
      st = fs.stat(full)
    end
    -- Symbolic links are not followed: one could point out of root.
    if not st or st.type ~= "file" then return plain(res, 404) end
    local data, _, code = fs.read_file(full)
    if not data then return plain(res, code == "EACCES" and 403 or 404) end
    local ext = string.match(full, "%.([%w]+)$")
    res:header("Content-Type", ext and types[string.lower(ext)] or "application/octet-stream")
    return res:send(data)
  end
end

-- -- The client -----------------------------------------------------------------

-- Parse "http://host[:port][/path]" -> host, port, target.
local function parse_url(url)
  local rest = string.match(url, "^[hH][tT][tT][pP]://(.*)$")
  if not rest then return nil end
  local authority, target = string.match(rest, "^([^/?#]*)(.*)$")
  if target == "" then target = "/" end
  target = string.gsub(target, "#.*$", "")
  local host, port = string.match(authority, "^%[(.+)%]:?(%d*)$")
  if not host then host, port = string.match(authority, "^([^:]+):?(%d*)$") end
  if not host then return nil end
  return host, tonumber(port) or 80, target, authority
end

local Client = {}
Client.__index = Client

-- http.connect(host, port[, opts]) -> client | nil, err
-- opts: timeout (ms for connect and each request, 30000), max_body.
function http.connect(host, port, opts)
  opts = opts or {}
  local timeout = opts.timeout or CLIENT_TIMEOUT
  local sock, err = tcp.connect(host, port, timeout)
  if not sock then return nil, err end
  return setmetatable({
    sock = sock, host = host, port = port, timeout = timeout,
    max_body = opts.max_body or DEFAULTS.max_body,
    authority = opts.authority or (port == 80 and host or (host .. ":" .. port)),
  }, Client)
end

-- client:request(method, target[, headers[, body]]) -> res | nil, err
-- res = {status =, version =, headers = {lower-case name = value}, body =}
function Client:request(method, target, headers, body)
  local sock = self.sock
  if not sock then return nil, "closed" end
  local lines = { method, " ", target, " HTTP/1.1\r\n" }
  local has_host = false
  for k, v in pairs(headers or {}) do
    if string.lower(k) == "host" then has_host = true end
    lines[#lines + 1] = k .. ": " .. tostring(v) .. "\r\n"
  end
  if not has_host then lines[#lines + 1] = "Host: " .. self.authority .. "\r\n" end
  if body then lines[#lines + 1] = "Content-Length: " .. #body .. "\r\n" end
  lines[#lines + 1] = "\r\n"
  local ok, err = sock:write(table.concat(lines) .. (body or ""))
  if not ok then return nil, err end
  local c = self.c
  if not c then
    c = { sock = sock, parser = hp.new({ type = "response", max_head = 65536, max_headers = 1000 }),
          deadline = false }
    self.c = c
  end
  if method == "HEAD" then c.parser:skip_body() end
  c.deadline = mb.now() + self.timeout
  local res, parts, size
  while true do
    local kind, a, b = next_event(c)
    if not kind then return nil, a end
    if kind == "head" then
      -- (a: {status, version, headers, keep_alive, upgrade}; 1xx other
      -- than 101 are interim responses, skipped)
      if a.status >= 200 or a.status == 101 then
        res = a
        parts, size = {}, 0
      end
    elseif kind == "body" and res then
      size = size + #a
      if size > self.max_body then return nil, "response body too large" end
      parts[#parts + 1] = a
    elseif kind == "done" and res and not res.upgrade then
      res.body = table.concat(parts)
      if not a then self:close() end
      return res
    elseif kind == "upgrade" and res then
      -- A 101 answer: the connection now speaks another protocol, and what
      -- came after the head belongs to it.
      res.body = table.concat(parts)
      res.pending = a
      return res
    elseif kind == "error" then
      self:close()
      return nil, "bad response: " .. b
    end
  end
end

-- client:close()
function Client:close()
  if self.sock then self.sock:close() end
  self.sock = nil
end

-- http.request(method, url[, headers[, body[, opts]]]) -> res | nil, err
-- One request on a new connection: url is "http://host[:port]/path".
function http.request(method, url, headers, body, opts)
  local host, port, target, authority = parse_url(url)
  if not host then error("http.request: bad url " .. tostring(url) .. " (http://host[:port]/path expected)", 2) end
  local o = { authority = authority }
  for k, v in pairs(opts or {}) do o[k] = v end
  local client, err = http.connect(host, port, o)
  if not client then return nil, err end
  local h = { Connection = "close" }
  for k, v in pairs(headers or {}) do h[k] = v end
  local res, rerr = client:request(method, target, h, body)
  client:close()
  return res, rerr
end

http.parse_url = parse_url
http.reason = reason_phrase
-- has_token(header_value, token): does a comma-separated header value
-- contain token (case-insensitive)? (Also used by moonbeam.websocket.)
http.has_token = has_token

return http
