-- moonbeam.server: request/reply server processes, like Erlang's gen_server.
--
-- DESIGN
-- A server is one process running a receive loop around a state value and a
-- set of callbacks (init, handle_call, handle_cast, handle_info, terminate).
-- Everything here is built from the runtime's primitives (spawn, send,
-- selective receive, links and monitors); no C code is involved. The module
-- owns two message protocols. The Lua one's messages to a server are tables
-- whose tag starts with "$" (user messages should not use such tags); what
-- they carry is in the array part (a key costs the receiver its interning
-- and a hash insertion: a call's two messages with keyed fields cost 6,000
-- of its 32,000 instructions more):
--
--   to a server:   {tag = "$call", p, r, req}       (the caller p, its alias r)
--                  {tag = "$system", p, r, "get_state"}
--                  {tag = "$cast", msg}
--                  {tag = "$stop", reason}
--   to a caller:   {r, value[, err]}     (through the alias r: only it has r)
--   to a starter:  {tag = "$started", pid = server[, err = message]}
--
-- Alongside it, for other nodes, Erlang's gen_server protocol: a server
-- also takes the messages OTP's gen_server:call and cast send (Erlang terms,
-- term.h), and server.call and cast use them when the destination is on
-- another node (a remote pid or {name, node}), so a Moonbeam server answers
-- Erlang's gen_server:call({Name, Node}, Req) and server.call reaches an
-- Erlang gen_server (or a Moonbeam server on another host) alike:
--
--   to a server:   {'$gen_call', {From, Tag}, Req}    {'$gen_cast', Msg}
--                  {system, {From, Tag}, get_state}   (sys:get_state)
--                  {system, {From, Tag}, {terminate, Reason}}  (sys:terminate)
--   to a caller:   {Tag, Reply}, sent through the alias in Tag when Tag is
--                  [alias | Ref] (OTP 24's gen.erl), else to From
--
-- The loop turns such a message into the Lua protocol's shape (a call's
-- {tag, From, Tag, req, erlang = true}), and the `from` that callbacks and
-- server.reply see is {pid = p, ref = r} for a Lua caller, {pid = From,
-- tag = Tag} for an Erlang one. A caller on our side does what gen.erl
-- does: a monitor of the server (by pid or by name) whose ref is also an
-- alias, the tag [alias | Ref] (a table {atom "alias", ["$tail"] = ref}),
-- the reply or the DOWN ("noconnection" when the node goes away), and, once
-- done, the alias dropped and the monitor taken off.
--
-- "$system" messages are answered by the loop itself, never by a callback
-- (like OTP's sys messages), so they work whatever the callbacks do. A
-- "$call", "$cast", "$stop" or "$system" of the wrong shape (a forged or
-- garbled message) is dropped with a report: it never reaches a callback and
-- never ends the server. Other "$" tags go to handle_info like any message
-- (moonbeam.supervisor sends itself one).
--
-- Calls and late replies. A call that times out must never leave its reply
-- behind: the caller may receive() later and would find a reply it no longer
-- expects. As in Erlang, the call's monitor ref doubles as a process alias
-- (mb.alias): the server sends the reply through it, and once the caller
-- drops the alias (on timeout, or when the reply came) the runtime discards
-- any message sent through it, even one already queued. The server's DOWN
-- ends the wait when it dies during the call.
--
-- Callback results are counted, as gen_server matches them: handle_call must
-- return at least (reply, state), handle_cast and handle_info at least
-- (state), init at least one value. Fewer is a bad return value: an error of
-- the callback, so a forgotten `return state` ends the server with a reason
-- that says so instead of silently making the state nil.
--
-- Ending. A server ends on a stop reason returned by a callback, on
-- server.stop, on an exit signal from its parent or, for a graceful server,
-- the host's stop (SIGTERM: an EXIT from itself) when it traps exits, or
-- when a callback raises or returns a bad value. In every case terminate
-- (reason, state) runs first, then the server exits with the reason. An end
-- whose reason is not "normal" or "shutdown" prints one report block to
-- stderr (pid, name, the last message handled, the state, the reason, and
-- the traceback of a crash), like gen_server's "** Generic server
-- terminating" report; a normal end prints nothing. A terminate that raises
-- is in the same report; after a stop, its error becomes the exit reason (so
-- the failure is not hidden behind "normal"), after a crash the crash stays
-- the reason.
--
-- Hibernation. A server started with opts.hibernate_after = ms hibernates
-- when no message came for ms, and one whose callback returns
-- server.hibernate in place of the stop reason hibernates when the callback
-- is done: mb.hibernate drops its Lua state and keeps only the
-- continuation, woken(ctx, state). ctx holds everything the loop needs (the
-- parent, the name for reports, the options, the callbacks table, or for a
-- callbacks module only its name) and state is the user's state. The next
-- message rebuilds a Lua state, where woken requires this module and goes
-- on in wake: it loads the callbacks module again and enters the loop,
-- which finds the message still queued and handles it as usual. Links,
-- monitors, the registered name, aliases, trap_exit, sockets and timers
-- belong to the process, not to its Lua state, so they stay. What does not
-- stay: the process's globals and a callbacks module's module-level
-- variables (the module is loaded afresh). A state that cannot be copied
-- (it holds a coroutine) cannot hibernate: the server reports it once and
-- goes on awake, trying again only after its next message (so a
-- hibernate_after of 0 cannot spin on it).
--
-- Most functions here run in other processes: spawn copies the server's
-- body, with every upvalue, into each new process.
-- So unlike other modules this one reads standard functions as globals
-- instead of caching them in locals at the top: each cached local would be
-- one more upvalue to encode and resolve again on every spawn.
local mb = require "moonbeam"

local server = {}

-- The default timeout of server.call and server.stop, in milliseconds.
local DEFAULT_TIMEOUT = 5000
-- How long to wait for the DOWN of a process that was killed. The kill
-- cannot be trapped, so this only guards against a runtime bug.
local KILL_WAIT = 5000
-- Limits of the value printer used in reports: characters and nesting.
local SHOW_MAX_CHARS = 400
local SHOW_MAX_DEPTH = 4

local CALLBACKS = { "init", "handle_call", "handle_cast", "handle_info", "terminate" }
-- What handle_cast and handle_info return (after the reply, handle_call too),
-- as the report of a bad return value says it.
local STATE_RETURNS = "state[, stop_reason or server.hibernate]"
local CALL_RETURNS = "reply, " .. STATE_RETURNS

-- handle_call may return server.noreply in place of a reply: the reply is
-- then sent later with server.reply(from, value). The marker is compared by
-- content, not identity, because callback tables (and their upvalues) are
-- copied into the server process.
server.noreply = { ["$moonbeam.server"] = "noreply" }

local function is_noreply(v)
  return type(v) == "table" and v["$moonbeam.server"] == "noreply"
end

-- A callback may return server.hibernate where a stop reason goes: the
-- server then hibernates once the callback is done (gen_server's
-- {noreply, State, hibernate}). Compared by content, like noreply.
server.hibernate = { ["$moonbeam.server"] = "hibernate" }

local function is_hibernate(v)
  return type(v) == "table" and v["$moonbeam.server"] == "hibernate"
end

-- -- Printing values in reports -------------------------------------------

-- A short, single-line rendering of any value; never fails, never long.
local function show(v)
  local out, n, budget = {}, 0, SHOW_MAX_CHARS
  local seen = {}
  local function put(s)
    if budget <= 0 then return end
    n = n + 1
    out[n] = s
    budget = budget - #s
  end
  local function walk(x, depth)
    local t = type(x)
    if t == "string" then
      put((string.format("%q", x):gsub("\\\n", "\\n")))
    elseif t == "table" and mb.is_tuple(x) then
      if depth >= SHOW_MAX_DEPTH then put("{...}") return end
      put("{")
      for i = 1, x.n do
        if budget <= 0 then break end
        if i > 1 then put(", ") end
        walk(x[i], depth + 1)
      end
      put("}")
    elseif t == "table" then
      local marker = x["$moonbeam.server"]
      if (marker == "noreply" or marker == "hibernate") and next(x, next(x)) == nil then
        put("server." .. marker) return
      end
      if seen[x] then put("<cycle>") return end
      if depth >= SHOW_MAX_DEPTH then put("{...}") return end
      seen[x] = true
      put("{")
      local len, first = #x, true
      for i = 1, len do
        if budget <= 0 then break end
        if not first then put(", ") end
        first = false
        walk(x[i], depth + 1)
      end
      for k, val in pairs(x) do
        if budget <= 0 then break end
        if not (type(k) == "number" and k >= 1 and k <= len and k % 1 == 0) then
          if not first then put(", ") end
          first = false
          if type(k) == "string" and k:match("^[%a_][%w_]*$") then
            put(k)
          else
            put("[") walk(k, depth + 1) put("]")
          end
          put(" = ")
          walk(val, depth + 1)
        end
      end
      put("}")
      seen[x] = nil
    else
      put(tostring(x))
    end
  end
  walk(v, 0)
  local s = table.concat(out)
  if budget <= 0 then s = s:sub(1, SHOW_MAX_CHARS) .. " ..." end
  return s
end

-- A callback's bad return value travels as an error of this shape, so that
-- it takes the crash path (terminate, report, exit) without a traceback,
-- which would only show this module. Compared by content, like noreply.
local function is_bad_return(e)
  return type(e) == "table" and e["$moonbeam.server"] == "bad_return"
end

-- The error handler of every callback: keeps the error value and the
-- traceback of the place that raised it, without the frames of this module
-- that called the callback (the server loop), which say nothing to the user.
local function catch(e)
  if is_bad_return(e) then return { err = e.reason, expected = e.expected } end
  local lines = {}
  for line in debug.traceback("", 2):sub(2):gmatch("[^\n]+") do
    if line:find("^%s*%[C%]: in function 'xpcall'") then
      if lines[#lines]:find("moonbeam/server.lua:", 1, true) then lines[#lines] = nil end
      break
    end
    lines[#lines + 1] = line
  end
  return { err = e, traceback = table.concat(lines, "\n") }
end

local function bad_return(name, what, expected, why)
  error({
    ["$moonbeam.server"] = "bad_return",
    reason = "bad return value from " .. name .. ": " .. what,
    expected = name .. " must return " .. expected .. " (" .. why .. ")",
  }, 0)
end

-- Passes on the results of callback `name` if there are at least `min` of
-- them, else raises its bad return value: the reason is
-- "bad return value from <name>: <what it returned>", where what it returned
-- is "nothing" or the one value it returned, as show() prints it. The
-- server.hibernate marker among the first `min` (a reply or a state) is a
-- bad return value too: `return server.hibernate` for `return state,
-- server.hibernate` would otherwise make the marker the state.
local function returned(name, min, expected, ...)
  local n = select("#", ...)
  if n < min then
    bad_return(name, n == 0 and "nothing" or show((...)), expected,
               "it returned " .. (n == 0 and "no value" or n == 1 and "1 value" or n .. " values"))
  end
  local first, second = ...
  local misplaced = is_hibernate(first) and (min == 2 and "reply" or "state")
                    or min == 2 and is_hibernate(second) and "state"
  if misplaced then
    bad_return(name, "server.hibernate", expected, "server.hibernate in place of the " .. misplaced)
  end
  return ...
end

-- An error value or exit reason as text, the way the runtime's crash
-- reports print it.
local function reason_text(e)
  if type(e) == "string" then return e end
  return show(e)
end

-- Writes one report block to stderr in a single write, in the format of the
-- runtime's crash reports: "=SERVER REPORT==== <pid> registered as name".
local function report(ctx, lines)
  local buf = { "=SERVER REPORT==== " .. ctx.head }
  for i = 1, #lines do buf[#buf + 1] = lines[i] end
  io.stderr:write(table.concat(buf, "\n") .. "\n")
end

-- -- Argument checks ------------------------------------------------------

local is_ref = mb.is_ref

-- This host's node name: set before any process runs, never changed.
local NODE = mb.node()

-- A destination on another node: a pid of another node, or {name, node}
-- with a node that is not ours. Returns it, or nil.
local function remote(dest)
  if mb.is_pid(dest) then
    if mb.node(dest) ~= NODE then return dest end
  elseif type(dest) == "table" and dest[1] ~= nil and dest[2] ~= nil
         and tostring(dest[2]) ~= NODE then
    return dest
  end
end

-- The pid registered as name, or nil; a string that cannot be a name (empty,
-- over 255 bytes, with a NUL: mb.whereis raises for it) names no process.
local function lookup(name)
  local ok, pid = pcall(mb.whereis, name)
  return ok and pid or nil
end

-- Returns the pid that dest names, or raises an error that names fname,
-- at `level` (default 3: the caller of the function that called resolve).
-- {name, node} with our own node is the name.
local function resolve(dest, fname, level)
  level = level or 3
  if type(dest) == "table" and dest[1] ~= nil and tostring(dest[2]) == NODE then
    dest = tostring(dest[1])
  end
  if type(dest) == "string" then
    local pid = lookup(dest)
    if pid == nil then
      error(fname .. ": no process registered as '" .. dest .. "'", level)
    end
    return pid
  elseif mb.is_pid(dest) then
    return dest
  end
  error(fname .. ": bad destination (pid, registered name or {name, node} expected, got "
        .. type(dest) .. ")", level)
end

local function check_timeout(timeout, default, fname, level)
  if timeout == nil then return default end
  if type(timeout) ~= "number" or timeout < 0 or timeout ~= timeout then
    error(fname .. ": bad timeout (non-negative number of ms or math.huge expected, got "
          .. show(timeout) .. ")", level or 3)
  end
  return timeout
end

-- Checks a table of callbacks; returns it, or nil and what is wrong.
local function check_callbacks(cb, where)
  for i = 1, #CALLBACKS do
    local f = cb[CALLBACKS[i]]
    if f ~= nil and type(f) ~= "function" then
      return nil, where .. "." .. CALLBACKS[i] .. " must be a function, got " .. type(f)
    end
  end
  return cb
end

-- -- The server process ---------------------------------------------------

-- The `from` of a call or a system request: whom to answer, through which
-- alias.
local function is_from(from)
  return type(from) == "table" and mb.is_pid(from.pid)
         and (is_ref(from.ref) or (from.ref == nil and from.tag ~= nil))
end

-- The `from` of a call or a system request (see DESIGN).
local function from_of(msg)
  if msg.erlang then return { pid = msg[1], tag = msg[2] } end
  return { pid = msg[1], ref = msg[2] }
end

-- What is wrong with a message of the server protocol, or nil when it is
-- well formed or not one of ours (a message for handle_info).
local function malformed(msg)
  local tag = msg.tag
  if tag == "$call" or tag == "$system" then
    if not (mb.is_pid(msg[1]) and (is_ref(msg[2]) or msg.erlang and msg[2] ~= nil)) then
      return "bad caller: {tag = tag, pid, ref, request} or an Erlang {From, Tag} expected"
    end
    if msg[3] == nil then return "no request" end
  elseif tag == "$cast" then
    if msg[1] == nil then return "no message" end
  elseif tag == "$stop" then
    if msg[1] == nil then return "no reason" end
  end
end

local function is_normal(reason)
  return reason == "normal" or reason == "shutdown"
end

local function describe(msg)
  if type(msg) == "table" then
    if msg.tag == "$call" then return "call " .. show(msg[3]) .. " from " .. tostring(msg[1]) end
    if msg.tag == "$cast" then return "cast " .. show(msg[1]) end
    if msg.tag == "$stop" then return "stop " .. show(msg[1]) end
  end
  if msg == nil then return "none (crashed before the first message)" end
  return "info " .. show(msg)
end

-- The alias in an Erlang caller's tag: [alias | Ref] or [[alias | Ref] | _]
-- (gen.erl's tags for call and send_request), else nil.
local function tag_alias(tag)
  if type(tag) ~= "table" then return nil end
  if mb.is_atom(tag[1]) and tostring(tag[1]) == "alias" and is_ref(tag["$tail"]) then
    return tag["$tail"]
  end
  local inner = tag[1]
  if type(inner) == "table" and mb.is_atom(inner[1]) and tostring(inner[1]) == "alias"
     and is_ref(inner["$tail"]) then
    return inner["$tail"]
  end
end

local function send_reply(from, value, err)
  if from.tag ~= nil then
    -- An Erlang caller (gen.erl's reply): {Tag, Reply}, through its alias.
    if err ~= nil then value = mb.tuple(mb.atom("error"), err) end
    mb.send(from.pid, mb.tuple(from.tag, value), tag_alias(from.tag))
    return
  end
  mb.send(from.pid, { from.ref, value, err }, from.ref)
end

-- An Erlang-protocol message in the Lua protocol's shape (see DESIGN), or
-- msg itself. A garbled one becomes a call with a bad `from` (dropped and
-- reported by the loop, as a garbled Lua one).
local function from_erlang(msg)
  if not mb.is_tuple(msg) or not mb.is_atom(msg[1]) then return msg end
  local kind = tostring(msg[1])
  if kind == "$gen_cast" and msg.n == 2 then
    return { tag = "$cast", msg[2] }
  elseif (kind == "$gen_call" or kind == "system") and msg.n == 3 then
    local f, tag = msg[2], nil
    if mb.is_tuple(f) and f.n == 2 then f, tag = f[1], f[2] end
    if kind == "$gen_call" then return { tag = "$call", f, tag, msg[3], erlang = true } end
    local req = msg[3]
    if mb.is_atom(req) and tostring(req) == "get_state" then req = "get_state" end
    return { tag = "$system", f, tag, req, erlang = true }
  end
  return msg
end

-- Answers a "$system" request in the loop itself: no callback runs, so it
-- works whatever state the callbacks are in.
-- Returns a stop reason for {terminate, Reason} (sys:terminate), which is
-- answered ok before the server ends, as OTP's sys does. An atom reason is
-- a string here, as exit reasons that cross nodes are.
local function system(ctx, msg)
  local value, err
  local from, req = from_of(msg), msg[3]
  if mb.is_tuple(req) and req.n == 2 and mb.is_atom(req[1]) and tostring(req[1]) == "terminate" then
    pcall(send_reply, from, mb.atom("ok"))
    local reason = req[2]
    if mb.is_atom(reason) then reason = tostring(reason) end
    return reason == nil and "normal" or reason
  elseif req == "get_state" then
    value = ctx.state
  else
    err = "unknown system request " .. show(req)
  end
  local ok, e = pcall(send_reply, from, value, err)
  if not ok then
    -- The state holds something that cannot be copied (a coroutine, say).
    send_reply(from, nil, "the state cannot be sent: " .. tostring(e))
  end
end

-- What a callback's last value asks for: a stop reason (returned), or
-- server.hibernate (ctx.hibernate_now, for the loop), or nothing.
local function after(ctx, stop)
  if is_hibernate(stop) then
    ctx.hibernate_now = true
    return nil
  end
  return stop
end

-- Handles one message; runs under xpcall. Returns a stop reason or nil.
local function handle(ctx, msg)
  local cb = ctx.cb
  if type(msg) == "table" then
    local tag = msg.tag
    if tag == "$call" then
      if cb.handle_call == nil then
        error("server has no handle_call callback (request " .. show(msg[3]) .. ")", 0)
      end
      local from = from_of(msg)
      local reply, state, stop = returned("handle_call", 2, CALL_RETURNS,
                                          cb.handle_call(msg[3], from, ctx.state))
      ctx.state = state
      if not is_noreply(reply) then send_reply(from, reply) end
      return after(ctx, stop)
    elseif tag == "$cast" then
      if cb.handle_cast == nil then
        error("server has no handle_cast callback (message " .. show(msg[1]) .. ")", 0)
      end
      local state, stop = returned("handle_cast", 1, STATE_RETURNS,
                                   cb.handle_cast(msg[1], ctx.state))
      ctx.state = state
      return after(ctx, stop)
    elseif tag == "$stop" then
      return msg[1]
    elseif msg.event == "EXIT" and (msg.pid == ctx.parent
                                     or msg.pid == ctx.self and mb.stopping()) then
      -- Only seen when the server traps exits: its parent (a supervisor),
      -- or the host's stop (SIGTERM: an EXIT from itself, see mb.stopping),
      -- asks it to stop, so it runs terminate like Erlang's gen_server.
      return msg.reason
    end
  end
  if cb.handle_info == nil then
    report(ctx, { ctx.origin, "unexpected message dropped (no handle_info): " .. show(msg) })
    return nil
  end
  local state, stop = returned("handle_info", 1, STATE_RETURNS,
                               cb.handle_info(msg, ctx.state))
  ctx.state = state
  return after(ctx, stop)
end

-- Ends the server: runs terminate(reason, state), prints the report of an
-- abnormal end, and exits. `caught` is what catch made of the callback's
-- error or bad return value when that is why the server ends (reason is
-- then its error), nil for a stop.
local function finish(ctx, reason, caught)
  local state = show(ctx.state)   -- as it was when the server ended
  local failed
  if ctx.cb.terminate then
    local ok, t = xpcall(ctx.cb.terminate, catch, reason, ctx.state)
    if not ok then failed = t end
  end
  -- A stop whose terminate raises ends with terminate's error, so that the
  -- failure is not hidden behind "normal"; a crash stays the reason.
  local exit_reason = reason
  if failed and not caught then exit_reason = failed.err end
  if failed or not is_normal(exit_reason) then
    local lines = { ctx.origin, "last message: " .. describe(ctx.last), "state: " .. state }
    if caught then
      lines[#lines + 1] = "reason: " .. reason_text(reason)
      lines[#lines + 1] = caught.expected or caught.traceback
      if failed then
        lines[#lines + 1] = "terminate failed too: " .. reason_text(failed.err)
        lines[#lines + 1] = failed.traceback
      end
    elseif failed then
      lines[#lines + 1] = "reason: " .. reason_text(failed.err)
      lines[#lines + 1] = "terminate failed while stopping with reason " .. show(reason)
      lines[#lines + 1] = failed.traceback
    else
      lines[#lines + 1] = "reason: " .. reason_text(reason)
    end
    report(ctx, lines)
  end
  return mb.exit(exit_reason)
end

-- -- Hibernation (see DESIGN) ---------------------------------------------

-- Loads a callbacks module: returns its table, or nil and what is wrong.
local function load_callbacks(name)
  local ok, m = pcall(require, name)
  if not ok then
    return nil, "cannot load callbacks module '" .. name .. "': " .. tostring(m)
  elseif type(m) ~= "table" then
    return nil, "callbacks module '" .. name .. "' returned " .. type(m)
                .. ", not a table of functions"
  end
  return check_callbacks(m, "callbacks module '" .. name .. "': field")
end

local loop

-- Where a hibernated server goes on, in its new Lua state (through woken,
-- below). The message that woke it is still queued for the loop.
local function wake(ctx, state)
  ctx.state = state
  if ctx.module then
    -- The module is loaded again, as the new state has none loaded.
    local cb, err = load_callbacks(ctx.module)
    if not cb then
      report(ctx, { ctx.origin, "cannot wake from hibernation: " .. err, "state: " .. show(state) })
      return mb.exit(err)
    end
    ctx.cb = cb
  end
  return loop(ctx)
end

-- The continuation itself: a function with no upvalues, which loads this
-- module in the new state and goes on in its wake. Hibernating into wake
-- directly would copy every function it reaches (the loop, the handlers,
-- the report printer: some 25 functions) into each hibernated server,
-- twice the memory, and re-intern their bytecode at every hibernation; a
-- require from the host's module cache costs about as much as decoding them.
local function woken(ctx, state)
  return require("moonbeam.server")["$wake"](ctx, state)
end

-- mb.hibernate's error for a value it cannot copy, in the server's words:
-- arg 1 is ctx, arg 2 the state.
local function uncopyable(err)
  err = tostring(err):gsub("^hibernate: ", "")
  local n = 0
  err, n = err:gsub("^arg 2", "state", 1)
  if n == 0 then err = err:gsub("^arg 1%.cb", "callbacks", 1) end
  return err
end

-- Hibernates the server: never returns, unless the continuation cannot be
-- copied (the state holds a coroutine, say). Then it reports why, once for
-- the same reason, and returns: the server goes on awake, and the loop
-- does not try again before the next message.
local function hibernate(ctx)
  local state, cb, last, failed = ctx.state, ctx.cb, ctx.last, ctx.hibernate_failed
  -- The last message only serves reports of the message being handled;
  -- the callbacks of a module are loaded again on wake.
  ctx.state, ctx.last, ctx.hibernate_failed = nil, nil, nil
  if ctx.module then ctx.cb = nil end
  local _, err = pcall(mb.hibernate, woken, ctx, state)
  ctx.state, ctx.cb, ctx.last = state, cb, last
  ctx.stay_awake = true
  err = uncopyable(err)
  if err ~= failed then
    report(ctx, { ctx.origin, "cannot hibernate, going on awake: " .. err })
  end
  ctx.hibernate_failed = err
end

loop = function(ctx)
  while true do
    local msg
    if ctx.hibernate_after and not ctx.stay_awake then
      msg = mb.receive(ctx.hibernate_after)
      if msg == nil then
        hibernate(ctx)   -- returns only if it could not
        msg = mb.receive()
      end
    else
      msg = mb.receive()
    end
    ctx.stay_awake = nil
    if type(msg) ~= "table" or msg.tag == nil then msg = from_erlang(msg) end
    local bad = type(msg) == "table" and malformed(msg)
    if bad then
      report(ctx, { ctx.origin, "dropped a malformed " .. msg.tag .. " message (" .. bad .. "): "
                                .. show(msg) })
    elseif type(msg) == "table" and msg.tag == "$system" then
      local stop = system(ctx, msg)
      if stop ~= nil then
        ctx.last = msg
        return finish(ctx, stop)
      end
    else
      ctx.last = msg
      local ok, r = xpcall(handle, catch, ctx, msg)
      if not ok then return finish(ctx, r.err, r) end
      if r ~= nil then return finish(ctx, r) end
      if ctx.hibernate_now then
        ctx.hibernate_now = nil
        hibernate(ctx)
      end
    end
  end
end

-- Tells the starter that init failed and ends without an exit signal: the
-- starter gets the error as start's return value instead.
local function init_failed(parent, err)
  mb.unlink(parent)
  mb.send(parent, { tag = "$started", pid = mb.self(), err = err })
end

-- Where a server's code comes from, for reports: the module name, or where
-- the table's functions are defined.
local function origin(callbacks)
  if type(callbacks) == "string" then return "module '" .. callbacks .. "'" end
  for i = 1, #CALLBACKS do
    local f = callbacks[CALLBACKS[i]]
    if type(f) == "function" then
      local info = debug.getinfo(f, "S")
      return "table (" .. CALLBACKS[i] .. " at " .. info.short_src .. ":" .. info.linedefined .. ")"
    end
  end
  return "table (no callbacks)"
end

local function run_init(cb, arg)
  return returned("init", 1, "a state[, server.hibernate], or nil and an error", cb.init(arg))
end

-- The body of a server process.
local function server_main(parent, callbacks, arg, name, hibernate_after)
  local self = mb.self()
  local ctx = {
    parent = parent,
    self = self,
    hibernate_after = hibernate_after,
    head = tostring(self) .. (name and (" registered as " .. name) or ""),
    origin = "server callbacks: " .. origin(callbacks),
  }
  local cb = callbacks
  if type(callbacks) == "string" then
    local bad
    cb, bad = load_callbacks(callbacks)
    if not cb then return init_failed(parent, bad) end
    ctx.module = callbacks
  end
  if name ~= nil then
    local ok, err = pcall(mb.register, name)
    if not ok then
      local owner = mb.whereis(name)
      return init_failed(parent, "name '" .. name .. "' is already registered"
                         .. (owner and (" to " .. tostring(owner)) or "")
                         .. " (" .. tostring(err) .. ")")
    end
  end
  ctx.cb = cb
  if cb.init ~= nil then
    local ok, state, err = xpcall(run_init, catch, cb, arg)
    if not ok then
      local caught = state
      report(ctx, {
        ctx.origin,
        (caught.expected and "init returned a bad value" or "init crashed")
          .. "; argument: " .. show(arg),
        "reason: " .. reason_text(caught.err),
        caught.expected or caught.traceback,
      })
      if caught.expected then return init_failed(parent, caught.err) end
      return init_failed(parent, "init failed: " .. tostring(caught.err))
    elseif state == nil and err ~= nil and not is_hibernate(err) then
      return init_failed(parent, err)
    end
    ctx.state = state
    ctx.hibernate_now = is_hibernate(err) or nil
  else
    ctx.state = arg
  end
  mb.send(parent, { tag = "$started", pid = self })
  if ctx.hibernate_now then
    ctx.hibernate_now = nil
    hibernate(ctx)
  end
  return loop(ctx)
end

-- -- Starting -------------------------------------------------------------

-- Receives the first message that match accepts; waits at most timeout ms
-- (nil or math.huge: no limit). ref, if given: match takes no message queued
-- before ref was made (mb.receive skips those).
local function receive(match, timeout, ref)
  if timeout == math.huge then timeout = nil end
  return mb.receive(match, timeout, ref)
end

local function flush(match)
  while mb.receive(match, 0) ~= nil do end
end

local function exit_from(pid)
  return function(m) return type(m) == "table" and m.event == "EXIT" and m.pid == pid end
end

local function down_of(ref)
  return function(m) return type(m) == "table" and m.event == "DOWN" and m.ref == ref end
end

-- server.start(callbacks, arg[, opts]) -> pid | nil, err
function server.start(callbacks, arg, opts)
  local tc = type(callbacks)
  if tc == "table" then
    local ok, err = check_callbacks(callbacks, "callbacks")
    if not ok then error("server.start: " .. err, 2) end
  elseif tc ~= "string" then
    error("server.start: callbacks must be a module name or a table of functions, got " .. tc, 2)
  end
  opts = opts or {}
  if type(opts) ~= "table" then error("server.start: opts must be a table, got " .. type(opts), 2) end
  local name = opts.name
  -- (mb.whereis raises for a string that cannot be a name: the host's rule.)
  if name ~= nil and (type(name) ~= "string" or not pcall(mb.whereis, name)) then
    error("server.start: opts.name must be a string of 1 to 255 bytes without NUL, got "
          .. (type(name) == "string" and #name .. " bytes" or type(name)), 2)
  end
  if opts.link ~= nil and type(opts.link) ~= "boolean" then
    error("server.start: opts.link must be a boolean, got " .. type(opts.link), 2)
  end
  local timeout = check_timeout(opts.timeout, DEFAULT_TIMEOUT, "server.start")
  local hibernate_after = opts.hibernate_after
  if hibernate_after == false or hibernate_after == math.huge then
    hibernate_after = nil
  elseif hibernate_after ~= nil and (type(hibernate_after) ~= "number" or hibernate_after < 0
                                     or hibernate_after ~= hibernate_after) then
    error("server.start: opts.hibernate_after must be a non-negative number of ms (or false), got "
          .. show(hibernate_after), 2)
  end
  if name ~= nil then
    local owner = mb.whereis(name)
    if owner ~= nil then
      return nil, "name '" .. name .. "' is already registered to " .. tostring(owner)
    end
  end

  if opts.graceful ~= nil and type(opts.graceful) ~= "boolean" then
    error("server.start: opts.graceful must be a boolean, got " .. type(opts.graceful), 2)
  end
  local spawn_opts = { link = opts.link or nil, monitor = true, max_memory = opts.max_memory,
                       graceful = opts.graceful or nil }
  local ok, pid, ref = pcall(mb.spawn_opt, spawn_opts, server_main, mb.self(), callbacks, arg, name,
                             hibernate_after)
  if not ok then error("server.start: " .. tostring(pid), 2) end

  local msg = receive(function(m)
    return type(m) == "table" and ((m.tag == "$started" and m.pid == pid)
                                   or (m.event == "DOWN" and m.ref == ref))
  end, timeout, ref)
  if msg ~= nil and msg.tag == "$started" and msg.err == nil then
    mb.demonitor(ref)
    flush(down_of(ref))
    return pid
  end

  -- Failure: make sure the process is gone before returning, and that no
  -- exit signal or message about it is left for the caller.
  local err
  if msg == nil then
    err = "init did not finish within " .. timeout .. " ms"
    mb.unlink(pid)
    mb.exit(pid, "kill")
  elseif msg.event == "DOWN" then
    err = "server exited during init: " .. reason_text(msg.reason)
  else
    err = msg.err
    mb.unlink(pid)
  end
  if msg == nil or msg.event ~= "DOWN" then
    if receive(down_of(ref), KILL_WAIT, ref) == nil then
      mb.exit(pid, "kill")
      mb.demonitor(ref)
    end
  end
  flush(down_of(ref))
  flush(exit_from(pid))
  flush(function(m) return type(m) == "table" and m.tag == "$started" and m.pid == pid end)
  return nil, err
end

-- -- Calling --------------------------------------------------------------

local function call_failed(fname, pid, req, reason)
  if reason == "noproc" then
    return fname .. ": server " .. tostring(pid) .. " is not running (noproc)"
  end
  return fname .. ": server " .. tostring(pid) .. " exited during the call "
         .. show(req) .. ": " .. reason_text(reason)
end

-- What gen.erl's call does, to a server on another node (see DESIGN):
-- label is "$gen_call" or "system". Returns {ref, reply}, as request does,
-- or raises.
local function gen_request(fname, dest, label, req, timeout)
  local me = mb.self()
  local ok, ref = pcall(mb.monitor, dest)
  if not ok then error(fname .. ": " .. tostring(ref), 4) end
  mb.alias(ref)
  local tag = { mb.atom("alias"), ["$tail"] = ref }
  local sent, err = pcall(mb.send, dest, mb.tuple(mb.atom(label), mb.tuple(me, tag), req))
  if not sent then
    mb.unalias(ref)
    mb.demonitor(ref, true)
    error(fname .. ": cannot send the request: " .. tostring(err), 4)
  end
  local m = mb.receive(function(m)
    if type(m) ~= "table" then return false end
    if mb.is_tuple(m) then
      return m.n == 2 and type(m[1]) == "table" and m[1]["$tail"] == ref
    end
    return m.event == "DOWN" and m.ref == ref
  end, timeout ~= math.huge and timeout or nil, ref)
  mb.unalias(ref)
  mb.demonitor(ref, true)
  local what = type(dest) == "table" and not mb.is_pid(dest)
               and ("{" .. tostring(dest[1]) .. ", " .. tostring(dest[2]) .. "}") or tostring(dest)
  if m == nil then
    error(fname .. ": timeout after " .. timeout .. " ms waiting for " .. what
          .. " to answer " .. show(req), 4)
  end
  if m.event == "DOWN" then
    if m.reason == "noconnection" then
      error(fname .. ": server " .. what .. ": its node is down (nodedown)", 4)
    end
    error(call_failed(fname, what, req, m.reason), 4)
  end
  return { ref, m[2] }
end

-- Sends {tag = tag, me, r, req} to the server dest names and waits for its
-- reply: the reply message, {r, value[, err]}, or raises an error starting
-- with fname (at the level of fname's caller).
local function request(fname, dest, tag, req, timeout)
  if remote(dest) then
    if req == nil then error(fname .. ": request is nil", 3) end
    timeout = check_timeout(timeout, DEFAULT_TIMEOUT, fname, 4)
    return gen_request(fname, dest, tag == "$call" and "$gen_call" or "system",
                       tag == "$system" and mb.atom(req) or req, timeout)
  end
  local pid = resolve(dest, fname, 4)
  if req == nil then error(fname .. ": request is nil", 3) end
  timeout = check_timeout(timeout, DEFAULT_TIMEOUT, fname, 4)
  local me = mb.self()
  if pid == me then error(fname .. ": a process cannot call itself (deadlock)", 3) end

  local ref = mb.monitor(pid)
  mb.alias(ref)
  local ok, err = pcall(mb.send, pid, { tag = tag, me, ref, req })
  if not ok then
    mb.unalias(ref)
    mb.demonitor(ref, true)
    error(fname .. ": cannot send the request: " .. tostring(err), 3)
  end
  local m = mb.receive(function(m)
    return type(m) == "table" and (m[1] == ref or m.ref == ref and m.event == "DOWN")
  end, timeout ~= math.huge and timeout or nil, ref)
  mb.unalias(ref)
  mb.demonitor(ref, true)
  if m == nil then
    error(fname .. ": timeout after " .. timeout .. " ms waiting for "
          .. tostring(dest) .. (dest ~= pid and (" (" .. tostring(pid) .. ")") or "")
          .. " to answer " .. show(req), 3)
  end
  if m[1] ~= ref then error(call_failed(fname, pid, req, m.reason), 3) end
  return m
end

-- server.call(dest, req[, timeout_ms]) -> reply
function server.call(dest, req, timeout)
  return request("server.call", dest, "$call", req, timeout)[2]
end

-- server.get_state(dest[, timeout_ms]) -> state
-- Like Erlang's sys:get_state: a system request, answered by the server's
-- loop between two messages without running a callback.
function server.get_state(dest, timeout)
  local m = request("server.get_state", dest, "$system", "get_state", timeout)
  if m[3] ~= nil then error("server.get_state: " .. tostring(m[3]), 2) end
  return m[2]
end

-- server.reply(from, value): answers a call whose handle_call returned
-- server.noreply. from is the value handle_call was given.
function server.reply(from, value)
  if not is_from(from) then
    error("server.reply: bad 'from' (the from argument of handle_call expected, got "
          .. show(from) .. ")", 2)
  end
  local ok, err = pcall(send_reply, from, value)
  if not ok then error("server.reply: " .. tostring(err), 2) end
  return true
end

-- server.cast(dest, msg) -> true | nil, err
-- Like Erlang's cast, never fails because of the server: a dead pid drops
-- the message; an unregistered name returns nil, err.
function server.cast(dest, msg)
  if msg == nil then error("server.cast: message is nil", 2) end
  if remote(dest) then
    local ok, err = pcall(mb.send, dest, mb.tuple(mb.atom("$gen_cast"), msg))
    if not ok then error("server.cast: " .. tostring(err), 2) end
    return true
  end
  local pid
  if type(dest) == "string" then
    pid = lookup(dest)
    if pid == nil then return nil, "no process registered as '" .. dest .. "'" end
  else
    pid = resolve(dest, "server.cast")
  end
  local ok, err = pcall(mb.send, pid, { tag = "$cast", msg })
  if not ok then error("server.cast: " .. tostring(err), 2) end
  return true
end

-- server.stop on another node: sys:terminate's message {system, {From,
-- Tag}, {terminate, Reason}}, which gets no reply; the DOWN tells the end.
local function remote_stop(dest, reason, timeout)
  if reason == nil then reason = "normal" end
  timeout = check_timeout(timeout, DEFAULT_TIMEOUT, "server.stop", 4)
  local ok, ref = pcall(mb.monitor, dest)
  if not ok then error("server.stop: " .. tostring(ref), 3) end
  local req = mb.tuple(mb.atom("terminate"), type(reason) == "string" and mb.atom(reason) or reason)
  local sent, err = pcall(mb.send, dest, mb.tuple(mb.atom("system"),
                                                  mb.tuple(mb.self(), ref), req))
  if not sent then
    mb.demonitor(ref, true)
    error("server.stop: " .. tostring(err), 3)
  end
  local m = receive(down_of(ref), timeout, ref)
  if m == nil then
    mb.demonitor(ref, true)
    error("server.stop: " .. tostring(dest[1] or dest) .. " did not stop within " .. timeout .. " ms", 3)
  end
  if m.reason == "noproc" or m.reason == "noconnection" then
    error("server.stop: server is not running (" .. m.reason .. ")", 3)
  end
  return true
end

-- server.stop(dest[, reason[, timeout_ms]]) -> true
-- Asks the server to run terminate(reason, state) and exit with reason
-- (default "normal"), and waits until it has exited.
function server.stop(dest, reason, timeout)
  if remote(dest) then return remote_stop(dest, reason, timeout) end
  local pid = resolve(dest, "server.stop")
  if reason == nil then reason = "normal" end
  timeout = check_timeout(timeout, DEFAULT_TIMEOUT, "server.stop")
  if pid == mb.self() then error("server.stop: a server cannot stop itself this way; return a stop reason from a callback", 2) end
  local ref = mb.monitor(pid)
  local ok, err = pcall(mb.send, pid, { tag = "$stop", reason })
  if not ok then
    mb.demonitor(ref)
    flush(down_of(ref))
    error("server.stop: " .. tostring(err), 2)
  end
  local m = receive(down_of(ref), timeout, ref)
  if m == nil then
    mb.demonitor(ref)
    flush(down_of(ref))
    error("server.stop: " .. tostring(dest) .. " did not stop within " .. timeout .. " ms", 2)
  end
  if m.reason == "noproc" then
    error("server.stop: server " .. tostring(pid) .. " is not running (noproc)", 2)
  end
  if type(reason) ~= "table" and m.reason ~= reason then
    error("server.stop: server " .. tostring(pid) .. " exited with reason "
          .. show(m.reason) .. " instead of " .. show(reason), 2)
  end
  return true
end

-- For moonbeam.supervisor and for reports of user code: the printer used in
-- crash reports (one line, bounded length).
server.show = show

-- For hibernated servers only (see woken).
server["$wake"] = wake

return server
