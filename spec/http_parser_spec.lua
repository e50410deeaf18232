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
  -- Only what every request uses is registered when the module opens; the
  -- rest is made on its first lookup. Checked in a new process, where the
  -- module is opened afresh.
  it("makes its rarely used functions and methods on first use", function()
    local mb = require "moonbeam"
    local me = mb.self()
    mb.spawn(function()
      local h = require "moonbeam.http_parser"
      local r = {}
      r.before = rawget(h, "reason") == nil and rawget(h, "ws_accept") == nil
      r.eager = type(rawget(h, "new")) == "function" and type(rawget(h, "respond")) == "function"
      r.reason = h.reason(404)
      r.kept = rawget(h, "reason") == h.reason
      r.head = h.head(204, nil, nil, false, false)
      r.accept = h.ws_accept("dGhlIHNhbXBsZSBub25jZQ==")
      r.fns = type(h.started) == "function" and type(h.finished) == "function"
      r.unknown = h.nope == nil and h[1] == nil and h.__index == nil
      local p = h.new()
      r.resting = p:resting()
      local n, ev = p:feed("GET / HTTP/1.1\r\nHost: x\r\n\r\n")
      r.fed = n > 0 and ev[1].type == "head"
      local q = h.new({ type = "response" })
      q:skip_body()
      local _, fin = q:finish()
      r.finish = type(fin) == "table"
      r.nomethod = p.nope == nil and p[1] == nil
      mb.send(me, r)
    end)
    local r = mb.receive(function(m) return type(m) == "table" and m.before ~= nil end, 5000)
    assert.is_table(r)
    assert.is_true(r.before)
    assert.is_true(r.eager)
    assert.are.equal("Not Found", r.reason)
    assert.is_true(r.kept)
    assert.is_truthy(r.head:find("^HTTP/1.1 204 No Content\r\n"))
    assert.are.equal("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", r.accept)
    assert.is_true(r.fns)
    assert.is_true(r.unknown)
    assert.is_true(r.resting)
    assert.is_true(r.fed)
    assert.is_true(r.finish)
    assert.is_true(r.nomethod)
  end)

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
    local req = "POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nX-Long-Header: some value\r\n\r\nhello"
    local pieces = {}
    for i = 1, #req do pieces[i] = req:sub(i, i) end
    local ev, used = feed_all(p, pieces)
    assert.are.equal(#req, used)
    assert.are.equal("POST", ev[1].method)
    assert.are.same({ "Host", "h", "Content-Length", "5", "X-Long-Header", "some value" }, ev[1].headers)
    assert.are.equal(5, ev[1].content_length)
    assert.are.equal("hello", body_of(ev))
    assert.are.equal("done", ev[#ev].type)
  end)

  it("decodes a chunked request body", function()
    local p = hp.new()
    local ev = feed_all(p, {
      "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n",
      "5\r\nhello\r\n", "6\r\n world\r\n", "0\r\nX-Trailer: t\r\n\r\n" })
    assert.is_true(ev[1].chunked)
    assert.are.equal("hello world", body_of(ev))
    assert.are.equal("done", ev[#ev].type)
    -- The trailer is not a header of the request.
    assert.are.same({ "Host", "h", "Transfer-Encoding", "chunked" }, ev[1].headers)
  end)

  it("parses pipelined requests out of one feed", function()
    local p = hp.new()
    local n, ev = p:feed("GET /1 HTTP/1.1\r\nHost: h\r\n\r\nGET /2 HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nokGET /3 HTTP/1.1\r\nHost: h\r\n")
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
    _, ev = hp.new():feed("GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    assert.is_false(ev[1].keep_alive)
    assert.is_false(ev[2].keep_alive)
  end)

  it("stops at an upgrade and hands back the bytes after the head", function()
    local p = hp.new()
    local head = "GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
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
    local req = "GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" ..
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
    local _, ev = p:feed("GET / HTTP/1.1\r\nHost: h\r\n\r\nBLAH\1 / HTTP/1.1\r\n\r\n")
    assert.are.equal("head done error", types(ev))
    local e = ev[3]
    assert.are.equal(400, e.status)
    assert.are.equal("string", type(e.name))
    assert.are.equal("string", type(e.message))
    -- A stopped parser stays stopped.
    local n, ev2 = p:feed("GET / HTTP/1.1\r\nHost: h\r\n\r\n")
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
    _, ev = hp.new({ max_headers = 21 }):feed("GET / HTTP/1.1\r\nHost: h\r\n" .. table.concat(lines) .. "\r\n")
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

  -- Request smuggling lives where parsers disagree on where a message ends.
  -- Each of these is refused (and so is each fed one byte at a time).
  local refused = {
    { "SPACE_IN_NAME", 400, "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n" },
    { "SPACE_IN_NAME", 400, "POST / HTTP/1.1\r\nHost: h\r\nContent-Length : 5\r\n\r\nhello" },
    { "SPACE_IN_NAME", 400, "GET / HTTP/1.1\r\nHost: h\r\nX\t: y\r\n\r\n" },
    { "OBS_FOLD", 400, "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip,\r\n chunked\r\n\r\n0\r\n\r\n" },
    { "OBS_FOLD", 400, "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding:\r\n\tchunked\r\n\r\n0\r\n\r\n" },
    { "OBS_FOLD", 400, "GET / HTTP/1.1\r\nHost: h\r\nX-A: b\r\n c\r\n\r\n" },
    { "SPACE_BEFORE_HEADER", 400, "GET / HTTP/1.1\r\n Host: h\r\n\r\n" },
    { "NO_COLON", 400, "GET / HTTP/1.1\r\nHost: h\r\nNoColon\r\n\r\n" },
    { "TE_TWICE", 400, "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" },
    { "HPE_UNEXPECTED_CONTENT_LENGTH", 400, "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n" },
    { "HPE_UNEXPECTED_CONTENT_LENGTH", 400, "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" },
    { "TE_NOT_CHUNKED", 400, "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\nabc" },
    { "TE_NOT_CHUNKED", 400, "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, gzip\r\n\r\nabc" },
    { "TE_NOT_CHUNKED", 400, "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n" },
    { "TE_NOT_CHUNKED", 400, "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\t\r\n\r\n0\r\n\r\n" },
    { "TE_UNSUPPORTED", 501, "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n" },
    { "TE_HTTP10", 400, "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" },
    { "HPE_UNEXPECTED_CONTENT_LENGTH", 400, "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!" },
    { "HPE_INVALID_CONTENT_LENGTH", 400, "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5, 6\r\n\r\nhello!" },
    { "NO_HOST", 400, "GET / HTTP/1.1\r\n\r\n" },
    { "HOST_TWICE", 400, "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n" },
    { "HOST_TWICE", 400, "GET / HTTP/1.0\r\nHost: a\r\nhost: a\r\n\r\n" },
    { "BAD_VERSION", 505, "GET / HTTP/9.9\r\nHost: h\r\n\r\n" },
    { "BAD_VERSION", 505, "GET / HTTP/2.0\r\nHost: h\r\n\r\n" },
    { "BAD_VERSION", 505, "GET / HTTP/0.9\r\nHost: h\r\n\r\n" },
    { "BARE_LF", 400, "GET / HTTP/1.1\nHost: h\r\n\r\n" },
    { "BARE_LF", 400, "GET / HTTP/1.1\r\nHost: h\nX: y\r\n\r\n" },
    { "BARE_LF", 400, "GET / HTTP/1.1\r\nHost: h\r\n\n" },
    { "BARE_LF", 400, "\nGET / HTTP/1.1\r\nHost: h\r\n\r\n" },
    { "BARE_CR", 400, "GET / HTTP/1.1\r\nHost: h\rX: y\r\n\r\n" },
    { "BARE_CR", 400, "GET / HTTP/1.1\r\nHost: h\r\n\rX" },
    { "BARE_CR", 400, "GET / HTTP/1.1\rXHost: h\r\n\r\n" },
    -- chunked framing: http-parser takes any two bytes after chunk data,
    -- any byte after a chunk size's CR, and anything in extensions
    { "BAD_CHUNK", 400, "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXY0\r\n\r\n", "after head" },
    { "BARE_CR", 400, "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\rX0\r\n\r\n", "after head" },
    { "BARE_CR", 400, "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\rXhello\r\n0\r\n\r\n", "after head" },
    { "BAD_CHUNK", 400, "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n", "after head" },
    { "BAD_CHUNK", 400, "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5;a\nb\r\nhello\r\n0\r\n\r\n", "after head" },
    { "BAD_CHUNK", 400, "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5 x\r\nhello\r\n0\r\n\r\n", "after head" },
    { "BAD_CHUNK", 400, "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n;x\r\nhello\r\n0\r\n\r\n", "after head" },
    { "BAD_CHUNK", 400, "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000000\r\n", "after head" },
    { "BAD_CHUNK", 400, "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5;" .. ("x"):rep(5000) .. "\r\n", "after head" },
    { "BARE_LF", 400, "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\n", "after head" },
    { "OBS_FOLD", 400, "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-T: a\r\n b\r\n\r\n", "after head" },
  }

  it("refuses what request smuggling is made of, however the bytes are cut", function()
    for _, case in ipairs(refused) do
      local name, status, bytes = case[1], case[2], case[3]
      local _, ev = hp.new():feed(bytes)
      local last = ev[#ev]
      assert(last and last.type == "error", "not refused: " .. bytes:gsub("[\r\n]", { ["\r"] = "\\r", ["\n"] = "\\n" }))
      assert.are.equal(name, last.name, bytes)
      assert.are.equal(status, last.status)
      local pieces = {}
      for i = 1, #bytes do pieces[i] = bytes:sub(i, i) end
      local ev1 = feed_all(hp.new(), pieces)
      assert.are.equal(name, ev1[#ev1].name, "byte by byte: " .. bytes)
    end
  end)

  it("finds a bare LF or CR at any place in a long line, the whole or cut", function()
    -- (The checker scans start lines and values eight bytes at a time and
    -- names by a table: every offset, and every cut, must still be seen.)
    local long = ("v"):rep(40)
    for at = 0, 40 do
      local value = long:sub(1, at) .. "\n" .. long:sub(at + 1)
      local line = "GET /" .. long:sub(1, at) .. "\n" .. long:sub(at + 1) .. " HTTP/1.1\r\n"
      local cr = "GET / HTTP/1.1\r\nHost: h\r\nX: " .. long:sub(1, at) .. "\rz\r\n\r\n"
      local name = "GET / HTTP/1.1\r\nHost: h\r\nX" .. long:sub(1, at) .. " : y\r\n\r\n"
      for _, case in ipairs({
        { "BARE_LF", "GET / HTTP/1.1\r\nHost: h\r\nX: " .. value .. "\r\n\r\n" },
        { "BARE_LF", line .. "Host: h\r\n\r\n" },
        { "BARE_CR", cr }, { "SPACE_IN_NAME", name } }) do
        local bytes = case[2]
        for cut = 1, #bytes, 7 do
          local ev = feed_all(hp.new(), { bytes:sub(1, cut), bytes:sub(cut + 1) })
          assert.are.equal(case[1], ev[#ev].name, at .. "/" .. cut .. ": " .. bytes)
        end
      end
      local ok = "GET /" .. long:sub(1, at) .. " HTTP/1.1\r\nHost: h\r\nX" .. long:sub(1, at)
        .. ": " .. long:sub(1, at) .. "\r\n\r\n"
      local _, ev = hp.new():feed(ok)
      assert.are.equal("done", ev[#ev].type, ok)
    end
  end)

  it("gives no head event for a request refused in its head", function()
    for _, case in ipairs(refused) do
      local bytes = case[3]
      if not case[4] then   -- chunk errors come after the head
        local _, ev = hp.new():feed(bytes)
        assert.are.equal("error", ev[1].type, bytes)
      end
    end
  end)

  it("accepts what is strict yet unusual", function()
    local ok = {
      "GET / HTTP/1.0\r\n\r\n",                                         -- HTTP/1.0 needs no Host
      "GET / HTTP/1.2\r\nHost: h\r\n\r\n",                              -- a later 1.x minor is 1.1
      "\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n",                      -- empty lines before a request
      "GET / HTTP/1.1\r\nHost: h\r\nX-Empty:\r\nX-Sp: a  b \r\n\r\n",
      "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding:  Chunked \r\n\r\n" ..
        "5 ;ext=1;b=\"q s\"\r\nhello\r\n000\r\nX-Trailer: t\r\n\r\n",
      "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5 \r\n\r\nhe\r\nl",   -- a body may hold anything
    }
    for _, bytes in ipairs(ok) do
      local _, ev = hp.new():feed(bytes)
      assert.are.equal("done", ev[#ev].type, bytes)
      local pieces = {}
      for i = 1, #bytes do pieces[i] = bytes:sub(i, i) end
      local ev1 = feed_all(hp.new(), pieces)
      assert.are.equal("done", ev1[#ev1].type, bytes)
    end
  end)

  it("refuses the same ambiguities in responses", function()
    local bad = {
      { "SPACE_IN_NAME", "HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nhi" },
      { "OBS_FOLD", "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip,\r\n chunked\r\n\r\n0\r\n\r\n" },
      { "TE_TWICE", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" },
      { "HPE_UNEXPECTED_CONTENT_LENGTH", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n0\r\n\r\n" },
      { "HPE_UNEXPECTED_CONTENT_LENGTH", "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nhi" },
      { "TE_NOT_CHUNKED", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\nabc" },
      { "BARE_LF", "HTTP/1.1 200 OK\nContent-Length: 2\r\n\r\nhi" },
      { "BARE_CR", "HTTP/1.1 200 OK\rXContent-Length: 2\r\n\r\nhi" },
      { "BAD_CHUNK", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhiXY0\r\n\r\n" },
      { "BAD_VERSION", "HTTP/2.0 200 OK\r\nContent-Length: 2\r\n\r\nhi" },
    }
    for _, case in ipairs(bad) do
      local _, ev = hp.new({ type = "response" }):feed(case[2])
      assert.are.equal("error", ev[#ev].type, case[2])
      assert.are.equal(case[1], ev[#ev].name, case[2])
    end
    -- Host is a request header: a response needs none.
    local _, ev = hp.new({ type = "response" }):feed("HTTP/1.1 204 No Content\r\n\r\n")
    assert.are.equal("head done", types(ev))
  end)

  it("parses pipelined chunked requests and bodies split anywhere", function()
    local one = "POST /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    local two = "POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\n\r\n\r\n"
    local three = "GET /c HTTP/1.1\r\nHost: h\r\n\r\n"
    local all = one .. two .. three
    for cut = 1, #all - 1 do
      local ev = feed_all(hp.new(), { all:sub(1, cut), all:sub(cut + 1) })
      local urls, bodies = {}, {}
      local parts = {}
      for _, e in ipairs(ev) do
        assert(e.type ~= "error", "error at cut " .. cut .. ": " .. tostring(e.message))
        if e.type == "head" then urls[#urls + 1] = e.url; parts = {} end
        if e.type == "body" then parts[#parts + 1] = e.data end
        if e.type == "done" then bodies[#bodies + 1] = table.concat(parts) end
      end
      assert.are.same({ "/a", "/b", "/c" }, urls)
      assert.are.same({ "abc", "\r\n\r\n", "" }, bodies)
    end
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
  describe("parser:next (the queue moonbeam.http reads)", function()
    -- A request's head as next gives it ("head", framing, headers, more,
    -- method, url, path, query, version, keep_alive, upgrade): kind, the
    -- fields as a table, framing, more. Other events: kind, a, b, more.
    local function take(k, a, b, more, method, url, path, query, version, keep, upgrade)
      if k == "head" and type(a) ~= "table" then
        return k, { method = method, url = url, path = path, query = query, version = version,
                    headers = b, body = "", keep_alive = keep, upgrade = upgrade }, a, more
      end
      return k, a, b, more
    end
    -- All events of feeding the pieces, each as {kind, a, b, more}.
    local function next_all(p, pieces)
      local all = {}
      for _, piece in ipairs(pieces) do
        local k, a, b, more = take(p:next(piece))
        while k do
          all[#all + 1] = { k, a, b, more }
          k, a, b, more = take(p:next())
        end
      end
      return all
    end

    -- The Lua heap's growth in KB while fn runs (no collection meanwhile),
    -- and fn's results.
    local function growth(fn)
      collectgarbage()
      collectgarbage("stop")
      local before = collectgarbage("count")
      local r = { fn() }
      local grew = collectgarbage("count") - before
      collectgarbage("restart")
      return grew, unpack(r, 1, 4)
    end

    -- It parses ahead by a few requests, keeping the rest of the input: a
    -- client that pipelined without reading the answers made each 64 KiB
    -- read ~2,400 requests' values at once, 1-2 MB of a connection's heap.
    it("parses ahead of next by a few requests, not a whole read, and loses nothing", function()
      local p = hp.new()
      local one = "GET /x HTTP/1.1\r\nHost: h\r\n\r\n"
      local input = one:rep(2000) .. "POST /y HTTP/1.1\r\nHost: h\r\nContent-Len"
      local grew, k, r, _, more = growth(function() return take(p:next(input)) end)
      assert.is_true(grew < 100, grew .. " KB")   -- (every request parsed: ~600 KB)
      assert.are.equal("head", k)
      assert.are.equal("/x", r.path)
      assert.is_false(p:resting())
      local n = 1
      for _ = 1, 10000 do
        if not more then break end
        k, r, _, more = take(p:next())
        if k == "head" then
          assert.are.equal("/x", r.path)
          n = n + 1
        end
      end
      assert.are.equal(2000, n)
      assert.is_nil(p:next())   -- the rest of the POST has not come
      k, r = take(p:next("gth: 2\r\n\r\nab" .. one))
      assert.are.equal("head", k)
      assert.are.equal("/y", r.path)
      local all = next_all(p, {})
      local kinds = {}
      k, r, _, more = take(p:next())
      while k do
        kinds[#kinds + 1] = k .. (k == "body" and "=" .. r or "")
        k, r, _, more = take(p:next())
      end
      assert.are.same({ "body=ab", "done", "head" }, kinds)
      assert.is_true(p:resting())
      assert.are.equal(0, #all)
      -- The end of the stream after input kept for later: the kept
      -- requests come first, then the end's error for a cut message.
      local q = hp.new()
      k = take(q:next(one:rep(40) .. "GET /cut"))
      local heads = k == "head" and 1 or 0
      k, r = take(q:next(true))
      while k do
        if k == "head" then heads = heads + 1 end
        if k == "error" then break end
        k, r = take(q:next())
      end
      assert.are.equal(40, heads)
      assert.are.equal("error", k)
    end)

    -- The same with bodies: the framing checker used to run on from the
    -- end of a Content-Length body into the next head, so the queue never
    -- saw a boundary after such a body and parsed every request of the read
    -- at once (found by fuzz_http's queue mode, which counts the heads
    -- queued).
    it("parses ahead by a few requests with Content-Length bodies too", function()
      for _, case in ipairs({
        { "request", "POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nab" },
        { "response", "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nab" },
      }) do
        local p = hp.new({ type = case[1] })
        local input = case[2]:rep(2000)
        local grew, k, a, _, more = growth(function() return take(p:next(input)) end)
        assert.is_true(grew < 100, case[1] .. ": " .. grew .. " KB")   -- (all parsed: ~1 MB)
        local n = { head = 0, body = 0, done = 0 }
        for _ = 1, 10000 do
          if not k then break end
          n[k] = n[k] + 1
          if k == "body" then assert.are.equal("ab", a) end
          if not more then break end
          k, a, _, more = take(p:next())
        end
        assert.are.same({ head = 2000, body = 2000, done = 2000 }, n)
        assert.is_true(p:resting())
      end
    end)

    it("gives a request's fields as values, headers lower-cased and joined", function()
      local p = hp.new()
      local kind, framing, headers, more, method, url, path, query, version, keep, upgrade = p:next(
        "GET /p/a?x=1&y=2 HTTP/1.1\r\nHost: example\r\nX-A: 1\r\nx-a: 2\r\nAccept: */*\r\n\r\n")
      assert.are.same({ "GET", "/p/a?x=1&y=2", "/p/a", "x=1&y=2", "1.1", true, false },
        { method, url, path, query, version, keep, upgrade })
      assert.are.same({ host = "example", ["x-a"] = "1, 2", accept = "*/*" }, headers)
      assert.is_false(framing)
      assert.is_false(more)
      assert.is_nil(p:next())
      local req
      kind, req, framing, more = take(p:next(
        "GET /p/a?x=1&y=2 HTTP/1.1\r\nHost: example\r\nX-A: 1\r\nx-a: 2\r\nAccept: */*\r\n\r\n"))
      assert.are.equal("head", kind)
      assert.are.equal("GET", req.method)
      assert.are.equal("/p/a?x=1&y=2", req.url)
      assert.are.equal("/p/a", req.path)
      assert.are.equal("x=1&y=2", req.query)
      assert.are.equal("1.1", req.version)
      assert.are.same({ host = "example", ["x-a"] = "1, 2", accept = "*/*" }, req.headers)
      assert.are.equal("", req.body)
      assert.is_true(req.keep_alive)
      assert.is_false(req.upgrade)
      -- complete with its head: no body, no "done" event after it
      assert.is_false(framing)
      assert.is_false(more)
      assert.is_nil(p:next())
      -- without a query: path is the URL, query nil
      local _, r2 = take(p:next("GET /plain HTTP/1.1\r\nHost: h\r\n\r\n"))
      assert.are.equal("/plain", r2.path)
      assert.is_nil(r2.query)
    end)

    it("gives the framing, then body and done events", function()
      local ev = next_all(hp.new(), {
        "POST /u HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhel", "lo" })
      assert.are.equal("head", ev[1][1])
      assert.are.equal(5, ev[1][3])
      assert.are.same({ "body", "hel" }, { ev[2][1], ev[2][2] })
      assert.are.same({ "body", "lo" }, { ev[3][1], ev[3][2] })
      assert.are.same({ "done", true }, { ev[4][1], ev[4][2] })
      assert.are.equal(4, #ev)
      local ch = next_all(hp.new(), {
        "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n" })
      assert.is_true(ch[1][3])
      assert.are.same({ "body", "abc" }, { ch[2][1], ch[2][2] })
      assert.are.equal("done", ch[3][1])
      -- Content-Length: 0 is a request complete with its head
      local z = next_all(hp.new(), { "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n" })
      assert.are.equal(1, #z)
      assert.is_false(z[1][3])
    end)

    it("queues pipelined requests in order and says when more are ready", function()
      local p = hp.new()
      local ev = next_all(p, {
        "GET /1 HTTP/1.1\r\nHost: h\r\n\r\nPOST /2 HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nok"
        .. "GET /3 HTTP/1.0\r\n\r\n" })
      local seen = {}
      for i, e in ipairs(ev) do seen[i] = e[1] .. (e[1] == "head" and e[2].url or "") end
      assert.are.same({ "head/1", "head/2", "body", "done", "head/3" }, seen)
      for i = 1, #ev - 1 do assert.is_true(ev[i][4]) end
      assert.is_false(ev[#ev][4])
      assert.are.equal("1.0", ev[5][2].version)
      assert.is_false(ev[5][2].keep_alive)
      -- the queue is reused: the next request starts afresh
      local k, r = take(p:next("GET /4 HTTP/1.1\r\nHost: h\r\n\r\n"))
      assert.are.equal("head", k)
      assert.are.equal("/4", r.url)
    end)

    it("gives a queued request's head as it gives the first one", function()
      -- The first event of a feed is returned without the queue, the rest
      -- come through it: both ways, the same values, a repeated header
      -- joined and a request complete with its head folded (framing false).
      local p = hp.new()
      local one = "GET /q?a=1 HTTP/1.1\r\nHost: h\r\nX-A: 1\r\nX-a: 2\r\n\r\n"
      local ev = next_all(p, { one .. one .. "POST /b HTTP/1.0\r\nContent-Length: 1\r\n\r\nz" .. one })
      local kinds = {}
      for i, e in ipairs(ev) do kinds[i] = e[1] end
      assert.are.same({ "head", "head", "head", "body", "done", "head" }, kinds)
      for _, i in ipairs({ 1, 2, 6 }) do
        local req = ev[i][2]
        assert.are.same({ "GET", "/q?a=1", "/q", "a=1", "1.1", true, false },
          { req.method, req.url, req.path, req.query, req.version, req.keep_alive, req.upgrade })
        assert.are.same({ host = "h", ["x-a"] = "1, 2" }, req.headers)
        assert.is_false(ev[i][3])
      end
      assert.are.same({ "POST", "/b", "1.0", false }, { ev[3][2].method, ev[3][2].path,
        ev[3][2].version, ev[3][2].keep_alive })
      assert.is_nil(ev[3][2].query)
      assert.are.equal(1, ev[3][3])
      assert.is_false(ev[#ev][4])
      -- a head whose body comes later keeps its framing
      local q = hp.new()
      local k, framing = q:next("PUT / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\n")
      assert.are.same({ "head", 3 }, { k, framing })
      local kb, data, _, more = q:next("abc")
      assert.are.same({ "body", "abc", true }, { kb, data, more })
      assert.are.same({ "done", true, nil, false }, { q:next() })
    end)

    it("parses a head split into single bytes", function()
      local req = "GET /slow HTTP/1.1\r\nHost: h\r\nX-Long: some value\r\n\r\n"
      local pieces = {}
      for i = 1, #req do pieces[i] = req:sub(i, i) end
      local ev = next_all(hp.new(), pieces)
      assert.are.equal(1, #ev)
      assert.are.equal("/slow", ev[1][2].url)
      assert.are.equal("some value", ev[1][2].headers["x-long"])
    end)

    it("reports errors as (\"error\", status, message), and again on later feeds", function()
      local p = hp.new()
      local k, status, msg = p:next("GET / HTTP/1.1\r\nHost: h\r\nBad Name: x\r\n\r\n")
      assert.are.equal("error", k)
      assert.are.equal(400, status)
      assert.is_string(msg)
      assert.are.equal("error", (p:next("GET / HTTP/1.1\r\n\r\n")))
      local big = hp.new({ max_url = 10 })
      local k2, st2 = big:next("GET /" .. ("a"):rep(20) .. " HTTP/1.1\r\n")
      assert.are.same({ "error", 414 }, { k2, st2 })
    end)

    it("hands back the bytes after an upgrade head", function()
      local ev = next_all(hp.new(), {
        "GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\129\0rest" })
      assert.are.equal("head", ev[1][1])
      assert.is_true(ev[1][2].upgrade)
      assert.are.same({ "upgrade", "\129\0rest" }, { ev[#ev][1], ev[#ev][2] })
    end)

    it("reads responses too, one read to the end of the stream", function()
      local p = hp.new({ type = "response" })
      local ev = next_all(p, { "HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\nbody to the end" })
      assert.are.equal("head", ev[1][1])
      local res = ev[1][2]
      assert.are.equal(200, res.status)
      assert.are.equal("1.1", res.version)
      assert.are.same({ ["x-a"] = "1" }, res.headers)
      assert.are.same({ "body", "body to the end" }, { ev[2][1], ev[2][2] })
      assert.is_true(p:in_message())
      assert.are.equal("done", (p:next(true)))
    end)

    it("refuses to mix feed and next on one parser", function()
      local p = hp.new()
      p:next("GET / HTTP/1.1\r\nHost: h\r\n\r\n")
      assert.has_error(function() p:feed("x") end)
      local q = hp.new()
      q:feed("GET / HTTP/1.1\r\nHost: h\r\n\r\n")
      assert.has_error(function() q:next("x") end)
      assert.has_error(function() q.next({}) end)
      assert.has_error(function() p:next(false) end)
    end)

    it("says when it rests between messages (what hibernation needs)", function()
      local p = hp.new()
      assert.is_true(p:resting())
      p:next("GET / HT")
      assert.is_false(p:resting())
      p:next("TP/1.1\r\nHost: h\r\n\r\nGET /2 HTTP/1.1\r\nHost: h\r\n\r\n")
      assert.is_false(p:resting())   -- the second request is still queued
      p:next()
      assert.is_true(p:resting())
      p:next("\r")                  -- half of an empty line's CRLF
      assert.is_false(p:resting())
      p:next("\n")
      assert.is_true(p:resting())
    end)
  end)

  -- A whole request head without a body, kept alive, is read by a fast
  -- path in C (lib_http.c, "The fast path"); anything else, and a head cut
  -- over several reads, by http-parser behind the framing checker. Both
  -- must give the same events: each case here is fed whole (the fast path
  -- where it applies) and a byte at a time (never the fast path), through
  -- feed and through next, and the events compared.
  describe("the fast path for whole heads", function()
    -- Events of feed up to the first error (a stopped parser repeats it at
    -- every feed), adjacent bodies joined and the bytes after an upgrade
    -- (cuts split them).
    local function feed_events(p, pieces)
      local out = {}
      for _, piece in ipairs(pieces) do
        local _, ev = p:feed(piece)
        if out[#out] and out[#out].type == "error" then break end
        for _, e in ipairs(ev) do
          local last = out[#out]
          if e.type == "body" and last and last.type == "body" then
            last.data = last.data .. e.data
          elseif e.type == "upgrade" and last and last.type == "upgrade" then
            last.rest = last.rest .. e.rest
          else
            out[#out + 1] = e
          end
        end
      end
      return out
    end
    -- Events of next, the same way, each {kind, a, b, method, url, path,
    -- query, version, keep_alive, upgrade} (without "more", which depends
    -- on the reads).
    local function next_events(p, pieces)
      local out = {}
      local function take(k, a, b, _, ...)
        return k and { k, a, b, ... }
      end
      for _, piece in ipairs(pieces) do
        if out[#out] and out[#out][1] == "error" then break end
        local r = take(p:next(piece))
        while r do
          local last = out[#out]
          if (r[1] == "body" or r[1] == "upgrade") and last and last[1] == r[1] then
            last[2] = last[2] .. r[2]
          else
            out[#out + 1] = r
          end
          r = take(p:next())
        end
      end
      return out
    end
    local function bytes(s)
      local t = {}
      for i = 1, #s do t[i] = s:sub(i, i) end
      return t
    end
    -- loose: an error is only an error (where a stream that breaks two
    -- limits is cut decides which one is found first, in the slow path).
    local function same_both_ways(stream, opts, loose)
      local function erase(evs)
        for i, e in ipairs(evs) do
          if loose and (e.type == "error" or e[1] == "error") then evs[i] = { "error" } end
        end
        return evs
      end
      local whole = feed_events(hp.new(opts), { stream })
      assert.are.same(erase(feed_events(hp.new(opts), bytes(stream))), erase(whole), stream)
      assert.are.same(erase(next_events(hp.new(opts), bytes(stream))), erase(next_events(hp.new(opts), { stream })),
                      stream)
      return whole
    end
    local H = "Host: x\r\n"

    it("drops the whitespace after a header's value, on either path", function()
      -- (RFC 9110 5.5: it is not part of the value; the leading is dropped too.)
      for _, head in ipairs({
        "GET / HTTP/1.1\r\nHost: x \r\nX-A:\t 1 \t \r\nX-B: a b\t\r\nX-C: \t\r\n\r\n",  -- the fast path
        "GET / HTTP/1.1\r\nHost: x \r\nX-A:\t 1 \t \r\nX-B: a b\t\r\nX-C: \t\r\n"
          .. "Content-Length: 0\r\n\r\n",                                                   -- http-parser
      }) do
        local _, _, headers = hp.new():next(head)
        assert.are.equal("x", headers.host)
        assert.are.equal("1", headers["x-a"])
        assert.are.equal("a b", headers["x-b"])
        assert.are.equal("", headers["x-c"])
        local ev = same_both_ways(head)
        assert.are.same({ "Host", "x", "X-A", "1", "X-B", "a b", "X-C", "" }, { table.unpack(ev[1].headers, 1, 8) })
      end
      -- Repeated, each is trimmed before they are joined.
      local _, _, headers = hp.new():next("GET / HTTP/1.1\r\nHost: x\r\nX-A: 1 \r\nx-a: 2\t\r\n\r\n")
      assert.are.equal("1, 2", headers["x-a"])
      -- A response's headers too (the client's parser).
      local p = hp.new({ type = "response" })
      local kind, res = p:next("HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-A: v \r\n\r\n")
      assert.are.equal("head", kind)
      assert.are.equal("v", res.headers["x-a"])
    end)

    it("reads a plain head as http-parser does, fields and all", function()
      local ev = same_both_ways("GET /a?b=c&d HTTP/1.1\r\nHost: x\r\nX-A:  1\r\nx-a:\t2\r\nEmpty:\r\n"
                                .. "UA: caf\xc3\xa9 \x80\xff\tv\r\nT: trail \t\r\n\r\n")
      assert.are.equal("head done", types(ev))
      assert.are.same({ "Host", "x", "X-A", "1", "x-a", "2", "Empty", "", "UA", "caf\xc3\xa9 \x80\xff\tv",
                        "T", "trail" },
                      ev[1].headers)
      assert.are.equal("/a?b=c&d", ev[1].url)
      assert.is_true(ev[1].keep_alive)
      local k, framing, headers, _, method, url, path, query, version, keep, upgrade =
        hp.new():next("GET /a?b=c&d HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nx-a: 2\r\n\r\n")
      assert.are.same({ "head", false, { host = "x", ["x-a"] = "1, 2" }, "GET", "/a?b=c&d", "/a", "b=c&d",
                        "1.1", true, false },
                      { k, framing, headers, method, url, path, query, version, keep, upgrade })
    end)

    it("gives each method, version and keep-alive what http-parser gives", function()
      for _, m in ipairs({ "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "PURGE" }) do
        assert.are.equal(m, same_both_ways(m .. " / HTTP/1.1\r\n" .. H .. "\r\n")[1].method)
      end
      for _, head in ipairs({
        "GET / HTTP/1.0\r\n\r\n", "GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        "GET / HTTP/1.0\r\n" .. H .. "Connection: Keep-Alive\r\n\r\n",
        "GET / HTTP/1.1\r\n" .. H .. "Connection: close\r\n\r\n",
        "GET / HTTP/1.1\r\n" .. H .. "connection: KEEP-ALIVE\r\n\r\n",
        "GET / HTTP/1.1\r\n" .. H .. "Connection: keep-alive, x\r\n\r\n",
        "GET / HTTP/1.1\r\n" .. H .. "Connection: keep-alive\r\nConnection: close\r\n\r\n",
        "GET / HTTP/1.1\r\n" .. H .. "Proxy-Connection: close\r\n\r\n",
        "GET / HTTP/1.1\r\n" .. H .. "Keep-Alive: timeout=5\r\n\r\n",
      }) do
        same_both_ways(head)
      end
    end)

    it("leaves bodies, upgrades and odd forms to http-parser, with the same result", function()
      for _, stream in ipairs({
        "POST / HTTP/1.1\r\n" .. H .. "Content-Length: 0\r\n\r\n",
        "POST / HTTP/1.1\r\n" .. H .. "Content-Length: 3\r\n\r\nabcGET / HTTP/1.1\r\n" .. H .. "\r\n",
        "POST / HTTP/1.1\r\n" .. H .. "Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        "GET / HTTP/1.1\r\n" .. H .. "Upgrade: websocket\r\nConnection: Upgrade\r\n\r\nrest",
        "CONNECT a:443 HTTP/1.1\r\n" .. H .. "\r\n",
        "OPTIONS * HTTP/1.1\r\n" .. H .. "\r\n",
        "GET http://a/b HTTP/1.1\r\n" .. H .. "\r\n",
        "GET /a#frag HTTP/1.1\r\n" .. H .. "\r\n",
        "GET /caf\xc3\xa9 HTTP/1.1\r\n" .. H .. "\r\n",
        "GET  / HTTP/1.1\r\n" .. H .. "\r\n",
        "GET / HTTP/1.2\r\n" .. H .. "\r\n",
        "\r\nGET / HTTP/1.1\r\n" .. H .. "\r\n",
        "GET / HTTP/1.1\r\n" .. H .. "Content-Lengthy: 5\r\nConnection-x: close\r\nUpgrade2: h\r\n\r\n",
        "GET / HTTP/1.1\r\n" .. H .. "Proxy-Connection: keep-alive\r\n\r\n",
      }) do
        same_both_ways(stream)
      end
    end)

    it("refuses what http-parser or the framing checker refuses, whole or cut", function()
      for _, stream in ipairs({
        "GET / HTTP/1.1\r\n\r\n",                                  -- no Host
        "GET / HTTP/1.1\r\n" .. H .. H .. "\r\n",                    -- two
        "GET / HTTP/1.0\r\n" .. H .. H .. "Connection: keep-alive\r\n\r\n",
        "get / HTTP/1.1\r\n" .. H .. "\r\n",
        "GET / HTTP/2.0\r\n" .. H .. "\r\n",
        "GET / HTTP/1.1\n" .. H .. "\r\n",
        "GET / HTTP/1.1\r\nHost: x\n\r\n",
        "GET / HTTP/1.1\r\n" .. H .. "X : y\r\n\r\n",
        "GET / HTTP/1.1\r\n" .. H .. "X: y\r\n z\r\n\r\n",
        "GET / HTTP/1.1\r\n" .. H .. "X: a\1b\r\n\r\n",
        "GET / HTTP/1.1\r\n" .. H .. "X: a\127b\r\n\r\n",
        "GET / HTTP/1.1\r\n" .. H .. "X: a\rb\r\n\r\n",
        "GET / HTTP/1.1\r\n" .. H .. "(x): y\r\n\r\n",
        "GET /\1 HTTP/1.1\r\n" .. H .. "\r\n",
        -- http-parser reads a name that begins with Transfer-Encoding as one
        "GET / HTTP/1.1\r\n" .. H .. "Transfer-Encodingx: y\r\n\r\n",
        "GET / HTTP/1.1\r\n" .. H .. "\r\nGET / HTTP/1.1\r\n\r\n",   -- the second
      }) do
        local ev = same_both_ways(stream)
        assert.are.equal("error", ev[#ev].type, stream)
      end
    end)

    it("reads heads made at random from near-misses as http-parser does", function()
      -- A fixed seed, so a failure shows again; each head mixes what the
      -- fast path takes with what it must leave to the slow path.
      local seed = 12345
      local function rnd(n)
        seed = (seed * 1103515245 + 12345) % 2147483648
        return math.floor(seed / 65536) % n + 1   -- (the high bits: the low ones cycle)
      end
      -- Mostly what the fast path takes (the first list), now and then a
      -- near-miss (the second).
      local function pick(t) return rnd(5) > 1 and t[1][rnd(#t[1])] or t[2][rnd(#t[2])] end
      local methods = { { "GET", "HEAD", "POST", "PATCH", "OPTIONS" }, { "TRACE", "get", "GE T", "CONNECT" } }
      local urls = { { "/", "/a/b", "/a?b=c", "/?", "/%41" }, { "/a#b", "/\xe9", "*", "http://h/", "/a b" } }
      local versions = { { "HTTP/1.1", "HTTP/1.0" }, { "HTTP/1.2", "HTTP/2.0", "http/1.1" } }
      local names = { { "Host", "host", "X-A", "x-a", "Accept", "Connection", "Keep-Alive", "Te" },
                      { "HOST", "connection", "Content-Length", "Transfer-Encoding", "Upgrade",
                        "Proxy-Connection", "Content-Lengthx", "Connectionx", "Hostx", "X y", "X\1", "" } }
      local values = { { "x", "", "keep-alive", "Keep-Alive", "a, b", " pad ", "\tt\t", "\xc3\xa9" },
                       { "close", "0", "5", "chunked", "a\1b", "a\127", "upgrade", "keep-alive, upgrade" } }
      local ends = { { "\r\n" }, { "\n", "\r" } }
      for _ = 1, 1000 do
        local parts = { pick(methods), " ", pick(urls), " ", pick(versions), pick(ends) }
        if rnd(4) > 1 then parts[#parts + 1] = "Host: h\r\n" end
        for _ = 1, rnd(4) - 1 do
          parts[#parts + 1] = pick(names) .. ":" .. (rnd(3) == 1 and "" or " ") .. pick(values) .. pick(ends)
        end
        parts[#parts + 1] = "\r\n"
        if rnd(3) == 1 then parts[#parts + 1] = "GET /next HTTP/1.1\r\nHost: h\r\n\r\n" end
        same_both_ways(table.concat(parts), rnd(4) == 1 and { max_head = 60, max_headers = 2, max_url = 3 } or nil,
                       true)
      end
    end)

    it("holds the limits at their bounds", function()
      local hdrs = "GET /123456789 HTTP/1.1\r\nHost: x\r\nA: 1\r\n\r\n"
      -- the URL is 10 bytes; the head counts 16 + 10 + (4 + 1 + 4) + (1 + 1 + 4)
      assert.are.equal("head done", types(same_both_ways(hdrs, { max_url = 10 })))
      assert.are.equal(414, same_both_ways(hdrs, { max_url = 9 })[1].status)
      assert.are.equal("head done", types(same_both_ways(hdrs, { max_headers = 2 })))
      assert.are.equal(431, same_both_ways(hdrs, { max_headers = 1 })[1].status)
      assert.are.equal("head done", types(same_both_ways(hdrs, { max_head = 41 })))
      assert.are.equal(431, same_both_ways(hdrs, { max_head = 40 })[1].status)
      -- a head of its request line alone counts too (16 + the URL)
      local bare = "GET /1 HTTP/1.0\r\n\r\n"
      assert.are.equal("head done", types(same_both_ways(bare, { max_head = 18 })))
      assert.are.equal(431, same_both_ways(bare, { max_head = 17 })[1].status)
    end)

    it("reads pipelined heads one after the other, whichever path each takes", function()
      local a = "GET /1 HTTP/1.1\r\n" .. H .. "\r\n"
      local b = "POST /2 HTTP/1.1\r\n" .. H .. "Content-Length: 2\r\n\r\nhi"
      local c = "GET /3 HTTP/1.0\r\n\r\n"
      local ev = same_both_ways(a .. b .. a .. c .. a)
      assert.are.equal("head done head body done head done head done head done", types(ev))
      -- and a head the first read ends in the middle of, the next read completing it
      local p = hp.new()
      local k1 = p:next(a .. "GET /4 HT")
      local k2, _, _, _, _, url = p:next("TP/1.1\r\n" .. H .. "\r\n" .. a)
      assert.are.same({ "head", "head", "/4" }, { k1, k2, url })
      assert.are.equal("head", (p:next()))
      assert.is_true(p:resting())
    end)
  end)

  describe("http_parser.head (a whole response in one string)", function()
    it("builds the status line, headers, framing and body", function()
      assert.are.equal("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        hp.head(200, nil, 5, false, false, "hello"))
      assert.are.equal("HTTP/1.1 404 Not Found\r\nA: b\r\nSet-Cookie: x=1\r\n"
        .. "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        hp.head(404, { "A", "b", "Set-Cookie", "x=1" }, true, true, false))
      assert.are.equal("HTTP/1.1 204 No Content\r\nConnection: keep-alive\r\n\r\n",
        hp.head(204, {}, nil, false, true))
      assert.are.equal("HTTP/1.1 799 Unknown\r\nContent-Length: 1234567890123\r\n\r\n",
        hp.head(799, nil, 1234567890123, false, false))
    end)

    it("takes heads larger than its stack buffer", function()
      local big = ("v"):rep(5000)
      local out = hp.head(200, { "X-Big", big, "X-Small", "s" }, 2, false, false, "ok")
      assert.are.equal("HTTP/1.1 200 OK\r\nX-Big: " .. big .. "\r\nX-Small: s\r\nContent-Length: 2\r\n\r\nok", out)
    end)

    it("refuses bad arguments", function()
      assert.has_error(function() hp.head(99, nil, 0) end)
      assert.has_error(function() hp.head(1000, nil, 0) end)
      assert.has_error(function() hp.head(200, { "A" }, 0) end)
      assert.has_error(function() hp.head(200, { "A", {} }, 0) end)
      assert.has_error(function() hp.head(200, nil, -1) end)
      assert.has_error(function() hp.head(200, nil, "5") end)
      assert.has_error(function() hp.head(200, nil, 5, false, false, {}) end)
    end)
  end)

  describe("the guard around a handler (guard_new, guard, started, respond, finished, guard_free, trapping)", function()
    local mb = require "moonbeam"
    local tcp = require "moonbeam.tcp"
    local l, a, b
    before_each(function()
      l = assert(tcp.listen("127.0.0.1", 0))
      a = assert(tcp.connect("127.0.0.1", l:port(), 5000))
      b = assert(l:accept(5000))
    end)
    after_each(function()
      -- b first: a case may leave b's exit on close armed (a request timed
      -- out, never finished), and the FIN of a closed first then ended this
      -- process - the whole spec run, silently, now and then.
      b:close(); a:close(); l:close()
      mb.receive(function(m) return m == "$guard test" end, 0)
    end)

    local function overtime(ms)
      return mb.receive(function(m) return m == "$guard test" end, ms)
    end

    it("sends its message when the timing is not stopped in time", function()
      local g = hp.guard_new(b, mb.self(), 20, "$guard test")
      hp.guard(g, true)
      assert.are.equal("$guard test", overtime(5000))
      assert.is_false(hp.started(g))   -- too late
      hp.finished(g)
      -- The next request is timed again (the timer went idle when it fired).
      hp.guard(g, true)
      assert.are.equal("$guard test", overtime(5000))
      assert.is_false(hp.started(g))
      hp.guard_free(g)
    end)

    it("never fires for a request that finished, nor before a later request's time", function()
      local g = hp.guard_new(b, mb.self(), 100, "$guard test")
      hp.guard(g, true)
      assert.is_true(hp.started(g))
      hp.finished(g)
      -- The timer, armed for the first request, finds nothing to time.
      assert.is_nil(overtime(250))
      -- A request that starts while the timer is armed for an earlier one
      -- (finished) gets its own full time: never told early.
      hp.guard(g, true)
      assert.is_true(hp.started(g))
      mb.sleep(60)
      local t0 = mb.now()
      hp.guard(g, true)
      assert.are.equal("$guard test", overtime(5000))
      assert.is_true(mb.now() - t0 >= 99)
      assert.is_false(hp.started(g))
      hp.guard_free(g)
    end)

    it("stops the timing, and respond writes the whole response", function()
      local g = hp.guard_new(b, mb.self(), 60000, "$guard test")
      hp.guard(g, false)
      local head = "HTTP/1.1 200 OK\r\nX-A: 1\r\nContent-Length: 2\r\n\r\nok"
      -- true: the kernel took it all; else what it did not take, for
      -- sock:write (as when this process runs off the socket's thread).
      local r = hp.respond(g, 200, { "X-A", "1" }, 2, false, false, "ok")
      if r ~= true then
        assert.is_string(r)
        assert.are.equal(head:sub(-#r), r)
        assert(b:write(r))
      end
      local got = ""
      for _ = 1, 50 do
        if #got >= #head then break end
        got = got .. assert(a:read(5000))
      end
      assert.are.equal(head, got)
      assert.is_nil(overtime(50))
      hp.guard_free(g)
      -- without a timer (handler_timeout = math.huge)
      g = hp.guard_new(b, mb.self())
      hp.guard(g, true)
      assert.is_nil(overtime(50))
      assert.is_true(hp.started(g))
      hp.finished(g)
      hp.guard_free(g)
    end)

    it("gives back what the kernel did not take, for sock:write", function()
      -- A body larger than RESPOND_COPY_MAX goes from its own string; the
      -- peer reads nothing, so the socket buffers fill.
      local body = ("0123456789abcdef"):rep(512 * 1024)   -- 8 MiB
      local g = hp.guard_new(b, mb.self(), 1, "$guard test")
      local rest = hp.respond(g, 200, nil, #body, false, false, body)
      assert.is_string(rest)
      local whole = "HTTP/1.1 200 OK\r\nContent-Length: " .. #body .. "\r\n\r\n" .. body
      if #rest == #whole then
        -- This process ran off the socket's thread (the other scheduler
        -- took it): then nothing is written here and all of it comes back.
        assert.are.equal(whole, rest)
      else
        assert.is_true(#rest > 0 and #rest < #body)
        assert.are.equal(body:sub(-#rest), rest)
      end
      -- and the whole response when the time was up
      hp.guard(g, true)
      overtime(5000)
      local late, whole = hp.respond(g, 204, nil, nil, true, false)
      assert.is_false(late)
      assert.are.equal("HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n", whole)
      hp.finished(g)
      hp.guard_free(g)
    end)

    it("does nothing to a socket it does not own, and refuses what is not a guard", function()
      local g = hp.guard_new(b, mb.self(), 60000, "$guard test")
      b:close()
      hp.guard(g, true)
      assert.are.equal("HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx",
        hp.respond(g, 200, nil, 1, false, false, "x"))
      -- A guard made for a closed socket guards the time alone.
      local g2 = hp.guard_new(b, mb.self())
      hp.guard(g2, true)
      assert.is_true(hp.started(g2))
      hp.finished(g2)
      assert.has_error(function() hp.guard(b, true) end)
      assert.has_error(function() hp.respond({}, 200) end)
      assert.has_error(function() hp.guard_new({}, mb.self()) end)
      assert.has_error(function() hp.guard_new(a, "not a pid") end)
      assert.has_error(function() hp.guard_new(l, mb.self()) end)
      -- Freeing twice is nothing; a freed guard is refused.
      hp.guard_free(g)
      hp.guard_free(g)
      assert.has_error(function() hp.guard(g, true) end)
      g2 = nil
      collectgarbage()   -- (its __gc frees it)
    end)

    it("leaves nothing behind when its process ends while a request is timed", function()
      -- Killed (its state closed: __gc), returned without a free (a reused
      -- state: freed with the host at the latest), or freed with the timer
      -- armed: the ASan run's leak check sees the rest.
      for _, how in ipairs({ "kill", "return", "free" }) do
        local me = mb.self()
        local pid = mb.spawn(function()
          local hp2 = require "moonbeam.http_parser"
          local s = mb.receive()
          local g = hp2.guard_new(s, me, 60000, "$guard test")
          hp2.guard(g, true)
          if how == "free" then hp2.guard_free(g) end
          mb.send(me, "armed")
          if how == "kill" then mb.receive() end
        end)
        local ref = mb.monitor(pid)
        local c = assert(tcp.connect("127.0.0.1", l:port(), 5000))
        local s = assert(l:accept(5000))
        assert(s:set_owner(pid))
        mb.send(pid, s)
        assert.are.equal("armed", mb.receive(function(m) return m == "armed" end, 5000))
        if how == "kill" then mb.exit(pid, "kill") end
        local down = mb.receive(function(m) return type(m) == "table" and m.ref == ref end, 5000)
        assert.is_truthy(down)
        c:close()
      end
      assert.is_nil(overtime(0))
    end)

    it("tells whether the process traps exits", function()
      local was = mb.trap_exit(true)
      assert.is_true(hp.trapping())
      mb.trap_exit(false)
      assert.is_false(hp.trapping())
      mb.trap_exit(was)
    end)

    it("reads a socket as sock:read does, unless the process traps exits", function()
      local was = mb.trap_exit(false)
      assert(a:write("GET / HTTP/1.1\r\n"))
      assert.are.equal("GET / HTTP/1.1\r\n", hp.read(b, 5000))
      local data, err = hp.read(b, 10)
      assert.is_nil(data)
      assert.are.equal("timeout", err)
      -- Trapping, it does not read: the bytes stay for the next read.
      mb.trap_exit(true)
      assert(a:write("Host: x\r\n\r\n"))
      data, err = hp.read(b, 5000)
      assert.is_nil(data)
      assert.are.equal("trapping", err)
      mb.trap_exit(false)
      assert.are.equal("Host: x\r\n\r\n", hp.read(b, 5000))
      -- Its argument checks are sock:read's.
      assert.has_error(function() hp.read("not a socket") end)
      assert.has_error(function() hp.read(l, 10) end)
      a:close()
      data, err = hp.read(b, 5000)
      assert.is_nil(data)
      assert.are.equal("closed", err)
      mb.trap_exit(was)
    end)
  end)
end)
