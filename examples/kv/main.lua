-- examples/kv/main.lua: a supervised key-value store.
--
--   scripts/run examples/kv             a short demo that ends by itself
--   scripts/run examples/kv --forever   keep running (Ctrl-C to stop)
--
-- The tree:   kv_sup (one_for_one, at most 5 restarts in 10 s)
--             ├── store   a server registered as "kv" (store.lua)
--             └── flaky   a worker that crashes every third beat (flaky.lua)
-- Crash reports and supervisor reports go to stderr; the demo's own lines
-- go to stdout.
local mb = require "moonbeam"
local server = require "moonbeam.server"
local supervisor = require "moonbeam.supervisor"

local forever = false
for i = 1, #arg do
  if arg[i] == "--forever" then
    forever = true
  elseif arg[i] == "-h" or arg[i] == "--help" then
    print("usage: scripts/run examples/kv [--forever]")
    return
  else
    io.stderr:write("examples/kv: unknown option " .. arg[i] .. " (try --help)\n")
    os.exit(2)
  end
end

-- The children are named by module: each process requires its module itself,
-- through package.path, whose "./?.lua" finds the files next to this one when
-- run from this directory (scripts/run does that).
if not package.searchpath("store", package.path) then
  io.stderr:write("examples/kv: run it from its directory, or as: scripts/run examples/kv\n")
  os.exit(2)
end

local function say(fmt, ...) print(("main: " .. fmt):format(...)) end

local function show_children(sup)
  for _, c in ipairs(supervisor.which_children(sup)) do
    say("  child %-6s %s", c.id, c.pid and tostring(c.pid) or "(not running)")
  end
end

local function child_pid(sup, id)
  for _, c in ipairs(supervisor.which_children(sup)) do
    if c.id == id then return c.pid end
  end
end

local sup = assert(supervisor.start({
  name = "kv_sup",
  strategy = "one_for_one",
  max_restarts = 5,
  max_seconds = 10,
  children = {
    -- A server: its callbacks module is "store"; it registers as "kv".
    { id = "store",
      start = function() return server.start("store", nil, { name = "kv", link = true }) end },
    -- A plain process: the module "flaky" returns the function to run.
    -- It crashes every third beat; beats are slower when running forever, so
    -- that it stays within the restart intensity.
    { id = "flaky", start = { "flaky", forever and 1000 or 300 }, shutdown = 100 },
  },
}))
say("supervisor kv_sup is %s", tostring(sup))
show_children(sup)

-- Plain use of the store.
server.call("kv", { op = "put", key = "lang", value = "lua" })
server.call("kv", { op = "put", key = "vm", value = "luajit" })
say("get lang -> %s", server.call("kv", { op = "get", key = "lang" }))
say("keys -> %s", table.concat(server.call("kv", { op = "keys" }), ", "))

-- A bad request crashes the store: the caller gets an error, the supervisor
-- restarts the store (empty: its state died with it) under the same name.
local old = mb.whereis("kv")
local ok, err = pcall(server.call, "kv", { op = "get", key = { "not", "a", "key" } })
say("a bad request failed, as it should: %s", tostring(err))
local deadline = mb.now() + 1000
while (mb.whereis("kv") == nil or mb.whereis("kv") == old) and mb.now() < deadline do mb.sleep(10) end
say("store restarted: %s -> %s", tostring(old), tostring(mb.whereis("kv")))
say("get lang after the restart -> %s (the data died with the old store)",
    tostring(server.call("kv", { op = "get", key = "lang" })))

if forever then
  say("running until interrupted (Ctrl-C)")
  mb.receive()
end

-- Let flaky crash once and be restarted (it beats every 300 ms).
local first = child_pid(sup, "flaky")
mb.sleep(1100)
say("heartbeat -> %s", tostring(server.call("kv", { op = "get", key = "heartbeat" })))
say("flaky crashed and was restarted: %s -> %s", tostring(first), tostring(child_pid(sup, "flaky")))
show_children(sup)

supervisor.stop(sup)
say("supervisor stopped; processes left: %d (this one)", #mb.processes())
