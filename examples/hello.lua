-- examples/hello.lua: processes, messages, a monitor and a crash that stays
-- local. Run it with: scripts/run examples/hello.lua
local mb = require "moonbeam"

-- An echo process: answers every {from = pid, text = ...} it receives.
local echo = mb.spawn(function()
  while true do
    local msg = mb.receive()
    if msg == "stop" then return end
    mb.send(msg.from, { text = msg.text:upper() })
  end
end)

mb.send(echo, { from = mb.self(), text = "hello from " .. tostring(mb.self()) })
print("echo replied:", mb.receive(1000).text)

-- A process that crashes: only it dies; its monitor tells us why.
local pid, ref = mb.spawn_monitor(function() error("on purpose") end)
local down = mb.receive(function(m) return m.ref == ref end, 1000)
print(("%s went down: %s"):format(tostring(down.pid), tostring(down.reason)))

-- A thousand processes, each sending its square back.
for i = 1, 1000 do
  mb.spawn(function(parent, n) mb.send(parent, n * n) end, mb.self(), i)
end
local sum = 0
for _ = 1, 1000 do sum = sum + mb.receive(1000) end
print("sum of squares 1..1000 =", sum)

mb.send(echo, "stop")
