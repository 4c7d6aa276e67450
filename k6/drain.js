/**
 * drain.js: how clients come back when the gateway restarts (close code 1012).
 *
 * VUS clients each hold one connection for DURATION, joined to one of ROOMS rooms, publishing
 * RATE messages per second. Restart the gateway while it runs (`systemctl restart rtgateway`,
 * a rolling deploy, or SIGTERM and start again: k6/smoke.py does that). The draining gateway
 * closes every connection with 1012 and a reason like `service restart; retry_after_ms=1234`,
 * spread over its drain window. Each client then does what the protocol asks:
 *
 * 1. parse retry_after_ms from the close reason (k6 1.1 hides the close code and reason from
 *    the close event; lib/ws.js recovers both);
 * 2. wait that long (capped at MAX_RETRY_AFTER_MS) plus a uniform jitter of 0..JITTER_MS;
 * 3. reconnect; a refused connection or a 503 (the old process still draining, the new one not
 *    yet listening) is retried with exponential backoff and full jitter, BACKOFF_MS doubling up
 *    to BACKOFF_MAX_MS;
 * 4. rejoin its room and carry on publishing.
 *
 * - drain_reconnect_delay: from the 1012 to the rejoin's ack, per client: the spread of returns;
 * - drain_retry_after: the delays the gateway advertised;
 * - drain_reconnect_attempts: connection attempts each client needed to get back;
 * - drain_close_1012, drain_reconnects, drain_reconnect_failures (failed attempts, tagged),
 *   drain_not_back (clients still away at the end), drain_messages_after_reconnect.
 *
 * With EXPECT_RESTART=true (the default) a run in which no restart happened fails: it measured
 * nothing. Set it to false to use the script as a plain steady-state check.
 *
 *   k6 run -e TARGET=ws://127.0.0.1:8083 -e VUS=1000 -e DURATION=2m k6/drain.js
 *   # ...and restart the gateway about a minute in.
 *
 * Knobs: TARGET, VUS (50), DURATION (60s), ROOMS (5), RATE (1 per client per second), SIZE (64),
 * JITTER_MS (250), MAX_RETRY_AFTER_MS (60000), BACKOFF_MS (250), BACKOFF_MAX_MS (5000),
 * EXPECT_RESTART (true), RECONNECT_MAX_MS (30000: threshold on the slowest return),
 * MAX_UNEXPECTED (0: closes other than 1012 allowed).
 */
import exec from 'k6/execution';
import { Counter, Trend } from 'k6/metrics';
import * as config from './lib/config.js';
import { SERVICE_RESTART, SeqTracker, decode, retryAfterMs, send } from './lib/protocol.js';
import { summaryFor, summaryTrendStats } from './lib/summary.js';
import { WebSocket, onClose } from './lib/ws.js';

const session = config.duration('DURATION', '60s');
const knobs = {
  VUS: config.int('VUS', 50, 1),
  DURATION: session.text,
  ROOMS: config.int('ROOMS', 5, 1),
  RATE: config.num('RATE', 1),
  SIZE: config.int('SIZE', 64),
  JITTER_MS: config.int('JITTER_MS', 250),
  MAX_RETRY_AFTER_MS: config.int('MAX_RETRY_AFTER_MS', 60000),
  BACKOFF_MS: config.int('BACKOFF_MS', 250, 1),
  BACKOFF_MAX_MS: config.int('BACKOFF_MAX_MS', 5000, 1),
  EXPECT_RESTART: config.bool('EXPECT_RESTART', true),
  RECONNECT_MAX_MS: config.num('RECONNECT_MAX_MS', 30000),
  MAX_UNEXPECTED: config.int('MAX_UNEXPECTED', 0),
};

const reconnectDelay = new Trend('drain_reconnect_delay', true);
const retryAfter = new Trend('drain_retry_after', true);
const attemptsToReturn = new Trend('drain_reconnect_attempts');
const deliveryLatency = new Trend('drain_delivery_latency', true);
const closes1012 = new Counter('drain_close_1012');
const noRetryAfter = new Counter('drain_1012_without_retry_after');
const reconnects = new Counter('drain_reconnects');
const reconnectFailures = new Counter('drain_reconnect_failures');
const notBack = new Counter('drain_not_back');
const unexpectedCloses = new Counter('drain_unexpected_closes');
const received = new Counter('drain_messages_received');
const receivedAfter = new Counter('drain_messages_after_reconnect');
const gaps = new Counter('drain_seq_gaps');
const serverErrors = new Counter('drain_server_errors');

