-- moonbeam.websocket: the WebSocket (RFC 6455) opening handshake, server
-- side on a moonbeam.http request and client side over moonbeam.tcp.
--
-- DESIGN
-- Only the handshake is done here, in Lua. Once it is done the socket is
-- switched to WebSocket framing (sock:websocket), which runs in the socket
-- layer on the libuv loop thread (host/ws.c on wslay): from then on
-- sock:read() returns whole messages, sock:write(data[, binary]) sends one,
-- pings are answered there, and bad frames close the connection with the
-- right code (1002, 1007, 1009). Active mode delivers {event = "ws", ...} and
-- {event = "ws_closed", ...} messages.
--
-- websocket.loop runs a connection as callbacks, as Cowboy's websocket
-- handlers and Phoenix's sockets do: one receive over the socket's
-- messages (active "once", so the peer is read only as fast as the loop
-- handles it) and every other message of the process, around a state the
-- callbacks return. Between messages the state is all there is, so after
-- hibernate_after ms without one the process hibernates (mb.hibernate)
-- with the socket armed: the next frame, the peer's close or any message
-- wakes it in a new state, and the loop goes on from the copied state.
-- Hence loop never returns: after the callbacks the stack is gone.
local mb = require "moonbeam"
local http = require "moonbeam.http"
local hp = require "moonbeam.http_parser"

local websocket = {}

-- websocket.loop's default hibernate_after outside moonbeam.http (ms):
-- Phoenix's, and http.listen's default.
local HIBERNATE_AFTER = 15000
-- What websocket.upgrade learnt of the server, for websocket.loop: socket
-- -> {hibernate_after =, acceptor =}. Weak: a closed socket goes.
local from_server = setmetatable({}, { __mode = "k" })

-- Default largest message accepted from the peer, in bytes (larger: 1009).
local DEFAULT_MAX_MESSAGE = 1024 * 1024
-- Default time for websocket.connect's TCP connect and handshake, in ms.
local CONNECT_TIMEOUT = 10000

local has_token = http.has_token

-- Refuse a handshake: answer `code` and close the connection.
local function refuse(res, code, msg, extra_name, extra_value)
  res:status(code)
  if extra_name then res:header(extra_name, extra_value) end
  res:header("Content-Type", "text/plain; charset=utf-8")
  res:header("Connection", "close")
  res:send(msg .. "\n")
  return nil, msg
end

-- Is key the base64 text of 16 bytes (22 characters and "==")?
local function valid_key(key)
  return type(key) == "string" and #key == 24 and string.match(key, "^[%w+/]+==$") ~= nil
end

-- The first protocol of the comma-separated `offered` that is in `supported`.
local function pick_protocol(offered, supported)
  if not offered or not supported then return nil end
  for part in string.gmatch(offered, "[^,]+") do
    local p = string.match(part, "^%s*(.-)%s*$")
    for _, s in ipairs(supported) do
      if s == p then return p end
    end
  end
  return nil
end

local function max_message(opts)
  local n = opts.max_message or DEFAULT_MAX_MESSAGE
  if type(n) ~= "number" or n < 1 then
    error("websocket: bad option max_message (a positive number expected)", 3)
  end
  return n
end

-- websocket.upgrade(req, res[, opts]) -> sock, protocol | nil, err
-- In an http handler: check the client's handshake, answer 101 and switch
-- the connection to WebSocket framing. On a bad handshake it answers 400
-- (426 for a version other than 13) and returns nil, err. opts:
-- max_message (bytes, 1 MiB), protocols (list of subprotocols supported,
-- chosen in the client's order of preference), headers (extra headers of
-- the 101 response: {name = value}).
function websocket.upgrade(req, res, opts)
  opts = opts or {}
  local limit = max_message(opts)
  local h = req.headers
  if req.method ~= "GET" then
    return refuse(res, 400, "websocket: the handshake must be a GET request")
  end
  if not has_token(h.upgrade, "websocket") then
    return refuse(res, 400, "websocket: no 'Upgrade: websocket' header")
  end
  if not has_token(h.connection, "upgrade") then
    return refuse(res, 400, "websocket: no 'Connection: Upgrade' header")
  end
  if h["sec-websocket-version"] ~= "13" then
    return refuse(res, 426, "websocket: unsupported version (13 expected)",
                  "Sec-WebSocket-Version", "13")
  end
  local key = h["sec-websocket-key"]
  if not valid_key(key) then
    return refuse(res, 400, "websocket: bad Sec-WebSocket-Key")
  end
  res:status(101)
  res:header("Upgrade", "websocket")
  res:header("Connection", "Upgrade")
  res:header("Sec-WebSocket-Accept", hp.ws_accept(key))
  local protocol = pick_protocol(h["sec-websocket-protocol"], opts.protocols)
  if protocol then res:header("Sec-WebSocket-Protocol", protocol) end
  for k, v in pairs(opts.headers or {}) do res:header(k, v) end
  local sock, pending = res:upgrade()
  if not sock then return nil, pending end
  res.websocket = true   -- moonbeam.http closes it with 1000 when the handler returns
  from_server[sock] = { hibernate_after = res.hibernate_after, acceptor = res.acceptor }
  local ok, err = sock:websocket({ client = false, max_message = limit, pending = pending })
  if ok == nil and err ~= nil then
    sock:close()
    return nil, err
  end
  return sock, protocol
