// A real daphne process for the tests, started the way production starts it (bin/serve),
// on a free loopback port with its own migrated SQLite file. Node's twin of
// calls/testing/servers.py.
//
// The Python is TEST_SERVER_PYTHON, else the repository's .venv/bin/python. (Not a
// SIGNALING_* name: the server refuses to start with any SIGNALING_* variable it does not know.)

import { spawn } from "node:child_process";
import { mkdtempSync, openSync, closeSync, readFileSync, rmSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../../..");
export const PYTHON = process.env.TEST_SERVER_PYTHON || path.join(ROOT, ".venv", "bin", "python");

// Settings every test server gets: presence broadcasts coalesced over 20 ms instead of 200,
// and no cap on new sockets per second from one address (every test client is 127.0.0.1).
const TEST_SETTINGS = {
  SIGNALING_PRESENCE_WINDOW_MS: "20",
  SIGNALING_CONNECT_RATE_PER_ADDRESS: "0",
};

/** A TCP port on 127.0.0.1 that nothing listens on right now. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

function run(command, args, options) {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { ...options, stdio: ["ignore", "pipe", "pipe"] });
    let output = "";
    child.stdout.on("data", (chunk) => (output += chunk));
    child.stderr.on("data", (chunk) => (output += chunk));
    child.once("error", reject);
    child.once("exit", (code) =>
      code === 0 ? resolve(output) : reject(new Error(`${command} ${args.join(" ")} exited with ${code}:\n${output}`)),
    );
  });
}

async function waitForPort(port, child, deadlineMs = 30_000) {
  const deadline = Date.now() + deadlineMs;
  while (Date.now() < deadline) {
    if (child.exitCode !== null) {
      throw new Error(`the server exited with code ${child.exitCode} before listening on ${port}`);
    }
    const up = await new Promise((resolve) => {
      const socket = net.connect(port, "127.0.0.1");
      socket.once("connect", () => {
        socket.destroy();
        resolve(true);
      });
      socket.once("error", () => resolve(false));
    });
    if (up) {
      return;
    }
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  throw new Error(`nothing listened on 127.0.0.1:${port} within ${deadlineMs} ms`);
}

/**
 * Migrate a fresh SQLite file and start `sh bin/serve` on it; resolves with
 * {url, port, stop(), logs()}. `settings` are extra environment variables (SIGNALING_AUTH...).
 */
export async function startServer(settings = {}) {
  const folder = mkdtempSync(path.join(tmpdir(), "signaling-js-"));
  const port = await freePort();
  // The test's own settings only: nothing inherited may change the server's behaviour.
  const env = Object.fromEntries(
    Object.entries(process.env).filter(
      ([name]) => !/^(SIGNALING_|DJANGO_SETTINGS)/.test(name) && !["DATABASE_URL", "REDIS_URL"].includes(name),
    ),
  );
  Object.assign(env, {
    DATABASE_URL: `sqlite:///${path.join(folder, "server.sqlite3")}`,
    PYTHONUNBUFFERED: "1",
    // bin/serve runs `daphne` from the PATH: the one next to this Python.
    PATH: `${path.dirname(PYTHON)}${path.delimiter}${process.env.PATH ?? ""}`,
    PORT: String(port),
    BIND: "127.0.0.1",
    ...TEST_SETTINGS,
    ...settings,
  });
  let child = null;
  let log = null;
  const logPath = path.join(folder, "daphne.log");
  // Should the test process die first, the server must not outlive it.
  const killOnExit = () => child?.kill("SIGKILL");
  process.once("exit", killOnExit);
  try {
    await run(PYTHON, ["manage.py", "migrate", "--noinput", "-v0"], { cwd: ROOT, env });
    log = openSync(logPath, "a");
    child = spawn("sh", [path.join(ROOT, "bin", "serve")], { cwd: ROOT, env, stdio: ["ignore", log, log] });
    await waitForPort(port, child);
  } catch (err) {
    child?.kill("SIGKILL");
    const logs = log === null ? "" : `\n${readFileSync(logPath, "utf8")}`;
    if (log !== null) {
      closeSync(log);
    }
    process.removeListener("exit", killOnExit);
    rmSync(folder, { recursive: true, force: true });
    throw new Error(`${err.message}${logs}`);
  }
  return {
    port,
    url: `ws://127.0.0.1:${port}/`,
    logs: () => readFileSync(logPath, "utf8"),
    /** SIGTERM (the server drains, closing sockets with 1012), SIGKILL if it takes over 10 s. */
    async stop() {
      process.removeListener("exit", killOnExit);
      if (child.exitCode === null && child.signalCode === null) {
        const exited = new Promise((resolve) => child.once("exit", resolve));
        child.kill("SIGTERM");
        const timer = setTimeout(() => child.kill("SIGKILL"), 10_000);
        await exited;
        clearTimeout(timer);
      }
      closeSync(log);
      rmSync(folder, { recursive: true, force: true });
    },
  };
}
