-- moonbeam.http_rare: the parts of moonbeam.http's connection processes
-- that a plain request never needs (internal): streamed responses
-- (res:write, res:finish), upgrades, error answers, and the wait and
-- hibernation of an idle connection.
--
-- DESIGN
-- A connection process loads moonbeam.http_conn, and this module only when
-- it first needs one of these (a process per connection pays for every
-- function and every string constant it loads: see moonbeam.http_conn).
-- So this module also has what a plain request never runs: the messages
-- of res:status's, res:header's and res:send's misuse errors (their checks
-- stay in moonbeam.http_conn), Expect: 100-continue, the end of a request
-- whose handler failed, upgraded or did not send its response whole, and
-- the helpers moonbeam.http's client shares (reason, has_token).
local mb = require "moonbeam"
local hp = require "moonbeam.http_parser"
local conn = require "moonbeam.http_conn"

local rare = {}

local ceil = conn.ceil

-- A response's slots (see Response in moonbeam.http_conn).
-- (GSTATE: the guard's state, 1 guarded, 2 started, 3 done; GUARD: the guard.)
local C, CODE, HLIST, CLOSE, V10, STARTED, DONE, GSTATE, HEAD_ONLY, GUARD = 1, 2, 3, 4, 5, 6, 7, 8, 9, 10

-- How long to wait for the EXIT of a process that was killed (the kill
-- cannot be trapped: this only guards against a runtime bug), and how long
-- a handler past handler_timeout waits for its kill.
local KILL_WAIT = 5000
local START_TIMEOUT = 5000

-- After an error response, the connection reads and drops what the client
-- still sends, for at most this long or this many bytes, before it closes:
-- closing with unread input makes TCP reset the connection, and a reset can
-- destroy the response before the client read it.
local LINGER_MS = 1000
local LINGER_BYTES = 1024 * 1024

-- -- Helpers shared by server and client ------------------------------------

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

-- who: the process's pid as text, taken beforehand (a process over its
-- max_memory may make no moonbeam call, mb.self() included).
local function report(who, lines)
  io.stderr:write("=HTTP REPORT==== " .. who .. "\n" .. table.concat(lines, "\n") .. "\n")
end

-- -- The response's guard -----------------------------------------------------

-- Status codes whose responses carry no body.
local function bodiless(code)
  return code < 200 or code == 204 or code == 304
end

-- The response head (and body, when given: one string, one write), built
-- in C; `framing` is the Content-Length, true for chunked, or nil.
local function build_head(res, framing, body)
  return hp.head(res[CODE], res[HLIST] or nil, framing, res[CLOSE], res[V10] == true, body)
end

-- (level: of the function whose caller misused the response)
local function check_open(res, what, level)
  level = (level or 2) + 1
  if res.upgraded then error("res:" .. what .. ": the connection was upgraded", level) end
  if res[DONE] then error("res:" .. what .. ": the response was already sent", level) end
end

-- The response starts: the handler is no longer timed, and the acceptor
-- could not answer for it any more (the head is going out).
local function started(res)
  if res[GSTATE] ~= 1 then return end
  res[GSTATE] = 2
  if not hp.started(res[GUARD]) then
    -- Too late: the acceptor was told to kill this process, and answers
    -- 503 for it. Wait for the kill rather than send half an answer.
    mb.receive(function() return false end, START_TIMEOUT)
  end
end

-- The response is complete (or the connection upgraded): what the handler
-- does now is its own business, not its client's, so the client's leaving
-- no longer ends it. (Always after started.)
local function finished(res)
  if res[GSTATE] ~= 2 then return end
  res[GSTATE] = 3
  hp.finished(res[GUARD])
end

-- -- Misuse of a response (the checks are in moonbeam.http_conn) -----------

-- res:status(code) failed its check: raise its error at the handler.
function rare.bad_status(res, code)
  if type(code) ~= "number" or code < 100 or code > 999 or code % 1 ~= 0 then
    error("res:status: bad status code (an integer from 100 to 999 expected)", 3)
  end
  error("res:status: the response head was already sent", 3)
end

-- res:header(name, value) failed its check (value: as given, or already
-- made a string).
function rare.bad_header(res, name, value)
  if type(name) ~= "string" or not string.match(name, "^[!#$%%&'*+%-.^_`|~%w]+$") then
    error("res:header: bad header name " .. tostring(name), 3)
  end
  value = tostring(value)
  if string.find(value, "[\r\n]") then error("res:header: line break in the value of " .. name, 3) end
  error("res:header: the response head was already sent", 3)
