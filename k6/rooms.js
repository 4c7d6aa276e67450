/**
 * rooms.js: publish -> receive latency and delivery completeness in rooms.
 *
 * ROOMS rooms of ROOM_SIZE members each (ROOMS x ROOM_SIZE VUs, one connection each). In every
 * room the first PUBLISHERS members publish RATE messages per second each; every member
 * (publishers too: the gateway delivers to the sender as well) records each message it receives:
 *
 * - rooms_delivery_latency: receive time - the publisher's send time carried in the message's
 *   data (`data.t`, epoch ms). Sender and receiver share a clock when k6 runs on one machine.
 * - rooms_server_latency: receive time - the server's `ts` (its receive time), i.e. fan-out and
 *   delivery without the client's send path; needs synchronized clocks across machines.
 * - rooms_ack_latency: publish -> its ack, on the publisher.
 * - completeness from `seq`: rooms_seq_gaps counts publications a member never received (gaps in
 *   the room's seq), rooms_delivery is a Rate: true per message received, false per one missed.
 *
 * Send times come from Date.now() (whole milliseconds, k6 1.1 has no finer clock) and receive
 * times from k6's event timestamps (sub-millisecond), so latencies read up to 1 ms high.
 * Publishers start SETTLE_MS after joining, so that the room is full; they stop TAIL_MS
 * before the members leave, so that what was sent can arrive.
 *
 *   k6 run -e TARGET=ws://127.0.0.1:8083 -e ROOMS=10 -e ROOM_SIZE=50 -e RATE=5 k6/rooms.js
 *
 * Knobs: TARGET, ROOMS (4), ROOM_SIZE (10), PUBLISHERS (1 per room), RATE (10 per publisher per
 * second), SIZE (64 bytes of padding in each message), DURATION (30s), POLICY (slow-consumer
 * policy asked for on join; default: the server's), ROOM_PREFIX (k6-rooms), SETTLE_MS (1000),
 * TAIL_MS (1000), LATENCY_P95_MS (50), LATENCY_P99_MS (100), MIN_DELIVERY (0.999),
 * MAX_ERRORS (0: server errors and unexpected closes allowed).
 */
import exec from 'k6/execution';
import { Counter, Rate, Trend } from 'k6/metrics';
import * as config from './lib/config.js';
import { SeqTracker, decode, send } from './lib/protocol.js';
import { summaryFor, summaryTrendStats } from './lib/summary.js';
import { WebSocket, onClose } from './lib/ws.js';

const session = config.duration('DURATION', '30s');
const knobs = {
  ROOMS: config.int('ROOMS', 4, 1),
  ROOM_SIZE: config.int('ROOM_SIZE', 10, 1),
  PUBLISHERS: config.int('PUBLISHERS', 1, 1),
  RATE: config.num('RATE', 10),
  SIZE: config.int('SIZE', 64),
  DURATION: session.text,
  POLICY: config.str('POLICY', ''),
  ROOM_PREFIX: config.str('ROOM_PREFIX', 'k6-rooms'),
  SETTLE_MS: config.int('SETTLE_MS', 1000),
  TAIL_MS: config.int('TAIL_MS', 1000),
  LATENCY_P95_MS: config.num('LATENCY_P95_MS', 50),
  LATENCY_P99_MS: config.num('LATENCY_P99_MS', 100),
  MIN_DELIVERY: config.num('MIN_DELIVERY', 0.999),
  MAX_ERRORS: config.int('MAX_ERRORS', 0),
};
if (knobs.PUBLISHERS > knobs.ROOM_SIZE) throw new Error('PUBLISHERS must be <= ROOM_SIZE');

const deliveryLatency = new Trend('rooms_delivery_latency', true);
const serverLatency = new Trend('rooms_server_latency', true);
const ackLatency = new Trend('rooms_ack_latency', true);
const received = new Counter('rooms_messages_received');
const published = new Counter('rooms_messages_published');
const gaps = new Counter('rooms_seq_gaps');
const delivery = new Rate('rooms_delivery');
const serverErrors = new Counter('rooms_server_errors');
const unexpectedCloses = new Counter('rooms_unexpected_closes');
const joined = new Counter('rooms_members_joined');

