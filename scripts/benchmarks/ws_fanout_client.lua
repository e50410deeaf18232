-- ws_fanout_client: the load of scripts/bench wsfanout, the same for both
-- servers (ws_fanout_server.lua, ws_fanout_server.js): n WebSocket clients,
-- each a process, connect and read `lines` messages. The servers start
-- sending once the n-th connects; the time runs from then (the last connect
-- seen here) to the last message read.
--
-- Args (key=value): port, n (default 200), lines (500), timeout (ms for it
-- all, default 60000). Prints `detail` and
-- `RESULT name=ws_fanout value=<msg/s> unit=msg/s`; exits 1 if messages were
-- missing.
local mb = require "moonbeam"
local websocket = require "moonbeam.websocket"

local function opt(name, default)
  for _, a in ipairs(arg or {}) do
    local k, v = a:match("^([%w_]+)=(.*)$")
    if k == name then return tonumber(v) end
  end
  return default
end
local PORT, N, LINES, TIMEOUT = opt("port"), opt("n", 200), opt("lines", 500), opt("timeout", 60000)
assert(PORT, "port=<port> expected")

local main = mb.self()
for _ = 1, N do
  mb.spawn(function()
    local mb = require "moonbeam"
    local sock, err = websocket.connect("127.0.0.1", PORT, "/")
    if not sock then mb.send(main, { failed = tostring(err) }) return end
    mb.send(main, { connected = true })
    local got = 0
    while got < LINES do
      if not sock:read(TIMEOUT) then break end
      got = got + 1
    end
    mb.send(main, { done = got })
    sock:close()
  end)
end

local deadline = mb.now() + TIMEOUT
local connected, finished, total, t0 = 0, 0, 0, nil
while finished < N do
  local m = mb.receive(math.max(0, deadline - mb.now()))
  if not m then break end
  if m.failed then print("detail a client failed: " .. m.failed) finished = finished + 1 end
  if m.connected then
    connected = connected + 1
    if connected == N then t0 = mb.now() end
  end
  if m.done then finished, total = finished + 1, total + m.done end
end
local ms = mb.now() - (t0 or mb.now())
print(("detail n=%d lines=%d: %d connected, %d of %d messages in %.0f ms"):format(
  N, LINES, connected, total, N * LINES, ms))
if total == N * LINES and ms > 0 then
  print(("RESULT name=ws_fanout value=%.0f unit=msg/s"):format(total / ms * 1000))
end
io.stdout:flush()
mb.halt(total == N * LINES and 0 or 1)
