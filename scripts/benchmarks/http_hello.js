// http_hello: HTTP hello world on Node.js's http module, for the HTTP
// benchmark (scripts/bench http, load from wrk); the twin of http_hello.lua.
//
// Args (key=value): port (0 = any free port, the default), host (default
// 127.0.0.1). Prints "listening port=<port> pid=<pid>" once it accepts
// connections, then nothing per request; runs until killed.
'use strict';
const http = require('http');

const opts = {};
for (const a of process.argv.slice(2)) {
  const m = /^(\w+)=(.*)$/.exec(a);
  if (m) opts[m[1]] = m[2];
}

const server = http.createServer((req, res) => {
  res.end('Hello, world!\n');
});
server.listen(Number(opts.port || 0), opts.host || '127.0.0.1', () => {
  console.log(`listening port=${server.address().port} pid=${process.pid}`);
});
