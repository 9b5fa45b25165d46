// A TCP relay on loopback between clients and the server, whose links a test breaks the
// way networks fail. Node's twin of TcpProxy in calls/tests/netclient.py.
//
//   cut()      resets every open link at both ends (a phone switching networks: both
//              sides see the connection die, with no WebSocket close);
//   freeze()   stops carrying bytes on the open links and leaves them open (a link that
//              went dark: only a ping deadline notices); new links still flow;
//   refusing   while true, a new connection is reset at once (the network is still down).

import net from "node:net";

export class TcpProxy {
  refusing = false;
  #server = null;
  #links = new Set();

  constructor(targetPort) {
    this.targetPort = targetPort;
  }

  async start() {
    this.#server = net.createServer((client) => this.#relay(client));
    await new Promise((resolve) => this.#server.listen(0, "127.0.0.1", resolve));
    this.port = this.#server.address().port;
    return this;
  }

  get url() {
    return `ws://127.0.0.1:${this.port}/`;
  }

  /** How many links are open now. */
  get links() {
    return this.#links.size;
  }

  cut() {
    for (const link of this.#links) {
      link.client.resetAndDestroy();
      link.upstream.resetAndDestroy();
    }
    this.#links.clear();
  }

  freeze() {
    for (const link of this.#links) {
      link.frozen = true;
    }
  }

  async stop() {
    this.cut();
    await new Promise((resolve) => this.#server.close(resolve));
  }

  #relay(client) {
    if (this.refusing) {
      client.resetAndDestroy();
      return;
    }
    const upstream = net.connect(this.targetPort, "127.0.0.1");
    const link = { client, upstream, frozen: false };
    this.#links.add(link);
    const pump = (from, to) => {
      from.on("data", (chunk) => {
        if (!link.frozen && !to.destroyed) {
          to.write(chunk);
        }
      });
      from.on("close", () => {
        if (!link.frozen) {
          to.destroy();
        }
        this.#links.delete(link);
      });
      from.on("error", () => {});
    };
    pump(client, upstream);
    pump(upstream, client);
  }
}
