/**
 * storm.js: a connection storm at a fixed arrival rate.
 *
 * RATE new connections per second for DURATION (constant-arrival-rate: new connections keep
 * arriving at that rate however slowly the server answers). Each one opens /ws, waits for the
 * hello, joins a room (JOIN), holds the connection HOLD_MS, and closes.
 *
 * - ws_connecting (k6's own): the handshake, TCP connect to the 101 response;
 * - storm_hello_time: connect start -> the server's hello (the first message);
 * - storm_connect_success: Rate of connections that got their hello;
 * - storm_rejected_503: handshakes answered 503 (connection limit or draining) and
 *   storm_503_without_retry_after those of them lacking a Retry-After header;
 *   storm_handshake_failures: other failures (refused, reset, timeouts, other statuses), tagged.
 * - dropped_iterations (k6's own): arrivals k6 could not start for want of a free VU (raise
 *   MAX_VUS); a run that drops arrivals did not make the storm it was asked to.
 *
 * This script uses the legacy blocking `connect` from lib/ws.js, the only k6 1.1 client that
 * reports the handshake's HTTP status (see lib/ws.js).
 *
 *   k6 run -e TARGET=ws://127.0.0.1:8083 -e RATE=500 -e DURATION=1m k6/storm.js
 *
 * Knobs: TARGET, RATE (50 connections/s), DURATION (30s), HOLD_MS (2000), JOIN (true),
 * ROOMS (10 rooms to spread joins over), HELLO_TIMEOUT_MS (5000), PRE_VUS (enough for
 * RATE x (HOLD_MS + 1 s)), MAX_VUS (4 x PRE_VUS), HANDSHAKE_P95_MS (200), HANDSHAKE_P99_MS (1000),
 * MIN_SUCCESS (0.99), MAX_503 (0), MAX_DROPPED (0).
 */
import exec from 'k6/execution';
import { Counter, Rate, Trend } from 'k6/metrics';
import * as config from './lib/config.js';
import { decode, send } from './lib/protocol.js';
import { summaryFor, summaryTrendStats } from './lib/summary.js';
import { connect } from './lib/ws.js';

const rate = config.int('RATE', 50, 1);
const holdMs = config.int('HOLD_MS', 2000);
const preVus = config.int('PRE_VUS', Math.max(2, Math.ceil(rate * (holdMs / 1000 + 1) * 1.2)), 1);
const knobs = {
  RATE: rate,
  DURATION: config.duration('DURATION', '30s').text,
  HOLD_MS: holdMs,
  JOIN: config.bool('JOIN', true),
  ROOMS: config.int('ROOMS', 10, 1),
  HELLO_TIMEOUT_MS: config.int('HELLO_TIMEOUT_MS', 5000, 1),
  PRE_VUS: preVus,
  MAX_VUS: config.int('MAX_VUS', 4 * preVus, preVus),
  HANDSHAKE_P95_MS: config.num('HANDSHAKE_P95_MS', 200),
  HANDSHAKE_P99_MS: config.num('HANDSHAKE_P99_MS', 1000),
  MIN_SUCCESS: config.num('MIN_SUCCESS', 0.99),
  MAX_503: config.int('MAX_503', 0),
  MAX_DROPPED: config.int('MAX_DROPPED', 0),
};

const helloTime = new Trend('storm_hello_time', true);
const success = new Rate('storm_connect_success');
const connected = new Counter('storm_connections');
const rejected503 = new Counter('storm_rejected_503');
const noRetryAfter = new Counter('storm_503_without_retry_after');
const failures = new Counter('storm_handshake_failures');
const helloTimeouts = new Counter('storm_hello_timeouts');
const joins = new Counter('storm_joins');

export const options = {
  summaryTrendStats,
  scenarios: {
    storm: {
      executor: 'constant-arrival-rate',
      rate: knobs.RATE,
      timeUnit: '1s',
      duration: knobs.DURATION,
      preAllocatedVUs: knobs.PRE_VUS,
      maxVUs: knobs.MAX_VUS,
    },
  },
  thresholds: {
    ws_connecting: [`p(95)<${knobs.HANDSHAKE_P95_MS}`, `p(99)<${knobs.HANDSHAKE_P99_MS}`],
    storm_connect_success: [`rate>=${knobs.MIN_SUCCESS}`],
    storm_connections: ['count>0'],
    storm_rejected_503: [`count<=${knobs.MAX_503}`],
    dropped_iterations: [`count<=${knobs.MAX_DROPPED}`],
  },
};

function header(headers, name) {
  for (const key of Object.keys(headers || {})) {
    if (key.toLowerCase() === name) return headers[key];
  }
  return undefined;
}

export default function () {
  const room = `k6-storm-${exec.scenario.iterationInTest % knobs.ROOMS}`;
  const started = Date.now();
  let hello = false;
  let res;
  try {
    res = connect(config.wsUrl('/ws'), { tags: { name: 'storm' } }, (socket) => {
      socket.on('message', (data) => {
        const msg = decode(data);
        if (msg === null) return;
        if (msg.op === 'hello') {
          hello = true;
          helloTime.add(Date.now() - started);
          if (knobs.JOIN) send(socket, { op: 'join', room, id: 1 });
          socket.setTimeout(() => socket.close(), knobs.HOLD_MS);
        } else if (msg.op === 'ack' && msg.id === 1) {
          joins.add(1);
        }
      });
      socket.setTimeout(() => {
        if (!hello) {
          helloTimeouts.add(1);
          socket.close();
        }
      }, knobs.HELLO_TIMEOUT_MS);
    });
  } catch (e) {
    failures.add(1, { reason: 'error' });
    success.add(false);
    return;
  }
  const status = res ? res.status : 0;
  if (status === 101 && hello) {
    connected.add(1);
    success.add(true);
    return;
  }
  success.add(false);
  if (status === 503) {
    rejected503.add(1);
    if (header(res.headers, 'retry-after') === undefined) noRetryAfter.add(1);
  } else {
    failures.add(1, { reason: status === 101 ? 'no_hello' : `status_${status}` });
    if (res && res.error) console.warn(`storm: handshake failed: ${res.error}`);
  }
}

export const handleSummary = summaryFor('storm', knobs);
