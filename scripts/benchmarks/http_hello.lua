-- http_hello: HTTP hello world on moonbeam.http, for the HTTP benchmark
-- (scripts/bench http, load from wrk); the twin of http_hello.js.
--
-- Args (key=value): port (0 = any free port, the default), host (default
-- 127.0.0.1). Prints "listening port=<port>" once it accepts connections,
-- then nothing per request; runs until killed. Each connection is a process
-- (moonbeam.http); every request gets "Hello, world!\n".
local mb = require "moonbeam"
local http = require "moonbeam.http"

local function opt(name, default)
  for _, a in ipairs(arg or {}) do
    local k, v = a:match("^([%w_]+)=(.*)$")
    if k == name then return v end
  end
  return default
end

local server, err = http.listen(opt("host", "127.0.0.1"), tonumber(opt("port", "0")),
  function(req, res) res:send("Hello, world!\n") end)
if not server then
  io.stderr:write("http_hello: ", tostring(err), "\n")
  os.exit(1)
end
print(("listening port=%d"):format(server:port()))
io.stdout:flush()
while true do mb.receive() end
