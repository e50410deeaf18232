-- moonbeam.http_parser: the C binding of http-parser that moonbeam.http and
-- moonbeam.websocket build on. Bytes go in, events come out.
local hp = require "moonbeam.http_parser"

-- Feed the pieces one after the other; return all events and the total of
-- bytes consumed.
local function feed_all(p, pieces)
  local all, used = {}, 0
  for _, piece in ipairs(pieces) do
    local n, ev = p:feed(piece)
    used = used + n
    for _, e in ipairs(ev) do all[#all + 1] = e end
  end
  return all, used
end

local function types(events)
  local t = {}
  for i, e in ipairs(events) do t[i] = e.type end
  return table.concat(t, " ")
end

local function body_of(events)
  local parts = {}
  for _, e in ipairs(events) do
    if e.type == "body" then parts[#parts + 1] = e.data end
  end
  return table.concat(parts)
end

describe("moonbeam.http_parser", function()
  it("parses a request head with its headers in order", function()
    local p = hp.new()
    local req = "GET /path?x=1&y=2 HTTP/1.1\r\nHost: example\r\nX-A: 1\r\nx-a: 2\r\n\r\n"
    local n, ev = p:feed(req)
    assert.are.equal(#req, n)
    assert.are.equal("head done", types(ev))
    local h = ev[1]
    assert.are.equal("GET", h.method)
    assert.are.equal("/path?x=1&y=2", h.url)
    assert.are.equal("1.1", h.version)
    assert.are.same({ "Host", "example", "X-A", "1", "x-a", "2" }, h.headers)
    assert.is_true(h.keep_alive)
    assert.is_false(h.upgrade)
    assert.is_false(h.chunked)
    assert.is_nil(h.content_length)
  end)

  it("parses a head split into single bytes", function()
    local p = hp.new()
    local req = "POST /upload HTTP/1.1\r\nContent-Length: 5\r\nX-Long-Header: some value\r\n\r\nhello"
    local pieces = {}
    for i = 1, #req do pieces[i] = req:sub(i, i) end
    local ev, used = feed_all(p, pieces)
    assert.are.equal(#req, used)
    assert.are.equal("POST", ev[1].method)
    assert.are.same({ "Content-Length", "5", "X-Long-Header", "some value" }, ev[1].headers)
    assert.are.equal(5, ev[1].content_length)
    assert.are.equal("hello", body_of(ev))
    assert.are.equal("done", ev[#ev].type)
  end)

  it("decodes a chunked request body", function()
    local p = hp.new()
    local ev = feed_all(p, {
      "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
      "5\r\nhello\r\n", "6\r\n world\r\n", "0\r\nX-Trailer: t\r\n\r\n" })
    assert.is_true(ev[1].chunked)
    assert.are.equal("hello world", body_of(ev))
    assert.are.equal("done", ev[#ev].type)
    -- The trailer is not a header of the request.
    assert.are.same({ "Transfer-Encoding", "chunked" }, ev[1].headers)
  end)

  it("parses pipelined requests out of one feed", function()
    local p = hp.new()
    local n, ev = p:feed("GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\nContent-Length: 2\r\n\r\nokGET /3 HTTP/1.1\r\n")
    assert.are.equal("head done head body done", types(ev))
    assert.are.equal("/1", ev[1].url)
    assert.are.equal("/2", ev[3].url)
    assert.is_true(p:in_message())
    local _, ev2 = p:feed("\r\n")
    assert.are.equal("head done", types(ev2))
    assert.are.equal("/3", ev2[1].url)
    assert.is_false(p:in_message())
  end)

  it("knows keep-alive from the version and the Connection header", function()
    local _, ev = hp.new():feed("GET / HTTP/1.0\r\n\r\n")
    assert.is_false(ev[1].keep_alive)
    _, ev = hp.new():feed("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert.is_true(ev[1].keep_alive)
    _, ev = hp.new():feed("GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert.is_false(ev[1].keep_alive)
    assert.is_false(ev[2].keep_alive)
  end)

  it("stops at an upgrade and hands back the bytes after the head", function()
    local p = hp.new()
    local head = "GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    local n, ev = p:feed(head .. "\129\133frame")
    assert.are.equal(#head, n)
    assert.is_true(ev[1].upgrade)
    assert.are.equal("upgrade", ev[#ev].type)
    assert.are.equal("\129\133frame", ev[#ev].rest)
    -- Later bytes are not HTTP: they come back untouched.
    n, ev = p:feed("more")
    assert.are.equal(0, n)
    assert.are.equal("more", ev[1].rest)
  end)

  it("reads the body of an upgrade request before upgrading, wherever the reads end", function()
    -- Found by fuzzing (spec/fuzz/http): a read ending after the head
    -- upgraded at once and handed the body back as the new protocol's bytes.
    local req = "GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" ..
                "Content-Length: 5\r\n\r\nhello"
    local cut = #req - 5
    for _, pieces in ipairs({ { req .. "NEXT" }, { req:sub(1, cut), req:sub(cut + 1) .. "NEXT" },
                              { req:sub(1, cut), "he", "llo", "NEXT" } }) do
      local all, used = feed_all(hp.new(), pieces)
      -- Bodies and the bytes after the upgrade may come in several events.
      local kinds, rest = {}, {}
      for _, e in ipairs(all) do
        if e.type ~= kinds[#kinds] or (e.type ~= "body" and e.type ~= "upgrade") then
          kinds[#kinds + 1] = e.type
        end
        if e.type == "upgrade" then rest[#rest + 1] = e.rest end
      end
      assert.are.equal("head body done upgrade", table.concat(kinds, " "))
      assert.are.equal("hello", body_of(all))
      assert.are.equal("NEXT", table.concat(rest))
      assert.are.equal(#req, used)
    end
  end)

  it("reports malformed requests as an error event with status 400", function()
    local p = hp.new()
    local _, ev = p:feed("GET / HTTP/1.1\r\n\r\nBLAH\1 / HTTP/1.1\r\n\r\n")
    assert.are.equal("head done error", types(ev))
    local e = ev[3]
    assert.are.equal(400, e.status)
    assert.are.equal("string", type(e.name))
    assert.are.equal("string", type(e.message))
    -- A stopped parser stays stopped.
    local n, ev2 = p:feed("GET / HTTP/1.1\r\n\r\n")
    assert.are.equal(0, n)
    assert.are.equal("error", ev2[1].type)
  end)

  it("limits the head size (431)", function()
    local p = hp.new({ max_head = 1024 })
    local _, ev = p:feed("GET / HTTP/1.1\r\nX-Big: " .. ("a"):rep(2000) .. "\r\n\r\n")
    assert.are.equal("error", ev[#ev].type)
    assert.are.equal(431, ev[#ev].status)
    assert.are.equal("HEAD_TOO_LARGE", ev[#ev].name)
    -- The default is 8 KiB, however the head is split.
    p = hp.new()
    local ev2 = feed_all(p, { "GET / HTTP/1.1\r\n", "X-Big: " .. ("a"):rep(5000) .. "\r\n",
                              "X-Big2: " .. ("a"):rep(5000) .. "\r\n\r\n" })
    assert.are.equal(431, ev2[#ev2].status)
  end)

  it("limits the number of headers (431)", function()
    local lines = {}
    for i = 1, 20 do lines[i] = "X-" .. i .. ": v\r\n" end
    local _, ev = hp.new({ max_headers = 10 }):feed("GET / HTTP/1.1\r\n" .. table.concat(lines) .. "\r\n")
    assert.are.equal("TOO_MANY_HEADERS", ev[#ev].name)
    assert.are.equal(431, ev[#ev].status)
    _, ev = hp.new({ max_headers = 20 }):feed("GET / HTTP/1.1\r\n" .. table.concat(lines) .. "\r\n")
    assert.are.equal("head done", types(ev))
  end)

  it("limits the URL length (414)", function()
    local _, ev = hp.new():feed("GET /" .. ("u"):rep(5000) .. " HTTP/1.1\r\n\r\n")
    assert.are.equal("URL_TOO_LONG", ev[#ev].name)
    assert.are.equal(414, ev[#ev].status)
  end)

  it("parses responses, with finish() ending a body read to the end", function()
    local p = hp.new({ type = "response" })
    local _, ev = p:feed("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
    assert.are.equal(200, ev[1].status)
    assert.are.equal("hi", body_of(ev))
    assert.are.equal("done", ev[#ev].type)
    p = hp.new({ type = "response" })
    _, ev = p:feed("HTTP/1.0 200 OK\r\n\r\nuntil the end")
    assert.are.equal("head body", types(ev))
    local _, fin = p:finish()
    assert.are.equal("done", fin[1].type)
    -- The answer to a HEAD request has no body.
    p = hp.new({ type = "response" })
    p:skip_body()
    _, ev = p:feed("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
    assert.are.equal("head done", types(ev))
  end)

  it("reports a message cut short by finish() as an error, consuming nothing", function()
    -- Found by fuzzing (spec/fuzz/http): finish() returned 1 consumed byte.
    for _, kind in ipairs({ "request", "response" }) do
      local p = hp.new({ type = kind })
      local n, ev = p:feed(kind == "request" and "GET / HTTP/1.1\r\nHost: h\r\nServ"
                           or "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nServ")
      assert.are.equal(0, #ev)
      assert.is_true(n > 0)
      n, ev = p:finish()
      assert.are.equal(0, n)
      assert.are.equal("error", types(ev))
      assert.are.equal("HPE_INVALID_EOF_STATE", ev[1].name)
      assert.are.equal(400, ev[1].status)
    end
  end)

  it("gives the reason phrase of a status code", function()
    assert.are.equal("Not Found", hp.reason(404))
    assert.are.equal("OK", hp.reason(200))
    assert.is_nil(hp.reason(299))
  end)

  it("rejects bad options", function()
    assert.has_error(function() hp.new({ max_head = -1 }) end)
    assert.has_error(function() hp.new({ type = "sideways" }) end)
  end)
end)
