-- hibernate: memory of hibernated processes and the cost of a hibernate +
-- wake cycle. The moonbeam twin of hibernate.erl; see BENCHMARKS.md.
--
-- Args (key=value): n (processes), batch (spawned before waiting for them
-- to be hibernated), sample (processes kept to ask mb.info and to wake),
-- rounds (echo round trips timed for the cycle cost).
-- Each process holds a small state ({k = i, name = "x", n = 2}, the twin of
-- Erlang's 3-key map) and hibernates between messages.
-- Figures:
--   hib_rss     growth of the host's resident set per process (bytes);
--   hib_alloc   mb.info(pid).memory, averaged over the sample (bytes);
--   hib_total   the host's resident set with all n hibernated (MB);
--   hib_woken   sampled processes woken that answered;
--   hib_cycle   a round trip to a hibernating echo minus one to an awake
--               echo: what a hibernate + wake adds (us);
--   hib_rtt     the round trip to the hibernating echo (us).
local mb = require "moonbeam"

local function opt(name, default)
  for _, a in ipairs(arg or {}) do
    local k, v = a:match("^([%w_]+)=(.*)$")
    if k == name then return tonumber(v) end
  end
  return default
end

local N, B, S, R = opt("n", 100000), opt("batch", 1000), opt("sample", 1000), opt("rounds", 20000)
local STEP = math.max(1, math.floor(N / S))

local function rss_kb()
  local f = assert(io.open("/proc/self/status", "r"))
  local s = f:read("*a")
  f:close()
  return tonumber(s:match("VmRSS:%s*(%d+)"))
end

local function loop(state)
  local m = mb.receive()
  if m.ping then mb.send(m.ping, state.k) end
  mb.hibernate(loop, state)
end

local function start(parent, i)
  mb.send(parent, i)
  mb.hibernate(loop, { k = i, name = "x", n = 2 })
end

local me = mb.self()
collectgarbage()
local rss0 = rss_kb()
local t0 = mb.now()
local sample, count = {}, 0
while count < N do
  local k = math.min(B, N - count)
  for _ = 1, k do
    count = count + 1
    local pid = mb.spawn(start, me, count)
    if count % STEP == 0 then sample[#sample + 1] = pid end
  end
  for _ = 1, k do mb.receive() end
end
-- Every process has said it starts; wait until the sample is hibernated.
for _, pid in ipairs(sample) do
  while mb.info(pid).status ~= "hibernated" do mb.sleep(1) end
end
local t1 = mb.now()
collectgarbage()
local rss1 = rss_kb()

local bytes, hib = 0, 0
for _, pid in ipairs(sample) do
  local info = mb.info(pid)
  bytes = bytes + info.memory
  if info.status == "hibernated" then hib = hib + 1 end
end

-- Wake the sample: each answers with its k.
local answered = 0
for _, pid in ipairs(sample) do mb.send(pid, { ping = me }) end
for _ = 1, #sample do
  if type(mb.receive(10000)) == "number" then answered = answered + 1 end
end

-- The cycle: round trips to a hibernating echo, then to an awake one.
local function rtt(pid)
  local msg = { ping = me }
  for _ = 1, math.min(1000, R) do mb.send(pid, msg) mb.receive() end
  local a = mb.now()
  for _ = 1, R do mb.send(pid, msg) mb.receive() end
  return (mb.now() - a) * 1000 / R
end
local hib_echo = mb.spawn(function(s) mb.hibernate(loop, s) end, { k = 0, name = "x", n = 2 })
local awake_echo = mb.spawn(function(s)
  while true do
    local m = mb.receive()
    mb.send(m.ping, s.k)
  end
end, { k = 0, name = "x", n = 2 })
local hib_rtt = rtt(hib_echo)
local awake_rtt = rtt(awake_echo)

print(string.format("detail n=%d hibernated in %.0f ms; VmRSS %d -> %d KB; sample=%d hibernated=%d answered=%d; rtt hibernating %.2f us, awake %.2f us",
  count, t1 - t0, rss0, rss1, #sample, hib, answered, hib_rtt, awake_rtt))
print(string.format("RESULT name=hib_rss value=%.1f unit=B", (rss1 - rss0) * 1024 / count))
print(string.format("RESULT name=hib_alloc value=%.1f unit=B", bytes / #sample))
print(string.format("RESULT name=hib_total value=%.1f unit=MB", rss1 / 1024))
print(string.format("RESULT name=hib_woken value=%d unit=procs", answered))
print(string.format("RESULT name=hib_rtt value=%.3f unit=us", hib_rtt))
print(string.format("RESULT name=hib_cycle value=%.3f unit=us", hib_rtt - awake_rtt))
io.stdout:flush()
mb.halt(0)
