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
local http = require "moonbeam.http"
local hp = require "moonbeam.http_parser"

local websocket = {}

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

websocket.base64 = base64

return websocket
