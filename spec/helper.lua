-- spec/helper.lua: loaded by busted (see .busted) before the specs run.
--
-- The busted runner is the host's first process, and the host only exits when
-- no process is left. The specs check after each test that they left nothing
-- running; this is the backstop for when one of those checks failed: at the
-- end of the run, kill whatever is still alive so the host can exit, and if
-- something survives even that, end the host (with a failure) rather than
-- hang.
local ok, mb = pcall(require, "moonbeam")
if not ok then
  io.stderr:write("spec/helper.lua: the specs must run inside moonbeam ",
                  "(busted --lua=build/moonbeam): ", tostring(mb), "\n")
  return
end

local function others()
  local me, list = mb.self(), {}
  for _, p in ipairs(mb.processes()) do
    if p ~= me then list[#list + 1] = p end
  end
  return list
end

require("busted").subscribe({ "exit" }, function()
  local left = others()
  if #left == 0 then return nil, true end
  for _, p in ipairs(left) do
    io.stderr:write("spec/helper.lua: killing leftover process ", tostring(p), "\n")
    mb.exit(p, "kill")
  end
  local deadline = mb.now() + 2000
  while #others() > 0 and mb.now() < deadline do mb.sleep(10) end
  if #others() > 0 then
    io.stderr:write("spec/helper.lua: processes survived 'kill'; halting the host\n")
    io.stdout:flush()
    io.stderr:flush()
    mb.halt(1)
  end
  return nil, true
end)
