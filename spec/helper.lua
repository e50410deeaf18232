-- spec/helper.lua: loaded by busted (see .busted) before the specs run.
--
-- The busted runner is the host's first process, and the host only exits when
-- no process is left. The specs check after each test that they left nothing
-- running; this is the backstop for when one of those checks failed: at the
-- end of the run, kill whatever is still alive so the host can exit.
local ok, mb = pcall(require, "moonbeam")
if not ok then
  io.stderr:write("spec/helper.lua: the specs must run inside moonbeam ",
                  "(busted --lua=build/moonbeam): ", tostring(mb), "\n")
  return
end

require("busted").subscribe({ "exit" }, function()
  local me = mb.self()
  for _, p in ipairs(mb.processes()) do
    if p ~= me then
      io.stderr:write("spec/helper.lua: killing leftover process ", tostring(p), "\n")
      mb.exit(p, "kill")
    end
  end
  return nil, true
end)
