// spec/browser/chat.mjs: the browser test of examples/chat.
//
//   cd spec/browser && npm install && node chat.mjs [path/to/moonbeam]
//
// Starts the chat server (build/moonbeam examples/chat/main.lua on free
// ports), opens two pages of its web client in headless Chromium (Debian's
// /usr/bin/chromium, driven by playwright-core), has both join one room and
// each send a message, and checks that each page shows the other's message.
// Saves a screenshot of each page and prints the paths. Exits 0 on success,
// 1 on failure (with the reason), and the whole run is bounded in time.
import { spawn } from "node:child_process";
import { mkdtempSync, mkdirSync, rmSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));
const top = resolve(here, "../..");
const moonbeam = resolve(process.argv[2] || process.env.MOONBEAM || join(top, "build/moonbeam"));
const chromiumPath = process.env.CHROMIUM || "/usr/bin/chromium";
const shotDir = join(top, "build");
const STEP = 15000;       // ms for any one step (page load, a line to appear)
const WHOLE = 120000;     // ms for the whole test

let server = null;
let context = null;
let profile = null;

function cleanup() {
  if (server && server.exitCode === null) server.kill("SIGTERM");
  if (profile) rmSync(profile, { recursive: true, force: true });
}

// What the pages said on their consoles, shown when the test fails.
const consoleLines = [];

async function fail(msg) {
  console.error("browser test FAILED: " + msg);
  if (consoleLines.length) console.error("page console:\n" + consoleLines.slice(-40).join("\n"));
  if (server && serverOutput) console.error("server output:\n" + serverOutput.slice(-2000));
  try { if (context) await context.close(); } catch { /* already gone */ }
  cleanup();
  process.exit(1);
}

const watchdog = setTimeout(() => fail(`took longer than ${WHOLE / 1000} s`), WHOLE);

// Start the chat on free ports; resolve with the HTTP port it prints.
let serverOutput = "";
function startServer() {
  return new Promise((ok, ko) => {
    if (!existsSync(moonbeam)) return ko(new Error(`no ${moonbeam} (build it with scripts/setup build)`));
    server = spawn(moonbeam, ["examples/chat/main.lua", "--tcp", "0", "--http", "0"],
                   { cwd: top, stdio: ["ignore", "pipe", "pipe"] });
    const timer = setTimeout(() => ko(new Error("the chat server did not print its HTTP port")), STEP);
    const onData = (chunk) => {
      serverOutput += chunk.toString();
      const m = serverOutput.match(/chat: HTTP on [^:\s]+:(\d+)/);
      if (m) { clearTimeout(timer); ok(Number(m[1])); }
    };
    server.stdout.on("data", onData);
    server.stderr.on("data", (c) => { serverOutput += c.toString(); });
    server.on("exit", (code, sig) => {
      clearTimeout(timer);
      ko(new Error(`the chat server exited (${code ?? sig})`));
    });
    server.on("error", (e) => { clearTimeout(timer); ko(e); });
  });
}

// Type one line into a page's input and send it.
async function say(page, line) {
  await page.fill("#input", line);
  await page.press("#input", "Enter");
}

// Wait until the page's log shows a line equal to `text` (a string) or
// matching it (a RegExp).
async function seen(page, who, text) {
  const want = text instanceof RegExp ? { re: text.source } : { eq: text };
  try {
    await page.waitForFunction(
      (w) => Array.from(document.querySelectorAll("#log div")).some(
        (d) => (w.re ? new RegExp(w.re).test(d.textContent) : d.textContent === w.eq)),
      want, { timeout: STEP });
  } catch {
    const log = await page.textContent("#log").catch(() => "(unreadable)");
    throw new Error(`${who} never showed "${text}"; its log:\n${log}`);
  }
}

async function main() {
  if (!existsSync(chromiumPath)) throw new Error(`no Chromium at ${chromiumPath}`);
  const port = await startServer();
  const url = `http://127.0.0.1:${port}/`;
  profile = mkdtempSync(join(tmpdir(), "mb-chromium-"));
  // A persistent context is how Playwright takes a user data directory; it
  // refuses --user-data-dir among the args.
  context = await chromium.launchPersistentContext(profile, {
    executablePath: chromiumPath,
    headless: true,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync"],
    viewport: { width: 800, height: 500 },
    timeout: STEP,
  });
  const alice = await context.newPage();
  const bob = await context.newPage();
  for (const [page, who] of [[alice, "alice"], [bob, "bob"]]) {
    page.on("console", (m) => consoleLines.push(`${who}: ${m.type()}: ${m.text()}`));
    page.on("pageerror", (e) => consoleLines.push(`${who}: page error: ${e.message}`));
  }
  for (const [page, who] of [[alice, "alice"], [bob, "bob"]]) {
    await page.goto(url, { timeout: STEP });
    await page.waitForSelector("#status.open, #status.closed", { timeout: STEP });
    const state = await page.textContent("#status");
    if (state !== "connected") throw new Error(`${who}'s WebSocket did not open: ${state}`);
    await seen(page, who, /^\* welcome guest\d+: \/nick <name>, \/join <room>, \/who, \/quit$/);
    await say(page, "/nick " + who);
    await seen(page, who, "* you are " + who);
    await say(page, "/join lobby");
    await seen(page, who, "* joined lobby");
  }
  await seen(alice, "alice", "* bob joined lobby");
  await say(alice, "hello from alice");
  await seen(bob, "bob", "[lobby] alice: hello from alice");
  await say(bob, "hello from bob");
  await seen(alice, "alice", "[lobby] bob: hello from bob");
  await say(bob, "/who");
  await seen(bob, "bob", "* in lobby: alice, bob");

  mkdirSync(shotDir, { recursive: true });
  const shots = [join(shotDir, "chat-browser-alice.png"), join(shotDir, "chat-browser-bob.png")];
  await alice.screenshot({ path: shots[0] });
  await bob.screenshot({ path: shots[1] });
  await context.close();
  context = null;
  console.log("browser test passed: two pages joined 'lobby' and each saw the other's message");
  console.log("screenshots: " + shots.join(" "));
}

main().then(() => {
  clearTimeout(watchdog);
  cleanup();
  process.exit(0);
}, (e) => fail(e && e.message ? e.message : String(e)));
