-- examples/chat/main.lua: the chat server. Each connected user is a process.
--
--   scripts/run examples/chat [--host H] [--tcp PORT] [--http PORT] [limits]
--   scripts/run examples/chat --sname b --join a@host ...   (across hosts)
--
-- Defaults: host 127.0.0.1, TCP port 7000 (nc, telnet), HTTP port 8080 (the
-- browser page, speaking WebSocket on /ws). The environment variables
-- CHAT_HOST, CHAT_TCP_PORT and CHAT_HTTP_PORT set them too; the options win.
-- Port 0 picks a free port; "off" leaves that listener out. The limits on
-- slow users (--max-behind N, --max-output BYTES, --max-stall MS,
-- --room-backlog N) and --hibernate-after MS (idle users and rooms
-- hibernate; 0 = never) are chat.start's options; see README.md.
-- Across hosts: each host is a node (the host options --sname NAME or
-- --name NAME@HOST, and --cookie, before the script; scripts/run puts them
-- there), and every host but the first takes --join <the first's node>: the
-- rooms live on that node, and users connected to any host meet in them.
local mb = require "moonbeam"

-- Find the example's modules next to this file, from any directory.
local dir = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
package.path = dir .. "/?.lua;" .. package.path

local chat = require "chat"

local function usage(code)
  local out = code == 0 and io.stdout or io.stderr
  out:write("usage: scripts/run examples/chat [--host H] [--tcp PORT] [--http PORT] [limits]\n",
            "  (or build/moonbeam examples/chat/main.lua ...)\n",
            "  --host H      address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)\n",
            "  --tcp PORT    TCP port for nc/telnet (default 7000; 0 = any free port; off = none)\n",
            "  --http PORT   HTTP port for the browser (default 8080; 0 = any free port; off = none)\n",
            "limits on slow users (a user over them is disconnected; see README.md):\n",
            "  --max-behind N        room lines waiting for a user (default 1000)\n",
            "  --max-output BYTES    output queued on a user's socket (default 32768)\n",
            "  --max-stall MS        how long the output may stay over that (default 5000)\n",
            "  --room-backlog N      a room's backlog before its talkers wait (default 1000)\n",
            "  --hibernate-after MS  idle time after which a TCP user or a room hibernates\n",
            "                        (default 15000; 0 = never)\n",
            "across hosts (each host a node: --sname NAME or --name NAME@HOST, --cookie C):\n",
            "  --join NODE   meet the users of the chat on NODE (name@host) in its rooms\n",
            "environment: CHAT_HOST, CHAT_TCP_PORT, CHAT_HTTP_PORT\n")
  os.exit(code)
end

local function port(v, what)
  if v == "off" or v == "false" or v == "none" then return false end
  local n = tonumber(v)
  if not n or n < 0 or n > 65535 or n % 1 ~= 0 then
    io.stderr:write("chat: bad ", what, " port '", tostring(v), "'\n")
    usage(2)
  end
  return n
end

local opts = {
  host = os.getenv("CHAT_HOST") or "127.0.0.1",
  tcp_port = port(os.getenv("CHAT_TCP_PORT") or "7000", "TCP"),
  http_port = port(os.getenv("CHAT_HTTP_PORT") or "8080", "HTTP"),
}
local LIMITS = { ["--max-behind"] = "max_behind", ["--max-output"] = "max_output",
                 ["--max-stall"] = "max_stall", ["--room-backlog"] = "room_backlog",
                 ["--hibernate-after"] = "hibernate_after" }
local i = 1
while i <= #arg do
  local a, v = arg[i], arg[i + 1]
  if a == "-h" or a == "--help" then usage(0)
  elseif a == "--host" and v then opts.host = v; i = i + 1
  elseif (a == "--tcp" or a == "--tcp-port") and v then opts.tcp_port = port(v, "TCP"); i = i + 1
  elseif (a == "--http" or a == "--http-port") and v then opts.http_port = port(v, "HTTP"); i = i + 1
  elseif a == "--join" and v then opts.join = v; i = i + 1
  elseif a == "--sname" or a == "--name" or a == "--cookie" then
    io.stderr:write("chat: ", a, " is an option of the host, before the script: ",
                    "build/moonbeam ", a, " ... examples/chat/main.lua ... ",
                    "(scripts/run examples/chat ", a, " ... puts it there)\n")
    os.exit(2)
  elseif LIMITS[a] and v then
    opts[LIMITS[a]] = tonumber(v)
    if not opts[LIMITS[a]] then
      io.stderr:write("chat: bad value '", v, "' for ", a, "\n")
      usage(2)
    end
    i = i + 1
  else
    io.stderr:write("chat: unknown argument '", a, "'\n")
    usage(2)
  end
  i = i + 1
end

-- The chat of every host has the same name, so that the registry (and the
-- rooms) of the node others join is found by that name from every node.
opts.name = "chat"
if opts.join then
  if mb.node() == "nonode@nohost" then
    io.stderr:write("chat: --join needs this host to be a node: ",
                    "scripts/run examples/chat --sname NAME --join ", opts.join, "\n")
    os.exit(2)
  end
  local up
  for _ = 1, 25 do
    up = mb.connect_node(opts.join)
    if up then break end
    mb.sleep(200)
  end
  if not up then
    io.stderr:write("chat: cannot reach the node ", opts.join, " (is its chat running, with the same cookie?)\n")
    os.exit(1)
  end
end

local ok, info, err = pcall(chat.start, opts)
if not ok then
  io.stderr:write("chat: ", (tostring(info):gsub("^.-chat%.start: ", "")), "\n")
  usage(2)
end
if not info then
  io.stderr:write("chat: could not start: ", tostring(err), "\n")
  os.exit(1)
end

local shown = opts.host == "0.0.0.0" and "localhost" or opts.host
if info.tcp_port then
  print(("chat: TCP  on %s:%d   connect with: nc %s %d   (or telnet %s %d)")
        :format(opts.host, info.tcp_port, shown, info.tcp_port, shown, info.tcp_port))
end
if info.http_port then
  print(("chat: HTTP on %s:%d   open http://%s:%d/ in a browser")
        :format(opts.host, info.http_port, shown, info.http_port))
end
if opts.join then
  print(("chat: node %s; the rooms are on %s"):format(mb.node(), opts.join))
elseif mb.node() ~= "nonode@nohost" then
  print(("chat: node %s; other hosts join with --join %s"):format(mb.node(), mb.node()))
end
print("chat: running; Ctrl-C stops it")
io.stdout:flush()

-- The chat runs in its own processes; this one only waits for its
-- supervisor, and ends the host if the supervisor gives up.
local ref = mb.monitor(info.sup)
while true do
  local m = mb.receive()
  if type(m) == "table" and m.event == "DOWN" and m.ref == ref then
    io.stderr:write("chat: the supervisor ended: ", tostring(m.reason), "\n")
    os.exit(1)
  end
end
