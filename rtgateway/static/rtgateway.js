/**
 * rtgateway.js: a browser client for the rtgateway room protocol.
 *
 * One dependency-free ES module. It speaks the JSON protocol of `/ws`
 * (join, leave, publish, ping; replies matched to requests by `id`), keeps the
 * connection alive with the application-level ping, reconnects after a close
 * with exponential backoff and full jitter (or after the delay the gateway
 * advertises with close code 1012), rejoins its rooms, and reports `seq` gaps.
 *
 *     import { RtGatewayClient } from "/rtgateway.js";
 *     const client = new RtGatewayClient();          // ws(s)://<this host>/ws
 *     client.addEventListener("message", (e) => console.log(e.detail));
 *     client.connect();
 *     await client.join("lobby");
 *     await client.publish("lobby", { text: "hi" });
 *
 * Events (all CustomEvent, payload in `event.detail`):
 *   statechange  {state, previous, ...}  state is connecting | open | reconnecting | closed
 *   message      {room, seq, ts, data}
 *   gap          {room, expected, got}    messages expected..got-1 were missed
 *   close        {code, reason, wasClean} every time a socket closes
 *   removed      {room, reason}           the backend took this client out of a room
 *   error        {code, message, ...}     failed sockets, rejoins, unsolicited errors
 *
 * A close with a code of 4000-4499 (but 4008) is the backend's: the client
 * does not reconnect by itself (state closed, `kicked: true`); connect() does.
 *
 * See docs/browser.md for the full API and the reconnect rules.
 */

export const VERSION = "0.1.0";

/** Close code the gateway sends while it drains for a restart. */
export const SERVICE_RESTART = 1012;

/** Whether a close code is the backend's disconnect (4000-4499 but 4008, the slow consumer). */
export function isKick(code) {
  return code >= 4000 && code <= 4499 && code !== 4008;
}

/** Error codes that say "try again later", not "this request is wrong". */
const TRANSIENT = new Set(["rate_limited", "draining", "unavailable", "internal"]);

const DEFAULTS = Object.freeze({
  pingIntervalMs: 20000, // send {"op":"ping"} this often while open (0 = never)
  pingTimeoutMs: 10000, // no pong this long after a ping: the connection is dead
  connectTimeoutMs: 10000, // no hello this long after opening a socket: give up on it
  requestTimeoutMs: 10000, // every join/leave/publish promise settles within this
  initialDelayMs: 500, // backoff: the first retry waits up to this long
  maxDelayMs: 30000, // backoff: no retry waits longer than this
  maxRetryAfterMs: 60000, // cap on a delay advertised by the gateway
  maxQueued: 1000, // requests held while not connected
  WebSocket: globalThis.WebSocket, // the constructor to use
});

/**
 * A request the gateway refused (`code` from its error reply), or one the
 * client gave up on: `timeout`, `disconnected` (the socket closed before the
 * reply; a publish may or may not have been delivered), `closed` (close()
 * was called), `cancelled` (leave() of a room being joined), `queue_full`.
 */
export class RtGatewayError extends Error {
  constructor(code, message, reply = null) {
    super(message);
    this.name = "RtGatewayError";
    this.code = code;
    this.reply = reply;
    this.retryAfterMs = reply && Number.isFinite(reply.retry_after_ms) ? reply.retry_after_ms : null;
  }
}

/** The WebSocket URL of `path` on the server that served `base` (a page URL). */
export function gatewayUrl(path = "ws", base = globalThis.location && globalThis.location.href) {
  const url = new URL(path, base);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  url.hash = "";
  return url.href;
}

/** The `retry_after_ms=N` a gateway puts in a close reason, or null. */
export function retryAfterFromReason(reason) {
  const match = /retry_after_ms=(\d+)/.exec(reason || "");
  return match ? Number(match[1]) : null;
}

/**
 * Exponential backoff with full jitter: uniform in [0, min(max, initial * 2^attempt)).
 * Full jitter spreads a fleet that lost its server at the same moment.
 */
export function backoffDelayMs(attempt, initialDelayMs, maxDelayMs, random = Math.random) {
  const ceiling = Math.min(maxDelayMs, initialDelayMs * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * ceiling);
}

