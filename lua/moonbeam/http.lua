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
-- socket over (sock:set_owner, then a message that is the socket). The
-- acceptor traps exits, so a connection process that dies, however it
-- dies, leaves it running.
-- server:close() (or the EXIT of another process linked to the acceptor,
-- such as a supervisor) shuts down in order, as a supervisor does: close
-- the listener, send every connection process the exit signal "shutdown",
-- wait up to shutdown_timeout for them to end, kill the rest, then end.
--
-- The connection processes (reading requests, responses, the guard around
-- a handler, hibernation) are moonbeam.http_conn and moonbeam.http_rare.
--
-- Like moonbeam.server, most functions here run in other processes: spawn
-- copies the process bodies with their upvalues, so standard functions are
-- read as globals rather than cached in locals.
local mb = require "moonbeam"
local tcp = require "moonbeam.tcp"
local hp = require "moonbeam.http_parser"
local conn = require "moonbeam.http_conn"
local rare = require "moonbeam.http_rare"

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
  -- take the host's memory. An idle connection uses about 45 KB awake,
  -- 1.5 KB hibernated.
  max_memory = 64 * 1024 * 1024,
}
-- How long the acceptor stops accepting after accept failed (out of
-- descriptors): the open connections go on meanwhile.
local ACCEPT_BACKOFF = 100
-- How long to wait for the EXIT of a process that was killed (the kill
-- cannot be trapped: this only guards against a runtime bug).
local KILL_WAIT = 5000
-- While the host stops, how often the acceptor looks for connections whose
-- response is complete, to ask them to stop (see acceptor).
local DRAIN_POLL = 20
-- How long http.listen waits for the acceptor to report the listening port.
local START_TIMEOUT = 5000
-- The client's default timeout for a whole request.
local CLIENT_TIMEOUT = 30000

local next_event, reason_phrase = conn.next_event, rare.reason
local has_token, error_response = rare.has_token, rare.error_response

-- What the acceptor spawns: a function without upvalues, so that a spawn
-- copies only it (spawn copies a function's upvalues, and with them every
-- function they reach); the connection process then loads the rest,
-- moonbeam.http_conn, with `require` from the host's module cache.
-- The collector is stopped while it loads: all that loading makes is live
-- (it is the module), so a collection then would only mark it (measured: a
-- tenth of a new connection's instructions). It restarts with its next
-- cycle at twice what the process holds then (LuaJIT's LUA_GCRESTART with
-- -1, as lstate.c's reset_gc uses it), the usual pause, as a collection
-- would have left it. A plain "restart" would start a cycle at once, over
-- a heap that is nearly all live: 14,000 instructions of a connection of
-- one request (callgrind, one scheduler), with nothing to free.
local function connection(handler, opts, acceptor)
  collectgarbage("stop")
  local serve = require("moonbeam.http_conn").serve
  collectgarbage("restart", -1)
  return serve(handler, opts, acceptor)
end

-- The options a connection process uses, as the list moonbeam.http_conn's
-- new_conn reads (see there: a list is cheaper to copy than named fields).
local function conn_options(o)
  return { o.max_body, o.max_head, o.max_headers, o.max_url, o.head_timeout,
           o.idle_timeout, o.handler_timeout, o.hibernate_after }
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
  local copts = conn_options(opts)
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

  -- Report why, and stop accepting for ACCEPT_BACKOFF. (Errors that come
  -- before the pause takes hold are only reported.)
  local function pause(why)
    io.stderr:write("=HTTP REPORT==== " .. tostring(me) .. "\n" .. why .. "\n")
    if not paused then
      paused = true
      l:set_active(false)
      mb.send_after(ACCEPT_BACKOFF, me, { tag = "$http_accept_again" })
    end
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
      local ok, pid = pcall(mb.spawn_opt, spawn_opts, connection, handler, copts, me)
      if not ok then
        -- The host starts no process now (over --max-memory, or too many
        -- processes): turn this client away and pause as for a failed
        -- accept, rather than end the server.
        m.conn:close()
        return pause("spawn failed: " .. tostring(pid))
      end
      conns[pid] = true
      if m.conn:set_owner(pid) then
        mb.send(pid, m.conn)   -- (bare: see moonbeam.http_conn's conn.serve)
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
      -- and accept again shortly rather than end the server.
      pause("accept failed: " .. tostring(m.reason))
    elseif m.tag == "$http_accept_again" then
      paused = false
      if not closing then l:set_active(true) end
    elseif m.tag == "$http_close" then
      return "normal"
    end
  end

  local reason
  repeat reason = handle(mb.receive()) until reason
  -- Shut down in order: stop accepting, ask, wait, then kill. While the
  -- host stops (SIGTERM) it drains: a connection whose request is in its
  -- handler or response is asked only once that response is complete
  -- (looked at every DRAIN_POLL ms; the response says Connection: close),
  -- so its client gets the answer rather than 503.
  closing = true
  l:close()
  local function ask(pid)
    watching[mb.monitor(pid)] = pid
    mb.exit(pid, "shutdown")
  end
  local drain = mb.stopping()
  local busy = {}   -- draining: pid -> true, not asked yet
  for pid in pairs(conns) do
    if drain and hp.busy(pid) then busy[pid] = true else ask(pid) end
  end
  local limit = opts.shutdown_timeout
  local deadline = limit ~= math.huge and mb.now() + limit or nil
  local poll = mb.now() + DRAIN_POLL
  while next(conns) do
    local now = mb.now()
    local left = deadline and deadline - now
    if left and left <= 0 then break end
    if next(busy) and now >= poll then
      for pid in pairs(busy) do
        if not conns[pid] then
          busy[pid] = nil
        elseif not hp.busy(pid) then
          busy[pid] = nil
          ask(pid)
        end
      end
      poll = now + DRAIN_POLL
    end
    local wait = left and math.ceil(left)
    if next(busy) then wait = math.min(wait or DRAIN_POLL, math.ceil(poll - now)) end
    local m = mb.receive(wait)
    if m ~= nil then
      handle(m)
    elseif not next(busy) then
      break
    end
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
  if not mb.receive(down, limit ~= math.huge and limit + KILL_WAIT or nil, ref) then
    mb.exit(self.pid, "kill")
    mb.receive(down, KILL_WAIT, ref)
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
  -- Essential: over --max-memory the host's killer ends connection
  -- processes first, not the acceptor (~190 KB with its module, where a
  -- connection holds ~60 KB), which would take the listener with it.
  -- Graceful: SIGTERM's stop shuts it down in order, as server:close().
  local pid, ref = mb.spawn_opt({ monitor = true, essential = true, graceful = true },
                                acceptor, mb.self(), host, port, handler, o)
  local m = mb.receive(function(x)
    return type(x) == "table" and ((x.tag == "$http_listen")
      or (x.event == "DOWN" and x.ref == ref))
  end, START_TIMEOUT, ref)
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
    -- ENOENT: gone since the stat. EMFILE, ENFILE: no file descriptor free
    -- (a server at its limit of connections), which is not the file's fault.
    -- ENOMEM: the file does not fit the connection's max_memory (moonbeam.fs).
    if not data then
      return plain(res, code == "EACCES" and 403
                        or (code == "ENOENT" or code == "ENOTDIR") and 404
                        or (code == "EMFILE" or code == "ENFILE") and 503 or 500)
    end
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
