-- examples/chat/chat.lua: starts the chat server (main.lua is the command;
-- specs require this module and call chat.start on free ports).
--
-- The process tree:
--
--   chat supervisor (one_for_one)
--   ├── registry       finds and creates rooms; rooms are linked to it (rooms.lua)
--   │     └── room ... one process per room, monitoring its members; hibernates when idle
--   ├── tcp listener   links to its acceptor and to one user process per connection
--   │     └── acceptor owns the listening socket; spawns the users (user.lua),
--   │                  which hibernate when idle
--   └── http listener  serves www/ and upgrades /ws to a WebSocket user (web.lua)
--
-- Across nodes (chat.start's join, main.lua's --join NODE): the registry,
-- and so every room, lives on one node, the one the others joined; the
-- users of every node send their joins to {registry name, that node}, so a
-- room is found the same way from every node, and users of different
-- hosts meet in it. A room monitors its members wherever they are: when a
-- host goes down, its users leave their rooms with the usual line
-- (their monitors fire with "noconnection"), and the users of a host whose
-- rooms' node went down are told that their room closed.
--
-- The listeners trap exits: a user that crashes or is killed does not take
-- its listener down, while a listener that is stopped (or crashes) takes its
-- users with it. A user finds the registry by its registered name, so a
-- registry restarted by the supervisor is found again.
--
-- As in rooms.lua, the functions that are copied into other processes (the
-- supervisor's start functions and everything they reach) capture plain
-- local functions, never this example's module tables: a captured module is
-- required again in the new process, where examples/chat is not on the path.
local mb = require "moonbeam"
local supervisor = require "moonbeam.supervisor"
local rooms = require "rooms"
local user = require "user"

local chat = {}

local start_registry = rooms.start_registry
local tcp_user = user.tcp_user

-- The TCP side is two processes. The acceptor owns the listening socket and
-- waits in accept; for each connection it spawns a user process, makes it
-- the socket's owner and hands it the socket, then asks the listener to link
-- to the user. The listener is the supervised child: it traps exits, so a
-- user that crashes is only an EXIT message to it, and when it is stopped its
-- links end the acceptor and every user. Splitting them keeps both simple:
-- the acceptor never has to look at its mailbox, and the listener answers
-- messages at once instead of between accepts.

-- The listen backlog: thousands of users may connect at once (a load test,
-- a reconnect storm); with the default 511 the kernel drops the SYNs over
-- it and those clients retry only a second later. The kernel caps it at
-- net.core.somaxconn.
local BACKLOG = 4096

-- The body of the acceptor process (linked to the listener).
local function tcp_acceptor(listener, host, port, registry, limits)
  local tcp = require "moonbeam.tcp"
  local lsock, err = tcp.listen(host, port, { backlog = BACKLOG })
  if not lsock then
    mb.send(listener, { acceptor_ready = mb.self(), err = tostring(err) })
    return
  end
  mb.send(listener, { acceptor_ready = mb.self(), port = lsock:port() })
  local complained = false
  while true do
    local sock, aerr = lsock:accept()
    local ok, pid
    if sock then ok, pid = pcall(mb.spawn, tcp_user, registry, limits) end
    if ok then
      if sock:set_owner(pid) then
        mb.send(pid, { tcp_socket = sock })
        mb.send(listener, { link = pid })
      else
        sock:close()
      end
    elseif aerr == "closed" then
      error("chat: the TCP listening socket was closed")
    elseif aerr ~= "timeout" then
      -- Out of file descriptors, or the host starts no process now (over
      -- --max-memory, too many processes): turn the user away, say it
      -- once, wait a little.
      local what = "accept failed: " .. tostring(aerr)
      if sock then
        sock:close()
        what = "cannot start a user: " .. tostring(pid)
      end
      if not complained then
        io.stderr:write("chat: " .. what .. "\n")
        complained = true
      end
      mb.sleep(50)
    end
  end
end

-- The body of the TCP listener process.
local function tcp_listener(parent, starter, host, port, registry, limits)
  mb.trap_exit(true)
  -- Essential: over --max-memory the host's killer ends users first.
  local acceptor = mb.spawn_opt({ link = true, essential = true },
                                tcp_acceptor, mb.self(), host, port, registry, limits)
  local m = mb.receive(function(x)
    return type(x) == "table" and (x.acceptor_ready == acceptor or (x.event == "EXIT" and x.pid == acceptor))
  end, 5000)
  if not m or m.err or m.event then
    local why = not m and "timeout" or m.err or tostring(m.reason)
    mb.send(starter, { tcp_ready = mb.self(), err = "tcp " .. host .. ":" .. port .. ": " .. why })
    return
  end
  port = m.port
  mb.send(starter, { tcp_ready = mb.self(), port = port })
  while true do
    local msg = mb.receive()
    if type(msg) == "table" then
      if msg.link then
        -- The user may be gone already: then the link delivers an EXIT.
        mb.link(msg.link)
      elseif msg.event == "EXIT" then
        -- A user ending is nothing to act on; the parent or the acceptor is.
        if msg.pid == parent or msg.pid == acceptor then mb.exit(msg.reason) end
      elseif msg.port_of then
        mb.send(msg.port_of, { port = port, tag = msg.tag })
      end
    end
  end
end

-- Start a listener process linked to the caller and wait until it listens.
-- Returns its pid, or nil, err.
local function start_listener(body, field, ...)
  local pid = mb.spawn_link(body, mb.self(), mb.self(), ...)
  local m = mb.receive(function(x)
    return type(x) == "table" and (x[field] == pid or (x.event == "EXIT" and x.pid == pid))
  end, 5000)
  if not m then
    mb.unlink(pid)
    mb.exit(pid, "kill")
    return nil, "the listener did not start in time"
  end
  if m.event == "EXIT" then return nil, "the listener failed: " .. tostring(m.reason) end
  if m.err then
    mb.unlink(pid)
    return nil, m.err
  end
  return pid
end

-- The port a listener listens on, or nil.
local function port_of(pid)
  local tag = tostring(pid)
  mb.send(pid, { port_of = mb.self(), tag = tag })
  local m = mb.receive(function(x) return type(x) == "table" and x.tag == tag and x.port end, 5000)
  return m and m.port
end

local function child_pid(sup, id)
  for _, c in ipairs(supervisor.which_children(sup)) do
    if c.id == id then return c.pid end
  end
end

local instances = 0

-- How long a TCP user or a room waits for a message before it hibernates
-- (see user.lua and README.md): longer than the pauses of a conversation,
-- so a user who is talking never pays for a wake, short enough that the
-- many users who are only connected cost about a kilobyte each.
local HIBERNATE_AFTER = 15000

-- chat.start's hibernate_after, checked: ms, or nil for never.
local function hibernate_after_of(opts)
  local v = opts.hibernate_after
  if v == nil then return HIBERNATE_AFTER end
  if v == false or v == 0 or v == math.huge then return nil end
  if type(v) ~= "number" or v ~= v or v < 0 then
    error("chat.start: hibernate_after must be a number of ms >= 0 or false, got "
          .. tostring(v), 3)
  end
  return v
end

-- The limits on slow users from chat.start's options (see user.lua), checked.
local function limits_of(opts)
  local limits = {}
  for k, default in pairs(user.DEFAULTS) do
    local v = opts[k]
    if v == nil then v = default end
    if type(v) ~= "number" or v ~= v or v <= 0 then
      error("chat.start: " .. k .. " must be a number > 0, got " .. tostring(v), 3)
    end
    limits[k] = v
  end
  if limits.max_output < user.MIN_OUTPUT or limits.max_output > user.MAX_OUTPUT then
    error("chat.start: max_output must be from " .. user.MIN_OUTPUT .. " to " .. user.MAX_OUTPUT
          .. " bytes (under the socket's 64 KiB backpressure mark), got " .. limits.max_output, 3)
  end
  return limits
end

-- chat.start(opts) -> info | nil, err
--   opts.host       address to listen on (default "127.0.0.1")
--   opts.tcp_port   TCP port for nc/telnet (default 7000; 0 = any free port; false = none)
--   opts.http_port  HTTP port for the browser (default 8080; 0 = any free port; false = none)
--   opts.www        directory of the web page (default: www/ next to this file)
--   opts.name       registered name of the supervisor (default: none); the
--                   registry is registered as "<name>.rooms" (without a name:
--                   "chat<N>@<caller's pid>.rooms", unique per chat started)
--   opts.max_behind, opts.max_output, opts.max_stall, opts.room_backlog
--                   the limits on slow users (user.lua; defaults in user.DEFAULTS)
--   opts.hibernate_after  ms without a message after which a TCP user or a
--                   room hibernates (default 15000; 0 or false: never)
--   opts.join       a node ("name@host") whose chat (started with the same
--                   opts.name) holds the rooms: this node's users meet its
--                   users there; this node then runs no registry of its own
-- info: {sup = pid, registry = name, join = node or nil, tcp_port = n, http_port = n}.
function chat.start(opts)
  opts = opts or {}
  local limits = limits_of(opts)
  local hibernate_after = hibernate_after_of(opts)
  limits.hibernate_after = hibernate_after
  local host = opts.host or "127.0.0.1"
  local tcp_port, http_port = opts.tcp_port, opts.http_port
  if tcp_port == nil then tcp_port = 7000 end
  if http_port == nil then http_port = 8080 end
  local join = opts.join
  if join ~= nil and (type(join) ~= "string" or not join:find("@", 1, true)) then
    error("chat.start: join must be a node name (name@host), got " .. tostring(join), 2)
  end
  if join and mb.node() == "nonode@nohost" then
    error("chat.start: join needs this host to be a node (--sname or --name)", 2)
  end
  if join == mb.node() then join = nil end
  instances = instances + 1
  local registry = (opts.name or ("chat" .. instances .. "@" .. tostring(mb.self()))) .. ".rooms"
  local children = {}
  if not join then
    children[1] = { id = "registry", start = function() return start_registry(registry, hibernate_after) end }
  end
  -- What users send their joins to: the name here, or the name on `join`.
  local registry_dest = join and { registry, join } or registry
  if tcp_port then
    children[#children + 1] = { id = "tcp", shutdown = 2000, start = function()
      return start_listener(tcp_listener, "tcp_ready", host, tcp_port, registry_dest, limits)
    end }
  end
  if http_port then
    local web = require "web"
    local www = opts.www or chat.www
    local http_listener = web.http_listener
    children[#children + 1] = { id = "http", shutdown = 2000, start = function()
      return start_listener(http_listener, "http_ready", host, http_port, registry_dest, www, limits)
    end }
  end
  -- Graceful: SIGTERM stops the chat in order (listeners, then the rooms).
  local sup, err = supervisor.start({
    name = opts.name, strategy = "one_for_one", max_restarts = 5, max_seconds = 10,
    children = children, graceful = true,
  })
  if not sup then return nil, err end
  local info = { sup = sup, registry = registry, join = join, host = host }
  if tcp_port then info.tcp_port = port_of(child_pid(sup, "tcp")) end
  if http_port then info.http_port = port_of(child_pid(sup, "http")) end
  return info
end

-- Stop a chat started by chat.start: its listeners, users, rooms.
function chat.stop(info)
  return supervisor.stop(info.sup)
end

-- The pid of the room registry (here), or nil; {name, node} when the rooms
-- are on the node this chat joined.
function chat.registry(info)
  if info.join then return { info.registry, info.join } end
  return mb.whereis(info.registry)
end

-- The members of a room: {{nick = n, pid = p}...}; nil on timeout.
function chat.members(info, room, timeout)
  local reg = chat.registry(info)
  return reg and rooms.members(reg, room, timeout)
end

-- The pid of room `name`, or nil (no such room, or timeout).
function chat.room(info, name, timeout)
  local reg = chat.registry(info)
  return reg and rooms.room(reg, name, timeout) or nil
end

-- The names of the open rooms.
function chat.rooms(info, timeout)
  local reg = chat.registry(info)
  return reg and rooms.list(reg, timeout)
end

-- The directory of this file, and the web page's directory in it.
local src = debug.getinfo(1, "S").source
chat.dir = src:sub(1, 1) == "@" and (src:sub(2):match("^(.*)/[^/]*$") or ".") or "."
chat.www = chat.dir .. "/www"

chat.start_listener = start_listener

return chat