export class RtGatewayClient extends EventTarget {
  #options;
  #url;
  #ws = null;
  #state = "closed";
  #hello = null;
  #nextId = 0;
  #attempt = 0; // failed connections since the last successful one
  #pending = new Map(); // id -> request sent, awaiting its reply
  #queue = []; // requests waiting for the connection to open
  #rooms = new Map(); // room -> {policy}: what to (re)join on every open
  #lastSeq = new Map(); // room -> last seq seen
  #reconnectTimer = null;
  #connectTimer = null;
  #pingTimer = null;
  #pingInFlight = false;

  /**
   * @param {string} [url] ws:// or wss:// URL of the gateway's /ws; by default
   *   the /ws next to the page that loaded this module.
   * @param {object} [options] see DEFAULTS above and docs/browser.md.
   */
  constructor(url = gatewayUrl(), options = {}) {
    super();
    this.#url = url;
    this.#options = { ...DEFAULTS, ...options };
  }

  get url() {
    return this.#url;
  }

  /** connecting | open | reconnecting | closed */
  get state() {
    return this.#state;
  }

  /** The gateway's hello on the current connection (conn_id, server, limits), or null. */
  get hello() {
    return this.#hello;
  }

  /** The rooms this client is in, or will rejoin when it reconnects. */
  get rooms() {
    return [...this.#rooms.keys()];
  }

  /**
   * Open the connection and keep it open until close(). While reconnecting,
   * try again now instead of waiting out the delay. Otherwise a no-op.
   */
  connect() {
    if (this.#state === "closed") this.#attempt = 0;
    if (this.#state === "closed" || this.#state === "reconnecting") this.#open();
    return this;
  }

  /**
   * Close and stop reconnecting. Requests in flight or queued reject with
   * `closed`. The rooms are kept: connect() rejoins them.
   */
  close(code = 1000, reason = "") {
    if (code !== 1000 && !(code >= 3000 && code <= 4999)) {
      throw new RangeError("close code must be 1000 or 3000-4999"); // what browsers allow
    }
    clearTimeout(this.#reconnectTimer);
    this.#reconnectTimer = null;
    const ws = this.#ws;
    if (ws) {
      this.#detach(ws);
      ws.close(code, reason);
      this.#socketClosed(ws, code, reason, true, false);
    }
    this.#failAll(new RtGatewayError("closed", "the client was closed"));
    this.#setState("closed", {});
  }

  /**
   * Join `room` (optionally with a slow-consumer `policy`). The room is kept
   * across reconnects until leave(). Resolves with the ack
   * `{room, members, policy}`; an error reply rejects and forgets the room.
   */
  join(room, { policy } = {}) {
    this.#rooms.set(room, { policy });
    // A newer join of the same room replaces a queued one.
    this.#cancelQueuedJoins(room, `joined ${room} again`);
    return this.#request(policy ? { op: "join", room, policy } : { op: "join", room });
  }

  /** Leave `room` and forget it. Resolves with the ack, or null when not connected. */
  leave(room) {
    this.#rooms.delete(room);
    this.#lastSeq.delete(room);
    this.#cancelQueuedJoins(room, `left ${room}`);
    if (this.#state !== "open") return Promise.resolve(null);
    return this.#request({ op: "leave", room });
  }

  /**
   * Publish JSON-serialisable `data` to `room`. Resolves with the ack
   * `{room, seq}`. Queued while not connected; at most once: a publish
   * interrupted by a disconnect rejects with `disconnected`.
   */
  publish(room, data) {
    if (data === undefined || typeof data === "function") {
      return Promise.reject(new TypeError("data must be JSON-serialisable"));
    }
    return this.#request({ op: "publish", room, data });
  }

  /** Round trip to the gateway; resolves with the time it took, in ms. */
  async ping() {
    const started = performance.now();
    await this.#request({ op: "ping" });
    return performance.now() - started;
  }

  // The connection.

  #open() {
    clearTimeout(this.#reconnectTimer);
    this.#reconnectTimer = null;
    this.#setState("connecting", { attempt: this.#attempt });
    let ws;
    try {
      ws = new this.#options.WebSocket(this.#url);
    } catch (err) {
      // A malformed URL throws at once (a SyntaxError): no retry will fix it.
      this.#emit("error", { code: "bad_url", message: String(err && err.message) });
      this.#failAll(new RtGatewayError("closed", "the client was closed"));
      this.#setState("closed", { code: 1006, reason: "bad url" });
      return;
    }
    this.#ws = ws;
    ws.onmessage = (event) => this.#received(ws, event.data);
    ws.onerror = () => {
      // Browsers hide why (refused, 403, TLS): the close event that follows has 1006.
      this.#emit("error", { code: "socket_error", message: "the WebSocket failed", url: this.#url });
    };
    // The backend's disconnect is on purpose: coming straight back would undo it.
    ws.onclose = (event) => {
      const kicked = isKick(event.code);
      this.#socketClosed(ws, event.code, event.reason, event.wasClean, !kicked, kicked);
    };
    // The connection counts as open at the gateway's hello, not at the upgrade.
    this.#connectTimer = setTimeout(
      () => this.#drop(ws, "no hello from the gateway"),
      this.#options.connectTimeoutMs,
    );
  }

  /** Give up on a socket that stopped answering, without waiting for its close handshake. */
  #drop(ws, reason) {
    if (ws !== this.#ws) return;
    this.#detach(ws);
    try {
      ws.close(4000, reason);
    } catch {
      // Already closing: nothing more to do with it.
    }
    this.#socketClosed(ws, 1006, reason, false, true);
  }

  #detach(ws) {
    ws.onmessage = ws.onerror = ws.onclose = null;
  }

  #socketClosed(ws, code, reason, wasClean, reconnect, kicked = false) {
    if (ws !== this.#ws) return;
    this.#ws = null;
    this.#hello = null;
    clearTimeout(this.#connectTimer);
    clearInterval(this.#pingTimer);
    this.#pingInFlight = false;
    this.#emit("close", { code, reason, wasClean });
    // Joins go around again on the next connection; anything else is at most once.
    for (const req of this.#pending.values()) {
      this.#pending.delete(req.id);
      if (req.msg.op === "join" && this.#rooms.has(req.msg.room)) {
        this.#queue.push(req);
      } else if (req.msg.op === "leave") {
        this.#settle(req, null, null); // a new connection is in no room
      } else {
        this.#settle(req, null, new RtGatewayError("disconnected", "the connection closed"));
      }
    }
    if (!reconnect) {
      if (kicked) {
        this.#failAll(new RtGatewayError("closed", `the gateway closed the connection: ${reason}`));
        this.#setState("closed", { code, reason, kicked: true });
      }
      return;
    }
    let delayMs;
    const advertised = code === SERVICE_RESTART ? retryAfterFromReason(reason) : null;
    if (advertised !== null) {
      // The gateway spreads its clients' returns: take its delay as given.
      delayMs = Math.min(advertised, this.#options.maxRetryAfterMs);
      this.#attempt = 0;
    } else {
      const { initialDelayMs, maxDelayMs } = this.#options;
      delayMs = backoffDelayMs(this.#attempt, initialDelayMs, maxDelayMs);
      this.#attempt += 1;
    }
    this.#setState("reconnecting", { code, reason, delayMs, advertised: advertised !== null });
    this.#reconnectTimer = setTimeout(() => this.#open(), delayMs);
  }

  #opened(ws, hello) {
    clearTimeout(this.#connectTimer);
    this.#hello = hello;
    this.#attempt = 0;
    this.#setState("open", { hello });
    if (this.#options.pingIntervalMs > 0) {
      this.#pingTimer = setInterval(() => this.#keepalive(ws), this.#options.pingIntervalMs);
    }
    // Rejoin first, so that queued publishes find their rooms joined.
    const queue = this.#queue;
    this.#queue = [];
    const joins = queue.filter((req) => req.msg.op === "join");
    for (const [room, { policy }] of this.#rooms) {
      if (!joins.some((req) => req.msg.room === room)) this.#rejoin(room, policy);
    }
    for (const req of joins) this.#transmit(req);
    for (const req of queue) if (req.msg.op !== "join") this.#transmit(req);
  }

  #rejoin(room, policy) {
    const msg = policy ? { op: "join", room, policy } : { op: "join", room };
    this.#request(msg, { internal: true }).catch((err) => {
      if (err.code === "closed" || err.code === "cancelled") return; // close() or leave()
      this.#emit("error", { code: err.code, message: err.message, op: "join", room });
      if (!this.#rooms.has(room)) return; // refused for good, and forgotten
      if (err.reply === null || TRANSIENT.has(err.code)) {
        const delayMs = err.retryAfterMs ?? backoffDelayMs(1, this.#options.initialDelayMs, 5000);
        const ws = this.#ws;
        setTimeout(() => {
          if (ws === this.#ws && this.#state === "open" && this.#rooms.has(room)) {
            this.#rejoin(room, this.#rooms.get(room).policy);
          }
        }, delayMs);
      }
    });
  }

  #keepalive(ws) {
    if (this.#pingInFlight || ws !== this.#ws) return;
    this.#pingInFlight = true;
    this.#request({ op: "ping" }, { timeoutMs: this.#options.pingTimeoutMs }).then(
      () => {
        this.#pingInFlight = false;
      },
      (err) => {
        this.#pingInFlight = false;
        if (err.code === "timeout") this.#drop(ws, "ping timeout");
      },
    );
  }

  // Requests and replies.

  #request(fields, { timeoutMs = this.#options.requestTimeoutMs, internal = false } = {}) {
    return new Promise((resolve, reject) => {
      const req = { id: ++this.#nextId, msg: null, internal, resolve, reject, timer: null };
      req.msg = { ...fields, id: req.id };
      req.timer = setTimeout(
        () => this.#settle(req, null, new RtGatewayError("timeout", `no reply to ${fields.op}`)),
        timeoutMs,
      );
      if (this.#state === "open") {
        this.#transmit(req);
      } else if (this.#queue.length >= this.#options.maxQueued) {
        this.#settle(req, null, new RtGatewayError("queue_full", "too many requests queued"));
      } else {
        this.#queue.push(req);
      }
    });
  }

  #transmit(req) {
    this.#pending.set(req.id, req);
    this.#ws.send(JSON.stringify(req.msg));
  }

  /** Resolve with `value` or reject with `error`, once; forget the request. */
  #settle(req, value, error) {
    clearTimeout(req.timer);
    this.#pending.delete(req.id);
    const queued = this.#queue.indexOf(req);
    if (queued !== -1) this.#queue.splice(queued, 1);
    if (error) req.reject(error);
    else req.resolve(value);
  }

  #cancelQueuedJoins(room, why) {
    const joins = this.#queue.filter((req) => req.msg.op === "join" && req.msg.room === room);
    for (const req of joins) this.#settle(req, null, new RtGatewayError("cancelled", why));
  }

  #failAll(error) {
    for (const req of [...this.#pending.values(), ...this.#queue]) this.#settle(req, null, error);
  }

  #received(ws, text) {
    let msg;
    try {
      msg = JSON.parse(text);
    } catch {
      this.#emit("error", { code: "bad_json", message: "the gateway sent a message that is not JSON" });
      return;
    }
    if (!msg || typeof msg !== "object") return;
    switch (msg.op) {
      case "message":
        this.#message(msg);
        break;
      case "hello":
        this.#opened(ws, msg);
        break;
      case "removed":
        // The backend took this client out of the room: do not rejoin it.
        this.#rooms.delete(msg.room);
        this.#lastSeq.delete(msg.room);
        this.#emit("removed", { room: msg.room, reason: msg.reason ?? "" });
        break;
      case "ack":
      case "pong": {
        const req = this.#pending.get(msg.id);
        if (!req) break; // a reply that arrived after its timeout
        if (msg.op === "ack" && req.msg.op === "join" && msg.members === 1) {
          // Alone in the room: it was (re)created and its seq starts over.
          this.#lastSeq.delete(msg.room);
        }
        this.#settle(req, msg, null);
        break;
      }
      case "error": {
        const req = msg.id === undefined ? undefined : this.#pending.get(msg.id);
        if (!req) {
          this.#emit("error", { ...msg });
          break;
        }
        if (req.msg.op === "join" && !(req.internal && TRANSIENT.has(msg.code))) {
          // Refused: forget the room, unless a rejoin should simply try again.
          this.#rooms.delete(req.msg.room);
        }
        this.#settle(req, null, new RtGatewayError(msg.code, msg.message, msg));
        break;
      }
      default:
        break; // ops from a newer gateway
    }
  }

  #message(msg) {
    const { room, seq } = msg;
    if (Number.isInteger(seq) && this.#rooms.has(room)) {
      const last = this.#lastSeq.get(room);
      if (last !== undefined && seq > last + 1) {
        this.#emit("gap", { room, expected: last + 1, got: seq });
      }
      // seq <= last: the room was recreated (a restart); start over from here.
      this.#lastSeq.set(room, seq);
    }
    this.#emit("message", { room, seq, ts: msg.ts, data: msg.data });
  }

  #setState(state, detail) {
    const previous = this.#state;
    if (state === previous && state === "closed") return;
    this.#state = state;
    this.#emit("statechange", { ...detail, state, previous });
  }

  #emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}
