-- spec/support.lua: helpers shared by the specs (not a spec itself).
--
-- The specs run inside the host: the busted runner is the first moonbeam
-- process, so a spec can spawn, send and receive. Every wait here is bounded,
-- so a host bug makes a test fail instead of hanging the suite.
--
-- Do not capture this module in a function that is spawned or sent: an
-- upvalue that is a loaded module is re-required in the new process, and
-- "spec.support" is only on the runner's package.path. Capture `mb` and the
-- plain local functions instead.

local mb = require "moonbeam"
local assert = require "luassert"

local S = {}

-- The generous bound for anything that should happen "soon". It only keeps a
-- broken host from hanging the suite; no test depends on it being tight.
S.T = 5000

-- A matcher for selective receive: tables whose field `k` equals `v`.
function S.field(k, v)
  return function(m) return type(m) == "table" and m[k] == v end
end

-- A matcher for the DOWN message of monitor `ref`.
function S.down_of(ref)
  return function(m)
    return type(m) == "table" and m.event == "DOWN" and m.ref == ref
  end
end

-- Receive a message (matching `match`, if given) within `timeout` ms (S.T by
-- default), and fail the test if none came.
function S.recv(match, timeout, what)
  local msg
  if match then msg = mb.receive(match, timeout or S.T)
  else msg = mb.receive(timeout or S.T) end
  assert(msg ~= nil, "timed out waiting for " .. (what or "a message"))
  return msg
end

-- Wait for the DOWN of monitor ref and return its reason.
function S.await_down(ref, timeout)
  local m = S.recv(S.down_of(ref), timeout, "a DOWN message")
  return m.reason, m
end

-- Throw away whatever is in the caller's mailbox.
function S.drain()
  local n = 0
  while mb.receive(0) ~= nil do n = n + 1 end
  return n
end

local function pid_set()
  local set = {}
  for _, p in ipairs(mb.processes()) do set[p] = true end
  return set
end

-- Record the live processes before a test ...
function S.snapshot()
  S.drain()
  return pid_set()
end

