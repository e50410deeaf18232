-- Distribution: a Moonbeam host as a node of an Erlang cluster (dist.h),
-- against real Erlang nodes (erl, Debian's erlang-base) and other Moonbeam
-- hosts, all on this machine (the host name resolves to 127.0.0.1).
--
-- The busted runner is not a node: every node here is a child - an `erl`
-- started in the background (its pid kept, killed at the end; its program
-- halts itself after a bound too) or a Moonbeam host run with S.moonbeam,
-- whose script prints what the test checks. Node names are unique per test.
local mb = require "moonbeam"
local S = require "spec.support"

local COOKIE = "moonbeam_spec_cookie"
local p = io.popen("hostname -s")
local HOST = p:read("*l")
p:close()

local seq = 0
local STAMP = string.format("%x%x", os.time() % 0x100000, math.floor(mb.now() * 1000) % 0x10000)
local function uniq(prefix)
  seq = seq + 1
  return string.format("%s%s_%d", prefix, STAMP, seq)
end

local erls = {}

-- Start `erl -sname name` running the Erlang expression `eval` (which
-- should end with halt()); it halts after `limit` seconds whatever happens.
local function erl(eval, opts)
  opts = opts or {}
  local name = uniq("erl")
  local dir = S.tmpdir()
  for file, text in pairs(opts.files or {}) do S.write(file, text, dir) end
  local out = dir .. "/erl.out"
  local prog = string.format("timer:apply_after(%d, erlang, halt, []), %s",
    (opts.limit or 30) * 1000, eval)
  local cmd = string.format("cd %s && erl -sname %s -setcookie %s -noshell -eval %s >%s 2>&1 </dev/null & echo $!",
    S.q(dir), name, opts.cookie or COOKIE, S.q(prog), S.q(out))
  local f = io.popen(cmd)
  local pid = f:read("*l")
  f:close()
  local node = { pid = pid, out = out, name = name .. "@" .. HOST, dir = dir }
  erls[#erls + 1] = node
  -- Bounded wait until the node is registered with epmd.
  for _ = 1, 100 do
    local e = io.popen("epmd -names 2>/dev/null")
    local names = e:read("*a")
    e:close()
    if names:find("name " .. name .. " ", 1, true) then return node end
    mb.sleep(100)
  end
  error("erl node " .. name .. " did not start: " .. (io.open(out) and io.open(out):read("*a") or ""))
end

local function output(node)
  local f = io.open(node.out)
  local s = f and f:read("*a") or ""
  if f then f:close() end
  return s
end

-- Wait (bounded) until the erl node printed `text`.
local function await_output(node, text, timeout)
  S.eventually(function() return S.has(output(node), text) end, timeout or 15000)
  return output(node)
end

local function kill(node)
  os.execute("kill -9 " .. node.pid .. " 2>/dev/null")
end

-- Prepended to every Moonbeam node's script: `connect(node)` retries until
-- the (just started) node accepts connections, then until its program has
-- registered its first process (every Erlang program here registers echo
-- or ctl first): epmd knows a node before its -eval runs, and a message to
-- a name not yet registered is dropped. A monitor by name tells (noproc
-- at once, or nothing). All bounded.
local PRELUDE = [[
local mb = require "moonbeam"
local function registered(name, n)
  local ref = mb.monitor({name, n})
  local d = mb.receive(function(m) return type(m) == "table" and m.ref == ref end, 300)
  if d then return false end
  mb.demonitor(ref, true)
  return true
end
local function connect(n)
  local up = false
  for _ = 1, 50 do
    if mb.connect_node(n) then up = true break end
    mb.sleep(200)
  end
  if not up then error("cannot connect to " .. n) end
  for _ = 1, 100 do
    if registered("echo", n) or registered("ctl", n) then return true end
    mb.sleep(50)
  end
  error("no echo or ctl registered on " .. n)
end
]]

local function script(src)
  return PRELUDE .. src:gsub("local e = arg%[1%]\n", "local e = arg[1] connect(e)\n")
end

-- Run a Moonbeam node with the script `src`; returns code, stdout, stderr.
local function moonbeam(src, opts)
  opts = opts or {}
  local name = opts.name or uniq("mb")
  local path = S.write("node.lua", script(src))
  return S.moonbeam(string.format("--sname %s --cookie %s %s %s %s", name,
    S.q(opts.cookie or COOKIE), opts.host_args or "", S.q(path), opts.args or ""), nil,
    opts.limit or 40)
end

-- Start a Moonbeam node in the background; returns its name and a function
-- that waits for it and returns code, stdout, stderr.
local function moonbeam_bg(src, opts)
  opts = opts or {}
  local name = opts.name or uniq("mb")
  local dir = S.tmpdir()
  local path = S.write("node.lua", script(src), dir)
  -- rc is written whole or not at all (renamed into place): a reader that
  -- sees the file sees the code, not an empty file being written.
  local cmd = string.format("timeout -k 5 %d %s --sname %s --cookie %s %s %s %s >%s/out 2>%s/err </dev/null; echo $? >%s/rc.tmp; mv %s/rc.tmp %s/rc",
    opts.limit or 40, S.q(S.bin), name, S.q(opts.cookie or COOKIE), opts.host_args or "",
    S.q(path), opts.args or "", dir, dir, dir, dir, dir)
  os.execute("(" .. cmd .. ") &")
  local function wait()
    S.eventually(function() return io.open(dir .. "/rc") ~= nil end, (opts.limit or 40) * 1000 + 10000)
    local function slurp(f) local h = io.open(dir .. "/" .. f) local s = h and h:read("*a") or "" if h then h:close() end return s end
    return tonumber(slurp("rc")), slurp("out"), slurp("err")
  end
  return name .. "@" .. HOST, wait
end

-- Wait in a Moonbeam script until a node is registered with epmd.
local WAIT_NODE = [[
local function wait_node(name)
  local alive = name:match("^[^@]+")
  for _ = 1, 100 do
    local e = io.popen("epmd -names 2>/dev/null")
    local names = e:read("*a") e:close()
    if names:find("name " .. alive .. " ", 1, true) then return true end
    mb.sleep(100)
  end
  error("node " .. name .. " did not come up")
end
]]

describe("distribution", function()
  local before
  before_each(function() before = S.snapshot() end)
  after_each(function()
    for i, node in ipairs(erls) do kill(node) erls[i] = nil end
    S.check_clean(before)
  end)
  teardown(S.cleanup_tmp)

  describe("without --sname", function()
    it("mb.node() is nonode@nohost and mb.nodes() is empty", function()
      assert.equal("nonode@nohost", mb.node())
      assert.same({}, mb.nodes())
    end)

    it("connect_node fails and a send to {name, node} is an error", function()
      local ok, err = mb.connect_node("x@" .. HOST)
      assert.is_nil(ok)
      assert.equal("not distributed", err)
      local ok2, e2 = pcall(mb.send, { "x", "x@" .. HOST }, 1)
      assert.is_false(ok2)
      assert.is_true(S.has(e2, "not a node"), e2)
    end)

    it("atoms are interned values that print as their name", function()
      local a = mb.atom("ok")
      assert.equal(a, mb.atom("ok"))
      assert.equal("ok", tostring(a))
      assert.is_true(mb.is_atom(a))
      assert.is_false(mb.is_atom("ok"))
      assert.has_error(function() mb.atom("") end)
      assert.has_error(function() mb.atom(string.rep("a", 2000)) end)
      assert.has_error(function() mb.atom(1) end)
    end)

    it("tuples and atoms round-trip between Lua processes", function()
      local t = mb.tuple(mb.atom("ok"), nil, "x")
      assert.is_true(mb.is_tuple(t))
      assert.is_false(mb.is_tuple({}))
      assert.equal(3, t.n)
      assert.equal("tuple", getmetatable(t))
      local pid = mb.spawn(function(parent)
        local m = mb.receive(5000)
        mb.send(parent, { back = m, is = mb.is_tuple(m), first = m[1] == mb.atom("ok") })
      end, mb.self())
      mb.send(pid, t)
      local r = S.recv(S.field("is", true))
      assert.is_true(r.first)
      assert.is_true(mb.is_tuple(r.back))
      assert.equal(3, r.back.n)
      assert.equal("{ok, nil, \"x\"}", tostring(r.back))
    end)
  end)

  describe("with an Erlang node", function()
    it("sends by name and by pid both ways", function()
      local e = erl([[
        register(echo, self()),
        receive {From, Msg} -> From ! {echo, Msg} end,
        receive {lua_pid, P} -> P ! {hello_from, node()}, io:format("sent~n") end,
        receive done -> io:format("done~n") end, halt().]])
      local code, out, err = moonbeam(WAIT_NODE .. [[
        local e = arg[1]
        mb.send({"echo", e}, mb.tuple(mb.self(), "ping"))
        local m = mb.receive(5000)
        print(mb.is_tuple(m), tostring(m[1]), m[2])
        local erl_pid = m.n and mb.whereis and nil
        mb.register("lua")
        mb.send({"echo", e}, mb.tuple(mb.atom("lua_pid"), mb.self()))
        local hi = mb.receive(5000)
        print(tostring(hi[1]), hi[2])
        print(#mb.nodes(), mb.nodes()[1] == e)
        mb.send({"echo", e}, mb.atom("done"))
        mb.sleep(200)
      ]], { args = S.q(e.name) })
      assert.equal(0, code, err)
      assert.is_true(S.has(out, "true\techo\tping"), out)
      assert.is_true(S.has(out, "hello_from\t" .. e.name), out)
      assert.is_true(S.has(out, "1\ttrue"), out)
      assert.is_true(S.has(await_output(e, "done"), "sent"))
    end)

    it("a name with a NUL from another node is nobody's, not the name before the NUL", function()
      local e = erl([[
        register(echo, self()),
        receive {go, P} ->
          Node = node(P),
          {list_to_atom("fuzz" ++ [0] ++ "x"), Node} ! bad,
          {fuzz, Node} ! good
        end,
        receive done -> halt() end.]])
      local code, out, err = moonbeam([[
        local e = arg[1]
        mb.register("fuzz")
        mb.send({"echo", e}, mb.tuple(mb.atom("go"), mb.self()))
        print("first", tostring(mb.receive(5000)))
        print("more", mb.receive(300))
        mb.send({"echo", e}, mb.atom("done"))
      ]], { args = S.q(e.name) })
      assert.equal(0, code, err)
      assert.is_true(S.has(out, "first\tgood"), out)
      assert.is_true(S.has(out, "more\tnil"), out)
    end)

    it("every row of the term mapping round-trips Lua -> Erlang -> Lua", function()
      local e = erl([[
        register(echo, self()),
        Loop = fun L() -> receive {From, Msg} -> From ! Msg, L(); stop -> halt() end end,
        Loop().]])
      local code, out, err = moonbeam([[
        local e = arg[1]
        local function deq(a, b)
          if a == b then return true end
          if type(a) ~= "table" or type(b) ~= "table" then return false end
          if mb.is_tuple(a) ~= mb.is_tuple(b) then return false end
          for k, v in pairs(a) do if not deq(v, b[k]) then return false end end
          for k in pairs(b) do if a[k] == nil then return false end end
          return true
        end
        local ref = mb.monitor(mb.self())  -- a local ref to carry
        mb.demonitor(ref, true)
        local values = {
          42, -7, 2^53, 1.5, -0.0, 1e300, true, false, "hello", "a\0b", "",
          string.rep("x", 100000), {}, {1, 2, 3}, {1, "two", {3}},
          {a = 1, b = "x"}, {1, 2, x = 3}, {[10] = "ten", [2.5] = "f"},
          {1, 2, ["$tail"] = 3}, mb.atom("ok"), mb.atom("undefined"),
          mb.tuple(mb.atom("ok"), 1, "x"), mb.tuple(), mb.tuple(1, nil, 3),
          mb.self(), ref, {pid = mb.self(), [5] = "k"},
          {nested = {deeper = {mb.atom("x"), {1.25}}}},
        }
        local bad = 0
        for i, v in ipairs(values) do
          mb.send({"echo", e}, mb.tuple(mb.self(), v))
          local back = mb.receive(5000)
          if not deq(v, back) then bad = bad + 1 print("mismatch", i, tostring(v), tostring(back)) end
        end
        -- A remote pid survives the round trip as the same value.
        mb.send({"echo", e}, mb.tuple(mb.self(), "x"))
        mb.receive(5000)
        print("rows", #values, "bad", bad)
        mb.send({"echo", e}, mb.atom("stop"))
      ]], { args = S.q(e.name) })
      assert.equal(0, code, err)
      assert.is_true(S.has(out, "bad\t0"), out)
    end)

    it("every row of the term mapping round-trips Erlang -> Lua -> Erlang", function()
      local name = uniq("mb")
      local node = name .. "@" .. HOST
      local e = erl(string.format([=[
        Node = '%s',
        Wait = fun W(0) -> exit(no_node); W(N) -> case net_adm:ping(Node) of pong -> ok; pang -> timer:sleep(100), W(N - 1) end end,
        Wait(100),
        Ref = make_ref(),
        Terms = [42, -7, 1 bsl 53, 1.5, -1.5e300, true, false, <<"bin">>, <<>>, [], [1, 2, 3],
                 "a string", [a, [b, [c]]], ok, undefined, {}, {ok, 1, <<"x">>}, {a, {b, {c}}},
                 #{a => 1, b => <<"x">>}, #{1 => one, 2.5 => two}, #{{t, 1} => tuple_key},
                 [1 | 2], [alias | Ref], self(), Ref, #{nested => #{deeper => [x, {1.25}]}},
                 1 bsl 60, -(1 bsl 40)],
        Bad = lists:filter(fun(T) ->
                {echo, Node} ! {self(), T},
                receive R -> R =/= T after 5000 -> true end
              end, Terms),
        io:format("terms ~p bad ~p~n", [length(Terms), Bad]),
        {echo, Node} ! stop,
        halt().]=], node))
      local code, out, err = moonbeam([[
        mb.register("echo")
        while true do
          local m = mb.receive(20000)
          if m == nil or m == mb.atom("stop") then break end
          mb.send(m[1], m[2])
        end
      ]], { name = name })
      assert.equal(0, code, err)
      local o = await_output(e, "terms")
      assert.is_true(S.has(o, "bad []"), o)
    end)

    it("documented one-way rows: floats with integral values, binary map keys, nil values", function()
      local e = erl([[
        register(echo, self()),
        receive {From, go} -> From ! {2.0, #{<<"k">> => 1, v => nil}, nil} end,
        receive {From2, Back} -> io:format("back ~p~n", [Back]) end, halt().]])
      local code, out, err = moonbeam([[
        local e = arg[1]
        mb.send({"echo", e}, mb.tuple(mb.self(), mb.atom("go")))
        local m = mb.receive(5000)
        print(m[1], m[2].k, m[2].v, m[3])
        mb.send({"echo", e}, mb.tuple(mb.self(), m))
        mb.sleep(300)
      ]], { args = S.q(e.name) })
      assert.equal(0, code, err)
      assert.is_true(S.has(out, "2\t1\tnil\tnil"), out)
      local o = await_output(e, "back")
      assert.is_true(S.has(o, "back {2,#{k => 1},nil}"), o)
    end)

    it("values with no Erlang meaning fail at send with a clear error", function()
      local e = erl([[register(echo, self()), receive stop -> halt() end.]])
      local code, out, err = moonbeam([[
        local e = arg[1]
        for _, v in ipairs({ function() end, 1/0, {print}, {[string.rep("k", 300)] = 1} }) do
          local ok, msg = pcall(mb.send, {"echo", e}, v)
          print(ok, msg)
        end
        local ok, msg = pcall(mb.send, {"echo"}, 1)
        print(ok, msg)
        -- A bad destination raises after the message was encoded: it is
        -- freed, not leaked (the ASan run checks).
        for _, d in ipairs({ {1, e}, {"echo", "nohost"}, {string.rep("n", 2000), e} }) do
          print("baddest", pcall(mb.send, d, {1, 2, 3}))
        end
        mb.send({"echo", e}, mb.atom("stop"))
      ]], { args = S.q(e.name) })
      assert.equal(0, code, err)
      assert.is_true(S.has(out, "false\tsend: cannot send a function to another node"), out)
      assert.is_true(S.has(out, "cannot send inf or nan"), out)
      assert.is_true(S.has(out, "255 bytes"), out)
      assert.is_true(S.has(out, "{name, node} expected"), out)
      assert.is_true(S.has(out, "baddest\tfalse\tbad argument #1 to 'send' (name (a string or atom) expected, got number)"), out)
      assert.is_true(S.has(out, "baddest\tfalse\tbad argument #1 to 'send' (node name name@host expected, got 'nohost')"), out)
      assert.is_true(S.has(out, "baddest\tfalse\tbad argument #1 to 'send' (name must be 1 to 1020 bytes)"), out)
    end)

    it("a message holding a fun is dropped and logged; the connection stays", function()
      local e = erl([[
        register(echo, self()),
        receive {From, go} -> From ! {fun() -> ok end}, From ! after_fun end,
        receive stop -> halt() end.]])
      local code, out, err = moonbeam([[
        local e = arg[1]
        mb.send({"echo", e}, mb.tuple(mb.self(), mb.atom("go")))
        print(tostring(mb.receive(5000)))
        mb.send({"echo", e}, mb.atom("stop"))
      ]], { args = S.q(e.name) })
      assert.equal(0, code, err)
      assert.is_true(S.has(out, "after_fun"), out)
      assert.is_true(S.has(err, "dropped a message"), err)
    end)

    it("links across nodes, both ways", function()
      local name = uniq("mb")
      local node = name .. "@" .. HOST
      local e = erl(string.format([[
        Node = '%s',
        register(ctl, self()),
        receive {lua, LuaPid} -> ok end,
        %% Erlang links to the Lua process, which then exits.
        process_flag(trap_exit, true),
        link(LuaPid),
        LuaPid ! go,
        receive {'EXIT', LuaPid, R2} -> io:format("exit ~p~n", [R2]) after 5000 -> io:format("no exit~n") end,
        %% A process the Lua side monitors and links to, which exits.
        Victim = spawn(fun() -> receive die -> exit(erl_reason) end end),
        {watcher, Node} ! {victim, Victim},
        receive ready -> Victim ! die end,
        receive stop -> halt() end.]], node))
      local code, out, err = moonbeam([[
        local e = arg[1]
        mb.register("watcher")
        local p = mb.spawn(function() mb.receive(10000) mb.exit("lua_reason") end)
        mb.send({"ctl", e}, mb.tuple(mb.atom("lua"), p))
        local v = mb.receive(25000)
        local victim = v[2]
        print("victim", tostring(victim))
        mb.trap_exit(true)
        mb.link(victim)
        mb.send({"ctl", e}, mb.atom("ready"))
        local m = mb.receive(function(m) return type(m) == "table" and m.event end, 5000)
        print("EXIT", m and m.reason, m and m.pid == victim)
        mb.send({"ctl", e}, mb.atom("stop"))
      ]], { name = name, args = S.q(e.name) })
      assert.equal(0, code, err)
      local o = await_output(e, "exit")
      assert.is_true(S.has(o, "exit lua_reason"), o)
      assert.is_true(S.has(out, "EXIT\terl_reason\ttrue"), out)
    end)

    it("monitors between Erlang and Moonbeam processes fire when the process exits", function()
      local name = uniq("mb")
      local node = name .. "@" .. HOST
      local e = erl(string.format([[
        Node = '%s',
        register(ctl, self()),
        receive {lua, LuaPid} -> ok end,
        %% Erlang monitors a Lua process by pid and one by name; both exit.
        R1 = erlang:monitor(process, LuaPid),
        R2 = erlang:monitor(process, {named, Node}),
        %% A monitor of a name nobody has: noproc at once.
        R3 = erlang:monitor(process, {nobody, Node}),
        receive {'DOWN', R3, process, _, N3} -> io:format("down3 ~p~n", [N3]) after 5000 -> io:format("no down3~n") end,
        %% A monitor taken off before the process exits never fires.
        R4 = erlang:monitor(process, LuaPid),
        true = erlang:demonitor(R4),
        LuaPid ! go,
        {named, Node} ! go,
        receive {'DOWN', R1, process, LuaPid, X1} -> io:format("down1 ~p~n", [X1]) after 5000 -> io:format("no down1~n") end,
        receive {'DOWN', R2, process, {named, Node}, X2} -> io:format("down2 ~p~n", [X2]) after 5000 -> io:format("no down2~n") end,
        receive {'DOWN', R4, _, _, _} -> io:format("down4~n") after 300 -> io:format("no down4~n") end,
        %% Erlang processes the Lua side monitors: one exits, one is demonitored.
        V = spawn(fun() -> receive die -> exit(erl_reason) end end),
        W = spawn(fun() -> receive die -> exit(other) end end),
        {watcher, Node} ! {victims, V, W},
        receive ready -> V ! die, W ! die end,
        receive stop -> halt() end.]], node))
      local code, out, err = moonbeam([[
        local e = arg[1]
        mb.register("watcher")
        local p = mb.spawn(function() mb.receive(15000) mb.exit("lua_reason") end)
        mb.spawn(function() mb.register("named") mb.receive(15000) mb.exit("named_reason") end)
        -- Erlang monitors "named" once told: it must be registered by then.
        for _ = 1, 500 do
          if mb.whereis("named") then break end
          mb.sleep(10)
        end
        mb.send({"ctl", e}, mb.tuple(mb.atom("lua"), p))
        local v = mb.receive(function(m) return mb.is_tuple(m) end, 25000)
        local r1 = mb.monitor(v[2])
        local r2 = mb.monitor(v[3])
        print("demonitor", mb.demonitor(r2))
        mb.send({"ctl", e}, mb.atom("ready"))
        local d = mb.receive(function(m) return type(m) == "table" and m.event == "DOWN" end, 5000)
        print("DOWN", d and d.reason, d and d.ref == r1, d and d.pid == v[2])
        print("more", mb.receive(function(m) return type(m) == "table" and m.event == "DOWN" end, 300))
        mb.send({"ctl", e}, mb.atom("stop"))
      ]], { name = name, args = S.q(e.name) })
      assert.equal(0, code, err)
      local o = await_output(e, "down2")
      assert.is_true(S.has(o, "down3 noproc"), o)
      assert.is_true(S.has(o, "down1 lua_reason"), o)
      assert.is_true(S.has(o, "down2 named_reason"), o)
      assert.is_true(S.has(await_output(e, "down4"), "no down4"), output(e))
      assert.is_true(S.has(out, "DOWN\terl_reason\ttrue\ttrue"), out)
      assert.is_true(S.has(out, "more\tnil"), out)
    end)

    -- An Erlang gen_server for the Lua side to call (compiled in the node).
    local KVSRV = [[
-module(kvsrv).
-behaviour(gen_server).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2]).
init(S) -> {ok, S}.
handle_call({get, K}, _From, S) -> {reply, maps:get(K, S, undefined), S};
handle_call({put, K, V}, _From, S) -> {reply, ok, S#{K => V}};
handle_call({slow, Ms}, _From, S) -> timer:sleep(Ms), {reply, late, S};
handle_call(crash, _From, _S) -> exit(crashed).
handle_cast({put, K, V}, S) -> {noreply, S#{K => V}}.
handle_info(_, S) -> {noreply, S}.
]]

    it("gen_server:call, cast, sys:get_state and gen_server:stop from Erlang reach a moonbeam.server", function()
      local name = uniq("mb")
      local node = name .. "@" .. HOST
      local e = erl(string.format([=[
        S = {lsrv, '%s'},
        Wait = fun W(0) -> exit(no_server); W(N) -> case catch sys:get_state(S, 1000) of #{} -> ok; _ -> timer:sleep(100), W(N - 1) end end,
        Wait(150),
        io:format("call1 ~p~n", [gen_server:call(S, hello)]),
        io:format("call2 ~p~n", [gen_server:call(S, {a, [1, 2], <<"x">>})]),
        ok = gen_server:cast(S, {put, 1}),
        io:format("state ~p~n", [sys:get_state(S)]),
        io:format("later ~p~n", [gen_server:call(S, later)]),
        io:format("timeout ~p~n", [catch gen_server:call(S, slow, 200)]),
        timer:sleep(1500),
        io:format("mailbox ~p~n", [process_info(self(), messages)]),
        io:format("stop ~p~n", [catch gen_server:stop(S)]),
        io:format("noproc ~p~n", [catch gen_server:call(S, hello, 2000)]),
        {ctl, '%s'} ! done,
        timer:sleep(500),
        halt().]=], node, node))
      local code, out, err = moonbeam([[
        local server = require "moonbeam.server"
        mb.register("ctl")
        local pid = server.start({
          init = function() return { n = 0 } end,
          handle_call = function(req, from, st)
            if req == mb.atom("slow") then mb.sleep(1000) return "late", st end
            if req == mb.atom("later") then
              mb.spawn(function(f) mb.sleep(50) require("moonbeam.server").reply(f, "deferred") end, from)
              return server.noreply, st
            end
            st.n = st.n + 1
            return mb.tuple(mb.atom("ok"), req, st.n), st
          end,
          handle_cast = function(msg, st) st.cast = msg return st end,
          terminate = function(r) print("terminate", r) end,
        }, nil, { name = "lsrv" })
        local ref = mb.monitor(pid)
        local d = mb.receive(function(m) return type(m) == "table" and m.event == "DOWN" end, 30000)
        print("down", d and d.reason)
        print("done", tostring(mb.receive(30000)))
      ]], { name = name, limit = 60 })
      assert.equal(0, code, err)
      local o = await_output(e, "noproc")
      assert.is_true(S.has(o, "call1 {ok,hello,1}"), o)
      assert.is_true(S.has(o, 'call2 {ok,{a,[1,2],<<"x">>},2}'), o)
      assert.is_true(S.has(o, "state #{cast => {put,1},n => 2}"), o)
      assert.is_true(S.has(o, 'later <<"deferred">>'), o)
      assert.is_true(S.has(o, "timeout {'EXIT',{timeout,"), o)
      -- The late reply went through the caller's alias, which was gone.
      assert.is_true(S.has(o, "mailbox {messages,[]}"), o)
      assert.is_true(S.has(o, "stop ok"), o)
      assert.is_true(S.has(o, "noproc {'EXIT',{noproc,"), o)
      assert.is_true(S.has(out, "terminate\tnormal"), out)
      assert.is_true(S.has(out, "down\tnormal"), out)
      assert.is_true(S.has(out, "done\tdone"), out)
    end)

    it("the refs of many calls from Erlang are not kept: remote refs live while a process holds them", function()
      local name = uniq("mb")
      local node = name .. "@" .. HOST
      local e = erl(string.format([=[
        S = {lsrv, '%s'},
        Wait = fun W(0) -> exit(no_server); W(N) -> case catch gen_server:call(S, count, 1000) of C when is_integer(C) -> C; _ -> timer:sleep(100), W(N - 1) end end,
        Before = Wait(150),
        [gen_server:call(S, {ref, make_ref()}) || _ <- lists:seq(1, 2000)],
        ok = gen_server:cast(S, collect),
        After = gen_server:call(S, count),
        io:format("refs ~p ~p~n", [Before, After]),
        {ctl, '%s'} ! done,
        timer:sleep(300),
        halt().]=], node, node), { limit = 60 })
      local code, out, err = moonbeam([[
        local server = require "moonbeam.server"
        mb.register("ctl")
        server.start({
          handle_call = function(req, from, st)
            if req == mb.atom("count") then return mb.node_info().remote_refs, st end
            st.last = req[2]     -- hold the newest ref until the next call
            return mb.atom("ok"), st
          end,
          handle_cast = function(msg, st)
            collectgarbage() collectgarbage()
            return st
          end,
        }, {}, { name = "lsrv" })
        print("done", tostring(mb.receive(45000)))
        server.stop("lsrv")
      ]], { name = name, limit = 60 })
      assert.equal(0, code, err .. output(e))
      local o = await_output(e, "refs")
      local before, after = o:match("refs (%d+) (%d+)")
      assert.is_truthy(before, o)
      -- Each call brought two new refs (the alias and make_ref()); what is
      -- left is what the server holds (the last one) and the call in flight.
      assert.is_true(tonumber(after) - tonumber(before) <= 4, o)
      assert.is_true(S.has(out, "done\tdone"), out)
    end)

    it("server.call and cast from Lua reach an Erlang gen_server, by name and by pid", function()
      local e = erl([[
        {ok, kvsrv} = compile:file("kvsrv.erl"),
        {ok, Pid} = gen_server:start({local, kv}, kvsrv, #{}, []),
        register(ctl, self()),
        receive {From, pid} -> From ! Pid end,
        receive {From2, kill} -> exit(Pid, kill), From2 ! killed end,
        {ok, _} = gen_server:start({local, kv2}, kvsrv, #{}, []),
        receive {From3, halt_soon} -> timer:apply_after(300, erlang, halt, []), From3 ! ok end,
        receive stop -> halt() end.]], { files = { ["kvsrv.erl"] = KVSRV } })
      local code, out, err = moonbeam([[
        local server = require "moonbeam.server"
        local e = arg[1]
        local kv = {"kv", e}
        for _ = 1, 100 do   -- until the Erlang node has compiled and started kv
          if pcall(server.call, kv, mb.tuple(mb.atom("get"), "k"), 1000) then break end
          mb.sleep(100)
        end
        print("put", tostring(server.call(kv, mb.tuple(mb.atom("put"), "k", 42))))
        print("get", server.call(kv, mb.tuple(mb.atom("get"), "k")))
        print("cast", server.cast(kv, mb.tuple(mb.atom("put"), "c", "v")))
        print("getc", server.call(kv, mb.tuple(mb.atom("get"), "c")))
        print("state", server.get_state(kv).k)
        print("timeout", pcall(server.call, kv, mb.tuple(mb.atom("slow"), 800), 200))
        mb.sleep(1200)
        print("mailbox", mb.receive(0))
        print("noproc", pcall(server.call, {"nobody", e}, 1))
        mb.send({"ctl", e}, mb.tuple(mb.self(), mb.atom("pid")))
        local pid = mb.receive(5000)
        print("node", mb.node(pid) == e)
        print("bypid", server.call(pid, mb.tuple(mb.atom("get"), "k")))
        print("crash", pcall(server.call, kv, mb.atom("crash")))
        print("unsendable", pcall(server.call, {"kv", e}, function() end))
        mb.send({"ctl", e}, mb.tuple(mb.self(), mb.atom("kill")))
        mb.receive(5000)
        print("dead", pcall(server.call, pid, 1))
        mb.send({"ctl", e}, mb.tuple(mb.self(), mb.atom("halt_soon")))
        mb.receive(5000)
        print("nodedown", pcall(server.call, {"kv2", e}, mb.tuple(mb.atom("slow"), 5000), 10000))
      ]], { args = S.q(e.name) })
      assert.equal(0, code, err)
      assert.is_true(S.has(out, "put\tok"), out)
      assert.is_true(S.has(out, "get\t42"), out)
      assert.is_true(S.has(out, "cast\ttrue"), out)
      assert.is_true(S.has(out, "getc\tv"), out)
      assert.is_true(S.has(out, "state\t42"), out)
      assert.is_true(S.has(out, "timeout\tfalse\t") and S.has(out, "server.call: timeout after 200 ms"), out)
      assert.is_true(S.has(out, "mailbox\tnil"), out)
      assert.is_true(S.has(out, "is not running (noproc)"), out)
      assert.is_true(S.has(out, "node\ttrue"), out)
      assert.is_true(S.has(out, "bypid\t42"), out)
      assert.is_true(S.has(out, "exited during the call crash: crashed"), out)
      assert.is_true(S.has(out, "unsendable\tfalse") and S.has(out, "cannot send the request"), out)
      assert.is_true(S.has(out, "dead\tfalse"), out)
      assert.is_true(S.has(out, "its node is down (nodedown)"), out)
    end)

    it("mb.exit on a remote pid sends an exit signal", function()
      local e = erl([[
        register(ctl, self()),
        P = spawn(fun() -> receive _ -> ok end end),
        Dead = spawn(fun() -> ok end),
        receive {From, go} -> From ! {P, Dead} end,
        Ref = erlang:monitor(process, P),
        receive {'DOWN', Ref, process, P, R} -> io:format("killed ~p~n", [R]) after 5000 -> io:format("alive~n") end,
        halt().]])
      local code, out, err = moonbeam([[
        local e = arg[1]
        mb.send({"ctl", e}, mb.tuple(mb.self(), mb.atom("go")))
        local m = mb.receive(5000)
        mb.exit(m[1], "kill")
        mb.sleep(300)
      ]], { args = S.q(e.name) })
      assert.equal(0, code, err)
      assert.is_true(S.has(await_output(e, "killed"), "killed killed"), output(e))
    end)

    it("links fire noconnection, monitors DOWN noconnection, monitor_node nodedown when the node is killed", function()
      local e = erl([[
        register(ctl, self()),
        P = spawn(fun() -> receive _ -> ok end end),
        receive {From, go} -> From ! P end,
        receive stop -> halt() end.]], { limit = 60 })
      local ready = S.tmpdir() .. "/ready"
      local name, wait = moonbeam_bg([[
        local e = arg[1]
        mb.send({"ctl", e}, mb.tuple(mb.self(), mb.atom("go")))
        local p = mb.receive(5000)
        mb.trap_exit(true)
        local ref = mb.monitor(p)
        mb.link(p)
        mb.monitor_node(e)
        print("ready") io.stdout:flush()
        local f = io.open(arg[2], "w") f:write("ready") f:close()
        local got = {}
        for _ = 1, 3 do
          local m = mb.receive(function(m) return type(m) == "table" and m.event end, 15000)
          if m then got[m.event] = m end
        end
        print("DOWN", got.DOWN and got.DOWN.reason, got.DOWN and got.DOWN.ref == ref)
        print("EXIT", got.EXIT and got.EXIT.reason, got.EXIT and got.EXIT.pid == p)
        print("nodedown", got.nodedown and got.nodedown.node == e)
        print("nodes", #mb.nodes())
      ]], { args = S.q(e.name) .. " " .. S.q(ready) })
      local up = S.eventually(function()
        local f = io.open(ready) if f then f:close() end return f ~= nil end, 20000)
      if not up then kill(e) local c, o, er = wait() error("node not ready: " .. o .. er) end
      kill(e)
      local code, out, err = wait()
      assert.equal(0, code, err)
      assert.is_true(S.has(out, "DOWN\tnoconnection\ttrue"), out)
      assert.is_true(S.has(out, "EXIT\tnoconnection\ttrue"), out)
      assert.is_true(S.has(out, "nodedown\ttrue"), out)
      assert.is_true(S.has(out, "nodes\t0"), out)
    end)

    -- A connection's links and monitors are hash tables: as lists, 100,000
    -- monitors each way taken off in the order made took minutes.
    it("many monitors over one connection, both ways, made, taken off and ended by noconnection", function()
      local N = 100000
      local e = erl(string.format([[
        register(ctl, self()),
        P = spawn(fun() -> receive _ -> ok end end),
        receive {From, go} -> From ! P,
          Refs = [erlang:monitor(process, From) || _ <- lists:seq(1, %d)],
          [erlang:demonitor(R) || R <- Refs],
          From ! <<"erl done">>
        end,
        receive stop -> halt() end.]], N), { limit = 90 })
      local code, out, err = moonbeam(string.format([[
        local e = arg[1]
        local N = %d
        mb.send({"ctl", e}, mb.tuple(mb.self(), mb.atom("go")))
        local p = mb.receive(5000)
        local refs = {}
        for i = 1, N do refs[i] = mb.monitor(p) end
        for i = 1, N do mb.demonitor(refs[i]) end
        for i = 1, N do refs[i] = mb.monitor(p) end
        print("erl", mb.receive(function(m) return m == "erl done" end, 60000))
        mb.send({"ctl", e}, mb.atom("stop"))
        local downs = 0
        for _ = 1, N do
          local m = mb.receive(function(m) return type(m) == "table" and m.event == "DOWN" end, 30000)
          if not m or m.reason ~= "noconnection" then break end
          downs = downs + 1
        end
        print("downs", downs)
      ]], N), { args = S.q(e.name), limit = 90 })
      kill(e)
      assert.equal(0, code, err)
      assert.is_true(S.has(out, "erl\terl done"), out)
      assert.is_true(S.has(out, "downs\t" .. N), out)
    end)

    it("a peer with the wrong cookie is refused and the refusal is logged", function()
      local e = erl([[register(ctl, self()), receive stop -> halt() end.]], { cookie = "another_cookie" })
      local code, out, err = moonbeam([[
        print("connect", mb.connect_node(arg[1]))
        print("nodes", #mb.nodes())
      ]], { args = S.q(e.name) })
      assert.equal(0, code, err)
      assert.is_true(S.has(out, "connect\tnil\tnoconnection"), out)
      assert.is_true(S.has(out, "nodes\t0"), out)
      -- And the other way: the Erlang node calls us with its cookie.
      local name, wait = moonbeam_bg([[ mb.sleep(4000) ]])
      local e2 = erl(string.format([[
        timer:sleep(1500),
        io:format("ping ~p~n", [net_adm:ping('%s')]), halt().]], name), { cookie = "another_cookie" })
      local o = await_output(e2, "ping")
      assert.is_true(S.has(o, "ping pang"), o)
      local code2, out2, err2 = wait()
      assert.equal(0, code2, err2)
      assert.is_true(S.has(err2, "refused a connection"), err2)
    end)
  end)

  -- A hand-made peer (an Erlang module over gen_tcp): the handshake done by
  -- hand, or spoiled, then raw frames, so that the tests can send what no
  -- real node would and stop reading.
  local RAWPEER = [[
-module(rawpeer).
-export([connect/3, raw/2, frame/2, tick_forever/1]).
flags() ->
    16#4 bor 16#8 bor 16#10 bor 16#80 bor 16#100 bor 16#800 bor 16#4000 bor
    16#10000 bor 16#20000 bor 16#40000 bor 16#1000000 bor 16#2000000 bor
    16#4000000 bor (4 bsl 32).
raw(Node, Packet) ->
    [Alive, Host] = string:split(atom_to_list(Node), "@"),
    {port, Port, _} = erl_epmd:port_please(Alive, Host),
    {ok, S} = gen_tcp:connect(Host, Port, [binary, {packet, Packet}, {active, false}]),
    S.
connect(Node, Cookie, Name) ->
    S = raw(Node, 2),
    NameB = list_to_binary(Name),
    ok = gen_tcp:send(S, <<$N, (flags()):64, 1:32, (byte_size(NameB)):16, NameB/binary>>),
    {ok, <<$s, "ok">>} = gen_tcp:recv(S, 0, 5000),
    {ok, <<$N, _:64, Challenge:32, _/binary>>} = gen_tcp:recv(S, 0, 5000),
    ok = gen_tcp:send(S, <<$r, 42:32, (erlang:md5([Cookie, integer_to_list(Challenge)]))/binary>>),
    {ok, <<$a, _/binary>>} = gen_tcp:recv(S, 0, 5000),
    ok = inet:setopts(S, [{packet, 4}]),
    S.
frame(Ctl, none) -> <<$p, (term_to_binary(Ctl))/binary>>;
frame(Ctl, Msg) -> <<$p, (term_to_binary(Ctl))/binary, (term_to_binary(Msg))/binary>>.
tick_forever(S) ->
    case gen_tcp:send(S, <<>>) of ok -> timer:sleep(200), tick_forever(S); _ -> ok end.
]]

  describe("connections", function()
    it("a peer that spoils the handshake or sends malformed frames is dropped and logged; the host goes on", function()
      local name = uniq("mb")
      local node = name .. "@" .. HOST
      local e = erl(string.format([=[
        {ok, rawpeer} = compile:file("rawpeer.erl"),
        Node = '%s', Cookie = "%s", Me = atom_to_list(node()),
        Wait = fun W(0) -> exit(no_node); W(N) -> case net_adm:ping(Node) of pong -> ok; pang -> timer:sleep(100), W(N - 1) end end,
        Wait(100),
        Closed = fun(S) -> case gen_tcp:recv(S, 0, 5000) of {error, closed} -> closed; Else -> Else end end,
        Fake = fun(I) -> "fake" ++ integer_to_list(I) ++ "@" ++ lists:nth(2, string:split(Me, "@")) end,
        %% The handshake spoiled: not a name packet; a name, then nothing.
        S1 = rawpeer:raw(Node, 2), ok = gen_tcp:send(S1, <<"GET / HTTP/1.0">>),
        io:format("notname ~p~n", [Closed(S1)]),
        S2 = rawpeer:raw(Node, 2), ok = gen_tcp:send(S2, <<$N, 0:64>>),
        io:format("shortname ~p~n", [Closed(S2)]),
        %% After the handshake: frames no node sends.
        Bad = [{notp, <<"xyz">>},
               {badterm, <<$p, 131, 104, 2, 97, 1>>},
               {wrongarity, rawpeer:frame({2}, none)},
               {notuple, rawpeer:frame(42, none)},
               {badsend, <<$p, (term_to_binary({2, '', self()}))/binary, 131, 255>>}],
        lists:foreach(fun({I, {What, Bytes}}) ->
            S = rawpeer:connect(Node, Cookie, Fake(I)),
            ok = gen_tcp:send(S, Bytes),
            io:format("~p ~p~n", [What, Closed(S)])
          end, lists:zip(lists:seq(1, length(Bad)), Bad)),
        %% A frame longer than the limit: the length alone closes it.
        S3 = rawpeer:connect(Node, Cookie, Fake(10)),
        ok = inet:setopts(S3, [{packet, raw}]), ok = gen_tcp:send(S3, <<255, 255, 255, 240, 0>>),
        io:format("huge ~p~n", [Closed(S3)]),
        %% What is well formed stays: an operation we do not know, a fun.
        S4 = rawpeer:connect(Node, Cookie, Fake(11)),
        ok = gen_tcp:send(S4, rawpeer:frame({99, x}, none)),
        ok = gen_tcp:send(S4, rawpeer:frame({6, self(), '', target}, {fun() -> ok end})),
        ok = gen_tcp:send(S4, rawpeer:frame({6, self(), '', target}, after_unknown)),
        io:format("unknown ~p~n", [gen_tcp:recv(S4, 0, 1000)]),
        gen_tcp:close(S4),
        {target, Node} ! done,
        io:format("finished~n"),
        timer:sleep(500),
        halt().]=], node, COOKIE), { files = { ["rawpeer.erl"] = RAWPEER }, limit = 60 })
      local code, out, err = moonbeam([[
        mb.register("target")
        for _ = 1, 2 do
          local m = mb.receive(40000)
          print("got", tostring(m))
        end
        print("nodes", #mb.nodes())
      ]], { name = name, limit = 60 })
      assert.equal(0, code, err)
      local o = await_output(e, "finished", 40000)
      for _, what in ipairs({ "notname", "shortname", "notp", "badterm", "wrongarity", "notuple",
                              "badsend", "huge" }) do
        assert.is_true(S.has(o, what .. " closed"), what .. ": " .. o)
      end
      assert.is_true(S.has(o, "unknown {error,timeout}"), o)
      assert.is_true(S.has(out, "got\tafter_unknown"), out)
      assert.is_true(S.has(out, "got\tdone"), out)
      assert.is_true(S.has(err, "refused a connection"), err)
      assert.is_true(S.has(err, "malformed message"), err)
      assert.is_true(S.has(err, "a frame of 4294967280 bytes"), err)
      assert.is_true(S.has(err, "dropped a message from fake11"), err)
    end)

    -- Incoming handshakes run each on a thread of its own, within
    -- net_setuptime (7 s) in all: before, they ran one at a time, each read
    -- bounded but not the whole, so a peer sending a byte every 500 ms held
    -- off every other node for as long as it liked.
    local RAW = [=[
        {ok, rawpeer} = compile:file("rawpeer.erl"),
        Node = '%s',
        Raw = fun W(0) -> exit(no_node); W(N) -> case catch rawpeer:raw(Node, 2) of {'EXIT', _} -> timer:sleep(100), W(N - 1); S -> S end end,
        Closed = fun(S, T) -> case gen_tcp:recv(S, 0, T) of {error, closed} -> closed; {error, timeout} -> open; Else -> Else end end,
]=]

    -- The node under test for a raw peer's script: it waits until the
    -- script sends `done` to its process registered as ctl.
    local function ctl_host(name)
      return moonbeam([[
        mb.register("ctl")
        print("got", mb.receive(50000))
      ]], { name = name, limit = 60 })
    end

    it("a peer that trickles its handshake or sends nothing holds off no other node, and is dropped at net_setuptime", function()
      local name = uniq("mb")
      local node = name .. "@" .. HOST
      local e = erl(string.format(RAW .. [=[
        Self = self(),
        spawn(fun() ->
            S1 = Raw(100), ok = inet:setopts(S1, [{packet, raw}]),
            ok = gen_tcp:send(S1, <<0, 200, $N>>),
            Self ! trickling,
            Trickle = fun L(0) -> open; L(K) -> timer:sleep(500),
                        case gen_tcp:send(S1, <<0>>) of
                          ok -> case Closed(S1, 0) of closed -> closed; _ -> L(K - 1) end;
                          _ -> closed end end,
            Self ! {trickler, Trickle(40)}
          end),
        receive trickling -> ok end,
        S2 = Raw(100),
        timer:sleep(500),
        io:format("ping ~p~n", [net_adm:ping(Node)]),
        io:format("during ping ~p~n", [receive {trickler, _} = T -> T after 0 -> still_trickling end]),
        io:format("trickler ~p~n", [receive {trickler, R} -> R after 30000 -> no_answer end]),
        io:format("silent ~p~n", [Closed(S2, 15000)]),
        {ctl, Node} ! done,
        timer:sleep(500),
        halt().]=], node), { files = { ["rawpeer.erl"] = RAWPEER }, limit = 60 })
      local code, out, err = ctl_host(name)
      local o = await_output(e, "silent", 5000)
      assert.equal(0, code, err)
      assert.is_true(S.has(o, "ping pong"), o)
      assert.is_true(S.has(o, "during ping still_trickling"), o)
      assert.is_true(S.has(o, "trickler closed"), o)
      assert.is_true(S.has(o, "silent closed"), o)
      assert.is_true(S.has(out, "got\tdone"), out)
      local _, drops = err:gsub("its handshake was not done within 7000 ms", "")
      assert.equal(2, drops, err)
    end)

    it("--net-setuptime sets the time a handshake may take", function()
      -- The node connects to its own port (from epmd) and sends nothing.
      local code, out, err = moonbeam([[
        local tcp = require "moonbeam.tcp"
        local alive = tostring(mb.node()):match("^[^@]+")
        local port
        for _ = 1, 100 do
          local e = io.popen("epmd -names 2>/dev/null")
          port = tonumber(e:read("*a"):match("name " .. alive .. " at port (%d+)"))
          e:close()
          if port then break end
          mb.sleep(100)
        end
        local s = assert(tcp.connect("127.0.0.1", port, 5000))
        print("read", s:read(20000))
      ]], { host_args = "--net-setuptime 2", limit = 30 })
      assert.equal(0, code, err)
      assert.is_true(S.has(out, "read\tnil\tclosed"), out .. err)
      assert.is_true(S.has(err, "its handshake was not done within 2000 ms (net_setuptime)"), err)
    end)

    it("at most 16 incoming handshakes at once: one more is closed at once and logged", function()
      local name = uniq("mb")
      local node = name .. "@" .. HOST
      local e = erl(string.format(RAW .. [=[
        Silent = [Raw(100) || _ <- lists:seq(1, 16)],
        timer:sleep(500),
        S17 = Raw(100),
        io:format("17th ~p~n", [Closed(S17, 5000)]),
        io:format("first then ~p~n", [Closed(hd(Silent), 0)]),
        io:format("all dropped ~p~n", [lists:usort([Closed(S, 15000) || S <- Silent])]),
        io:format("ping ~p~n", [net_adm:ping(Node)]),
        {ctl, Node} ! done,
        timer:sleep(500),
        halt().]=], node), { files = { ["rawpeer.erl"] = RAWPEER }, limit = 60 })
      local code, out, err = ctl_host(name)
      local o = await_output(e, "ping", 5000)
      assert.equal(0, code, err)
      assert.is_true(S.has(o, "17th closed"), o)
      assert.is_true(S.has(o, "first then open"), o)
      assert.is_true(S.has(o, "all dropped [closed]"), o)
      assert.is_true(S.has(o, "ping pong"), o)
      assert.is_true(S.has(out, "got\tdone"), out)
      assert.is_true(S.has(err, "16 handshakes are in progress already"), err)
    end)

    it("output to a peer that does not read: senders wait at the busy limit, the connection is dropped after net_ticktime", function()
      local name = uniq("mb")
      local node = name .. "@" .. HOST
      local e = erl(string.format([=[
        {ok, rawpeer} = compile:file("rawpeer.erl"),
        Node = '%s',
        Wait = fun W(0) -> exit(no_node); W(N) -> case catch rawpeer:connect(Node, "%s", "sink@" ++ lists:nth(2, string:split(atom_to_list(node()), "@"))) of {'EXIT', _} -> timer:sleep(100), W(N - 1); S -> S end end,
        S = Wait(100),
        io:format("connected~n"),
        rawpeer:tick_forever(S),
        io:format("dropped~n"),
        halt().]=], node, COOKIE), { files = { ["rawpeer.erl"] = RAWPEER }, limit = 60 })
      local code, out, err = moonbeam([[
        local sink = "sink@" .. mb.node():match("@(.*)")
        for _ = 1, 300 do
          if #mb.nodes() > 0 then break end
          mb.sleep(100)
        end
        print("up", mb.nodes()[1] == sink)
        local me = mb.self()
        local sender = mb.spawn(function()
          local chunk = string.rep("x", 256 * 1024)
          for i = 1, 64 do
            mb.send({"nobody", sink}, chunk)
            mb.send(me, i)
          end
        end)
        local sent, t0 = 0, mb.now()
        while true do
          local i = mb.receive(500)
          if i == nil then break end
          sent = i
        end
        print("blocked", sent < 64)
        while sent < 64 do sent = mb.receive(10000) or 64 end
        print("finished after", mb.now() - t0 > 1000)
        print("nodes", #mb.nodes())
      ]], { name = name, host_args = "--net-ticktime 2", limit = 60 })
      assert.equal(0, code, err)
      assert.is_true(S.has(out, "up\ttrue"), out)
      assert.is_true(S.has(out, "blocked\ttrue"), out)
      assert.is_true(S.has(out, "finished after\ttrue"), out)
      assert.is_true(S.has(out, "nodes\t0"), out)
      assert.is_true(S.has(err, "it has not read for"), err)
      assert.is_true(S.has(await_output(e, "dropped"), "connected"), output(e))
    end)

    it("a peer that does not read while many processes send to it is dropped at the queue's bound", function()
      local name = uniq("mb")
      local node = name .. "@" .. HOST
      local e = erl(string.format([=[
        {ok, rawpeer} = compile:file("rawpeer.erl"),
        Node = '%s',
        Wait = fun W(0) -> exit(no_node); W(N) -> case catch rawpeer:connect(Node, "%s", "sink@" ++ lists:nth(2, string:split(atom_to_list(node()), "@"))) of {'EXIT', _} -> timer:sleep(100), W(N - 1); S -> S end end,
        S = Wait(100),
        rawpeer:tick_forever(S),
        io:format("dropped~n"),
        halt().]=], node, COOKIE), { files = { ["rawpeer.erl"] = RAWPEER }, limit = 60 })
      local code, out, err = moonbeam([[
        local sink = "sink@" .. mb.node():match("@(.*)")
        for _ = 1, 300 do
          if #mb.nodes() > 0 then break end
          mb.sleep(100)
        end
        local me = mb.self()
        for _ = 1, 48 do
          mb.spawn(function()
            mb.send({"nobody", sink}, string.rep("y", 1024 * 1024))
            mb.send(me, "sent")
          end)
        end
        local n = 0
        for _ = 1, 48 do if mb.receive(20000) then n = n + 1 end end
        print("senders", n)
        print("nodes", #mb.nodes())
      ]], { name = name, limit = 60 })
      assert.equal(0, code, err)
      assert.is_true(S.has(out, "senders\t48"), out)
      assert.is_true(S.has(out, "nodes\t0"), out)
      assert.is_true(S.has(err, "it does not read what we send"), err)
      await_output(e, "dropped")
    end)
  end)

  -- A remote node's monitor of a local process counts in that process's
  -- memory (max_memory, mb.info(pid).memory) and the host's total: before,
  -- in nobody's, and 4.1M of them from one Erlang node took a host capped at
  -- 200 MB to 596 MB.
  describe("remote monitors", function()
    -- The Erlang side: ctl, and a hand-made connection (as fake@host) that
    -- sets and takes off N monitors of the process registered as victim.
    local PEER = [=[
        {ok, rawpeer} = compile:file("rawpeer.erl"),
        register(ctl, self()),
        Node = '%s', N = %d,
        Fake = "fake@" ++ lists:nth(2, string:split(atom_to_list(node()), "@")),
        Conn = fun W(0) -> exit(no_node); W(K) -> case catch rawpeer:connect(Node, "%s", Fake) of {'EXIT', _} -> timer:sleep(100), W(K - 1); S -> S end end,
        Refs = [make_ref() || _ <- lists:seq(1, N)],
        Send = fun(S, Op) -> [ok = gen_tcp:send(S, rawpeer:frame({Op, self(), victim, R}, none)) || R <- Refs], ok end,
        Loop = fun L(S) ->
          receive
            {set, From} -> S1 = case S of none -> Conn(100); _ -> S end, Send(S1, 19), From ! <<"set">>, L(S1);
            {off, From} -> Send(S, 20), From ! <<"off">>, L(S);
            {close, From} -> gen_tcp:close(S), From ! <<"closed">>, L(none);
            stop -> halt()
          end end,
        Loop(none).]=]

    it("are charged to the process they watch, and given back when taken off or when the connection goes", function()
      local N = 20000
      local name = uniq("mb")
      local node = name .. "@" .. HOST
      local e = erl(string.format(PEER, node, N, COOKIE), { files = { ["rawpeer.erl"] = RAWPEER }, limit = 60 })
      local code, out, err = moonbeam(string.format([[
        local e = arg[1]
        local N = %d
        local victim = mb.spawn(function() mb.receive() end)
        mb.register("victim", victim)
        mb.sleep(100)
        local m0 = mb.info(victim).memory
        local function ask(what)
          mb.send({"ctl", e}, mb.tuple(mb.atom(what), mb.self()))
          return mb.receive(30000)
        end
        local function settle(ok)
          for _ = 1, 100 do
            if ok(mb.info(victim).memory - m0) then break end
            mb.sleep(100)
          end
          return mb.info(victim).memory - m0
        end
        print("set", ask("set"))
        local d = settle(function(d) return d >= N * 100 end)
        print("charged", d >= N * 100, d / N)
        print("off", ask("off"))
        print("after off", settle(function(d) return d == 0 end))
        print("set", ask("set"))
        print("charged again", settle(function(d) return d >= N * 100 end) >= N * 100)
        print("close", ask("close"))
        print("after close", settle(function(d) return d == 0 end))
        mb.send({"ctl", e}, mb.atom("stop"))
        mb.exit(victim, "kill")
      ]], N), { name = name, args = S.q(e.name), limit = 60 })
      kill(e)
      assert.equal(0, code, err)
      assert.is_true(S.has(out, "charged\ttrue"), out)
      assert.is_true(S.has(out, "after off\t0\n"), out)
      assert.is_true(S.has(out, "charged again\ttrue"), out)
      assert.is_true(S.has(out, "after close\t0\n"), out)
    end)

    it("past the watched process's max_memory end it with out of memory, not the host", function()
      local N = 50000
      local name = uniq("mb")
      local node = name .. "@" .. HOST
      local e = erl(string.format(PEER, node, N, COOKIE), { files = { ["rawpeer.erl"] = RAWPEER }, limit = 60 })
      local code, out, err = moonbeam([[
        local e = arg[1]
        local victim, ref = mb.spawn_opt({ max_memory = 1e6, monitor = true }, function() mb.receive() end)
        mb.register("victim", victim)
        mb.send({"ctl", e}, mb.tuple(mb.atom("set"), mb.self()))
        local d = mb.receive(function(m) return type(m) == "table" and m.ref == ref end, 30000)
        print("down", d and d.reason)
        print("set", mb.receive(function(m) return m == "set" end, 30000))
        mb.send({"ctl", e}, mb.atom("stop"))
        mb.exit(victim, "kill")
      ]], { name = name, args = S.q(e.name), limit = 60 })
      kill(e)
      assert.equal(0, code, err)
      assert.is_true(S.has(out, "down\tout of memory"), out)
      assert.is_true(S.has(out, "set\tset"), out)
    end)
  end)

  describe("between Moonbeam nodes", function()
    it("server.call, cast, get_state and stop reach a server on another Moonbeam node", function()
      local a, wait_a = moonbeam_bg([[
        local server = require "moonbeam.server"
        local pid = server.start({
          init = function() return { n = 0 } end,
          handle_call = function(req, from, st)
            if req == "slow" then mb.sleep(800) return "late", st end
            st.n = st.n + 1
            return { got = req, n = st.n, from_node = mb.node(from.pid) }, st
          end,
          handle_cast = function(msg, st) st.cast = msg return st end,
        }, nil, { name = "kv" })
        local ref = mb.monitor(pid)
        local d = mb.receive(function(m) return type(m) == "table" and m.event == "DOWN" end, 30000)
        print("down", d and d.reason)
        io.stdout:flush()
        mb.sleep(1500)   -- for the caller's last call, which finds no kv
      ]])
      local code, out, err = moonbeam(WAIT_NODE .. [[
        local server = require "moonbeam.server"
        local a = arg[1]
        wait_node(a)
        local kv = {"kv", a}
        for _ = 1, 50 do
          if pcall(server.call, kv, "ping", 1000) then break end
          mb.sleep(100)
        end
        local r = server.call(kv, { x = 1, list = { 1, 2 } })
        print("call", r.got.x, r.got.list[2], r.n, r.from_node == mb.node())
        print("cast", server.cast(kv, "hello"))
        print("state", server.get_state(kv).cast)
        print("timeout", pcall(server.call, kv, "slow", 200))
        mb.sleep(1000)
        print("mailbox", mb.receive(0))
        print("stop", server.stop(kv, "shutdown"))
        print("after", pcall(server.call, kv, "ping", 1000))
      ]], { args = S.q(a) })
      assert.equal(0, code, err)
      assert.is_true(S.has(out, "call\t1\t2\t2\ttrue"), out)
      assert.is_true(S.has(out, "cast\ttrue"), out)
      assert.is_true(S.has(out, "state\thello"), out)
      assert.is_true(S.has(out, "timeout\tfalse"), out)
      assert.is_true(S.has(out, "mailbox\tnil"), out)
      assert.is_true(S.has(out, "stop\ttrue"), out)
      assert.is_true(S.has(out, "after\tfalse") and S.has(out, "noproc"), out)
      local code_a, out_a, err_a = wait_a()
      assert.equal(0, code_a, err_a)
      assert.is_true(S.has(out_a, "down\tshutdown"), out_a)
    end)

    it("two Moonbeam hosts form a cluster without Erlang: names, pids, links, noconnection", function()
      local a, wait_a = moonbeam_bg([[
        mb.register("a")
        local m = mb.receive(20000)
        mb.send(m.from, { echo = m.body, from = mb.self(), node = mb.node() })
        mb.receive(20000)   -- killed by b's exit signal
      ]])
      local code, out, err = moonbeam(WAIT_NODE .. [[
        local a = arg[1]
        wait_node(a)
        mb.sleep(300)
        mb.send({"a", a}, { from = mb.self(), body = mb.tuple(1, "two", mb.atom("three")) })
        local m = mb.receive(5000)
        print("echo", mb.is_tuple(m.echo), m.echo[2], tostring(m.echo[3]), m.node == a)
        print("pid", tostring(m.from):match("^<%d+%.%d+%.%d+>$") ~= nil)
        local ref = mb.monitor(m.from)
        mb.exit(m.from, "bye")
        local d = mb.receive(function(x) return type(x) == "table" and x.ref == ref end, 5000)
        print("down", d and d.reason)
        print("nodes", #mb.nodes())
      ]], { args = S.q(a) })
      assert.equal(0, code, err)
      assert.is_true(S.has(out, "echo\ttrue\ttwo\tthree\ttrue"), out)
      assert.is_true(S.has(out, "pid\ttrue"), out)
      assert.is_true(S.has(out, "down\tbye"), out)
      local code_a, out_a, err_a = wait_a()
      assert.equal(1, code_a, err_a)   -- its first process ended with "bye"
    end)
  end)
end)
