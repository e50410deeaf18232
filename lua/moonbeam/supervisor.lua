-- moonbeam.supervisor: processes that start, watch and restart other
-- processes, like Erlang's supervisor.
--
-- DESIGN
-- A supervisor is a moonbeam.server whose callbacks live in this file. It
-- traps exits and links to every child, so a child's end arrives as an EXIT
-- message. Its state is the ordered list of children (start order) with the
-- pid of each running one, and the times of recent restarts. When a child
-- ends, its restart type decides whether to act ("permanent": always,
-- "transient": only after an abnormal exit, "temporary": never), and the
-- strategy decides what to restart:
--   one_for_one   the child alone;
--   one_for_all   all children: the others are shut down in reverse start
--                 order, then all are started in start order;
--   rest_for_one  the child and those started after it, the same way.
-- More than max_restarts restarts within max_seconds means the system is not
-- recovering: the supervisor shuts its children down and exits with reason
-- "shutdown", so that its own supervisor can act. A child that fails to
-- restart is retried through a message to self, so the supervisor keeps
-- answering calls, and each retry counts as a restart.
--
-- Shutting a child down (on terminate_child, on group restarts and when the
-- supervisor itself stops, then in reverse start order): monitor it, unlink,
-- send exit signal "shutdown", wait up to its shutdown time, then "kill".
-- Children that are servers and trap exits run their terminate callback.
--
-- Everything the supervisor process runs is copied into it with the callback
-- table (see moonbeam.server), so helpers keep no state in upvalues, and they
-- read standard functions as globals rather than as cached locals (each local
-- would be one more upvalue to copy into every supervisor).
local mb = require "moonbeam"
local server = require "moonbeam.server"

local supervisor = {}

-- Defaults, as documented in the README.
local DEFAULT_MAX_RESTARTS = 3
local DEFAULT_MAX_SECONDS = 5
local DEFAULT_SHUTDOWN = 5000 -- ms, for workers; supervisors wait without limit
-- After "kill", how long to wait for the DOWN; only a runtime bug exceeds it.
local KILL_WAIT = 5000

local STRATEGIES = { one_for_one = true, one_for_all = true, rest_for_one = true }
local RESTARTS = { permanent = true, transient = true, temporary = true }
local TYPES = { worker = true, supervisor = true }

local show = server.show

-- -- Child specs ----------------------------------------------------------

local function show_id(id)
  return type(id) == "string" and ("'" .. id .. "'") or tostring(id)
end

-- Checks a child spec and returns a normalized copy, or raises an error
-- that starts with where (like "supervisor.start: spec.children[2]").
local function check_child(cs, where, level)
  level = level + 1
  if type(cs) ~= "table" then
    error(where .. ": child spec must be a table, got " .. type(cs), level)
  end
  local id = cs.id
  if id == nil then error(where .. ": missing field 'id'", level) end
  if type(id) ~= "string" and type(id) ~= "number" then
    error(where .. ": id must be a string or a number, got " .. type(id), level)
  end
  if id ~= id then error(where .. ": id must not be NaN", level) end
  where = where .. " (id " .. show_id(id) .. ")"
  local start = cs.start
  if start == nil then
    error(where .. ": missing field 'start' (a function or {module, args...})", level)
  elseif type(start) == "table" then
    if type(start[1]) ~= "string" then
      error(where .. ": start must be {module, args...} with a module name first, got "
            .. type(start[1]) .. " at start[1]", level)
    end
    local n = start.n
    if n ~= nil and not (type(n) == "number" and n >= 1 and n % 1 == 0) then
      error(where .. ": start.n must be the number of values in start (an integer >= 1), got "
            .. show(n), level)
    end
  elseif type(start) ~= "function" then
    error(where .. ": start must be a function or {module, args...}, got " .. type(start), level)
  end
  local restart = cs.restart or "permanent"
  if not RESTARTS[restart] then
    error(where .. ": restart must be \"permanent\", \"transient\" or \"temporary\", got "
          .. show(restart), level)
  end
  local ctype = cs.type or "worker"
  if not TYPES[ctype] then
    error(where .. ": type must be \"worker\" or \"supervisor\", got " .. show(ctype), level)
  end
  local shutdown = cs.shutdown
  if shutdown == nil then
    shutdown = ctype == "supervisor" and "infinity" or DEFAULT_SHUTDOWN
  elseif not ((type(shutdown) == "number" and shutdown >= 0)
              or shutdown == "infinity" or shutdown == "brutal_kill") then
    error(where .. ": shutdown must be a number of ms >= 0, \"infinity\" or \"brutal_kill\", got "
          .. show(shutdown), level)
  end
  if shutdown == math.huge then shutdown = "infinity" end
  return { id = id, start = start, restart = restart, shutdown = shutdown, type = ctype }
