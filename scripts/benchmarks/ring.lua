-- ring: message passing around a ring of processes, nanoseconds per hop.
-- The moonbeam twin of ring.erl; see BENCHMARKS.md.
--
-- Args (key=value): n (processes in the ring), rounds (times the message
-- goes round), reps (repetitions; the median is reported), small (a second
-- ring of that many processes, default 10, the same number of hops: its
-- states stay in the caches, where each of n's is cold when its turn comes,
-- so the two figures tell the cost of a hop from that of a cold process).
-- The message is a small table {hop = h, from = pid}; each node builds a
-- fresh one per hop.  One message circulates, so this measures the latency
-- of a send + wake-up + receive chain, not throughput.
local mb = require "moonbeam"

local function opt(name, default)
  for _, a in ipairs(arg or {}) do
    local k, v = a:match("^([%w_]+)=(.*)$")
    if k == name then return tonumber(v) end
  end
  return default
end

local N, ROUNDS, REPS = opt("n", 1000), opt("rounds", 1000), opt("reps", 3)
local SMALL = opt("small", 10)

-- A ring node: learns its successor, then forwards hops until the last one,
-- which it reports to main.  {stop = k} goes k nodes round, then tells main.
local function node(main, hops)
  local nxt = mb.receive().next
  local me = mb.self()
  while true do
    local m = mb.receive()
    local h = m.hop
    if h then
      if h == hops then
        mb.send(main, {done = true})
      else
        mb.send(nxt, {hop = h + 1, from = me})
      end
    else
      if m.stop == 1 then
        mb.send(main, {stopped = true})
      else
        mb.send(nxt, {stop = m.stop - 1})
      end
      return
    end
  end
end

local function run(n, rounds)
  local main, hops = mb.self(), n * rounds
  local nodes = {}
  for i = 1, n do nodes[i] = mb.spawn(node, main, hops) end
  for i = 1, n do mb.send(nodes[i], {next = nodes[i % n + 1]}) end
  local t0 = mb.now()
  mb.send(nodes[1], {hop = 0, from = main})
  assert(mb.receive().done)
  local t1 = mb.now()
  mb.send(nodes[1], {stop = n})
  assert(mb.receive().stopped)
  return (t1 - t0) * 1e6 / hops
end

local function measure(name, n, rounds)
  run(n, 10)                                 -- warm-up
  local t = {}
  for i = 1, REPS do t[i] = run(n, rounds) end
  table.sort(t)
  local ns = t[math.floor((#t + 1) / 2)]
  local all = {}
  for i, v in ipairs(t) do all[i] = string.format("%.1f", v) end
  print(string.format("detail n=%d rounds=%d hops=%d median of %d: %.1f ns/hop (all: %s)",
    n, rounds, n * rounds, REPS, ns, table.concat(all, " ")))
  print(string.format("RESULT name=%s value=%.1f unit=ns", name, ns))
end

measure("ring", N, ROUNDS)
measure("ring_small", SMALL, math.max(1, math.floor(N * ROUNDS / SMALL)))
io.stdout:flush()
mb.halt(0)
