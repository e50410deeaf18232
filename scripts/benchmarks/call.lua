-- call: a server.call's round trip, in microseconds, with an empty mailbox
-- and with `backlog` unrelated messages queued in the caller. The moonbeam
-- twin of call.erl (gen_server:call); see BENCHMARKS.md.
--
-- Args (key=value): n (calls per repetition), backlog (messages queued in
-- the caller for the second figure), reps (repetitions; the median is
-- reported).
-- A call waits for its reply with a selective receive. Erlang's receive
-- marker lets that receive start past the messages queued before the call;
-- mb.receive's ref argument does the same. Without it each call would test
-- every queued message.
local mb = require "moonbeam"
local server = require "moonbeam.server"

local function opt(name, default)
  for _, a in ipairs(arg or {}) do
    local k, v = a:match("^([%w_]+)=(.*)$")
    if k == name then return tonumber(v) end
  end
  return default
end

local N, BACKLOG, REPS = opt("n", 100000), opt("backlog", 10000), opt("reps", 3)

local echo = server.start({
  init = function(arg) return arg end,
  handle_call = function(req, _, state) return req, state end,
}, 0)

local function run(n)
  local t0 = mb.now()
  for i = 1, n do server.call(echo, i) end
  return (mb.now() - t0) * 1000 / n
end

local function median(t)
  table.sort(t)
  return t[math.floor((#t + 1) / 2)]
end

run(1000)                                     -- warm-up
local plain, queued = {}, {}
for i = 1, REPS do plain[i] = run(N) end
local me = mb.self()
for i = 1, BACKLOG do mb.send(me, { tag = "unrelated", n = i }) end
for i = 1, REPS do queued[i] = run(N) end
assert(mb.info(me).mailbox == BACKLOG, "the backlog changed")
local p, q = median(plain), median(queued)
print(string.format("detail server.call %.3f us, with %d messages queued %.3f us (n=%d median of %d)",
  p, BACKLOG, q, N, REPS))
print(string.format("RESULT name=call value=%.3f unit=us", p))
print(string.format("RESULT name=call_backlog value=%.3f unit=us", q))
io.stdout:flush()
mb.halt(0)
