-- hook: a CPU-bound Lua loop, timed; the driver runs it with and without
-- preemption (the count hook) and reports the ratio.
-- Runs under moonbeam and under plain luajit (for reference figures).
-- See BENCHMARKS.md; hook.erl is the same loops on the BEAM.
--
-- Args (key=value): n (iterations of each loop), reps (best of).
-- Two loops: arithmetic only (where the hook costs most), and a function
-- call per iteration.  Figures in ms of CPU time (os.clock): hook (both
-- loops), hook_arith, hook_calls.  CPU time rather than wall time because
-- the machine is shared: a neighbour's load stretches wall time but not the
-- CPU the loop itself needs, and plain luajit and moonbeam are then measured
-- alike.  Under moonbeam the idle second scheduler sleeps, so it adds ~0;
-- the wall time is printed on the detail line as a check.
local ok, mb = pcall(require, "moonbeam")
if not ok then mb = nil end

local function opt(name, default)
  for _, a in ipairs(arg or {}) do
    local k, v = a:match("^([%w_]+)=(.*)$")
    if k == name then return tonumber(v) end
  end
  return default
end

local N, REPS = opt("n", 20000000), opt("reps", 3)

local clock = os.clock
local wall = mb and mb.now or function() return 0 end
local wall_total = 0

local function arith(n)
  local x = 0
  for i = 1, n do x = (x * 3 + i) % 1000003 end
  return x
end

local function f(x) return (x * 3 + 1) % 1000003 end

local function calls(n)
  local x = 0
  for i = 1, n do x = f(x) + i % 7 end
  return x
end

local function best(fn)
  local b = math.huge
  for _ = 1, REPS do
    local t0, w0 = clock(), wall()
    fn(N)
    b = math.min(b, (clock() - t0) * 1000)
    wall_total = wall_total + (wall() - w0)
  end
  return b
end

local a, c = best(arith), best(calls)
print(string.format("detail n=%d best of %d: arith %.1f ms, calls %.1f ms CPU (%s%s)",
  N, REPS, a, c, mb and "moonbeam" or "plain luajit",
  mb and string.format("; wall for all %d runs %.0f ms", 2 * REPS, wall_total) or ""))
print(string.format("RESULT name=hook value=%.1f unit=ms", a + c))
print(string.format("RESULT name=hook_arith value=%.1f unit=ms", a))
print(string.format("RESULT name=hook_calls value=%.1f unit=ms", c))
io.stdout:flush()
if mb then mb.halt(0) end
