-- Deep copy: what crosses between processes, how it arrives, and how a value
-- that cannot cross is refused.
local mb = require "moonbeam"
local S = require "spec.support"

local MiB = 1024 * 1024

-- An echo process sends back every message it gets; a value thus crosses
-- twice (out of this state, into the echo's, out again, into ours).
local function start_echo()
  return mb.spawn(function(parent)
    while true do
      local m = mb.receive()
      mb.send(parent, m)
    end
  end, mb.self())
end

describe("deep copy", function()
  local before, echo
  before_each(function()
    before = S.snapshot()
    echo = start_echo()
  end)
  after_each(function()
    local ref = mb.monitor(echo)
    mb.exit(echo, "kill")
    S.await_down(ref)
    S.check_clean(before)
  end)

  local function roundtrip(v)
    mb.send(echo, v)
    local r = mb.receive(S.T)
    assert(r ~= nil, "no echo")
    return r
  end

  describe("copies", function()
    it("booleans", function()
      assert.is_true(roundtrip(true))
      assert.is_false(roundtrip(false))
      assert.are.same({ t = true, f = false }, roundtrip({ t = true, f = false }))
    end)

    it("numbers, bit-exact: integers, fractions, huge, tiny, inf, -inf, nan, -0", function()
      for _, v in ipairs { 0, 1, -1, 0.1, 1 / 3, 2 ^ 53, -2 ^ 53 + 1, 1e308, 5e-324, 2 ^ -1022 } do
        assert.are.equal(v, roundtrip(v))
      end
      assert.are.equal(math.huge, roundtrip(math.huge))
      assert.are.equal(-math.huge, roundtrip(-math.huge))
      local nan = roundtrip(0 / 0)
      assert.is_true(nan ~= nan, "nan came back as " .. tostring(nan))
      local negzero = roundtrip(-0.0)
      assert.are.equal(0, negzero)
      assert.are.equal(-math.huge, 1 / negzero)
      assert.are.equal(math.huge, 1 / roundtrip(0))
      local t = roundtrip({ inf = math.huge, nan = 0 / 0, z = -0.0 })
      assert.are.equal(math.huge, t.inf)
      assert.is_true(t.nan ~= t.nan)
      assert.are.equal(-math.huge, 1 / t.z)
    end)

    it("strings: empty, embedded zeros, every byte value, long", function()
      assert.are.equal("", roundtrip(""))
      assert.are.equal("a\0b\0\0c", roundtrip("a\0b\0\0c"))
      local bytes = {}
      for i = 0, 255 do bytes[#bytes + 1] = string.char(i) end
      local all = table.concat(bytes)
      assert.are.equal(all, roundtrip(all))
      local long = all:rep(4096) -- 1 MiB
      local r = roundtrip(long)
      assert.are.equal(#long, #r)
      assert.is_true(r == long)
    end)

    it("nested tables, arrays with holes, and keys of every copyable type", function()
      local v = {
        1, 2, nil, 4,
        name = "x",
        nested = { a = { b = { c = { d = "deep" } } } },
        [1.5] = "float key",
        [-3] = "negative key",
        [true] = "true key",
        [false] = "false key",
        ["with space"] = 1,
        ["\0"] = "zero key",
      }
      local r = roundtrip(v)
      assert.are.equal(1, r[1])
      assert.are.equal(2, r[2])
      assert.is_nil(r[3])
      assert.are.equal(4, r[4])
      assert.are.equal("x", r.name)
      assert.are.equal("deep", r.nested.a.b.c.d)
      assert.are.equal("float key", r[1.5])
      assert.are.equal("negative key", r[-3])
      assert.are.equal("true key", r[true])
      assert.are.equal("false key", r[false])
      assert.are.equal(1, r["with space"])
      assert.are.equal("zero key", r["\0"])
    end)

    it("tables used as keys", function()
      local k = { id = 1 }
      local r = roundtrip({ [k] = "value", key = k })
      assert.are.equal("value", r[r.key])
      assert.are.equal(1, r.key.id)
    end)

    it("a table with many entries", function()
      local v = {}
      for i = 1, 100000 do v[i] = i * 2 end
      for i = 1, 1000 do v["k" .. i] = i end
      local r = roundtrip(v)
      assert.are.equal(100000, #r)
      for i = 1, 100000 do assert(r[i] == i * 2) end
      for i = 1, 1000 do assert(r["k" .. i] == i) end
    end)

    it("cycles", function()
      local t = { name = "t" }
      t.self = t
      t.child = { parent = t }
      local r = roundtrip(t)
      assert.are.equal(r, r.self)
      assert.are.equal(r, r.child.parent)
      assert.are.equal("t", r.self.self.name)
    end)

    it("shared references as shared references", function()
      local shared = { 1, 2, 3 }
      local r = roundtrip({ a = shared, b = shared, list = { shared, shared } })
      assert.are.equal(r.a, r.b)
      assert.are.equal(r.a, r.list[1])
      assert.are.equal(r.a, r.list[2])
      assert.are.same({ 1, 2, 3 }, r.a)
      r.a[1] = 100
      assert.are.equal(100, r.b[1])
    end)

    it("pids, as values and as keys", function()
      local me = mb.self()
      local r = roundtrip({ pid = me, [me] = "me", list = { echo, me } })
      assert.are.equal(me, r.pid)
      assert.are.equal("me", r[me])
      assert.are.equal(echo, r.list[1])
      assert.are.equal(tostring(me), tostring(r.pid))
      assert.are.equal(me, roundtrip(me))
    end)

    it("monitor refs, equal to the original and printable", function()
      local pid, ref = mb.spawn_monitor(function() mb.receive(5000) end)
      local r = roundtrip({ ref = ref, [ref] = true })
      assert.are.equal(ref, r.ref)
      assert.is_true(r[ref])
      assert.are_not.equal("number", type(r.ref))
      assert.is_truthy(tostring(r.ref):match("Ref"), tostring(r.ref))
      mb.send(pid, "go")
      local reason, down = S.await_down(r.ref) -- the copy matches the DOWN's ref
      assert.are.equal("normal", reason)
      assert.are.equal(ref, down.ref)
    end)

    it("functions with their upvalues, callable in the receiver", function()
      local base = 40
      local tbl = { add = 2 }
      local function f(x) return base + tbl.add + (x or 0) end
      local caller = mb.spawn(function(parent)
        local m = mb.receive(5000)
        mb.send(parent, { called = m.fn(m.arg) })
      end, mb.self())
      mb.send(caller, { fn = f, arg = 100 })
      assert.are.equal(142, S.recv(function(m) return type(m) == "table" and m.called end).called)
      local g = roundtrip(f)
      assert.are.equal(42, g())
    end)

    it("recursive local functions and functions nested in upvalues", function()
      local function fact(n) if n <= 1 then return 1 end return n * fact(n - 1) end
      local function compose(a, b) return function(x) return a(b(x)) end end
      local inc = function(x) return x + 1 end
      local h = compose(fact, inc)
      local r = roundtrip({ fact = fact, h = h })
      assert.are.equal(120, r.fact(5))
      assert.are.equal(720, r.h(5))
    end)

    it("a function's table constructors build, from its bytecode, the tables its source does", function()
      -- The host repairs the templates lua_dump leaves short (host/bcdump.c):
      -- the nil-valued keys it puts back must stay invisible, and constant
      -- fields keep their values.
      local function build(a, b, nothing)
        local t = { x = 1, y = a, a, b, 7, z = { w = b, a }, n = nothing, [3] = a }
        t.later = b
        return { t, { "ok", a }, { k = 1, k = a }, { hop = a + 1, from = b }, { n = nothing } }
      end
      local function show(v)
        if type(v) ~= "table" then return tostring(v) end
        local ks, n = {}, 0
        for k, x in pairs(v) do ks[#ks + 1] = tostring(k) .. "=" .. show(x) end
        local k = next(v)
        while k ~= nil do n = n + 1; k = next(v, k) end
        table.sort(ks)
        return "{" .. table.concat(ks, ",") .. "|" .. n .. "|" .. #v .. "}"
      end
      local fns = roundtrip({ build = build, show = show })
      assert.are.equal(show(build(5, "b")), fns.show(fns.build(5, "b")))
      assert.are.equal(show(build(-1, false)), fns.show(fns.build(-1, false)))
      assert.are.equal("{1=ok,2=5|2|2}", fns.show(fns.build(5, "b")[2]))
      assert.are.equal("{|0|0}", fns.show(fns.build(5, "b")[5]))
    end)

    it("a function whose upvalue is a loaded module, re-required by the receiver", function()
      local strlib = string
      local mbmod = mb
      local f = function(n) return strlib.rep("ab", n), type(mbmod.self) end
      local r = roundtrip(f)
      local s, t = r(2)
      assert.are.equal("abab", s)
      assert.are.equal("function", t)
    end)

    it("nil and other values as spawn arguments", function()
      local pid = mb.spawn(function(parent, ...)
        mb.send(parent, { n = select("#", ...), ... })
      end, mb.self(), nil, false, 0 / 0, "s\0", nil)
      local m = S.recv()
      assert.are.equal(5, m.n)
      assert.is_nil(m[1])
      assert.is_false(m[2])
      assert.is_true(m[3] ~= m[3])
      assert.are.equal("s\0", m[4])
      assert.is_nil(m[5])
      assert.is_not_nil(pid)
    end)

    it("a large message under the limit (8 MiB)", function()
      local big = ("0123456789abcdef"):rep(MiB / 2)
      local r = roundtrip({ big = big })
      assert.are.equal(#big, #r.big)
      assert.is_true(r.big == big)
    end)

    it("a message nested 100 levels deep", function()
      local t = {}
      local cur = t
      for i = 1, 99 do cur.next = { i = i } cur = cur.next end
      local r = roundtrip(t)
      local n = 0
      while r.next do r = r.next n = n + 1 end
      assert.are.equal(99, n)
    end)
  end)

  describe("does not copy", function()
    it("metatables: the receiver gets the plain table", function()
      local mt = { __index = function() return "from mt" end }
      local v = setmetatable({ own = 1 }, mt)
      local r = roundtrip(v)
      assert.is_nil(getmetatable(r))
      assert.are.equal(1, r.own)
      assert.is_nil(r.missing)
    end)

    it("what an __index table would supply: only raw contents are sent", function()
      local v = setmetatable({ real = true }, { __index = { fake = true } })
      local r = roundtrip(v)
      assert.is_true(r.real)
      assert.is_nil(r.fake)
    end)
  end)

  describe("refuses with an error naming the type and the path", function()
    it("a coroutine: msg.handlers[2]: cannot send a coroutine", function()
      local co = coroutine.create(function() end)
      local ok, err = pcall(mb.send, echo, { handlers = { 1, co } })
      assert.is_false(ok)
      assert.is_true(S.has(err, "handlers[2]: cannot send a coroutine"), err)
    end)

    it("a userdata", function()
      local ok, err = pcall(mb.send, echo, { files = { out = io.stdout } })
      assert.is_false(ok)
      assert.is_true(S.has(err, "files.out: cannot send a userdata"), err)
      ok, err = pcall(mb.send, echo, newproxy())
      assert.is_false(ok)
      assert.is_true(S.has(err, "cannot send a userdata"), err)
    end)

    it("a cdata", function()
      -- A 64-bit literal is a cdata even where the FFI is off (the default).
      local cdata = loadstring("return 1LL")()
      local ok, err = pcall(mb.send, echo, { a = { b = cdata } })
      assert.is_false(ok)
      assert.is_true(S.has(err, "a.b: cannot send a cdata"), err)
    end)

    it("a coroutine as the message itself", function()
      local ok, err = pcall(mb.send, echo, coroutine.create(print))
      assert.is_false(ok)
      assert.is_true(S.has(err, "cannot send a coroutine"), err)
    end)

    it("an uncopyable table key", function()
      local ok, err = pcall(mb.send, echo, { [coroutine.create(print)] = 1 })
      assert.is_false(ok)
      assert.is_true(S.has(err, "cannot send a coroutine"), err)
    end)

    it("an uncopyable upvalue of a function in a message, naming the upvalue", function()
      local worker_thread = coroutine.create(print)
      local f = function() return worker_thread end
      local ok, err = pcall(mb.send, echo, { job = f })
      assert.is_false(ok)
      assert.is_true(S.has(err, "worker_thread"), err)
      assert.is_true(S.has(err, "cannot send a coroutine"), err)
    end)

    it("and delivers nothing, leaving the sender able to send", function()
      local ok = pcall(mb.send, echo, { 1, 2, coroutine.create(print) })
      assert.is_false(ok)
      mb.send(echo, "marker")
      -- The echo replies in order: had the bad message gone out, it would come first.
      assert.are.equal("marker", S.recv())
    end)
  end)

  describe("refuses cleanly", function()
    it("a message larger than the limit (a 65 MiB string)", function()
      local huge = ("x"):rep(65 * MiB)
      local ok, err = pcall(mb.send, echo, { data = huge })
      huge = nil
      assert.is_false(ok)
      assert.is_string(err)
      local e = err:lower()
      assert.is_truthy(e:find("large") or e:find("limit") or e:find("size") or e:find("big"), err)
      mb.send(echo, "still fine")
      assert.are.equal("still fine", S.recv())
    end)

    it("a message larger than the limit made of many parts", function()
      local parts = {}
      for i = 1, 66 do parts[i] = ("p"):rep(MiB - 16) .. i end
      local ok, err = pcall(mb.send, echo, parts)
      parts = nil
      collectgarbage()
      assert.is_false(ok)
      assert.is_string(err)
      mb.send(echo, "still fine")
      assert.are.equal("still fine", S.recv())
    end)

    it("a message nested deeper than the limit (1000 levels)", function()
      local t = {}
      local cur = t
      for _ = 1, 1000 do cur.next = {} cur = cur.next end
      local ok, err = pcall(mb.send, echo, t)
      assert.is_false(ok)
      assert.is_string(err)
      local e = err:lower()
      assert.is_truthy(e:find("deep") or e:find("nest") or e:find("depth") or e:find("level"), err)
      mb.send(echo, "still fine")
      assert.are.equal("still fine", S.recv())
    end)

    it("a message nested 300 levels deep (over the documented 200)", function()
      local t = {}
      local cur = t
      for _ = 1, 300 do cur[1] = {} cur = cur[1] end
      local ok, err = pcall(mb.send, echo, t)
      assert.is_false(ok)
      assert.is_string(err)
    end)

    it("a deeply nested spawn argument", function()
      local t = {}
      local cur = t
      for _ = 1, 1000 do cur.next = {} cur = cur.next end
      local ok, err = pcall(mb.spawn, function() end, t)
      assert.is_false(ok)
      assert.is_string(err)
    end)
  end)
end)
