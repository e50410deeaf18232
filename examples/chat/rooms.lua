-- examples/chat/rooms.lua: the rooms of the chat and the registry that finds
-- or creates them.
--
-- DESIGN
-- A room is one process. It monitors its members, so a member that leaves,
-- disconnects or crashes is removed and the others see "* <nick> left <room>".
-- Members talk to their room with plain messages (all tables with an `op`):
--
--   to a room:      {op = "join", pid = p, nick = n, tag = t}   (sent by the registry)
--                   {op = "leave", pid = p}
--                   {op = "say", pid = p, text = s}
--                   {op = "nick", pid = p, nick = n}
--                   {op = "who", pid = p}
--                   {op = "members", from = p, tag = t}  -> {members = t, list = {{nick =, pid =}...}}
--   to a member:    {joined = tag, room = pid, name = room name}
--                   "text to show"   (a plain string: the cheapest message
--                                     to copy, and lines are most of them)
--
-- The registry is one process that maps room names to room processes. Every
-- join goes through it (it forwards the join to the room), so two users who
-- create the same room at once get the same room: the registry handles one
-- message at a time. An empty room asks the registry to be stopped, quoting
-- how many joins it has received; the registry stops it only if it forwarded
-- no join since, so a join on its way never reaches a room that is gone.
-- Rooms are linked to the registry: when the registry ends, its rooms end too.
--
--   to the registry: {op = "guest", pid = p}            -> {guest = n}  (a fresh guest number)
--                    {op = "join", room = name, pid = p, nick = n, tag = t}
--                    {op = "members", room = name, from = p, tag = t}   (answered by the room;
--                                                      an unknown room answers {members = t, list = {}})
--                    {op = "rooms", from = p, tag = t}  -> {rooms = t, list = {names...}}
--                    {op = "room", room = name, from = p, tag = t} -> {room = t, pid = room or false}
--                    {op = "idle", room = pid, joins = n}            (from an empty room)
--
-- An idle room hibernates: after `hibernate_after` ms without a message
-- (chat.start's option) it drops its Lua state and keeps only its table
-- (name, members, monitor refs, join count), copied; its next message
-- rebuilds a state and room_loop goes on with that table. The monitors
-- belong to the process, so a member that ends while the room hibernates
-- still sends it a DOWN, which wakes it. The registry is one process and
-- always busy when anybody joins: it does not hibernate.
--
-- A room never waits on its members: it sends with mb.send, which only
-- queues, and a member that does not keep up drops itself (user.lua). Nor
-- may a stray message end a room or the registry, which everybody shares:
-- messages of the wrong shape are ignored.
--
-- Spawned functions here capture only `mb` and plain local functions: a
-- captured module table of this example would be required again in the new
-- process, where examples/chat is not on package.path.
local mb = require "moonbeam"

local rooms = {}

-- Send `line` to every member but `except`.
local function broadcast(list, line, except)
  for i = 1, #list do
    local p = list[i]
    if p ~= except then mb.send(p, line) end
  end
end

-- Removes member pid from room r, telling the others.
local function remove(r, pid)
  local m = r.members[pid]
  if not m then return end
  r.members[pid] = nil
  local order = r.order
  for i = 1, #order do
    if order[i] == pid then table.remove(order, i) break end
  end
  broadcast(order, "* " .. m.nick .. " left " .. r.name)
  if #order == 0 then mb.send(r.registry, { op = "idle", room = mb.self(), joins = r.joins }) end
end

-- A room's loop over its table r (see room_main); also where a hibernated
-- room wakes.
local function room_loop(r)
  local name, members, order = r.name, r.members, r.order
  while true do
    local msg
    if r.hibernate_after then
      msg = mb.receive(r.hibernate_after)
      -- r holds only strings, numbers, pids and refs: it can be copied.
      if msg == nil then mb.hibernate(room_loop, r) end
    else
      msg = mb.receive()
    end
    if type(msg) ~= "table" then msg = {} end   -- not ours: ignore it
    local op = msg.op
    if op == "say" then
      local m = members[msg.pid]
      if m and type(msg.text) == "string" then
        broadcast(order, "[" .. name .. "] " .. m.nick .. ": " .. msg.text, msg.pid)
      end
    elseif op == "join" and not (mb.is_pid(msg.pid) and type(msg.nick) == "string") then
      -- Garbled: ignore it (a real join always has both).
    elseif op == "join" then
      r.joins = r.joins + 1
      local pid = msg.pid
      if members[pid] then
        members[pid].nick = msg.nick
      else
        members[pid] = { nick = msg.nick, ref = mb.monitor(pid) }
        order[#order + 1] = pid
        broadcast(order, "* " .. msg.nick .. " joined " .. name, pid)
      end
      mb.send(pid, { joined = msg.tag, room = mb.self(), name = name })
    elseif op == "leave" then
      local m = members[msg.pid]
      if m then
        mb.demonitor(m.ref, true)
        remove(r, msg.pid)
      end
    elseif msg.event == "DOWN" then
      local m = members[msg.pid]
      if m and m.ref == msg.ref then remove(r, msg.pid) end
    elseif op == "nick" then
      local m = members[msg.pid]
      if m and type(msg.nick) == "string" then m.nick = msg.nick end
    elseif op == "who" and mb.is_pid(msg.pid) then
      local nicks = {}
      for i = 1, #order do nicks[i] = members[order[i]].nick end
      mb.send(msg.pid, "* in " .. name .. ": " .. table.concat(nicks, ", "))
    elseif op == "members" and mb.is_pid(msg.from) then
      local list = {}
      for i = 1, #order do list[i] = { nick = members[order[i]].nick, pid = order[i] } end
      mb.send(msg.from, { members = msg.tag, list = list })
    elseif op == "stop" then
      -- Only sent by the registry, and only while the room is empty.
      return
    end
  end
end

-- The body of a room process; hibernate_after: ms, or nil for never.
local function room_main(name, registry, hibernate_after)
  return room_loop({
    name = name, registry = registry, hibernate_after = hibernate_after,
    members = {},   -- pid -> {nick = n, ref = monitor ref}
    order = {},     -- member pids in join order (for /who and broadcasts)
    joins = 0,      -- joins received, compared by the registry before a stop
  })
end

-- The body of the registry process. It traps exits: a room that crashes is
-- forgotten (its members see it go through their monitors), and when the
-- registry's parent (the chat's supervisor) stops it, it ends with the same
-- reason, which takes the rooms down with it.
local function registry_main(parent, starter, hibernate_after)
  mb.trap_exit(true)
  local by_name = {}   -- room name -> {pid = room, joins = joins forwarded}
  local by_pid = {}    -- room pid -> room name
  local guests = 0
  mb.send(starter, { registry_ready = mb.self() })
  while true do
    local msg = mb.receive()
    if type(msg) ~= "table" then msg = {} end   -- not ours: ignore it
    local op = msg.op
    if (op == "join" or op == "guest") and not mb.is_pid(msg.pid)
       or (op == "join" or op == "members" or op == "room") and type(msg.room) ~= "string"
       or (op == "members" or op == "rooms" or op == "room") and not mb.is_pid(msg.from) then
      op = nil   -- garbled: ignore it
    end
    if op == "join" then
      local r = by_name[msg.room]
      if not r then
        r = { pid = mb.spawn_link(room_main, msg.room, mb.self(), hibernate_after), joins = 0 }
        by_name[msg.room] = r
        by_pid[r.pid] = msg.room
      end
      r.joins = r.joins + 1
      mb.send(r.pid, { op = "join", pid = msg.pid, nick = msg.nick, tag = msg.tag })
    elseif op == "guest" then
      guests = guests + 1
      mb.send(msg.pid, { guest = guests })
    elseif op == "idle" then
      local name = by_pid[msg.room]
      local r = name and by_name[name]
      if r and r.joins == msg.joins then
        by_name[name] = nil
        by_pid[msg.room] = nil
        mb.send(msg.room, { op = "stop" })
      end
    elseif op == "members" then
      local r = by_name[msg.room]
      if r then
        mb.send(r.pid, { op = "members", from = msg.from, tag = msg.tag })
      else
        mb.send(msg.from, { members = msg.tag, list = {} })
      end
    elseif op == "rooms" then
      local list = {}
      for name in pairs(by_name) do list[#list + 1] = name end
      table.sort(list)
      mb.send(msg.from, { rooms = msg.tag, list = list })
    elseif op == "room" then
      local r = by_name[msg.room]
      mb.send(msg.from, { room = msg.tag, pid = r and r.pid or false })
    elseif msg.event == "EXIT" then
      if msg.pid == parent then mb.exit(msg.reason) end
      local name = by_pid[msg.pid]
      if name then
        by_pid[msg.pid] = nil
        if by_name[name] and by_name[name].pid == msg.pid then by_name[name] = nil end
      end
    end
  end
end

-- Start a registry linked to the caller (for a supervisor's start function)
-- and register it under `name` if given; its rooms hibernate after
-- `hibernate_after` ms without a message (nil: never). Returns its pid once
-- it is ready.
function rooms.start_registry(name, hibernate_after)
  local pid = mb.spawn_link(registry_main, mb.self(), mb.self(), hibernate_after)
  local ok = mb.receive(function(m) return type(m) == "table" and m.registry_ready == pid end, 5000)
  if not ok then mb.exit(pid, "kill") return nil, "the room registry did not start" end
  if name then mb.register(name, pid) end
  return pid
end

-- A request to the registry answered by a message whose field `field`
-- carries the request's tag. Returns that message's field `result` (default
-- "list"), or nil after `timeout` ms.
local tags = 0
local function ask(registry, req, field, timeout, result)
  tags = tags + 1
  local tag = tostring(mb.self()) .. ":" .. tags
  req.from, req.tag = mb.self(), tag
  mb.send(registry, req)
  local m = mb.receive(function(x) return type(x) == "table" and x[field] == tag end, timeout or 5000)
  return m and m[result or "list"]
end

-- The members of room `name`: {{nick = n, pid = p}...} in join order ({} for
-- no such room), or nil on timeout. For tests and tools.
function rooms.members(registry, name, timeout)
  return ask(registry, { op = "members", room = name }, "members", timeout)
end

-- The pid of room `name`: false for no such room, nil on timeout. For tests
-- and tools.
function rooms.room(registry, name, timeout)
  return ask(registry, { op = "room", room = name }, "room", timeout, "pid")
end

-- The names of the open rooms, sorted, or nil on timeout.
function rooms.list(registry, timeout)
  return ask(registry, { op = "rooms" }, "rooms", timeout)
end

return rooms