end

-- res:header with Connection, Content-Length or Transfer-Encoding (lname:
-- the name in lower case). Returns true when the header is not to be
-- added.
function rare.special_header(res, name, value, lname)
  if lname ~= "connection" then
    error("res:header: " .. name .. " is set by send and write", 3)
  end
  -- "close" is added by the framing code (and ends the connection);
  -- other values (Upgrade) go out as given, in place of keep-alive.
  if has_token(value, "close") then
    res[CLOSE] = true
    return true
  end
  if res[V10] == true then res[V10] = 0 end
  return false
end

-- res:send on a response already started, sent or upgraded.
function rare.bad_send(res)
  check_open(res, "send", 3)
  error("res:send: the response was started with res:write", 3)
end

-- The rest of res:send (the head and body made, res.started and res.done
-- set) for a response that is not guarded as a fresh one is.
function rare.send_unguarded(res, framing, body)
  started(res)
  return rare.send_rest(res, build_head(res, framing, body))
end

-- The rest of res:send when http_parser.respond did not write the whole
-- response: rest is what is left to write (a string), or false when the
-- handler's time was up (whole: the whole response).
function rare.send_rest(res, rest, whole)
  if res[GSTATE] == 3 then
    res[GSTATE] = 2
    if rest == false then
      -- Too late, as in started: wait for the kill.
      mb.receive(function() return false end, START_TIMEOUT)
      rest = whole
    end
  end
  local ok, err = res[C].sock:write(rest)
  if not ok then res[CLOSE] = true; res.broken = true end
  finished(res)
  if ok then return true end
  return nil, err
end

-- -- Streamed responses and upgrades ------------------------------------------

local Response = {}
rare.Response = Response

