/**
 * echo.js: round-trip time on /ws/echo.
 *
 * Each VU opens /ws/echo, plays MESSAGES strict ping-pongs (send, wait for the echo, send the
 * next), closes, and starts again, for DURATION. Every echo is checked byte for byte.
 *
 * RTT is measured between k6's event timestamps, which have sub-millisecond resolution
 * (k6 1.1 has no performance.now() and Date.now() counts whole milliseconds): the next frame is
 * sent from the handler of the previous echo, so echo_rtt = time of echo N - time of echo N-1
 * (the open event for the first), i.e. the round trip as this client sees it, its own event-loop
 * delay included.
 *
 *   k6 run -e TARGET=ws://127.0.0.1:8083 k6/echo.js
 *
 * Knobs: TARGET, VUS (10), DURATION (30s), MESSAGES (100 per connection), SIZE (64 bytes),
 * MODE (text | binary | mixed), TIMEOUT_MS (5000, no echo this long: give up the connection),
 * RTT_P95_MS (20), RTT_P99_MS (50), MAX_ERRORS (0).
 */
import { Counter, Trend } from 'k6/metrics';
import * as config from './lib/config.js';
import { summaryFor, summaryTrendStats } from './lib/summary.js';
import { WebSocket, onClose } from './lib/ws.js';

const knobs = {
  VUS: config.int('VUS', 10, 1),
  DURATION: config.duration('DURATION', '30s').text,
  MESSAGES: config.int('MESSAGES', 100, 1),
  SIZE: config.int('SIZE', 64, 1),
  MODE: config.str('MODE', 'text'),
  TIMEOUT_MS: config.int('TIMEOUT_MS', 5000, 1),
  RTT_P95_MS: config.num('RTT_P95_MS', 20),
  RTT_P99_MS: config.num('RTT_P99_MS', 50),
  MAX_ERRORS: config.int('MAX_ERRORS', 0),
};
if (!['text', 'binary', 'mixed'].includes(knobs.MODE)) {
  throw new Error(`MODE must be text, binary or mixed, got ${JSON.stringify(knobs.MODE)}`);
}

const rtt = new Trend('echo_rtt', true);
const echoes = new Counter('echo_messages');
const mismatches = new Counter('echo_mismatches');
const errors = new Counter('echo_errors');
const timeouts = new Counter('echo_timeouts');

export const options = {
  summaryTrendStats,
  scenarios: {
    echo: { executor: 'constant-vus', vus: knobs.VUS, duration: knobs.DURATION },
  },
  thresholds: {
    echo_rtt: [`p(95)<${knobs.RTT_P95_MS}`, `p(99)<${knobs.RTT_P99_MS}`],
    echo_messages: ['count>0'],
    echo_mismatches: ['count==0'],
    echo_errors: [`count<=${knobs.MAX_ERRORS}`],
    echo_timeouts: [`count<=${knobs.MAX_ERRORS}`],
  },
};

const TEXT = config.padding(knobs.SIZE);
const BINARY = new Uint8Array(knobs.SIZE).map((_, i) => i % 251).buffer;

function sameBytes(a, b) {
  if (!(a instanceof ArrayBuffer) || a.byteLength !== b.byteLength) return false;
  const x = new Uint8Array(a);
  const y = new Uint8Array(b);
  for (let i = 0; i < x.length; i += 1) if (x[i] !== y[i]) return false;
  return true;
}

export default function () {
  const ws = new WebSocket(config.wsUrl('/ws/echo'));
  ws.binaryType = 'arraybuffer';
  let sent = 0;
  let sentAt = 0;
  let expected = null;
  let timer = null;
  let done = false;

  const finish = () => {
    done = true;
    clearTimeout(timer);
    ws.close();
  };
  const next = (at) => {
    const binary = knobs.MODE === 'binary' || (knobs.MODE === 'mixed' && sent % 2 === 1);
    expected = binary ? BINARY : TEXT;
    sentAt = at;
    sent += 1;
    ws.send(expected);
    clearTimeout(timer);
    timer = setTimeout(() => {
      timeouts.add(1);
      finish();
    }, knobs.TIMEOUT_MS);
  };

  ws.addEventListener('open', (event) => next(event.timestamp));
  ws.addEventListener('message', (event) => {
    const ok = typeof expected === 'string' ? event.data === expected : sameBytes(event.data, expected);
    if (!ok) {
      mismatches.add(1);
      finish();
      return;
    }
    rtt.add(event.timestamp - sentAt);
    echoes.add(1);
    if (sent >= knobs.MESSAGES) finish();
    else next(event.timestamp);
  });
  onClose(ws, (code, reason, error) => {
    clearTimeout(timer);
    if (!done) errors.add(1, { code: String(code) });
    if (!done && error) console.warn(`echo: socket failed: ${error}`);
  });
}

export const handleSummary = summaryFor('echo', knobs);
