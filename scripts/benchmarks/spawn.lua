-- spawn: cost of spawn + exit of a trivial process, in microseconds each.
-- The moonbeam twin of spawn.erl; see BENCHMARKS.md.
--
-- Args (key=value): n (processes per repetition), batch (processes alive at
-- once), reps (repetitions; the median is reported).
-- Primary figure: spawn_monitor of a function that returns at once, waiting
-- for every DOWN message, so each process has fully exited before it counts.
-- Detail figure: spawn of a function that sends one message to the parent.
local mb = require "moonbeam"

local function opt(name, default)
  for _, a in ipairs(arg or {}) do
    local k, v = a:match("^([%w_]+)=(.*)$")
    if k == name then return tonumber(v) end
  end
  return default
end

local N, B, REPS = opt("n", 100000), opt("batch", 1000), opt("reps", 3)
local BATCHES = math.floor(N / B)

local function trivial() end

local function run_monitor(batches, b)
  local t0 = mb.now()
  for _ = 1, batches do
    for _ = 1, b do mb.spawn_monitor(trivial) end
    local got = 0
    while got < b do
      local m = mb.receive()
      if type(m) == "table" and m.event == "DOWN" then got = got + 1 end
    end
  end
  return (mb.now() - t0) * 1000 / (batches * b)
end

local function run_message(batches, b)
  local me = mb.self()
  local function child(parent) mb.send(parent, true) end
  local t0 = mb.now()
  for _ = 1, batches do
    for _ = 1, b do mb.spawn(child, me) end
    for _ = 1, b do mb.receive() end
  end
  return (mb.now() - t0) * 1000 / (batches * b)
end

local function median(t)
  table.sort(t)
  return t[math.floor((#t + 1) / 2)]
end

run_monitor(1, B)                            -- warm-up
local mon, msg = {}, {}
for i = 1, REPS do mon[i] = run_monitor(BATCHES, B) end
for i = 1, REPS do msg[i] = run_message(BATCHES, B) end
local m1, m2 = median(mon), median(msg)
print(string.format("detail spawn_monitor+DOWN %.3f us, spawn+message %.3f us (n=%d batch=%d median of %d)",
  m1, m2, BATCHES * B, B, REPS))
print(string.format("RESULT name=spawn value=%.3f unit=us", m1))
print(string.format("RESULT name=spawn_msg value=%.3f unit=us", m2))
io.stdout:flush()
mb.halt(0)
