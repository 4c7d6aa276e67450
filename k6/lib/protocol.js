/**
 * The gateway's room protocol (/ws, JSON text frames) as the k6 scripts use it.
 *
 * Server: {"op":"hello",...} first, then {"op":"ack","id":N,...}, {"op":"error","id":N,"code":...},
 * {"op":"pong","id":N} and {"op":"message","room":R,"seq":N,"ts":T,"data":...}. `seq` numbers the
 * publications of a room (1, 2, 3, ...); it starts again at 1 when a room is recreated (it emptied,
 * or the gateway restarted). `ts` is the server's receive time in epoch milliseconds.
 */

/** Close code the gateway sends while it drains for a restart. */
export const SERVICE_RESTART = 1012;

export function send(ws, message) {
  ws.send(JSON.stringify(message));
}

/** Parse a server frame; null for anything that is not a JSON object. */
export function decode(data) {
  try {
    const value = JSON.parse(data);
    return value !== null && typeof value === 'object' ? value : null;
  } catch (e) {
    return null;
  }
}

/** The `retry_after_ms=N` a gateway puts in a 1012 close reason, or null. */
export function retryAfterMs(reason) {
  const match = /retry_after_ms=(\d+)/.exec(reason || '');
  return match ? Number(match[1]) : null;
}

/**
 * Counts publications a subscriber missed, from `seq` gaps, per room.
 *
 * The first message of a room sets the baseline: what was published before the join is not
 * missed. A seq at or below the last one seen means the room was recreated (a restart), so it
 * sets a new baseline. Call reset() on a new connection: a reconnecting client receives no
 * history, so publications while it was away are not gaps of this connection.
 */
export class SeqTracker {
  constructor() {
    this.last = new Map();
  }

  /** Record `seq` for `room`; return how many publications were skipped before it. */
  observe(room, seq) {
    const last = this.last.get(room);
    this.last.set(room, seq);
    if (last === undefined || seq <= last) return 0;
    return seq - last - 1;
  }

  reset() {
    this.last.clear();
  }
}