const thresholds = {
  drain_messages_received: ['count>0'],
  drain_not_back: ['count==0'],
  drain_1012_without_retry_after: ['count==0'],
  drain_unexpected_closes: [`count<=${knobs.MAX_UNEXPECTED}`],
  drain_reconnect_delay: [`max<${knobs.RECONNECT_MAX_MS}`],
  // Always true: listed so that the summary breaks failed attempts down by kind.
  'drain_reconnect_failures{kind:rejected}': ['count>=0'],
  'drain_reconnect_failures{kind:refused}': ['count>=0'],
  'drain_reconnect_failures{kind:other}': ['count>=0'],
};
if (knobs.EXPECT_RESTART) {
  thresholds.drain_close_1012 = ['count>0'];
  thresholds.drain_reconnects = ['count>0'];
  thresholds.drain_messages_after_reconnect = ['count>0'];
}

export const options = {
  summaryTrendStats,
  scenarios: {
    drain: {
      executor: 'per-vu-iterations',
      vus: knobs.VUS,
      iterations: 1,
      maxDuration: `${Math.ceil(session.ms / 1000) + 60}s`,
    },
  },
  thresholds,
};

const PAD = config.padding(knobs.SIZE);

/** Exponential backoff with full jitter: uniform in [0, min(max, base * 2^attempt)). */
function backoff(attempt) {
  return Math.random() * Math.min(knobs.BACKOFF_MAX_MS, knobs.BACKOFF_MS * 2 ** Math.min(attempt, 20));
}

export default function () {
  const index = exec.vu.idInTest - 1;
  const room = `k6-drain-${index % knobs.ROOMS}`;
  const url = config.wsUrl('/ws');
  const seqs = new SeqTracker();
  let ws = null;
  let ending = false;
  let failed = 0; // failed attempts since the last successful join
  let tries = 0; // attempts since the 1012
  let restartedAt = null; // when the current absence began with a 1012
  let returned = false; // this connection was a return after a 1012
  let publishTimer = null;
  let reconnectTimer = null;

  const stopPublishing = () => {
    clearInterval(publishTimer);
    publishTimer = null;
  };

  const open = () => {
    reconnectTimer = null;
    if (ending) return;
    if (restartedAt !== null) tries += 1;
    const socket = new WebSocket(url);
    ws = socket;
    let joined = false;

    socket.addEventListener('message', (event) => {
      const msg = decode(event.data);
      if (msg === null) return;
      if (msg.op === 'message') {
        received.add(1);
        if (returned) receivedAfter.add(1);
        const missed = seqs.observe(msg.room, msg.seq);
        if (missed > 0) gaps.add(missed);
        if (msg.data && typeof msg.data.t === 'number') deliveryLatency.add(event.timestamp - msg.data.t);
      } else if (msg.op === 'hello') {
        send(socket, { op: 'join', room, id: 0 });
      } else if (msg.op === 'ack' && msg.id === 0) {
        joined = true;
        failed = 0;
        if (restartedAt !== null) {
          reconnectDelay.add(event.timestamp - restartedAt);
          attemptsToReturn.add(tries);
          reconnects.add(1);
          restartedAt = null;
          returned = true;
        }
        if (knobs.RATE > 0) {
          publishTimer = setInterval(() => {
            send(socket, { op: 'publish', room, data: { t: Date.now(), vu: index, pad: PAD } });
          }, 1000 / knobs.RATE);
        }
      } else if (msg.op === 'error') {
        serverErrors.add(1, { code: String(msg.code) });
      }
    });

    onClose(socket, (code, reason, error) => {
      stopPublishing();
      seqs.reset(); // no history on a new connection: its first message is the new baseline
      if (ending) return;
      let delay;
      if (code === SERVICE_RESTART) {
        closes1012.add(1);
        const advertised = retryAfterMs(reason);
        if (advertised === null) noRetryAfter.add(1);
        else retryAfter.add(advertised);
        restartedAt = Date.now();
        tries = 0;
        returned = false;
        delay = advertised === null
          ? backoff(0)
          : Math.min(advertised, knobs.MAX_RETRY_AFTER_MS) + Math.random() * knobs.JITTER_MS;
      } else if (!joined) {
        // Refused, reset, or 503 while the old process drains or before the new one listens.
        const kind = /bad handshake/.test(error) ? 'rejected' : /refused/.test(error) ? 'refused' : 'other';
        reconnectFailures.add(1, { kind });
        delay = backoff(failed);
        failed += 1;
      } else {
        unexpectedCloses.add(1, { code: String(code) });
        console.warn(`drain: connection closed: ${code} ${reason || error}`);
        delay = backoff(failed);
        failed += 1;
      }
      reconnectTimer = setTimeout(open, delay);
    });
  };

  open();
  setTimeout(() => {
    ending = true;
    stopPublishing();
    clearTimeout(reconnectTimer);
    if (restartedAt !== null) notBack.add(1);
    if (ws !== null) ws.close();
  }, session.ms);
}

export const handleSummary = summaryFor('drain', knobs);
