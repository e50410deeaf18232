-- moonbeam.http_conn: the connection processes of moonbeam.http (internal):
-- reading requests, the response object, the guard around a handler,
-- hibernation between requests. moonbeam.http's acceptor spawns them.
--
-- DESIGN
-- A module of its own so that a connection process, which loads it with
-- `require` (from the host's module cache), loads only this: a process per
-- connection pays for every function of what it loads, and the acceptor,
-- static files and the client are no business of a connection. What a
-- plain request never needs (streamed responses, upgrades, error answers,
-- Expect, the messages of misuse errors, the end of a request whose
-- handler failed or did not send its response whole, idle connections and
-- hibernation) is in moonbeam.http_rare, loaded on first use: every
-- function and every string constant here costs each new connection
-- process (loading this module: 85,000 instructions with 30 functions and
-- 260 string constants, 57,000 with 19 and 168). moonbeam.http takes
-- next_event from here, and reason and has_token from http_rare, for its
-- client.
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
-- deadline) and feeds the bytes to moonbeam.http_parser (parser:next),
-- which does the parsing, enforces the head limits and builds the headers
-- table in C (serve_one makes the request table of what it gives); its
-- events (head, body, done, upgrade, error) are consumed here in order,
-- one request at a time, so pipelined requests are answered in order. A
-- request's body is read whole (up to max_body) before the handler runs. The handler runs in the
-- connection process under xpcall: an error becomes a 500 (or closes the
-- connection when the response had started) and a report on stderr, never
-- a crash of the server.
--
-- While a handler runs it does not read the socket, so the connection is
-- guarded (in C, on a guard made at the connection's first request, which
-- keeps the socket and one lazy timer: http_parser.guard_new, guard,
-- started, respond, finished; see host/lib/http_guard.h): the socket
-- ends the process when the client goes (as sock:set_exit_on_close: on its
-- FIN too after a keep-alive request; only on a reset after an HTTP/1.0 or
-- "Connection: close" request, whose client may half-close once it has
-- sent it); the acceptor is the socket's heir (as sock:set_heir) until
-- the response starts, so that it can still answer a connection whose
-- process died (500, or 503 after handler_timeout); and the guard's timer
-- tells the acceptor to kill a handler that has not started its response
-- within handler_timeout (its message, "$http_overtime <pid>", is
-- a string made once per connection; a request only stores its deadline,
-- and the timer, armed when idle, re-arms itself for what is left when it
-- finds a later one; the guard is freed when the connection ends or
-- hibernates, by its __gc when the process dies). A WebSocket handler is
-- none of these after the upgrade: it is long-lived, and its close
-- handshake tells it when the peer goes.
--
-- Timeouts: a new connection must send a whole request head within
-- head_timeout (if it sent nothing at all it is closed quietly); between
-- keep-alive requests it may stay idle idle_timeout, after which it is
-- closed silently; once a request's first byte came, the
-- rest of its head must come within head_timeout (else 408 and close); each
-- read of a body must come within idle_timeout.
--
-- Cost: a keep-alive request without a body is a few C calls (a socket
-- read, http_parser.next, http_parser.guard, and http_parser.respond, which
-- builds and writes the response) and about 200 bytecodes; the headers
-- table is built in C, the request and response tables from constructors
-- that keep their size from bytecode (see serve_one). With many
-- connections what a request costs is mostly the cache lines of its
-- state it touches (each connection is a state of its own: its own
-- bytecode, closures, key strings, tables), so the serving path touches
-- few: the response's state in slots, what a request needs of its
-- connection in arguments, no clock read between requests (see Response
-- and serve_one). Measured (callgrind, one scheduler, keep-alive hello
-- world, a client sending only Host): 11,660 instructions a request, and
-- with 64 connections taking turns 152 L1d read misses a request (13,470
-- and 213 the day before, with named fields and read_head; the
-- parser and request table alone: 95); 13,650 the same day with the
-- response made and the guard armed by two functions of their own;
-- 13,900-14,100 a day before, with the parser's fast path for whole heads;
-- 14,900-15,500 before it; 16,550 before other host work and
-- the 8-key response), 18,690 with a send_after timer per
-- request and the socket looked up at each step (20,600-21,200 with a
-- client sending more headers), 23,300 with the request table built in C,
-- 65,000 before (BENCHMARKS.md). The serving path uses no standard library but
-- the base one, so that a connection process opens no other (LuaJIT's
-- libraries open lazily here, each at a cost).
local mb = require "moonbeam"
local hp = require "moonbeam.http_parser"

