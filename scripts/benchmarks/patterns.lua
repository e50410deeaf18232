-- patterns: string.find, match, gmatch and gsub on everyday inputs (a
-- request line, a header, a text), in ns a call, CPU time. Runs under
-- moonbeam (the host's preemptible matcher, host/lib/strmatch.c) and under
-- plain luajit -joff (LuaJIT's own); the driver reports the ratio. See
-- BENCHMARKS.md.
--
-- Args (key=value): n (calls of each kind), reps (best of).
-- Figures: patterns (the sum over the kinds, ns), and one per kind on the
-- detail line.
local ok, mb = pcall(require, "moonbeam")
if not ok then mb = nil end

local function opt(name, default)
  for _, a in ipairs(arg or {}) do
    local k, v = a:match("^([%w_]+)=(.*)$")
    if k == name then return tonumber(v) end
  end
  return default
end

local N, REPS = opt("n", 200000), opt("reps", 3)
local line = "GET /index.html?q=moon HTTP/1.1"
local header = "Content-Type:  text/html; charset=utf-8  "
local text = ("The quick brown fox jumps over the lazy dog & <cat>. "):rep(4)

local kinds = {
  {"find_plain", function() return line:find("HTTP", 1, true) end},
  {"find", function() return line:find("%s") end},
  {"match_request", function() return line:match("^(%u+) (%S+) HTTP/(%d)%.(%d)$") end},
  {"match_header", function() return header:match("^([^:]+):%s*(.-)%s*$") end},
  {"gmatch_words", function() local n = 0 for _ in text:gmatch("%a+") do n = n + 1 end return n end},
  {"gsub_escape", function() return text:gsub("[<>&]", {["<"] = "&lt;", [">"] = "&gt;", ["&"] = "&amp;"}) end},
  {"gsub_string", function() return text:gsub("(%w+)", "%1!") end},
}

local total, detail = 0, {}
for _, k in ipairs(kinds) do
  local f, best = k[2], math.huge
  for _ = 1, REPS do
    local t = os.clock()
    for _ = 1, N do f() end
    best = math.min(best, os.clock() - t)
  end
  local ns = best / N * 1e9
  total = total + ns
  detail[#detail + 1] = ("%s %.0f"):format(k[1], ns)
end
print("detail " .. table.concat(detail, ", ") .. (" ns (n=%d, best of %d)"):format(N, REPS))
print(("RESULT name=patterns value=%.1f unit=ns"):format(total))
io.stdout:flush()
if mb then mb.halt(0) end
