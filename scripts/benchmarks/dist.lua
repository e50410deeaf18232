-- dist: messages between two nodes on this machine - one-way rate and
-- round-trip latency. The moonbeam twin of dist.erl; see BENCHMARKS.md.
--
-- Run as two hosts (scripts/bench starts them with --sname and --cookie):
--   mode=server          registers "bench" and serves the client below,
--                        then prints "ready node=<name>"; ends on {stop}
--   mode=client peer=N   drives the server registered as bench on node N
--                        (a Moonbeam or an Erlang node) and prints RESULT
--                        lines named dist_rate, dist_rtt_p50, dist_rtt_p99,
--                        each with suffix=S appended when given
-- Args (key=value): n (messages of the rate run), rtts (round trips),
-- reps (rate runs; the median is reported), stop=1 (stop the server after).
--
-- The protocol is Erlang terms, the same for both twins:
--   {msg, I, Payload}   counted by the server (Payload: a 32-byte binary)
--   {done, From}        answered {count, K} (the msgs since the last done)
--   {ping, From, I}     answered {pong, I}
--   stop                the server ends
-- Rate: the client sends n msgs as fast as it can (the distribution layer
-- makes it wait while the connection's output is busy, as Erlang does),
-- then done; from the first send to the count. RTT: one ping at a time.
local mb = require "moonbeam"

local function opt(name, default)
  for _, a in ipairs(arg or {}) do
    local k, v = a:match("^([%w_]+)=(.*)$")
    if k == name then return tonumber(v) or v end
  end
  return default
end

local MODE, PEER = opt("mode", "client"), opt("peer", nil)
local N, RTTS, REPS = opt("n", 200000), opt("rtts", 10000), opt("reps", 3)
local SUFFIX = opt("suffix", "")

local A = {}
for _, k in ipairs({ "msg", "done", "count", "ping", "pong", "stop" }) do A[k] = mb.atom(k) end

if MODE == "server" then
  mb.register("bench")
  print("ready node=" .. mb.node())
  io.stdout:flush()
  local count = 0
  while true do
    local m = mb.receive()
    local tag = m[1]
    if tag == A.msg then
      count = count + 1
    elseif tag == A.ping then
      mb.send(m[2], mb.tuple(A.pong, m[3]))
    elseif tag == A.done then
      mb.send(m[2], mb.tuple(A.count, count))
      count = 0
    elseif m == A.stop then
      break
    end
  end
  mb.halt(0)
end

-- The client.
assert(PEER, "client: peer=NODE needed")
local ok = false
for _ = 1, 100 do
  if mb.connect_node(PEER) then ok = true break end
  mb.sleep(100)
end
assert(ok, "cannot connect to " .. PEER)
local dest, me = { "bench", PEER }, mb.self()
local payload = string.rep("p", 32)

local function rate(n)
  local t0 = mb.now()
  for i = 1, n do mb.send(dest, mb.tuple(A.msg, i, payload)) end
  mb.send(dest, mb.tuple(A.done, me))
  local m = mb.receive(120000)
  assert(m and m[1] == A.count and m[2] == n, "count mismatch: " .. tostring(m and m[2]))
  return n / ((mb.now() - t0) / 1000)
end

local function rtts(k)
  local lat = {}
  for i = 1, k do
    local t0 = mb.now()
    mb.send(dest, mb.tuple(A.ping, me, i))
    local m = mb.receive(10000)
    assert(m and m[1] == A.pong and m[2] == i, "lost a pong")
    lat[i] = (mb.now() - t0) * 1000
  end
  table.sort(lat)
  return lat[math.floor(k * 0.5) + 1], lat[math.floor(k * 0.99) + 1]
end

rate(math.max(1000, math.floor(N / 10)))                -- warm-up (both nodes)
rtts(math.max(100, math.floor(RTTS / 10)))
local rates, all = {}, {}
for i = 1, REPS do rates[i] = rate(N) end
for i, v in ipairs(rates) do all[i] = string.format("%.0f", v) end
table.sort(rates)
local r = rates[math.floor((#rates + 1) / 2)]
local p50, p99 = rtts(RTTS)
print(string.format("detail %s -> %s: %d msgs x %d, median %.0f msg/s (all: %s); %d round trips: p50 %.1f us, p99 %.1f us",
  mb.node(), PEER, N, REPS, r, table.concat(all, " "), RTTS, p50, p99))
print(string.format("RESULT name=dist_rate%s value=%.0f unit=msg/s", SUFFIX, r))
print(string.format("RESULT name=dist_rtt_p50%s value=%.1f unit=us", SUFFIX, p50))
print(string.format("RESULT name=dist_rtt_p99%s value=%.1f unit=us", SUFFIX, p99))
io.stdout:flush()
if opt("stop", 0) == 1 then mb.send(dest, A.stop) mb.sleep(100) end
mb.halt(0)