-- What a request calls, as upvalues: a global or a module's field is a
-- look-up in a table of its own and the key's string, two more cache
-- lines a request each when many connections take turns.
local type, setmetatable, xpcall = type, setmetatable, xpcall
local hp_guard, hp_respond = hp.guard, hp.respond

local conn = {}

-- The rest of a connection process's code, for what a plain request never
-- needs (streaming, upgrades, errors, hibernation, the checks' messages):
-- moonbeam.http_rare, loaded on first use (see DESIGN).
local function rare()
  return require "moonbeam.http_rare"
end

-- How long a connection process waits for its socket.
local START_TIMEOUT = 5000

-- math.ceil of a number of ms, and math.huge, without the math library: a
-- connection process would open it (lazily, at a cost) for these alone.
local HUGE = 1 / 0
local function ceil(x)
  local f = x % 1
  if f > 0 then return x - f + 1 end
  return x
end

-- parser:next, parser:in_message and sock:read, looked up once per
-- process (by new_conn) for the server's reads: a method of a userdata is
-- a metatable look-up at every call (measured: ~120 instructions each, four
-- a keep-alive request). next_event, which the client uses too, calls them
-- as methods.
local p_next, p_in_message, s_read

-- sock:read unless the process traps exits (see serve_one).
local h_read = hp.read

-- The next parser event, as parser:next gives it (kind, a, b, more; see
-- moonbeam.http_parser), reading the socket until c.deadline (ms, mb.now()
-- time; false: no limit) while none is ready. nil, why when none came:
-- "timeout", "closed" or the socket's error. ready == false: the caller
-- knows that no event is queued (the last one said so), so it reads first.
-- (The client's responses and a request's body; a server waits for a
-- request head in serve_one.)
local function next_event(c, ready)
  local parser = c.parser
  local kind, a, b, more
  if ready ~= false then kind, a, b, more = parser:next() end
  while not kind do
    local deadline = c.deadline
    local left = deadline and deadline - mb.now()
    if left and left <= 0 then return nil, "timeout" end
    local data, err = c.sock:read(left and ceil(left))
    if data then
      kind, a, b, more = parser:next(data)
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

-- res:status, res:header and res:send are here; res:write, res:finish and
-- res:upgrade are in moonbeam.http_rare, looked up there the first time a
-- response of this process uses one. So are the messages of the errors
-- these raise for misuse: the checks are here, and a failed one calls
-- http_rare to raise the error (a message is a string constant, and every
-- constant costs each new connection process its interning).
--
-- A response is a table whose state is in its array part, slots 1-10 (the
-- code here indexes them by number; http_rare names them): 1 its
-- connection (c: the socket and the guard are c.sock and c.guard), 2 the
-- status code, 3 the added headers (false, or a list: name, value, ...), 4
-- whether the connection closes after it, 5 the request's HTTP/1.0-ness
-- (false for HTTP/1.1; true for 1.0 asking to be kept alive, which is
-- answered "Connection: keep-alive"; 0 for any other 1.0 request), 6
-- whether it started and 7 is done (done implies started), 8 the guard's
-- state (1 guarded, 2 response started, 3 done), 9 head_only (a HEAD
-- request, or a streamed response of a bodiless status), 10 the guard
-- (c.guard, here for res:send). Slots, not named
-- fields: a named field's key is a string object of the state's own that
-- every get and set reads, and with many connections taking turns each is
-- a cache line from far away (measured, callgrind: with 64 connections
-- taking turns 171-174 -> 162 L1d read misses a request; 12,490 -> 11,960
-- instructions a request on one connection). What few responses need is
-- named, absent (nil) until set: upgraded, broken (a write failed), and
-- http_rare's fields for streaming and upgrades; a handler's own fields
-- go there too.
local Response = {}
Response.__index = Response
setmetatable(Response, { __index = function(_, k)
  local f = rare().Response[k]
  if f ~= nil then Response[k] = f end
  return f
end })
-- The named fields a response sets only when it needs them, read here
-- until then: not through the function above, which would look up
-- http_rare at every read.
Response.upgraded, Response.broken = false, false

-- res:status(code) -> res
function Response:status(code)
  if type(code) ~= "number" or code < 100 or code > 999 or code % 1 ~= 0 or self[6] then
    rare().bad_status(self, code)
  end
  self[2] = code
  return self
end

-- res:header(name, value) -> res   (adds a header; call again to repeat it)
-- Content-Length and Transfer-Encoding are refused (send and write set
-- them) and Connection has a meaning of its own: http_rare's
-- special_header does those three.
function Response:header(name, value)
  local ok = type(name) == "string" and string.match(name, "^[!#$%%&'*+%-.^_`|~%w]+$")
  if ok then
    value = tostring(value)
    ok = not string.find(value, "[\r\n]") and not self[6]   -- (started)
  end
  if not ok then rare().bad_header(self, name, value) end
  local lname = string.lower(name)
  if lname == "connection" or lname == "content-length" or lname == "transfer-encoding" then
    if rare().special_header(self, name, value, lname) then return self end
  end
  local hs = self[3]
  if not hs then
    hs = {}
    self[3] = hs
  end
  hs[#hs + 1] = name
  hs[#hs + 1] = value
  return self
end

-- res:send([body]) -> true | nil, err   (the whole response, with Content-Length)
function Response:send(body)
  -- (started: 6, which done or upgraded implies)
  if self[6] then rare().bad_send(self) end
  if type(body) ~= "string" then body = body == nil and "" or tostring(body) end
  local code = self[2]
  local framing
  if code < 200 or code == 204 or code == 304 then   -- (bodiless)
    body = nil
  else
    framing = #body
    if self[9] then body = nil end   -- (head_only)
  end
  self[6], self[7] = true, true   -- (started, done)
  if self[8] ~= 1 then return rare().send_unguarded(self, framing, body) end
  -- started, the response built and written, and finished, in one call
  -- (http_parser.respond) when the kernel takes it all; http_rare's
  -- send_rest writes the rest otherwise.
  self[8] = 3
  local rest, whole = hp_respond(self[10], code, self[3] or nil, framing,
                                 self[4], self[5] == true, body)
  if rest == true then return true end
  return rare().send_rest(self, rest, whole)
end

-- -- The connection process ---------------------------------------------------

-- The handler's message handler (under xpcall): its error and the
-- traceback, which http_rare trims afterwards (not here: loading a module
-- in a message handler, near a stack overflow say, could fail itself).
local function traceback(e)
  return { err = e, traceback = debug.traceback("", 2) }
end

-- The end of a connection that cannot go on (why: from serve_one): a
-- status is answered (http_rare), anything else closes it quietly.
local function stop(c, why)
  if type(why) == "number" then
    rare().fail(c, why)
  else
    c.sock:close()
  end
  return false
end

-- Read the body of req into req.body (ready: as for next_event). Returns
-- true and whether more events are queued, or nil and a status to answer
-- (or "closed").
local function read_body(c, req, ready)
  -- One piece is the body as it came; more go into a string.buffer: a list
  -- of pieces held a string per piece, and a chunked body of 1-byte chunks
  -- took the connection's 64 MiB at 4.5 MB, long before max_body.
  local body, buf, size = nil, nil, 0
  while true do
    local kind, a, _, more
    -- (A request without a body is complete already: its "done" is queued.)
    if ready then kind, a, _, more = p_next(c.parser) end
    if not kind then
      c.deadline = mb.now() + c.idle_timeout
      kind, a, _, more = next_event(c, false)
      if not kind then
        if a == "timeout" then return nil, 408 end
        return nil, "closed"
      end
    end
    ready = more
    if kind == "body" then
      size = size + #a
      if size > c.max_body then return nil, 413 end
      if buf then
        buf:put(a)
      elseif body then
        buf = require("string.buffer").new(2 * (#body + #a)):put(body, a)
        body = nil
      else
        body = a
      end
    elseif kind == "done" then
      if buf then
        req.body = buf:tostring()
        buf:free()
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

-- The connection's guard (see DESIGN), made at its first request: it keeps
-- the socket and one lazy timer (see http_guard.h); serve_one arms it
-- for each request with http_parser.guard, which makes the socket end the
-- process if the client goes (on its FIN too after a keep-alive request),
-- the acceptor its heir, and tells the acceptor when handler_timeout has
-- passed.
local function new_guard(c)
  local g
  local ms = c.handler_timeout
  if ms ~= HUGE then
    -- (A string, made once per connection, is the cheapest message to
    -- send; the acceptor looks the pid up by it only when it comes.)
    g = hp.guard_new(c.sock, c.acceptor, ms, "$http_overtime " .. c.me)
  else
    g = hp.guard_new(c.sock, c.acceptor)
  end
  c.guard = g
  return g
end

-- Handle one request: wait for its head (ready: as for next_event), read
-- its body, run the handler. Returns true, whether more events are queued,
-- the guard and the wait (below) to go on with the next request; false when
-- the connection ended. What a plain request never needs (Expect,
-- upgrades, a handler that failed or did not send its response whole) is
-- http_rare's. One function, with what a request uses of its connection
-- (the parser, the socket, the guard, the wait) as arguments and results,
-- not fields of c: each field's key is a string object of the state's own,
-- a cache line from far away when many connections take turns (see
-- Response; measured with 64 connections: each such field cost ~3 L1d
-- misses a request).
-- Timeouts: a new connection has head_timeout for its first request, a
-- kept-alive one idle_timeout for its next (a woken one goes on with the
-- deadline it hibernated with); once the first byte of a head has come,
-- the rest must come within head_timeout (else 408). A connection that
-- never sent a byte is closed quietly: browsers open spare connections
-- they may never use. Between requests the wait may end in hibernation
-- (http_rare).
-- The common wait, a kept-alive connection's for its next request, is one
-- read of `wait` ms (c.wait: hibernate_after, or idle_timeout when it cannot
-- hibernate first) without reading the clock or storing the deadline:
-- those are computed when needed, after it (measured: reading the clock
-- and storing the deadline at every request cost ~25 of the ~210 cache
-- lines a request touches with 64 connections taking turns). A head begun
-- in that read then has head_timeout from the read's end, capped by
-- idle_timeout (not by what was left of it).
local function serve_one(c, handler, parser, sock, guard, wait, first, ready, deadline)
  -- deadline (ms of mb.now()): the end of the wait for the head; nil until
  -- it is needed, true after the wait between requests (computed from now
  -- when it is needed then). Given: a woken connection's.
  local now
  local begun = false   -- the head's first byte came
  -- The parser's events (see moonbeam.http_parser): a head gives the
  -- request's fields as values (framing: Content-Length, true for
  -- chunked, nil, or false when it has no body).
  local kind, framing, headers, more, method, url, path, query, version, keep, upgrade
  if ready ~= false then
    kind, framing, headers, more, method, url, path, query, version, keep, upgrade = p_next(parser)
  end
  while kind ~= "head" do
    if kind == "error" then return stop(c, framing) end
    if kind and more then
      -- Nothing else can come before a head; skip it if it does.
      kind, framing, headers, more, method, url, path, query, version, keep, upgrade = p_next(parser)
    else
      local data, err
      if not deadline and not first then
        -- Between keep-alive requests (see above): http_parser.read is
        -- sock:read, or nil, "trapping" when the process traps exits
        -- (its handler may have turned it on), which the wait below does.
        wait = wait or c.wait   -- (nil after http_rare's end of a request)
        data, err = h_read(sock, wait)
        if not data and err == "timeout" and wait ~= c.idle_wait then
          -- hibernate_after has passed: hibernate (http_rare).
          now = mb.now()
          deadline = now - wait + c.idle_timeout
          c.deadline, c.first = deadline, false
          data, err = rare().idle(c, false)
          guard, wait = c.guard, c.wait   -- (freed, and idle_wait, if it tried)
        end
        deadline = deadline or true   -- (the fast read is done: computed below if needed)
      end
      if not data and (not err or err == "trapping") then
        now = mb.now()
        if not deadline then   -- (only a new connection's first request comes here so)
          deadline = now + c.head_timeout
        elseif deadline == true then
          deadline = now + c.idle_timeout
        end
        c.deadline, c.first = deadline, first
        local left = deadline - now
        if c.pending then
          -- Bytes that woke a hibernated connection (they came in time,
          -- though the loop may have read them after the deadline).
          data, c.pending = c.pending, false
        elseif left <= 0 then
          return stop(c, begun and 408 or "idle")
        elseif begun then
          data, err = s_read(sock, ceil(left))
        else
          -- Between requests: a read, or the wait of a process that traps
          -- exits, then hibernation once idle for hibernate_after.
          local hib = c.hibernate_after
          local can = hib and hib < left and not c.no_hibernate
          local traps = hp.trapping()   -- (a handler may have turned it on)
          if traps then
            data, err = rare().await_bytes(c, can and hib or left)
          else
            data, err = s_read(sock, ceil(can and hib or left))
          end
          if not data and err == "timeout" and can then
            data, err = rare().idle(c, traps)
            guard, wait = c.guard, c.wait   -- (freed, and idle_wait, if it tried)
          end
        end
      end
      if not data then
        return stop(c, err == "timeout" and (begun and 408 or "idle") or "closed")
      end
      kind, framing, headers, more, method, url, path, query, version, keep, upgrade = p_next(parser, data)
      if not kind then
        now = mb.now()
        if deadline == true then
          deadline = now + c.idle_timeout
          c.deadline = deadline
        end
        if not begun and p_in_message(parser) then
          begun = true
          local d = now + c.head_timeout
          if d < deadline then
            deadline = d
            c.deadline = d
          end
        end
      end
    end
  end
  -- The request: a template copy and a store per field. The template's
  -- values are constants, overwritten at once (query with nil when there
  -- is none): a constructor with the variables in it would have nil-valued
  -- keys in its template, and LuaJIT's insertion takes a node whose value
  -- is nil for a colliding key, so such a template loses some of them
  -- (which ones depends on the state's string hash seed) and each copy
  -- then inserts those again (measured: 3 key insertions a request).
  local req = {
    method = false, url = false, path = false, query = false, version = false,
    headers = false, body = "", keep_alive = false, upgrade = false, socket = false,
  }
  req.method, req.url, req.path, req.query, req.version = method, url, path, query, version
  req.headers, req.keep_alive, req.upgrade, req.socket = headers, keep, upgrade, sock
  if framing and framing ~= true and framing > c.max_body then return stop(c, 413) end
  if headers.expect and not rare().expect(c, req, framing) then return false end
  local status = more
  if framing ~= false then   -- (false: complete with its head)
    local ok
    ok, status = read_body(c, req, more)
    if not ok then return stop(c, status) end
    keep = req.keep_alive
  end
  local v10 = false
  if version == "1.0" then v10 = keep or 0 end
  -- The guard: serve passes what the last request returned (nil after
  -- http_rare's end of a request; made at the first request). The
  -- response's slots: see Response.
  guard = guard or c.guard or new_guard(c)
  local res = setmetatable({ c, 200, false, not keep, v10, false, false, 1, false, guard },
                           Response)
  if method == "HEAD" then res[9] = true end
  if upgrade then rare().upgradable(c, res, status) end
  -- (true: the host stops, and its acceptor drains: the connection
  -- closes after this response.)
  if hp_guard(guard, keep) then res[4] = true end
  local okh, caught = xpcall(handler, traceback, req, res)
  if not okh or res[8] ~= 3 or not res[7] or upgrade then   -- (guard, done)
    return rare().after_handler(c, req, res, okh, caught, status)
  end
  if res[4] then   -- (close; broken: closed too)
    sock:close()
    return false
  end
  return true, status, guard, wait
end

-- The state of a connection process. opts is the list of
-- http.listen's options that a connection uses, in this order (built by
-- moonbeam.http's conn_options): max_body, max_head, max_headers, max_url,
-- head_timeout, idle_timeout, handler_timeout, hibernate_after. A list of
-- numbers is the cheapest table to copy into each new process: it has no
-- keys to intern (measured: decoding the spawn's arguments took 28,000
-- instructions a connection, 33,000 with the table of named options).
local function new_conn(sock, handler, opts, acceptor)
  local c = {
    sock = false, opts = false, acceptor = false, me = false, handler_spec = false,
    handler = false, parser = false, guard = false,
    deadline = false, first = false, pending = false,
    no_hibernate = false, max_body = 0, head_timeout = 0, idle_timeout = 0,
    handler_timeout = 0, hibernate_after = false, wait = 0, idle_wait = 0,
  }
  c.sock, c.opts, c.acceptor, c.handler_spec = sock, opts, acceptor, handler
  c.max_body, c.head_timeout, c.idle_timeout = opts[1], opts[5], opts[6]
  c.handler_timeout, c.hibernate_after = opts[7], opts[8]
  -- The wait between keep-alive requests (serve_one): hibernate_after
  -- first when it comes before idle_timeout; http_rare sets it to
  -- idle_wait when the connection cannot hibernate.
  local idle, hib = opts[6], opts[8]
  c.idle_wait = ceil(idle)
  c.wait = hib and hib < idle and ceil(hib) or c.idle_wait
  c.me = tostring(mb.self())
  c.handler = type(handler) == "string" and require(handler) or handler
  local parser = hp.new({ max_head = opts[2], max_headers = opts[3], max_url = opts[4] })
  c.parser = parser
  if not p_next then
    p_next, p_in_message, s_read = parser.next, parser.in_message, sock.read
  end
  return c
end

-- Serve requests until the connection ends (deadline: a woken connection's
-- for its next request, the one it hibernated with).
local function serve(c, first, deadline)
  local handler, parser, sock = c.handler, c.parser, c.sock
  local go, ready, guard, wait = serve_one(c, handler, parser, sock, false, c.wait, first, nil,
                                          deadline)
  while go do
    go, ready, guard, wait = serve_one(c, handler, parser, sock, guard, wait, false, ready)
  end
  if c.guard then hp.guard_free(c.guard) end
end

-- The socket is the acceptor's first message, and comes bare: a tagged
-- table's keys and tag are strings to intern in each new process
-- (measured: 4,200 instructions a connection with the acceptor's encoding;
-- the check costs nothing to speak of, while mb.is_pid's first use would
-- cost a process 2,000). No other process knows this one's pid before the
-- acceptor sent it; if one did send it another id (a pid, a ref) first,
-- the process would fail on it and the socket, whose owner it is, close.
local function is_socket(x)
  return type(x) == "userdata"
end

-- The body of a connection process: wait for the socket, then serve
-- requests until the connection ends.
function conn.serve(handler, opts, acceptor)
  local sock = mb.receive(is_socket, START_TIMEOUT)
  if not sock then return end
  return serve(new_conn(sock, handler, opts, acceptor), true)   -- (a tail call: one frame less under every read)
end

-- For moonbeam.http's client and moonbeam.http_rare.
conn.next_event, conn.ceil = next_event, ceil
conn.new_conn, conn.serve_conn = new_conn, serve

return conn