end

-- 16 random bytes for a Sec-WebSocket-Key.
local function random_bytes(n)
  local f = io.open("/dev/urandom", "rb")
  if f then
    local s = f:read(n)
    f:close()
    if s and #s == n then return s end
  end
  local t = {}
  for i = 1, n do t[i] = string.char(math.random(0, 255)) end
  return table.concat(t)
end

local B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

local function base64(s)
  local out = {}
  for i = 1, #s, 3 do
    local a, b, c = string.byte(s, i, i + 2)
    local n = a * 65536 + (b or 0) * 256 + (c or 0)
    local c1 = math.floor(n / 262144) % 64
    local c2 = math.floor(n / 4096) % 64
    local c3 = math.floor(n / 64) % 64
    local c4 = n % 64
    out[#out + 1] = string.sub(B64, c1 + 1, c1 + 1) .. string.sub(B64, c2 + 1, c2 + 1)
      .. (b and string.sub(B64, c3 + 1, c3 + 1) or "=")
      .. (c and string.sub(B64, c4 + 1, c4 + 1) or "=")
  end
  return table.concat(out)
end

-- websocket.connect(host, port[, path[, opts]]) -> sock, protocol | nil, err
-- A client: connects, does the handshake and switches to framing. opts:
-- timeout (ms, 10000), max_message (bytes, 1 MiB), protocols (list offered),
-- headers ({name = value}, e.g. Origin).
function websocket.connect(host, port, path, opts)
  opts = opts or {}
  local limit = max_message(opts)
  path = path or "/"
  local client, err = http.connect(host, port, { timeout = opts.timeout or CONNECT_TIMEOUT })
  if not client then return nil, err end
  local key = base64(random_bytes(16))
  local headers = {
    Upgrade = "websocket", Connection = "Upgrade",
    ["Sec-WebSocket-Key"] = key, ["Sec-WebSocket-Version"] = "13",
  }
  if opts.protocols then headers["Sec-WebSocket-Protocol"] = table.concat(opts.protocols, ", ") end
  for k, v in pairs(opts.headers or {}) do headers[k] = v end
  local res, rerr = client:request("GET", path, headers)
  if not res then
    client:close()
    return nil, "websocket: handshake failed: " .. tostring(rerr)
  end
  local function fail(msg)
    client:close()
    return nil, "websocket: " .. msg
  end
  if res.status ~= 101 then return fail("handshake refused: " .. res.status .. " " .. http.reason(res.status)) end
  if not has_token(res.headers.upgrade, "websocket") or not has_token(res.headers.connection, "upgrade") then
    return fail("bad handshake response (no Upgrade/Connection headers)")
  end
  if res.headers["sec-websocket-accept"] ~= hp.ws_accept(key) then
    return fail("bad Sec-WebSocket-Accept")
  end
  local protocol = res.headers["sec-websocket-protocol"]
  local sock = client.sock
  client.sock = nil
  local ok, werr = sock:websocket({ client = true, max_message = limit, pending = res.pending or "" })
  if ok == nil and werr ~= nil then
    sock:close()
    return nil, werr
  end
  return sock, protocol
end

-- -- The loop ---------------------------------------------------------------

local function pack(...) return select("#", ...), ... end

local function traceback(e)
  return debug.traceback(tostring(e), 2)
end

-- End the loop: terminate, close the socket (code), end the process.
local function finish(ws, h, state, reason, code, info)
  if h.terminate then h.terminate(ws, reason, state, info) end
  ws:close(code)
  mb.exit(reason == "closed" and "normal" or reason)
end

local run

-- Woken from hibernation, in a new state.
local function wake(ws, handler, state, o)
  return run(ws, handler, state, o)
end

-- The loop itself (see websocket.loop). Never returns.
function run(ws, handler, state, o)
  local h = handler
  if type(h) == "string" then h = require(h) end
  while true do
    if not ws:set_active("once") then
      return finish(ws, h, state, "closed", 1000, { code = 1006, reason = "" })
    end
    local m = mb.receive(o.hibernate_after or nil)
    if m == nil then
      -- Idle: keep only the state (the socket stays armed: the next
      -- frame wakes the process). If something cannot be copied, stay
      -- awake from now on, and say so once.
      local _, err = pcall(mb.hibernate, wake, ws, handler, state, o)
      o.hibernate_after = false
      io.stderr:write("=WEBSOCKET REPORT==== " .. tostring(mb.self())
                      .. "\ncannot hibernate: " .. tostring(err) .. "\n(it stays awake)\n")
    else
      local cb, ok, n, st, stop
      if type(m) == "table" and m.socket == ws and m.event == "ws" then
        cb = "message"
        ok, n, st, stop = xpcall(function() return pack(h.message(ws, m.data, m.binary, state)) end,
                                 traceback)
      elseif type(m) == "table" and m.socket == ws and m.event == "ws_closed" then
        return finish(ws, h, state, "closed", 1000, m)
      elseif type(m) == "table" and m.event == "EXIT" and o.acceptor and m.pid == o.acceptor then
        -- The server shuts down (server:close(), and this process traps
        -- exits): going away.
        return finish(ws, h, state, m.reason, 1001)
      elseif h.info then
        cb = "info"
        ok, n, st, stop = xpcall(function() return pack(h.info(ws, m, state)) end, traceback)
      end
      if cb then
        -- Results are counted, as moonbeam.server does: at least the state.
        if ok and n == 0 then
          ok, n = false, "websocket.loop: bad return value from " .. cb
                         .. ": nothing (state[, stop_reason] expected)"
        end
        if not ok then
          -- A callback failed: internal error (1011), then the error goes on.
          if h.terminate then pcall(h.terminate, ws, n, state) end
          ws:close(1011)
          error(n, 0)
        end
        state = st
        if stop ~= nil then return finish(ws, h, state, stop, 1000) end
      end
    end
  end
end

-- websocket.loop(ws, handler, state[, opts]) - never returns.
-- Runs the connection ws as callbacks around `state` (see README):
-- handler.message(ws, data, binary, state) for each message of the peer,
-- handler.info(ws, msg, state) for any other message of the process (else
-- dropped), each returning state[, stop_reason]; handler.terminate(ws,
-- reason, state[, close]) at the end. handler is a table of functions or
-- a module name. opts.hibernate_after: ms idle before hibernating (false:
-- never; default the server's when ws came from websocket.upgrade, else
-- 15000).
function websocket.loop(ws, handler, state, opts)
  if type(ws) ~= "userdata" then error("websocket.loop: bad ws (a socket expected)", 2) end
  if type(handler) ~= "table" and type(handler) ~= "string" then
    error("websocket.loop: bad handler (a table of callbacks or a module name expected)", 2)
  end
  if opts ~= nil and type(opts) ~= "table" then error("websocket.loop: bad opts (a table expected)", 2) end
  local h = type(handler) == "string" and require(handler) or handler
  if type(h) ~= "table" or type(h.message) ~= "function" then
    error("websocket.loop: bad handler (handler.message must be a function)", 2)
  end
  for _, k in ipairs({ "info", "terminate" }) do
    if h[k] ~= nil and type(h[k]) ~= "function" then
      error("websocket.loop: bad handler (handler." .. k .. " must be a function)", 2)
    end
  end
  local srv = from_server[ws] or {}
  local o = { hibernate_after = HIBERNATE_AFTER, acceptor = srv.acceptor }
  if srv.hibernate_after ~= nil then o.hibernate_after = srv.hibernate_after end
  if opts and opts.hibernate_after ~= nil then
    local hib = opts.hibernate_after
    if hib ~= false and (type(hib) ~= "number" or not (hib >= 0)) then
      error("websocket.loop: bad option hibernate_after (a number >= 0, or false)", 2)
    end
    o.hibernate_after = hib
  end
  return run(ws, handler, state, o)
end

websocket.base64 = base64

return websocket
