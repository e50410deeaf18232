-- tcp_hello: the floor under http_hello - a process per connection that
-- answers every read with a canned HTTP response, with no HTTP layer, to
-- tell the runtime's cost a request (scheduler, wake-up, a read and a
-- write) from moonbeam.http's. Not in scripts/bench's table; load it with
-- wrk as http_hello (BENCHMARKS.md, "where a keep-alive request's time
-- goes"). It assumes one request a read, as wrk's keep-alive load sends.
--
-- Args: mode=bare (the default: read, write) or mode=parse (the read also
-- goes through moonbeam.http_parser's next and the request table
-- moonbeam.http_conn makes of its event), port=N (0, the default: any free
-- port). Prints "listening port=<port>", then runs until killed.
local mb = require "moonbeam"
local tcp = require "moonbeam.tcp"
local hp = require "moonbeam.http_parser"

local RESPONSE = "HTTP/1.1 200 OK\r\nContent-Length: 14\r\nContent-Type: text/plain\r\n\r\n" ..
                 "Hello, world!\n"

local function opt(name, default)
  for _, a in ipairs(arg or {}) do
    local k, v = a:match("^([%w_]+)=(.*)$")
    if k == name then return v end
  end
  return default
end
local mode, port = opt("mode", "bare"), tonumber(opt("port", "0"))

local function bare(sock)
  while sock:read() do sock:write(RESPONSE) end
end

local function parse(sock)
  local parser = hp.new({})
  local p_next = parser.next
  while true do
    local data = sock:read()
    if not data then return end
    local kind, _, b, _, method, url, path, query, version, keep, upgrade = p_next(parser, data)
    if kind ~= "head" then error("tcp_hello: one whole request a read expected") end
    local req = {
      method = method, url = url, path = path, query = query, version = version,
      headers = b, body = "", keep_alive = keep, upgrade = upgrade, socket = sock,
    }
    p_next(parser)   -- (its "done"; req is made, as http_conn makes it, and dropped)
    sock:write(RESPONSE)
  end
end

local serve = mode == "parse" and parse or bare
local function connection()
  local sock = mb.receive()
  serve(sock)
  sock:close()
end

local listener = assert(tcp.listen("127.0.0.1", port))
print(("listening port=%d"):format(select(2, listener:sockname())))
io.stdout:flush()
while true do
  local sock = listener:accept()
  if sock then
    local pid = mb.spawn(connection)
    sock:set_owner(pid)
    mb.send(pid, sock)
  end
end
