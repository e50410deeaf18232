-- ws_fanout_server: a room's fan-out over WebSocket, the server (scripts/bench
-- wsfanout; the twin of ws_fanout_server.js, loaded by ws_fanout_client.lua).
-- Each WebSocket connection is a process (moonbeam.http +
-- moonbeam.websocket) that forwards the lines the room sends it to its
-- client, as the chat example's WebSocket users do. Once n users are
-- connected, the room (this main process) sends `lines` lines of `size`
-- bytes to each, a round of n sends at a time, letting the users run after
-- every 10 rounds. Then it waits to be killed.
--
-- Args (key=value): n (default 200), lines (500), size (60), port (0: any).
-- Prints "listening port=<port>" once it accepts connections.
local mb = require "moonbeam"
local http = require "moonbeam.http"

local function opt(name, default)
  for _, a in ipairs(arg or {}) do
    local k, v = a:match("^([%w_]+)=(.*)$")
    if k == name then return tonumber(v) end
  end
  return default
end
local N, LINES, SIZE = opt("n", 200), opt("lines", 500), opt("size", 60)

local room = mb.self()
local server = assert(http.listen("127.0.0.1", opt("port", 0), function(req, res)
  local mb = require "moonbeam"
  local ws = require("moonbeam.websocket").upgrade(req, res)
  if not ws then return end
  mb.send(room, { join = mb.self() })
  while true do ws:write(mb.receive()) end
end))
print(("listening port=%d"):format(server:port()))
io.stdout:flush()

local users = {}
while #users < N do
  local m = mb.receive()
  if type(m) == "table" and m.join then users[#users + 1] = m.join end
end
local line = ("x"):rep(SIZE)
for l = 1, LINES do
  for i = 1, N do mb.send(users[i], line) end
  if l % 10 == 0 then mb.sleep(0) end
end
while true do mb.receive() end
