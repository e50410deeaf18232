-- idle: memory per idle process blocked in receive.
-- The moonbeam twin of idle.erl; see BENCHMARKS.md.
--
-- Args (key=value): n (processes), batch (spawned before waiting for their
-- ready messages), sample (how many processes mb.info is asked about).
-- Figures, each per process, in KB (1024 bytes):
--   idle_rss    growth of the host's resident set (VmRSS from /proc);
--   idle_alloc  mb.info(pid).memory (the allocator's count), averaged over
--               a sample.
-- Only the sampled pids are kept, so the parent's own table of pids does not
-- count as per-process memory.
local mb = require "moonbeam"

local function opt(name, default)
  for _, a in ipairs(arg or {}) do
    local k, v = a:match("^([%w_]+)=(.*)$")
    if k == name then return tonumber(v) end
  end
  return default
end

local N, B, S = opt("n", 100000), opt("batch", 1000), opt("sample", 1000)
local STEP = math.max(1, math.floor(N / S))

local function rss_kb()
  local f = assert(io.open("/proc/self/status", "r"))
  local s = f:read("*a")
  f:close()
  return tonumber(s:match("VmRSS:%s*(%d+)"))
end

local function idler(parent)
  mb.send(parent, true)
  mb.receive()
end

local me = mb.self()
collectgarbage()
local rss0 = rss_kb()
local t0 = mb.now()
local sample, count = {}, 0
while count < N do
  local k = math.min(B, N - count)
  for _ = 1, k do
    local pid = mb.spawn(idler, me)
    count = count + 1
    if count % STEP == 0 then sample[#sample + 1] = pid end
  end
  for _ = 1, k do mb.receive() end
end
local t1 = mb.now()
collectgarbage()
local rss1 = rss_kb()

local bytes, statuses = 0, {}
for _, pid in ipairs(sample) do
  local info = mb.info(pid)
  bytes = bytes + info.memory
  local st = tostring(info.status)
  statuses[st] = (statuses[st] or 0) + 1
end
local st = {}
for k, v in pairs(statuses) do st[#st + 1] = k .. "=" .. v end
table.sort(st)

print(string.format("detail n=%d spawned and all waiting in %.0f ms; VmRSS %d -> %d KB; mb.info sample=%d statuses: %s",
  count, t1 - t0, rss0, rss1, #sample, table.concat(st, ",")))
print(string.format("RESULT name=idle_rss value=%.3f unit=KB", (rss1 - rss0) / count))
print(string.format("RESULT name=idle_alloc value=%.3f unit=KB", bytes / #sample / 1024))
print(string.format("RESULT name=idle_count value=%d unit=procs", count))
io.stdout:flush()
mb.halt(0)
