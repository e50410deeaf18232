-- Registered names: register, unregister, whereis, and sending by name.
local mb = require "moonbeam"
local S = require "spec.support"

-- A process that waits for "stop" (or 5 s) and then ends.
local function idle()
  return mb.spawn_monitor(function()
    mb.receive(function(m) return m == "stop" end, 5000)
  end)
end

describe("registry", function()
  local before
  before_each(function() before = S.snapshot() end)
  after_each(function()
    for _, n in ipairs { "spec_reg_a", "spec_reg_b", "spec_reg_self" } do
      if mb.whereis(n) == mb.self() then mb.unregister(n) end
    end
    S.check_clean(before)
  end)

  it("registers the caller by default", function()
    mb.register("spec_reg_self")
    assert.are.equal(mb.self(), mb.whereis("spec_reg_self"))
    mb.unregister("spec_reg_self")
    assert.is_nil(mb.whereis("spec_reg_self"))
  end)

  it("registers another process, visible from every process", function()
    local pid, ref = idle()
    mb.register("spec_reg_a", pid)
    assert.are.equal(pid, mb.whereis("spec_reg_a"))
    mb.spawn(function(parent) mb.send(parent, { seen = mb.whereis("spec_reg_a") }) end, mb.self())
    assert.are.equal(pid, S.recv(function(m) return type(m) == "table" and m.seen end).seen)
    mb.send(pid, "stop")
    S.await_down(ref)
  end)

  -- As an Erlang atom: at most 255 bytes. A 50 MB name was printed whole
  -- in every crash and watchdog report; one with a NUL registered cut short.
  it("takes names of 1 to 255 bytes without NUL, and refuses others clearly", function()
    local long = ("n"):rep(255)
    local pid, ref = idle()
    assert.is_true(mb.register(long, pid))
    assert.are.equal(pid, mb.whereis(long))
    for _, bad in ipairs { long .. "n", ("x"):rep(1e6), "spec\0reg", "" } do
      local ok, err = pcall(mb.register, bad)
      assert.is_false(ok)
      assert.is_truthy(S.has(err, "a name is 1 to 255 bytes, without NUL") or
                       S.has(err, "non-empty string expected"), err)
    end
    assert.is_nil(mb.whereis("spec"))
    local ok, err = pcall(mb.spawn_opt, { name = "spec\0reg" }, function() end)
    assert.is_false(ok)
    assert.is_truthy(S.has(err, "opts.name must be a string of 1 to 255 bytes, without NUL"), err)
    mb.send(pid, "stop")
    S.await_down(ref)
  end)

  it("whereis gives nil for an unknown name", function()
    assert.is_nil(mb.whereis("spec_reg_nobody"))
  end)

  it("sends by name", function()
    local pid = mb.spawn(function(parent)
      mb.register("spec_reg_b")
      mb.send(parent, "registered")
      local m = mb.receive(5000)
      mb.send(parent, { got = m })
    end, mb.self())
    S.recv(function(m) return m == "registered" end)
    mb.send("spec_reg_b", "by name")
    assert.are.equal("by name", S.recv(function(m) return type(m) == "table" and m.got end).got)
    assert.is_not_nil(pid)
  end)

  it("unregister frees the name: whereis gives nil and sending to it is an error", function()
    local pid, ref = idle()
    mb.register("spec_reg_a", pid)
    mb.unregister("spec_reg_a")
    assert.is_nil(mb.whereis("spec_reg_a"))
    assert.has_error(function() mb.send("spec_reg_a", "x") end)
    -- and the process itself lives on
    assert.is_not_nil(mb.info(pid))
    mb.send(pid, "stop")
    assert.are.equal("normal", S.await_down(ref))
  end)

  it("frees the name when the process dies, so it can be taken again", function()
    local pid, ref = idle()
    mb.register("spec_reg_a", pid)
    mb.send(pid, "stop")
    S.await_down(ref)
    assert.is_nil(mb.whereis("spec_reg_a"))
    local pid2, ref2 = idle()
    mb.register("spec_reg_a", pid2)
    assert.are.equal(pid2, mb.whereis("spec_reg_a"))
    mb.send("spec_reg_a", "stop")
    S.await_down(ref2)
  end)

  it("frees the name when the process crashes or is killed", function()
    local pid, ref = mb.spawn_monitor(function()
      mb.register("spec_reg_a")
      mb.receive(function() return false end, 5000)
    end)
    assert.is_true(S.eventually(function() return mb.whereis("spec_reg_a") == pid end))
    mb.exit(pid, "kill")
    S.await_down(ref)
    assert.is_nil(mb.whereis("spec_reg_a"))
  end)

  it("refuses a name that is already taken", function()
    local p1, r1 = idle()
    local p2, r2 = idle()
    mb.register("spec_reg_a", p1)
    local ok, err = pcall(mb.register, "spec_reg_a", p2)
    assert.is_false(ok)
    assert.is_true(S.has(err, "spec_reg_a"), tostring(err))
    assert.are.equal(p1, mb.whereis("spec_reg_a"))
    mb.send(p1, "stop")
    mb.send(p2, "stop")
    S.await_down(r1)
    S.await_down(r2)
  end)

  it("refuses names that are not strings", function()
    for _, bad in ipairs { 42, true, {}, print } do
      assert.has_error(function() mb.register(bad) end)
    end
    assert.has_error(function() mb.register(nil) end)
    assert.has_error(function() mb.register() end)
  end)

  it("refuses to register something that is not a pid", function()
    assert.has_error(function() mb.register("spec_reg_a", 42) end)
    assert.has_error(function() mb.register("spec_reg_a", "spec_reg_b") end)
    assert.is_nil(mb.whereis("spec_reg_a"))
  end)

  it("refuses to register a dead process", function()
    local pid, ref = mb.spawn_monitor(function() end)
    S.await_down(ref)
    assert.has_error(function() mb.register("spec_reg_a", pid) end)
    assert.is_nil(mb.whereis("spec_reg_a"))
  end)

  it("mb.exit takes a registered name too", function()
    local pid, ref = mb.spawn_monitor(function() mb.register("spec_exit_victim"); mb.receive(5000) end)
    assert.is_truthy(S.eventually(function() return mb.whereis("spec_exit_victim") == pid end))
    mb.exit("spec_exit_victim", "kill")
    assert.are.equal("killed", S.await_down(ref))
    local ok, err = pcall(mb.exit, "spec_exit_nobody", "x")
    assert.is_false(ok)
    assert.is_truthy(err:find("no process is registered as 'spec_exit_nobody'", 1, true))
  end)
end)