end

local function check_spec(spec, level)
  level = level + 1
  if type(spec) ~= "table" then
    error("supervisor.start: spec must be a table, got " .. type(spec), level)
  end
  local strategy = spec.strategy or "one_for_one"
  if not STRATEGIES[strategy] then
    error("supervisor.start: unknown strategy " .. show(strategy)
          .. " (one_for_one, one_for_all or rest_for_one expected)", level)
  end
  local max_restarts = spec.max_restarts or DEFAULT_MAX_RESTARTS
  if type(max_restarts) ~= "number" or max_restarts < 0 or max_restarts % 1 ~= 0 then
    error("supervisor.start: max_restarts must be an integer >= 0, got " .. show(max_restarts), level)
  end
  local max_seconds = spec.max_seconds or DEFAULT_MAX_SECONDS
  if type(max_seconds) ~= "number" or not (max_seconds > 0) then
    error("supervisor.start: max_seconds must be a number > 0, got " .. show(max_seconds), level)
  end
  if spec.name ~= nil and type(spec.name) ~= "string" then
    error("supervisor.start: name must be a string, got " .. type(spec.name), level)
  end
  local children = spec.children or {}
  if type(children) ~= "table" then
    error("supervisor.start: children must be a list of child specs, got " .. type(children), level)
  end
  local list, seen = {}, {}
  for i = 1, #children do
    local c = check_child(children[i], "supervisor.start: children[" .. i .. "]", level)
    if seen[c.id] then
      error("supervisor.start: duplicate child id " .. show_id(c.id) .. " (children["
            .. seen[c.id] .. "] and children[" .. i .. "])", level)
    end
    seen[c.id] = i
    list[i] = c
  end
  return {
    strategy = strategy, max_restarts = max_restarts, max_seconds = max_seconds,
    name = spec.name, children = list,
  }
end

-- -- Inside the supervisor process ----------------------------------------

-- Writes one report block to stderr in a single write, in the format of the
-- runtime's crash reports: "=SUPERVISOR REPORT==== <pid> registered as name".
local function log(st, lines)
  local buf = { "=SUPERVISOR REPORT==== " .. st.head }
  for i = 1, #lines do buf[#buf + 1] = lines[i] end
  io.stderr:write(table.concat(buf, "\n") .. "\n")
end

local function reason_text(e)
  if type(e) == "string" then return e end
  return show(e)
end

local function is_normal(reason)
  return reason == "normal" or reason == "shutdown"
end

local function find(st, id)
  for i, c in ipairs(st.children) do
    if c.id == id then return c, i end
  end
end

local function set_pid(st, child, pid)
  if child.pid ~= nil then st.by_pid[child.pid] = nil end
  child.pid = pid
  if pid ~= nil then st.by_pid[pid] = child end
end

local function remove(st, child)
  local _, i = find(st, child.id)
  if i then table.remove(st.children, i) end
  set_pid(st, child, nil)
end

-- Whether a new process could require module name: it looks where this
-- one would (the process it spawns inherits its package.path and cpath). A process started from a module that is not there would
-- only fail after spawn_link had returned its pid, and a typo in
-- start_child would then take the supervisor down through its restarts.
local function findable(name)
  return package.loaded[name] ~= nil or package.preload[name] ~= nil or
         package.searchpath(name, package.path) ~= nil or
         package.searchpath(name, package.cpath) ~= nil
end