-- res:write(chunk) -> true | nil, err   (streams the body, chunked)
function Response:write(chunk)
  check_open(self, "write")
  chunk = tostring(chunk)
  local out
  if not self[STARTED] then
    started(self)
    self[STARTED], self.streaming = true, true
    if bodiless(self[CODE]) then
      self[HEAD_ONLY] = true
      out = build_head(self, nil)
    elseif self[V10] ~= false then
      -- HTTP/1.0 knows no chunks: the body runs to the end of the connection.
      self[CLOSE] = true
      out = build_head(self, nil)
    else
      self.chunked = true
      out = build_head(self, true)
    end
  else
    out = ""
  end
  if #chunk > 0 and not self[HEAD_ONLY] then
    if self.chunked then
      out = out .. string.format("%x\r\n", #chunk) .. chunk .. "\r\n"
    else
      out = out .. chunk
    end
  end
  if out == "" then return true end
  local ok, err = self[C].sock:write(out)
  if not ok then self[CLOSE] = true; self.broken = true; return nil, err end
  return true
end

-- res:finish([chunk]) -> true | nil, err   (ends a streamed response)
function Response:finish(chunk)
  if chunk ~= nil and chunk ~= "" then
    local ok, err = self:write(chunk)
    if not ok then return nil, err end
  end
  if not self[STARTED] then return self:send("") end
  check_open(self, "finish")
  self[DONE] = true
  local ok, err = true, nil
  if self.chunked and not self[HEAD_ONLY] then
    ok, err = self[C].sock:write("0\r\n\r\n")
    if ok then err = nil else self[CLOSE] = true; self.broken = true end
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
  if self[STARTED] then error("res:upgrade: the response head was already sent", 2) end
  if not self.can_upgrade then return nil, "not an upgrade request" end
  -- A WebSocket is long-lived and has its own close: no timer, no exit on
  -- the peer's FIN.
  started(self)
  finished(self)
  self[CODE] = 101
  self[CLOSE] = false
  if self[V10] == true then self[V10] = 0 end
  self[STARTED], self[DONE], self.upgraded = true, true, true
  local sock = self[C].sock
  local ok, err = sock:write(build_head(self, nil))
  if not ok then return nil, err end
  return sock, self.pending or ""
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

-- -- The rare parts of a request ---------------------------------------------

-- A request with an Expect header: 417 unless it is 100-continue, which
-- gets its interim answer when a body is to come. Returns true to go on.
function rare.expect(c, req, framing)
  if string.lower(req.headers.expect) ~= "100-continue" then
    fail(c, 417)
    return false
  end
  if req.version == "1.1" and (framing == true or (framing or 0) > 0) then
    if not c.sock:write("HTTP/1.1 100 Continue\r\n\r\n") then
      c.sock:close()
      return false
    end
  end
  return true
end

-- An upgrade request (more: events are queued after its "done"): the
-- parser stopped at the head, and what follows belongs to the new
-- protocol; it is the next event.
function rare.upgradable(c, res, more)
  if more then
    local kind, rest = c.parser:next()
    if kind == "upgrade" then res.pending = rest end
  end
  res.can_upgrade = true
  -- The parser stops at an upgrade's head (what follows is the new
  -- protocol's), so a plain answer ends the connection, and says so: a
  -- client that sent more behind it learns it was not read.
  -- (res:upgrade sets it back.)
  res[CLOSE] = true
  -- (for moonbeam.websocket: the defaults of websocket.loop)
  res.hibernate_after = c.hibernate_after
  res.acceptor = c.acceptor
end

-- The handler's traceback without the frames of moonbeam.http_conn (from
-- its xpcall on) and the line that debug.traceback puts first.
local function trim(traceback)
  local lines = {}
  for line in string.gmatch(string.sub(traceback, 2), "[^\n]+") do
    if string.find(line, "^%s*%[C%]: in function 'xpcall'") then break end
    lines[#lines + 1] = line
  end
  return table.concat(lines, "\n")
end

-- The end of a request whose handler failed (ok false, caught: what its
-- message handler made of the error), upgraded the connection, or did not
-- send its response whole (moonbeam.http_conn's serve_one ends so when all
-- went plainly). Returns true (and more) to go on with the next request.
function rare.after_handler(c, req, res, ok, caught, more)
  if not ok then
    -- A refused allocation skips the message handler: the error is the bare
    -- string. The process then dies at its next moonbeam call (below) and
    -- the acceptor, heir of its socket, answers 500 for it.
    if type(caught) ~= "table" then
      local why = tostring(caught)
      if why == "not enough memory" then
        why = "out of memory (the connection went over its max_memory)"
      end
      caught = { err = why }
    end
    report(c.me, { "request: " .. req.method .. " " .. req.url,
                   "reason: " .. tostring(caught.err), caught.traceback and trim(caught.traceback) })
  end
  if res[GSTATE] ~= 3 then
    started(res)
    finished(res)
  end
  if res.upgraded then
    -- The handler owned the connection; it is over now. A WebSocket the
    -- handler left open gets a normal closure (1000) rather than a bare
    -- TCP close (closing one already closed does nothing).
    if res.websocket then c.sock:close(1000) else c.sock:close() end
    return false
  end
  if not ok then
    if not res[STARTED] then
      fail(c, 500)
    else
      c.sock:close()
    end
    return false
  end
  if not res[DONE] then
    local fok
    if res[STARTED] then fok = res:finish() else fok = res:send("") end
    if not fok then c.sock:close() return false end
  end
  if res[CLOSE] or req.upgrade then   -- (broken: closed too)
    c.sock:close()
    return false
  end
  return true, more
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
  -- (The guard, its timer and its reference to the socket go with the
  -- state: the woken connection makes a new one.)
  if c.guard then
    hp.guard_free(c.guard)
    c.guard = false
  end
  local _, err = pcall(mb.hibernate, wake, st)
  -- Not possible: the handler holds a value that cannot be copied (its
  -- upvalues go with the continuation). Stay awake from now on.
  c.no_hibernate = true
  c.wait = c.idle_wait
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
    -- A loop that ran late fires its timers before it reads: bytes that
    -- came before the deadline are read in the same turn, their message
    -- is here already, and they are a request in time.
    m = mb.receive(idle_match(st.sock, st.acceptor), 0)
    if not m then
      st.sock:close()   -- idle_timeout: closed quietly
      return
    end
  else
    cancel_idle(st.timer)
  end
  local data = from_message(st.sock, m)
  if not data then
    st.sock:close()
    return
  end
  local c = conn.new_conn(st.sock, st.handler, st.opts, st.acceptor)
  c.pending = data
  conn.serve_conn(c, st.first, st.deadline)
end

-- The rest of an idle connection's wait once hibernate_after has passed
-- (serve_one in moonbeam.http_conn): it hibernates, or, when it cannot,
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
rare.reason = reason_phrase
rare.has_token = has_token
rare.idle = idle
rare.error_response = error_response
rare.await_bytes = await_bytes
rare.hibernate = hibernate

return rare
