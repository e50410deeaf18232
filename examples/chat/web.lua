-- examples/chat/web.lua: the chat's web side. An HTTP server (moonbeam.http,
-- one process per connection) serves the page in www/ and upgrades /ws to a
-- WebSocket; the connection's process then becomes that user's process and
-- speaks the chat protocol, one line per text frame (user.lua).
--
-- http_listener is the supervised child: it starts the HTTP server, links to
-- its acceptor, answers port queries, and closes the server when its
-- supervisor stops it. As in rooms.lua, the copied functions capture only
-- `mb` and local functions.
local mb = require "moonbeam"
local user = require "user"

local web = {}

local ws_user = user.ws_user

-- The request handler, copied into every HTTP connection process.
local function make_handler(registry, www, limits)
  local http = require "moonbeam.http"
  local static = http.static(www)
  return function(req, res)
    if req.path == "/ws" then
      local websocket = require "moonbeam.websocket"
      local ws = websocket.upgrade(req, res, { max_message = 8192 })
      -- Without a socket, upgrade has answered the request (400 and such).
      if ws then ws_user(ws, registry, limits) end
      return
    end
    return static(req, res)
  end
end

-- The body of the HTTP listener process (see chat.start_listener).
local function http_listener(parent, starter, host, port, registry, www, limits)
  local http = require "moonbeam.http"
  mb.trap_exit(true)
  local srv, err = http.listen(host, port, make_handler(registry, www, limits))
  if not srv then
    mb.send(starter, { http_ready = mb.self(), err = "http " .. host .. ":" .. port .. ": " .. tostring(err) })
    return
  end
  mb.link(srv.pid)
  mb.send(starter, { http_ready = mb.self(), port = srv:port() })
  while true do
    local m = mb.receive()
    if type(m) == "table" then
      if m.event == "EXIT" and m.pid == parent then
        srv:close()
        mb.exit(m.reason)
      elseif m.event == "EXIT" and m.pid == srv.pid then
        mb.exit(m.reason)
      elseif m.port_of then
        mb.send(m.port_of, { port = srv:port(), tag = m.tag })
      end
    end
  end
end

web.http_listener = http_listener

return web
