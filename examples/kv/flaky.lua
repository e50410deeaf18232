-- examples/kv/flaky.lua: a worker that crashes on purpose.
--
-- It writes a heartbeat into the store every interval ms and crashes on its
-- third beat, to show a supervisor restarting it. It is spawned by module
-- name with the interval as argument: start = {"flaky", 300} in a child spec.
local mb = require "moonbeam"
local server = require "moonbeam.server"

local print, error, tostring = print, error, tostring

return function(interval)
  local me = tostring(mb.self())
  for beat = 1, 3 do
    mb.sleep(interval)
    -- A cast never fails because of the store; while the store restarts its
    -- name may be missing for a moment, and this beat is simply lost.
    server.cast("kv", { op = "put", key = "heartbeat", value = me .. " beat " .. beat })
    print(("flaky %s: beat %d"):format(me, beat))
  end
  error("flaky: crashing on purpose after 3 beats")
end
