/**
 * soak.js: hours of connection churn at moderate load.
 *
 * VUS clients for DURATION. Each client lives a random SESSION_MIN..SESSION_MAX: it connects,
 * joins ROOMS_PER_CLIENT of ROOMS rooms, publishes RATE messages per second to them, pings every
 * PING_MS, then closes, and a new session starts at once: the gateway sees a steady population
 * whose members keep changing (joins, leaves, handshakes, closes), which is where leaks show.
 *
 * A second scenario scrapes the gateway's /metrics every METRICS_INTERVAL (0 turns it off, e.g.
 * when a load balancer hides /metrics) into gauges: server_rss_mb, server_open_fds,
 * server_connections, server_cpu_seconds. Their min / last / max in the summary show growth: RSS
 * or fds that climb over an hour with a flat connection count are a leak.
 *
 * Latencies as in rooms.js: soak_delivery_latency (data.t -> receive), soak_ping_rtt
 * (ping -> pong); completeness from seq gaps (soak_seq_gaps, soak_delivery).
 *
 *   k6 run -e TARGET=ws://127.0.0.1:8083 -e DURATION=2h -e VUS=200 k6/soak.js
 *
 * Knobs: TARGET, VUS (50), DURATION (1h), ROOMS (10), ROOMS_PER_CLIENT (2), RATE (0.5 per
 * client per second), SIZE (64), SESSION_MIN (10s), SESSION_MAX (60s), PING_MS (5000),
 * METRICS_INTERVAL (30s; 0 = off), LATENCY_P99_MS (250), MIN_SESSION_SUCCESS (0.999),
 * MIN_DELIVERY (0.999), MAX_ERRORS (0: server errors and unexpected closes allowed).
 */
import { sleep } from 'k6';
import exec from 'k6/execution';
import http from 'k6/http';
import { Counter, Gauge, Rate, Trend } from 'k6/metrics';
import * as config from './lib/config.js';
import { SeqTracker, decode, send } from './lib/protocol.js';
import { summaryFor, summaryTrendStats } from './lib/summary.js';
import { WebSocket, onClose } from './lib/ws.js';

const total = config.duration('DURATION', '1h');
const sessionMin = config.duration('SESSION_MIN', '10s');
const sessionMax = config.duration('SESSION_MAX', '60s');
const metricsText = config.str('METRICS_INTERVAL', '30s');
const metricsMs = metricsText === '0' ? 0 : config.duration('METRICS_INTERVAL', '30s').ms;
const knobs = {
  VUS: config.int('VUS', 50, 1),
  DURATION: total.text,
  ROOMS: config.int('ROOMS', 10, 1),
  ROOMS_PER_CLIENT: config.int('ROOMS_PER_CLIENT', 2, 1),
  RATE: config.num('RATE', 0.5),
  SIZE: config.int('SIZE', 64),
  SESSION_MIN: sessionMin.text,
  SESSION_MAX: sessionMax.text,
  PING_MS: config.int('PING_MS', 5000),
  METRICS_INTERVAL: metricsText,
  LATENCY_P99_MS: config.num('LATENCY_P99_MS', 250),
  MIN_SESSION_SUCCESS: config.num('MIN_SESSION_SUCCESS', 0.999),
  MIN_DELIVERY: config.num('MIN_DELIVERY', 0.999),
  MAX_ERRORS: config.int('MAX_ERRORS', 0),
};
if (sessionMax.ms < sessionMin.ms) throw new Error('SESSION_MAX must be >= SESSION_MIN');
if (knobs.ROOMS_PER_CLIENT > knobs.ROOMS) throw new Error('ROOMS_PER_CLIENT must be <= ROOMS');

const deliveryLatency = new Trend('soak_delivery_latency', true);
const pingRtt = new Trend('soak_ping_rtt', true);
const sessionLength = new Trend('soak_session_length', true);
const received = new Counter('soak_messages_received');
const published = new Counter('soak_messages_published');
const gaps = new Counter('soak_seq_gaps');
const delivery = new Rate('soak_delivery');
const sessionOk = new Rate('soak_session_success');
const sessions = new Counter('soak_sessions');
const serverErrors = new Counter('soak_server_errors');
const unexpectedCloses = new Counter('soak_unexpected_closes');
const rss = new Gauge('server_rss_mb');
const fds = new Gauge('server_open_fds');
const connections = new Gauge('server_connections');
const cpu = new Gauge('server_cpu_seconds');

const scenarios = {
  churn: { executor: 'constant-vus', vus: knobs.VUS, duration: knobs.DURATION },
};
if (metricsMs > 0) {
  scenarios.server = {
    executor: 'constant-vus', vus: 1, duration: knobs.DURATION, exec: 'scrape',
  };
}