-- ... and after it, wait (bounded) until every process the test started has
-- ended. Whatever is still alive then is killed, so that one broken test does
-- not break the next, and the test fails naming the leftovers.
function S.check_clean(before, timeout)
  local deadline = mb.now() + (timeout or S.T)
  local extra
  repeat
    extra = {}
    for p in pairs(pid_set()) do
      if not before[p] then extra[#extra + 1] = p end
    end
    if #extra == 0 then break end
    mb.sleep(5)
  until mb.now() > deadline
  for _, p in ipairs(extra) do mb.exit(p, "kill") end
  if mb.trap_exit then mb.trap_exit(false) end
  S.drain()
  local names = {}
  for i, p in ipairs(extra) do names[i] = tostring(p) end
  assert(#extra == 0, "processes left running: " .. table.concat(names, ", "))
end

-- Run fn(...) in a new, monitored process and return:
--   true,  {results of fn}             when fn returned,
--   false, reason                      when the process ended without returning
--                                      (crash, exit, killed).
-- The probe is how tests exercise links and exit signals without putting the
-- busted runner itself at risk.
function S.probe(fn, ...)
  local pid, ref = mb.spawn_monitor(function(parent, f, ...)
    local r = { f(...) }
    mb.send(parent, { probe_done = mb.self(), results = r })
  end, mb.self(), fn, ...)
  local m = S.recv(function(x)
    return type(x) == "table"
      and (x.probe_done == pid or (x.event == "DOWN" and x.ref == ref))
  end, 3 * S.T, "the probe to finish")
  if m.event == "DOWN" then return false, m.reason end
  S.await_down(ref)
  return true, m.results
end

-- Wait (bounded) until pred() is true; return whether it became true.
function S.eventually(pred, timeout)
  local deadline = mb.now() + (timeout or S.T)
  while not pred() do
    if mb.now() > deadline then return false end
    mb.sleep(2)
  end
  return true
end

-- Does string s contain `part` (plain, no patterns)?
function S.has(s, part)
  return type(s) == "string" and s:find(part, 1, true) ~= nil
end

-- -- Subprocesses -------------------------------------------------------------

-- Quote s for sh.
function S.q(s)
  return "'" .. tostring(s):gsub("'", [['\'']]) .. "'"
end

local function absolute(p)
  if p:sub(1, 1) == "/" then return p end
  -- PWD is where busted was started; busted may have changed directory since.
  return (os.getenv("PWD") or ".") .. "/" .. p
end

-- The moonbeam binary: $MOONBEAM, or the interpreter running these specs
-- (busted --lua=build/moonbeam makes that arg[-1]), or build/moonbeam.
local function find_binary()
  local env = os.getenv("MOONBEAM")
  if env and env ~= "" then return absolute(env) end
  local a = rawget(_G, "arg")
  if type(a) == "table" then
    local lo = 0
    while a[lo - 1] ~= nil do lo = lo - 1 end
    if lo < 0 and tostring(a[lo]):find("moonbeam", 1, true) then
      return absolute(a[lo])
    end
  end
  return absolute("build/moonbeam")
end
S.bin = find_binary()

local function slurp(path)
  local f = io.open(path, "rb")
  if not f then return "" end
  local s = f:read("*a")
  f:close()
  return s
end

-- A fresh temporary directory (removed by S.cleanup_tmp()).
local tmpdirs = {}
function S.tmpdir()
  local p = io.popen("mktemp -d /tmp/mbspec.XXXXXX")
  local dir = p:read("*l")
  p:close()
  assert(dir and dir ~= "", "mktemp -d failed")
  tmpdirs[#tmpdirs + 1] = dir
  return dir
end

function S.cleanup_tmp()
  for i, dir in ipairs(tmpdirs) do
    if dir:match("^/tmp/mbspec%.") then os.execute("rm -rf " .. S.q(dir) .. " 2>/dev/null") end
    tmpdirs[i] = nil
  end
end

-- Write a file (in a fresh temporary directory unless dir is given) and
-- return its path.
function S.write(name, contents, dir)
  local path = (dir or S.tmpdir()) .. "/" .. name
  local f = assert(io.open(path, "wb"))
  f:write(contents)
  f:close()
  return path
end

-- Run a shell command line, bounded to `limit` seconds (20 by default), from
-- directory `cwd` if given. Returns exit code, stdout, stderr. A command that
-- had to be stopped by the bound returns 124 (timeout's code), or 137 if it
-- did not end within 5 s of timeout's SIGTERM and was killed.
-- The shell waits out SIGTERM (trap :) rather than die of it: timeout sends
-- the signal to the whole group and waits only for the shell, so a host
-- that could not take it (hung) outlived a shell that died at once, and
-- timeout's SIGKILL never came. A trap that runs a command, unlike an
-- ignored signal, is not inherited: the host still gets SIGTERM.
function S.sh(cmd, cwd, limit)
  local dir = S.tmpdir()
  local out, err = dir .. "/stdout", dir .. "/stderr"
  local line = string.format("%stimeout -k 5 %d sh -c %s >%s 2>%s </dev/null; echo $?",
    cwd and ("cd " .. S.q(cwd) .. " && ") or "", limit or 20, S.q("trap : TERM; " .. cmd),
    S.q(out), S.q(err))
  local p = assert(io.popen(line))
  local code = tonumber(p:read("*a"))
  p:close()
  return code, slurp(out), slurp(err)
end

-- Run the moonbeam binary with the (already quoted) argument string.
function S.moonbeam(args, cwd, limit)
  return S.sh(S.q(S.bin) .. " " .. args, cwd, limit)
end

-- Lua source for a child host's script (after `local mb = require
-- "moonbeam"`): pongs(n) makes n round trips to an echo process, each
-- given 10 s, and prints "pongs <how many came back>". Where other
-- processes hold the schedulers for good, fewer come back.
S.PONGS = [[
local function pongs(n)
  local echo = mb.spawn(function()
    while true do local m = mb.receive(); mb.send(m, "pong") end
  end)
  local got = 0
  for _ = 1, n do
    mb.send(echo, mb.self())
    if mb.receive(function(m) return m == "pong" end, 10000) then got = got + 1 end
  end
  print("pongs", got)
  mb.exit(echo, "kill")
end
]]

-- Run the script src in a child host, with the options opts (a string),
-- for at most limit seconds (default 60): exit code, stdout, stderr.
function S.child(src, opts, limit)
  local path = S.write("child.lua", src)
  return S.moonbeam((opts or "") .. " " .. S.q(path), nil, limit or 60)
end

return S