-- Starts a child's process and links to it; returns its pid or nil, err.
local function start_proc(st, child)
  local start = child.start
  local ok, pid, err
  if type(start) == "function" then
    ok, pid, err = pcall(start)
  elseif not findable(start[1]) then
    return nil, "module '" .. start[1] .. "' not found"
  else   -- (unpack inside the pcall: a start.n of 100,000 is too many results)
    ok, pid = pcall(function() return mb.spawn_link(start[1], unpack(start, 2, start.n or #start)) end)
  end
  if not ok then return nil, type(pid) == "string" and pid or show(pid) end
  if not mb.is_pid(pid) then
    if pid == nil and err ~= nil then return nil, type(err) == "string" and err or show(err) end
    return nil, "start returned " .. show(pid) .. " instead of a pid"
  end
  -- The start function need not link (server.start links only when asked);
  -- linking here is harmless if it did. If the child already died, the link
  -- brings an EXIT with reason "noproc", handled like any child exit.
  mb.link(pid)
  set_pid(st, child, pid)
  return pid
end

-- Shuts one running child down; returns its exit reason. A reason other
-- than the one asked for ("shutdown", or "killed" after brutal_kill) or
-- "normal" is logged, as OTP's shutdown_error: the child crashed just before
-- or while it was shut down (its terminate raised, say), and that would
-- otherwise go unseen.
local function shutdown_proc(st, child)
  local pid = child.pid
  local ref = mb.monitor(pid)
  mb.unlink(pid)
  set_pid(st, child, nil)
  local function down(m)
    return type(m) == "table" and m.event == "DOWN" and m.ref == ref
  end
  -- An EXIT queued before the unlink means the child is already gone.
  local exited = mb.receive(function(m)
    return type(m) == "table" and m.event == "EXIT" and m.pid == pid
  end, 0)
  local limit = child.shutdown
  if limit == "brutal_kill" then
    mb.exit(pid, "kill")
    limit = KILL_WAIT
  else
    mb.exit(pid, "shutdown")
  end
  local m = mb.receive(down, limit ~= "infinity" and limit or nil, ref)
  if m == nil then
    mb.exit(pid, "kill")
    m = mb.receive(down, KILL_WAIT, ref)
    log(st, {
      "child: " .. show_id(child.id) .. " " .. tostring(pid),
      "action: killed, as it did not stop within " .. tostring(child.shutdown)
        .. " ms of the exit signal \"shutdown\"",
    })
    if m == nil then
      mb.demonitor(ref)
      return "killed"
    end
    if not exited then return m.reason end   -- "killed", logged just above
  end
  -- "noproc": it was gone before the monitor and its EXIT is still on the
  -- way (then ignored as an old child's); its reason is not known here.
  local reason = exited and exited.reason or m.reason
  if not (is_normal(reason) or reason == "noproc"
          or (reason == "killed" and child.shutdown == "brutal_kill")) then
    log(st, {
      "child: " .. show_id(child.id) .. " " .. tostring(pid),
      "reason: " .. reason_text(reason),
      "action: none; it ended with this reason while being shut down",
    })
  end
  return reason
end

-- Shuts down the running children of list in reverse order.
local function shutdown_list(st, list)
  for i = #list, 1, -1 do
    if list[i].pid ~= nil then shutdown_proc(st, list[i]) end
  end
end

-- Records a restart; false when that exceeds the restart intensity.
local function add_restart(st)
  local now = mb.now()
  local keep = {}
  for _, t in ipairs(st.restarts) do
    if now - t < st.max_seconds * 1000 then keep[#keep + 1] = t end
  end
  keep[#keep + 1] = now
  st.restarts = keep
  return #keep <= st.max_restarts
end

-- The children restarted along with child, by the strategy, in start order.
local function group(st, child)
  if st.strategy == "one_for_one" then return { child } end
  local g, from = {}, 1
  if st.strategy == "rest_for_one" then
    local _, i = find(st, child.id)
    from = i
  end
  for i = from, #st.children do g[#g + 1] = st.children[i] end
  return g
end

-- Restarts child (not running) and its group. Returns the list of
-- "id as pid" texts, or nil, err, with child left to retry.
local function restart_group(st, child)
  local g = group(st, child)
  shutdown_list(st, g)
  local started = {}
  for _, c in ipairs(g) do
    if c.restart == "temporary" and c ~= child then
      remove(st, c)
    elseif c.pid == nil then
      local pid, err = start_proc(st, c)
      if pid == nil then return nil, show_id(c.id) .. " failed to start: " .. err, c end
      started[#started + 1] = show_id(c.id) .. " as " .. tostring(pid)
    end
  end
  return started
end

local function restart(st, child, old, reason)
  local head = {
    "child: " .. show_id(child.id) .. (old and (" " .. tostring(old)) or ""),
    "reason: " .. reason_text(reason),
  }
  if not add_restart(st) then
    head[#head + 1] = "action: none; that is more than " .. st.max_restarts
                      .. " restarts within " .. st.max_seconds
                      .. " s, so the supervisor shuts down its children and exits"
    log(st, head)
    return st, "shutdown"
  end
  local window = "(" .. st.strategy .. "; restart " .. #st.restarts .. " of at most "
                 .. st.max_restarts .. " within " .. st.max_seconds .. " s)"
  local started, err, failed = restart_group(st, child)
  if started == nil then
    head[#head + 1] = "action: restart failed: " .. err .. "; will retry " .. window
    log(st, head)
    failed.retry = true
    mb.send(mb.self(), { tag = "$supervisor_retry", id = failed.id })
    return st
  end
  head[#head + 1] = "action: restarted " .. table.concat(started, ", ") .. " " .. window
  log(st, head)
  return st
end

local function child_exited(st, child, reason)
  local old = child.pid
  set_pid(st, child, nil)
  -- While the host stops (SIGTERM) a child that ends stays down: the stop
  -- may reach it before this supervisor (a graceful child: mb.stopping).
  if mb.stopping() then
    if child.restart == "temporary" then remove(st, child) end
    return st
  end
  if child.restart == "permanent" or (child.restart == "transient" and not is_normal(reason)) then
    return restart(st, child, old, reason)
  end
  if not is_normal(reason) then
    log(st, {
      "child: " .. show_id(child.id) .. " " .. tostring(old),
      "reason: " .. reason_text(reason),
      "action: none (restart = \"" .. child.restart .. "\")",
    })
  end
  if child.restart == "temporary" then remove(st, child) end
  return st
end

-- The supervisor's server callbacks.
local callbacks = {}

function callbacks.init(spec)
  mb.trap_exit(true)
  local st = {
    strategy = spec.strategy, max_restarts = spec.max_restarts, max_seconds = spec.max_seconds,
    children = {}, by_pid = {}, restarts = {},
    head = tostring(mb.self()) .. (spec.name and (" registered as " .. spec.name) or ""),
  }
  for _, c in ipairs(spec.children) do
    st.children[#st.children + 1] = c
    local pid, err = start_proc(st, c)
    if pid == nil then
      -- Logged as well as returned, as OTP's start_error: the caller of
      -- supervisor.start may be a supervisor that only sees its own child
      -- fail to start.
      log(st, {
        "child: " .. show_id(c.id),
        "reason: " .. err,
        "action: none; it failed to start, so the supervisor stops the children "
          .. "started before it and does not start",
      })
      shutdown_list(st, st.children)
      return nil, "child " .. show_id(c.id) .. " failed to start: " .. err
    end
  end
  return st
end

local handlers = {}

function handlers.which_children(st)
  local list = {}
  for i, c in ipairs(st.children) do
    list[i] = { id = c.id, pid = c.pid, type = c.type, restart = c.restart }
  end
  return list
end

function handlers.start_child(st, spec)
  -- Checked here too: any process may call, and a request made by hand
  -- (server.call(sup, {op = "start_child", ...})) must not end the
  -- supervisor and its children.
  local ok, c = pcall(check_child, spec, "supervisor.start_child: child spec", 1)
  if not ok then return { err = tostring(c) } end
  spec = c
  if find(st, spec.id) then
    return { err = "child id " .. show_id(spec.id) .. " already exists" }
  end
  st.children[#st.children + 1] = spec
  local pid, err = start_proc(st, spec)
  if pid == nil then
    remove(st, spec)
    return { err = "child " .. show_id(spec.id) .. " failed to start: " .. err }
  end
  return { pid = pid }
end

function handlers.terminate_child(st, id)
  local c = find(st, id)
  if c == nil then return { err = "no child with id " .. show_id(id) } end
  if c.pid ~= nil then shutdown_proc(st, c) end
  -- A restart that failed and waits for its retry is called off: the child
  -- stays stopped, as asked.
  c.retry = nil
  if c.restart == "temporary" then remove(st, c) end
  return { ok = true }
end

function handlers.restart_child(st, id)
  local c = find(st, id)
  if c == nil then return { err = "no child with id " .. show_id(id) } end
  if c.pid ~= nil then return { err = "child " .. show_id(id) .. " is already running" } end
  local pid, err = start_proc(st, c)
  if pid == nil then return { err = "child " .. show_id(id) .. " failed to start: " .. err } end
  return { pid = pid }
end

function handlers.delete_child(st, id)
  local c = find(st, id)
  if c == nil then return { err = "no child with id " .. show_id(id) } end
  if c.pid ~= nil then
    return { err = "child " .. show_id(id) .. " is running; terminate it first" }
  end
  remove(st, c)
  return { ok = true }
end

function callbacks.handle_call(req, from, st)
  local h = type(req) == "table" and handlers[req.op]
  if not h then return { err = "unknown supervisor request " .. show(req) }, st end
  return h(st, req.arg), st
end

function callbacks.handle_info(msg, st)
  if type(msg) ~= "table" then return st end
  if msg.event == "EXIT" then
    local child = st.by_pid[msg.pid]
    if child == nil then return st end -- an old child, already handled
    return child_exited(st, child, msg.reason)
  elseif msg.tag == "$supervisor_retry" then
    local child = find(st, msg.id)
    if child == nil or child.pid ~= nil or not child.retry then return st end
    child.retry = nil
    return restart(st, child, nil, "restart failed")
  end
  return st
end

function callbacks.terminate(reason, st)
  shutdown_list(st, st.children)
end

-- -- Public API -----------------------------------------------------------

-- supervisor.start(spec) -> pid | nil, err
function supervisor.start(spec)
  local s = check_spec(spec, 1)
  local link, graceful = spec.link, spec.graceful
  if link ~= nil and type(link) ~= "boolean" then
    error("supervisor.start: link must be a boolean, got " .. type(link), 2)
  end
  if graceful ~= nil and type(graceful) ~= "boolean" then
    error("supervisor.start: graceful must be a boolean, got " .. type(graceful), 2)
  end
  return server.start(callbacks, s, { name = s.name, link = link, graceful = graceful,
                                      timeout = math.huge })
end

local function call(fname, sup, op, arg, timeout)
  if type(sup) ~= "string" and not mb.is_pid(sup) then
    error(fname .. ": bad supervisor (pid or registered name expected, got " .. type(sup) .. ")", 3)
  end
  if type(sup) == "string" then
    local found, pid = pcall(mb.whereis, sup)   -- (a string that cannot be a name names none)
    if not (found and pid) then error(fname .. ": no process registered as '" .. sup .. "'", 3) end
  end
  if timeout == nil then timeout = math.huge end
  local ok, r = pcall(server.call, sup, { op = op, arg = arg }, timeout)
  if not ok then
    error((tostring(r):gsub("^.-server%.call: ", fname .. ": ")), 3)
  end
  return r
end

local function check_id(fname, id)
  if type(id) ~= "string" and type(id) ~= "number" then
    error(fname .. ": bad child id (string or number expected, got " .. type(id) .. ")", 3)
  end
end

-- supervisor.which_children(sup[, timeout]) -> {{id=, pid=, type=, restart=}, ...}
function supervisor.which_children(sup, timeout)
  return call("supervisor.which_children", sup, "which_children", nil, timeout)
end

-- supervisor.start_child(sup, child_spec[, timeout]) -> pid | nil, err
function supervisor.start_child(sup, spec, timeout)
  local c = check_child(spec, "supervisor.start_child: child spec", 1)
  local r = call("supervisor.start_child", sup, "start_child", c, timeout)
  if r.err then return nil, r.err end
  return r.pid
end

-- supervisor.terminate_child(sup, id[, timeout]) -> true | nil, err
function supervisor.terminate_child(sup, id, timeout)
  check_id("supervisor.terminate_child", id)
  local r = call("supervisor.terminate_child", sup, "terminate_child", id, timeout)
  if r.err then return nil, r.err end
  return true
end

-- supervisor.restart_child(sup, id[, timeout]) -> pid | nil, err
function supervisor.restart_child(sup, id, timeout)
  check_id("supervisor.restart_child", id)
  local r = call("supervisor.restart_child", sup, "restart_child", id, timeout)
  if r.err then return nil, r.err end
  return r.pid
end

-- supervisor.delete_child(sup, id[, timeout]) -> true | nil, err
function supervisor.delete_child(sup, id, timeout)
  check_id("supervisor.delete_child", id)
  local r = call("supervisor.delete_child", sup, "delete_child", id, timeout)
  if r.err then return nil, r.err end
  return true
end

-- supervisor.stop(sup[, reason[, timeout]]) -> true
-- Shuts the children down in reverse start order, then the supervisor.
function supervisor.stop(sup, reason, timeout)
  if timeout == nil then timeout = math.huge end
  local ok, r = pcall(server.stop, sup, reason, timeout)
  if not ok then error((tostring(r):gsub("^.-server%.stop: ", "supervisor.stop: ")), 2) end
  return r
end

return supervisor
