// ws_fanout_server.js: the Node.js twin of ws_fanout_server.lua, on the `ws`
// package (scripts/bench installs it into build/node-ws; WS_MODULE names
// it). One event loop: once n clients are connected it sends `lines` lines
// of `size` bytes to each with ws.send, a round of n sends at a time,
// letting I/O run (setImmediate) after every 10 rounds. Then it waits to be
// killed. Args as ws_fanout_server.lua's.
'use strict';
const { WebSocketServer } = require(process.env.WS_MODULE || 'ws');
const args = Object.fromEntries(process.argv.slice(2).map((a) => a.split('=')));
const n = +(args.n || 200), lines = +(args.lines || 500), size = +(args.size || 60);
const wss = new WebSocketServer({ host: '127.0.0.1', port: +(args.port || 0) });
const clients = [];
wss.on('listening', () => console.log(`listening port=${wss.address().port}`));
wss.on('connection', (ws) => {
  ws.on('error', () => {});
  clients.push(ws);
  if (clients.length === n) broadcast();
});
function broadcast() {
  const line = 'x'.repeat(size);
  let l = 0;
  (function rounds() {
    for (let k = 0; k < 10 && l < lines; k++, l++)
      for (const ws of clients) ws.send(line);
    if (l < lines) setImmediate(rounds);
  })();
}
