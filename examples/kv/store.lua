-- examples/kv/store.lua: the callbacks of a key-value store server.
--
-- Requests (server.call): {op = "get", key = k} -> value
--                         {op = "put", key = k, value = v} -> previous value
--                         {op = "delete", key = k} -> previous value
--                         {op = "keys"} -> sorted list of keys
-- Casts (server.cast):    {op = "put", key = k, value = v}
-- Keys must be strings or numbers: any other key is a bug in the caller, and
-- the store lets it crash rather than guess (its supervisor restarts it, empty).
local mb = require "moonbeam"
local server = require "moonbeam.server"

local type, tostring, pairs, error = type, tostring, pairs, error
local table = table

local store = {}

local function check_key(key)
  if type(key) ~= "string" and type(key) ~= "number" then
    error("store: bad key " .. server.show(key) .. " (a string or a number expected)")
  end
  return key
end

-- init(data) -> state: starts with a copy of data (or empty).
function store.init(data)
  return { data = data or {}, started = mb.now() }
end

function store.handle_call(req, from, state)
  local data, op = state.data, req.op
  if op == "get" then
    return data[check_key(req.key)], state
  elseif op == "put" then
    local key = check_key(req.key)
    local old = data[key]
    data[key] = req.value
    return old, state
  elseif op == "delete" then
    local key = check_key(req.key)
    local old = data[key]
    data[key] = nil
    return old, state
  elseif op == "keys" then
    local keys = {}
    for k in pairs(data) do keys[#keys + 1] = tostring(k) end
    table.sort(keys)
    return keys, state
  end
  error("store: unknown request " .. server.show(req))
end

function store.handle_cast(msg, state)
  if msg.op == "put" then state.data[check_key(msg.key)] = msg.value end
  return state
end

-- Called when the store stops or crashes (not when it is killed).
function store.terminate(reason, state)
  if reason == "normal" then return end
  local n = 0
  for _ in pairs(state.data) do n = n + 1 end
  local why = type(reason) == "string" and reason or server.show(reason)
  print(("store %s: terminating, %d keys lost: %s"):format(tostring(mb.self()), n, why))
end

return store
