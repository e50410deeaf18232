-- ws_fanout: a room's fan-out over WebSocket - n connection processes
-- (moonbeam.http + moonbeam.websocket), each forwarding the lines a room
-- sends it to its browser, as the chat example's WebSocket users do - with
-- n clients in the same host reading them. `scripts/bench wsfanout` runs it
-- with no Erlang twin (OTP has no WebSocket server of its own): it measures
-- the socket layer's batching of a backlog of messages (sock.c, corking),
-- A/B between two builds (`MOONBEAM=<other> scripts/bench wsfanout`), or by
-- hand with `strace -f -c` for the write system calls (BENCHMARKS.md).
--
-- Args (key=value): n (users, default 200), lines (lines to each, default
-- 500), size (bytes a line, default 60). Prints `detail` and
-- `RESULT name=ws_fanout value=<msg/s> unit=msg/s`.
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

local me = mb.self()
local server = assert(http.listen("127.0.0.1", 0, function(req, res)
  local mb = require "moonbeam"
  local ws = require("moonbeam.websocket").upgrade(req, res)
  if not ws then return end
  mb.send(me, { join = mb.self() })
  while true do
    local m = mb.receive()
    if m == "stop" then break end
    ws:write(m)
  end
  ws:close()
end))
local port = server:port()

for _ = 1, N do
  mb.spawn(function()
    local mb = require "moonbeam"
    local sock = assert(require("moonbeam.websocket").connect("127.0.0.1", port, "/"))
    local got = 0
    while got < LINES do
      if not sock:read(30000) then break end
      got = got + 1
    end
    mb.send(me, { done = got })
    sock:close()
  end)
end

local users = {}
while #users < N do
  local m = assert(mb.receive(function(m) return type(m) == "table" and m.join end, 30000),
                   "a user did not join")
  users[#users + 1] = m.join
end
local t0 = mb.now()
local line = ("x"):rep(SIZE)
for l = 1, LINES do
  for i = 1, N do mb.send(users[i], line) end
  if l % 10 == 0 then mb.sleep(0) end   -- (let the users run: a room's pace)
end
local total = 0
for _ = 1, N do
  local m = mb.receive(function(m) return type(m) == "table" and m.done end, 60000)
  total = total + (m and m.done or 0)
end
local ms = mb.now() - t0
print(("detail n=%d lines=%d size=%d: delivered %d of %d in %.0f ms"):format(
  N, LINES, SIZE, total, N * LINES, ms))
print(("RESULT name=ws_fanout value=%.0f unit=msg/s"):format(total / ms * 1000))
io.stdout:flush()
for i = 1, N do mb.send(users[i], "stop") end
server:close()
mb.halt(0)
