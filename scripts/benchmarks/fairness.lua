-- fairness: ping-pong round-trip latency while busy processes hog the CPUs.
-- The moonbeam twin of fairness.erl; see BENCHMARKS.md.
--
-- Args (key=value): busy (number of busy-looping processes), ms (how long
-- the ping-pong pair measures).  Round trips run back to back; each one is
-- timed with mb.now().  Figures: p50, p99, max in milliseconds.
local mb = require "moonbeam"

local function opt(name, default)
  for _, a in ipairs(arg or {}) do
    local k, v = a:match("^([%w_]+)=(.*)$")
    if k == name then return tonumber(v) end
  end
  return default
end

local BUSY, MS = opt("busy", 8), opt("ms", 3000)

-- Pure arithmetic and never a call into the host: only preemption by the
-- count hook can take it off the CPU.
local function busy()
  local x = 0
  while true do x = (x * 3 + 1) % 1000003 end
end

local function pong()
  while true do
    local m = mb.receive()
    mb.send(m.from, true)
  end
end

for _ = 1, BUSY do mb.spawn(busy) end
local ponger = mb.spawn(pong)
mb.sleep(100)                                -- let the loopers get going

local me, now = mb.self(), mb.now
local samples, n = {}, 0
local deadline = now() + MS
while true do
  local t0 = now()
  if t0 >= deadline then break end
  mb.send(ponger, {from = me})
  mb.receive()
  n = n + 1
  samples[n] = now() - t0
end
table.sort(samples)

-- Nearest-rank percentile of the sorted samples.
local function pct(p) return samples[math.max(1, math.min(n, math.ceil(p * n / 100)))] end

print(string.format("detail busy=%d ms=%d round_trips=%d p50=%.3f p99=%.3f max=%.3f ms",
  BUSY, MS, n, pct(50), pct(99), samples[n]))
print(string.format("RESULT name=fair_p99 value=%.3f unit=ms", pct(99)))
print(string.format("RESULT name=fair_p50 value=%.3f unit=ms", pct(50)))
print(string.format("RESULT name=fair_max value=%.3f unit=ms", samples[n]))
print(string.format("RESULT name=fair_rtts value=%d unit=count", n))
io.stdout:flush()
mb.halt(0)