export const options = {
  summaryTrendStats,
  scenarios,
  thresholds: {
    soak_delivery_latency: [`p(99)<${knobs.LATENCY_P99_MS}`],
    soak_messages_received: ['count>0'],
    soak_session_success: [`rate>=${knobs.MIN_SESSION_SUCCESS}`],
    soak_delivery: [`rate>=${knobs.MIN_DELIVERY}`],
    soak_server_errors: [`count<=${knobs.MAX_ERRORS}`],
    soak_unexpected_closes: [`count<=${knobs.MAX_ERRORS}`],
  },
};

const PAD = config.padding(knobs.SIZE);

function pickRooms() {
  const rooms = new Set();
  while (rooms.size < knobs.ROOMS_PER_CLIENT) rooms.add(`k6-soak-${config.randomInt(0, knobs.ROOMS - 1)}`);
  return [...rooms];
}

export default function () {
  const left = exec.scenario.startTime + total.ms - Date.now();
  let lifetime = config.randomInt(sessionMin.ms, sessionMax.ms);
  if (left < 2000) {
    // Too little time for a session: idle to the end (at least 0.1 s, not a busy loop).
    sleep(Math.max(100, left) / 1000);
    return;
  }
  lifetime = Math.min(lifetime, left - 1000);

  const rooms = pickRooms();
  const seqs = new SeqTracker();
  const pings = new Map();
  const ws = new WebSocket(config.wsUrl('/ws'));
  const opened = Date.now();
  let nextId = 1;
  let hello = false;
  let ending = false;
  const timers = [];
  const intervals = [];

  ws.addEventListener('message', (event) => {
    const msg = decode(event.data);
    if (msg === null) return;
    if (msg.op === 'message') {
      received.add(1);
      delivery.add(true);
      const missed = seqs.observe(msg.room, msg.seq);
      for (let i = 0; i < missed; i += 1) delivery.add(false);
      if (missed > 0) gaps.add(missed);
      if (msg.data && typeof msg.data.t === 'number') deliveryLatency.add(event.timestamp - msg.data.t);
    } else if (msg.op === 'hello') {
      hello = true;
      for (const room of rooms) send(ws, { op: 'join', room, id: nextId++ });
      if (knobs.RATE > 0) {
        intervals.push(setInterval(() => {
          const room = rooms[config.randomInt(0, rooms.length - 1)];
          send(ws, { op: 'publish', room, data: { t: Date.now(), pad: PAD } });
          published.add(1);
        }, 1000 / knobs.RATE));
      }
      if (knobs.PING_MS > 0) {
        intervals.push(setInterval(() => {
          const id = nextId++;
          pings.set(id, Date.now());
          send(ws, { op: 'ping', id });
        }, knobs.PING_MS));
      }
    } else if (msg.op === 'pong') {
      const sentAt = pings.get(msg.id);
      pings.delete(msg.id);
      if (sentAt !== undefined) pingRtt.add(event.timestamp - sentAt);
    } else if (msg.op === 'error') {
      serverErrors.add(1, { code: String(msg.code) });
    }
  });
  onClose(ws, (code, reason, error) => {
    timers.forEach(clearTimeout);
    intervals.forEach(clearInterval);
    sessions.add(1);
    sessionOk.add(hello && ending);
    sessionLength.add(Date.now() - opened);
    if (!ending) {
      unexpectedCloses.add(1, { code: String(code) });
      console.warn(`soak: connection closed early: ${code} ${reason || error}`);
    }
  });
  timers.push(setTimeout(() => {
    ending = true;
    intervals.forEach(clearInterval);
    for (const room of rooms) send(ws, { op: 'leave', room, id: nextId++ });
    ws.close();
  }, lifetime));
}

const SCRAPED = {
  process_resident_memory_bytes: (v) => rss.add(v / 1048576),
  process_open_fds: (v) => fds.add(v),
  rtgateway_connections_current: (v) => connections.add(v),
  process_cpu_seconds_total: (v) => cpu.add(v),
};

/** The server scenario: one scrape of /metrics, then wait for the next. */
export function scrape() {
  const res = http.get(config.httpUrl('/metrics'), { tags: { name: 'metrics' }, timeout: '10s' });
  if (res.status === 200 && typeof res.body === 'string') {
    for (const line of res.body.split('\n')) {
      const match = /^([a-z_]+) ([0-9.e+-]+)$/.exec(line);
      if (match && SCRAPED[match[1]]) SCRAPED[match[1]](Number(match[2]));
    }
  }
  sleep(metricsMs / 1000);
}

export const handleSummary = summaryFor('soak', knobs);
