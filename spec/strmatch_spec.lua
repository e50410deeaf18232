-- string.find, match, gmatch and gsub (host/lib/strmatch.c): LuaJIT's
-- results and errors, and a long match that neither holds its scheduler nor
-- outlives an exit signal. The cases that would hang a host without that
-- run in a child host, bounded in time.
local mb = require "moonbeam"
local S = require "spec.support"

local child = S.child

-- The generators' common start: arguments (seed, count), a generator of
-- their own (the host seeds each process's math.random apart), and results
-- as one line of text.
local prelude = [=[
local seed, N = tonumber(arg[1]), tonumber(arg[2])
local x = seed
local function rnd(n) x = x * 16807 % 2147483647; return x % n + 1 end
local function show(...)
  local t = {}
  for i = 1, select("#", ...) do
    local v = select(i, ...)
    t[#t + 1] = type(v) == "string" and ("%q"):format(v) or tostring(v)
  end
  return table.concat(t, ",")
end
]=]

-- Random calls of the four functions, their results printed one a line; the
-- same text from the host and from luajit.
local differential = prelude .. [=[
local atoms = {"a", "b", "c", ".", "%a", "%d", "%s", "%w", "%p", "%l", "%u", "%x", "%c",
  "%z", "%A", "%S", "%g", "%G", "[ab]", "[^a]", "[a-c]", "[%a_]", "[]]", "[^]]", "[%]]",
  "[a-]", "[-a]", "%%", "%.", "%(", "%b()", "%bab", "%f[%a]", "%f[%A]", "%1", "%2", "%0",
  "(", ")", "()", "^", "$", "-", "*", "+", "?", "%", "[", "]", "x", "1", " ", "\0", "%e"}
local quant = {"", "", "", "*", "+", "-", "?"}
local chars = {"a", "b", "c", "x", "1", "2", " ", "(", ")", "_", "A", "B", "-", "]", "[",
  "\0", "%", ".", "\200"}
local function word(list, max, q)
  local t = {}
  for _ = 1, rnd(max) - 1 do t[#t + 1] = list[rnd(#list)] .. (q and q[rnd(#q)] or "") end
  return table.concat(t)
end
local inits = {1, 2, -1, -3, 0, 5, 100, -100, 2.5, "2", 2^40, -2^40}
local repls = {"x", "%0", "%1", "<%1%2>", "%%", "%", "a%", 5, "%9", ""}
local fns = {function(a, b) return a and (a .. "|" .. tostring(b)) end,
             function() return false end, {a = "A", b = 1, ["("] = true, c = {}}}
for _ = 1, N do
  local s, p, k = word(chars, 12), word(atoms, 6, quant), rnd(6)
  local r
  if k == 1 then r = show(pcall(string.find, s, p, inits[rnd(#inits)]))
  elseif k == 2 then r = show(pcall(string.match, s, p, inits[rnd(#inits)]))
  elseif k == 3 then r = show(pcall(string.find, s, p, inits[rnd(#inits)], rnd(2) == 1))
  elseif k == 4 then
    local ok, it = pcall(string.gmatch, s, p)
    local all = {}
    for _ = 1, 20 do
      local got = {pcall(it)}
      all[#all + 1] = show(unpack(got))
      if got[2] == nil then break end
    end
    r = table.concat(all, ";")
  elseif k == 5 then
    r = show(pcall(string.gsub, s, p, repls[rnd(#repls)], rnd(3) == 1 and rnd(3) or nil))
  else
    r = show(pcall(string.gsub, s, p, fns[rnd(#fns)]))
  end
  print(("%d %q %q %s"):format(k, s, p, r))
end
for _, bad in ipairs({
  function() return string.find(nil, "a") end, function() return ("a"):find({}) end,
  function() return ("a"):find("a", {}) end, function() return ("a"):gsub("a", true) end,
  function() return ("a"):gsub("a", nil, "x") end, function() return ("a"):gmatch() end,
  function() return ("aaa"):find(("a?"):rep(199) .. "b") end,
  function() return ("aaa"):find(("a?"):rep(200) .. "b") end,
  function() return ("a"):rep(250):find(("a?"):rep(200) .. "b") end,
  function() return ("a"):find(("()"):rep(33)) end,
  function() local r = ("a"):find("(a") return r end,
  function() local r = ("a"):gsub("(a)", "%2") return r end,
}) do
  print(show(pcall(bad)))
end
]=]

-- Random calls that each backtrack through 2^9-2^14 ways, with random
-- ends; under moonbeam beside a busy process on one scheduler, so that the
-- calls stop for it and go on as continuations.
local suspended = prelude .. [=[
local ptails = {"b", "c", "%d", "(b)", "b$", "%1", "()", "[bc]+", "x?", ".-c", "%bbc", "%f[%a]",
  "%w*", "1", "b-", "(%1)"}
local stails = {"b", "c", "bc", "1", "b1c", "", "bbcc", "aab"}
local function word(list) local t = {} for _ = 1, rnd(4) - 1 do t[#t + 1] = list[rnd(#list)] end return table.concat(t) end
local ok, mb = pcall(require, "moonbeam")
local reds
if ok then
  mb.spawn(function() while true do end end)
  reds = mb.info(mb.self()).reductions
end
for _ = 1, N do
  local k = 8 + rnd(6)
  local s = ("a"):rep(k) .. word(stails) .. ("a"):rep(rnd(3) - 1)
  local p = "(" .. ("a?"):rep(k) .. ")" .. ("a"):rep(k) .. word(ptails)
  local kind, r = rnd(4)
  if kind == 1 then r = show(pcall(string.find, s, p))
  elseif kind == 2 then r = show(pcall(string.match, s, p))
  elseif kind == 3 then
    local all = {}
    for a, b, c in (s .. s):gmatch(p) do all[#all + 1] = show(a, b, c) end
    r = table.concat(all, ";")
  else r = show(pcall(string.gsub, s, p, rnd(2) == 1 and "<%1>" or "%0%0", rnd(3))) end
  print(("%d %q %q %s"):format(kind, s, p:sub(3 * k + 3), r))
end
if ok then
  io.stderr:write("reductions ", mb.info(mb.self()).reductions - reds, "\n")
  os.exit(0)
end
]=]

-- A pattern that backtracks through 2^n ways on ("a"):rep(n) .. "b".
local function hog_pattern(n)
  return ("(" .. ("a?"):rep(n) .. ")" .. ("a"):rep(n) .. "()"), ("a"):rep(n) .. "b"
end

describe("string patterns", function()
  teardown(S.cleanup_tmp)

  it("give LuaJIT's results and errors", function()
    local path = S.write("differential.lua", differential)
    for seed = 1, 3 do
      local args = S.q(path) .. " " .. seed .. " 6000"
      local c1, mine, e1 = S.moonbeam(args, nil, 120)
      local c2, theirs, e2 = S.sh("luajit -joff " .. args, nil, 120)   -- as the host runs
      assert.are.equal(0, c1, e1)
      assert.are.equal(0, c2, e2)
      assert.is_true(#mine > 100000)
      if mine ~= theirs then   -- the first line that differs, not 600 KB
        local a, b = mine:gmatch("[^\n]*"), theirs:gmatch("[^\n]*")
        for l1 in a do
          local l2 = b()
          assert.are.equal(l2, l1)
        end
      end
    end
  end)

  it("give LuaJIT's results after stopping, again and again", function()
    local path = S.write("suspended.lua", suspended)
    local args = S.q(path) .. " 7 300"
    local c1, mine, e1 = S.moonbeam("--schedulers 1 " .. args, nil, 300)
    local c2, theirs, e2 = S.sh("luajit -joff " .. args, nil, 300)
    assert.are.equal(0, c1, e1)
    assert.are.equal(0, c2, e2)
    -- It did stop: the slices the busy process took it from (500 each).
    local reds = tonumber(e1:match("reductions (%d+)"))
    assert.is_true(reds ~= nil and reds > 100 * 500, e1)
    local a, b = mine:gmatch("[^\n]*"), theirs:gmatch("[^\n]*")
    for l2 in b do assert.are.equal(l2, a()) end
  end)

  it("leave a long match's scheduler to others, and give its results", function()
    -- One scheduler. The matchers are woken before the echo: its answer
    -- comes before their first result only if the matches stop for others
    -- (LuaJIT's matcher ran the first to its end).
    local code, out, err = child([[
      local mb = require "moonbeam"
      local main = mb.self()
      local pat, subj = ]] .. ("%q, %q"):format(hog_pattern(20)) .. [[
      local echo = mb.spawn(function()
        mb.send(main, "ready")
        while true do local m = mb.receive(); mb.send(m, "pong") end
      end)
      local matchers = {}
      local function matcher(name, f)
        matchers[#matchers + 1] = mb.spawn(function()
          mb.send(main, "ready")
          mb.receive()
          mb.send(main, {[name] = f()})
        end)
      end
      matcher("find", function() return {subj:find(pat)} end)
      matcher("match", function() return {subj:match(pat)} end)
      matcher("gmatch", function()
        local r = {}
        for a, b in (subj .. subj):gmatch(pat) do r[#r + 1] = #a .. ":" .. b end
        return r
      end)
      matcher("gsub", function() return {("xy" .. subj):gsub(pat, "<%1|%2>")} end)
      matcher("gsub_table", function() return {("xy" .. subj):gsub(pat, {})} end)
      matcher("gsub_function", function()
        return {("xy" .. subj):gsub(pat, function(a, b) return "(" .. b .. ")" end)}
      end)
      for _ = 1, 7 do mb.receive(function(m) return m == "ready" end, 60000) end
      for _, pid in ipairs(matchers) do mb.send(pid, "go") end
      mb.send(echo, main)
      local got, results, before_pong, ponged = {}, 0, 0, false
      while results < 6 or not ponged do
        local m = mb.receive(60000)
        if m == nil then break end
        if m == "pong" then ponged = true
        else
          results = results + 1
          if not ponged then before_pong = before_pong + 1 end
          for k, v in pairs(m) do got[k] = v end
        end
      end
      print("results before the pong", before_pong)
      print("find", table.concat(got.find or {}, ","))
      print("match", table.concat(got.match or {}, ","))
      print("gmatch", table.concat(got.gmatch or {}, ","))
      print("gsub", table.concat(got.gsub or {}, ","))
      print("gsub_table", table.concat(got.gsub_table or {}, ","))
      print("gsub_function", table.concat(got.gsub_function or {}, ","))
      mb.halt(0)
    ]], "--schedulers 1", 120)
    assert.are.equal(0, code, out .. err)
    local before = tonumber(out:match("results before the pong\t(%d+)"))
    assert.are.equal(0, before, out .. err)
    -- luajit's, for hog_pattern(20)
    assert.is_true(S.has(out, "find\t1,20,,21\n"), out)
    assert.is_true(S.has(out, "match\t,21\n"), out)
    assert.is_true(S.has(out, "gmatch\t0:21,0:42\n"), out)
    assert.is_true(S.has(out, "gsub\txy<|23>b,1\n"), out)
    assert.is_true(S.has(out, "gsub_table\txy" .. ("a"):rep(20) .. "b,1\n"), out)
    assert.is_true(S.has(out, "gsub_function\txy(23)b,1\n"), out)
  end)

  it("do not hold every scheduler with as many long matches", function()
    local code, out, err = child([[
      local mb = require "moonbeam"
      local pat, subj = ]] .. ("%q, %q"):format(hog_pattern(40)) .. [[
      for _ = 1, 2 do mb.spawn(function() subj:find(pat) end) end
      ]] .. S.PONGS .. [[
      pongs(20)
      os.exit(0)
    ]], "--schedulers 2", 60)
    assert.are.equal(0, code, out .. err)
    assert.is_true(S.has(out, "pongs\t20"), out .. err)
  end)

  it("end a long match at an exit signal, where it can yield or not", function()
    local code, out, err = child([[
      local mb = require "moonbeam"
      local pat, subj = ]] .. ("%q, %q"):format(hog_pattern(40)) .. [[
      local bodies = {
        plain = function() subj:find(pat) end,
        gmatch = function() for _ in subj:gmatch(pat) do end end,
        gsub_function = function() subj:gsub(pat, function() end) end,
        in_reader = function()   -- load's reader: C calls it, it cannot yield
          load(function() subj:find(pat) end)
        end,
        in_pcall = function() pcall(string.match, subj, pat) end,
      }
      for name, body in pairs(bodies) do
        local pid, ref = mb.spawn_monitor(body)
        -- Runnable, not asleep: where the match cannot stop (load's
        -- reader), a timer on its scheduler's loop would wait for it, but
        -- a queued process moves to the other scheduler.
        local t0 = mb.now()
        while mb.now() - t0 < 50 do mb.yield() end
        mb.exit(pid, "kill")
        local m = mb.receive(function(m) return type(m) == "table" and m.ref == ref end, 10000)
        print(name, m and m.reason or "still running")
      end
      os.exit(0)
    ]], "--schedulers 2", 60)
    assert.are.equal(0, code, out .. err)
    for _, name in ipairs({"plain", "gmatch", "gsub_function", "in_reader", "in_pcall"}) do
      assert.is_true(S.has(out, name .. "\tkilled"), out .. err)
    end
  end)

  it("raise a long match's pattern errors when it stops", function()
    -- LuaJIT would meet the bad end (or not) only after 2^40 ways; a match
    -- that stops checks its whole pattern, and raises at once.
    local code, out, err = child([[
      local mb = require "moonbeam"
      local pat, subj = ]] .. ("%q, %q"):format(hog_pattern(40)) .. [[
      -- Company on the one scheduler, so that the match is preempted.
      mb.spawn(function() for _ = 1, 200 do mb.sleep(1) end end)
      for _, case in ipairs({
        {pat .. "%", "malformed pattern (ends with '%')"},
        {pat .. "[a", "malformed pattern (missing ']')"},
        {pat .. "(", "unfinished capture"},
        {pat .. "%3", "invalid capture index"},
        {pat .. ("a*"):rep(200), "pattern too complex"},
      }) do
        local ok, e = pcall(string.find, subj, case[1])
        print(ok, e == case[2] and "right" or e)
      end
      local ok, e = pcall(string.gsub, subj, pat, "%3")
      print(ok, e == "invalid capture index" and "right" or e)
      os.exit(0)
    ]], "--schedulers 1", 60)
    assert.are.equal(0, code, out .. err)
    local _, rights = out:gsub("false\tright", "")
    assert.are.equal(6, rights, out .. err)
  end)

  it("raise in gsub's function replacement as in LuaJIT, and bound its recursion", function()
    local ok, e = pcall(string.gsub, "abc", "%w", function(c)
      if c == "b" then error("no b", 0) end
    end)
    assert.is_false(ok)
    assert.are.equal("no b", e)
    local function deep(s) return (s:gsub(".", deep)) end
    ok, e = pcall(deep, ("x"):rep(10))
    assert.is_false(ok)
    assert.is_true(S.has(e, "C stack overflow") or S.has(e, "stack overflow"), e)
  end)
end)
