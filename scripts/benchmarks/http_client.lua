-- http_client: n keep-alive requests, one at a time on one connection, for
-- scripts/instructions (which counts what the server runs per request); or,
-- with close=1, n requests each on a connection of its own.
--
-- Args (key=value): port (required), host (default 127.0.0.1), n (requests,
-- default 1000), timeout (ms for each response, default 10000), close (1: a
-- connection per request, "Connection: close"). Sends "GET / HTTP/1.1" with
-- only a Host header, reads each response whole (by its Content-Length),
-- prints "done n=<n>" and exits 0; on any error it prints why and exits 1.
local mb = require "moonbeam"
local tcp = require "moonbeam.tcp"

local function opt(name, default)
  for _, a in ipairs(arg or {}) do
    local k, v = a:match("^([%w_]+)=(.*)$")
    if k == name then return v end
  end
  return default
end

local host, port = opt("host", "127.0.0.1"), tonumber(opt("port", ""))
local n, timeout = tonumber(opt("n", "1000")), tonumber(opt("timeout", "10000"))
local close = opt("close", "0") == "1"
local function fail(why)
  io.stderr:write("http_client: ", tostring(why), "\n")
  os.exit(1)
end
if not port then fail("port=N expected") end

local function connect()
  local sock, err = tcp.connect(host, port, timeout)
  if not sock then fail(err) end
  return sock
end
local sock = not close and connect()
local REQUEST = close and "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                       or "GET / HTTP/1.1\r\nHost: x\r\n\r\n"
local buf = ""
for _ = 1, n do
  if close then
    sock = connect()
    buf = ""
  end
  local ok, werr = sock:write(REQUEST)
  if not ok then fail(werr) end
  while true do
    local head_end = buf:find("\r\n\r\n", 1, true)
    local len = head_end and tonumber(buf:sub(1, head_end):lower():match("content%-length:%s*(%d+)"))
    if head_end and not len then fail("a response without Content-Length") end
    if len and #buf >= head_end + 3 + len then
      buf = buf:sub(head_end + 4 + len)
      break
    end
    local data, rerr = sock:read(timeout)
    if not data then fail(rerr) end
    buf = buf .. data
  end
  if close then sock:close() end
end
if not close then sock:close() end
print("done n=" .. n)
io.stdout:flush()
mb.halt(0)