export const options = {
  summaryTrendStats,
  scenarios: {
    rooms: {
      executor: 'per-vu-iterations',
      vus: knobs.ROOMS * knobs.ROOM_SIZE,
      iterations: 1,
      maxDuration: `${Math.ceil(session.ms / 1000) + 30}s`,
    },
  },
  thresholds: {
    rooms_delivery_latency: [`p(95)<${knobs.LATENCY_P95_MS}`, `p(99)<${knobs.LATENCY_P99_MS}`],
    rooms_messages_received: ['count>0'],
    rooms_delivery: [`rate>=${knobs.MIN_DELIVERY}`],
    rooms_server_errors: [`count<=${knobs.MAX_ERRORS}`],
    rooms_unexpected_closes: [`count<=${knobs.MAX_ERRORS}`],
  },
};

const PAD = config.padding(knobs.SIZE);

export default function () {
  const index = exec.vu.idInTest - 1;
  const room = `${knobs.ROOM_PREFIX}-${index % knobs.ROOMS}`;
  const publisher = Math.floor(index / knobs.ROOMS) < knobs.PUBLISHERS;
  const seqs = new SeqTracker();
  const pending = new Map(); // publish id -> send time
  const ws = new WebSocket(config.wsUrl('/ws'));
  let nextId = 1;
  let ending = false;
  let publishTimer = null;
  const timers = [];

  const publish = () => {
    const id = nextId++;
    const t = Date.now();
    pending.set(id, t);
    send(ws, { op: 'publish', room, id, data: { t, vu: index, pad: PAD } });
  };
  const stopPublishing = () => {
    clearInterval(publishTimer);
    publishTimer = null;
  };

  ws.addEventListener('message', (event) => {
    const msg = decode(event.data);
    if (msg === null) return;
    if (msg.op === 'message') {
      received.add(1);
      delivery.add(true);
      const missed = seqs.observe(msg.room, msg.seq);
      if (missed > 0) {
        gaps.add(missed);
        for (let i = 0; i < missed; i += 1) delivery.add(false);
      }
      if (msg.data && typeof msg.data.t === 'number') deliveryLatency.add(event.timestamp - msg.data.t);
      if (typeof msg.ts === 'number') serverLatency.add(event.timestamp - msg.ts);
    } else if (msg.op === 'hello') {
      const join = { op: 'join', room, id: 0 };
      if (knobs.POLICY) join.policy = knobs.POLICY;
      send(ws, join);
    } else if (msg.op === 'ack' && msg.id === 0) {
      joined.add(1);
      if (publisher && knobs.RATE > 0) {
        timers.push(setTimeout(() => {
          if (!ending) publishTimer = setInterval(publish, 1000 / knobs.RATE);
        }, knobs.SETTLE_MS));
      }
    } else if (msg.op === 'ack') {
      const sentAt = pending.get(msg.id);
      if (sentAt !== undefined) {
        pending.delete(msg.id);
        published.add(1);
        ackLatency.add(event.timestamp - sentAt);
      }
    } else if (msg.op === 'error') {
      serverErrors.add(1, { code: String(msg.code) });
      pending.delete(msg.id);
    }
  });
  onClose(ws, (code, reason, error) => {
    stopPublishing();
    timers.forEach(clearTimeout);
    if (!ending) {
      unexpectedCloses.add(1, { code: String(code) });
      console.warn(`rooms: connection closed early: ${code} ${reason || error}`);
    }
  });

  timers.push(setTimeout(stopPublishing, Math.max(0, session.ms - knobs.TAIL_MS)));
  timers.push(setTimeout(() => {
    ending = true;
    stopPublishing();
    ws.close();
  }, session.ms));
}

export const handleSummary = summaryFor('rooms', knobs);
