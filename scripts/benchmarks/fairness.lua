-- fairness: ping-pong round-trip latency while busy processes hog the CPUs.
-- The moonbeam twin of fairness.erl; see BENCHMARKS.md.
--
-- Args (key=value): busy (number of busy-looping processes), ms (how long
-- the ping-pong pair measures), work (below).  Round trips run back to back; each one is
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

-- work= what the busy processes do: "loop" (the default), pure arithmetic
-- and never a call into the host, so only preemption by the count hook can
-- take it off the CPU; "send", sends of a short string to a process that
-- has ended (mostly C: a few VM instructions a send); "rep",
-- string.rep(100 KB) (mostly C, and no host call); "sort", table.sort of
-- 300,000 numbers with a comparator, over and over; "gsub", a replacement
-- function over 300,000 matches (both C functions calling Lua, which
-- LuaJIT's own could not yield from); "require", a module whose top level
-- computes ~30 million steps, required again and again (LuaJIT's require
-- is C too). Moonbeam only: the last five show what the hook does not
-- count, or could not reach (BENCHMARKS.md).
local WORK = "loop"
for _, a in ipairs(arg or {}) do WORK = a:match("^work=(%a+)$") or WORK end

local function busy()
  if WORK == "send" then
    local gone, ref = mb.spawn_monitor(function() end)
    mb.receive(function(m) return type(m) == "table" and m.ref == ref end)
    while true do mb.send(gone, "a short line of text") end
  elseif WORK == "rep" then
    while true do local _ = string.rep("x", 100000) end
  elseif WORK == "sort" then
    local t = {}
    for i = 1, 300000 do t[i] = (i * 7919) % 300007 end
    while true do
      table.sort(t, function(a, b) return a < b end)
      table.sort(t, function(a, b) return a > b end)
    end
  elseif WORK == "gsub" then
    local s = ("%41"):rep(300000)
    while true do s:gsub("%%(%x%x)", function() return "%41" end) end
  elseif WORK == "require" then
    package.preload.fairness_heavy = function()
      local x = 0
      for _ = 1, 30000000 do x = (x * 3 + 1) % 1000003 end
      return x
    end
    while true do
      package.loaded.fairness_heavy = nil
      require "fairness_heavy"
    end
  end
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

print(string.format("detail busy=%d work=%s ms=%d round_trips=%d p50=%.3f p99=%.3f max=%.3f ms",
  BUSY, WORK, MS, n, pct(50), pct(99), samples[n]))
print(string.format("RESULT name=fair_p99 value=%.3f unit=ms", pct(99)))
print(string.format("RESULT name=fair_p50 value=%.3f unit=ms", pct(50)))
print(string.format("RESULT name=fair_max value=%.3f unit=ms", samples[n]))
print(string.format("RESULT name=fair_rtts value=%d unit=count", n))
io.stdout:flush()
mb.halt(0)
