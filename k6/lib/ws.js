/**
 * The one file that names k6's WebSocket modules: every script imports them from here.
 *
 * k6 1.1 ships the WHATWG-style client as `k6/experimental/websockets`; k6 1.6 renames it
 * `k6/websockets`. Moving to a newer k6 changes the import below and nothing else.
 *
 * Two gaps of k6 1.1, checked by running it against a websockets server, and bridged here:
 *
 * 1. The `close` event has only `type`, `target` and `timestamp`: no `code`, `reason` or
 *    `wasClean`. When the server closes with any code other than 1000, k6 first dispatches an
 *    `error` event whose `error` is the string `websocket: close 1012: service restart;
 *    retry_after_ms=1234` (`websocket: close 1012` when the reason is empty). A 1000 close
 *    dispatches no error. A socket that never opened gets `error` set to the dial error or
 *    `websocket: bad handshake`. `onClose()` turns this back into (code, reason), preferring
 *    a real CloseEvent's fields when a later k6 provides them.
 * 2. A refused handshake is only `websocket: bad handshake`: the HTTP status (503 while the
 *    gateway drains or is full) is not exposed. The legacy `k6/ws` module's blocking
 *    `connect()` returns the handshake response with its `status` and headers, so storm.js,
 *    which must count 503s, uses `connect` below.
 */
import { WebSocket } from 'k6/experimental/websockets'; // k6 >= 1.6: 'k6/websockets'
import legacy from 'k6/ws';

export { WebSocket };

/** Legacy blocking client: `connect(url, params, (socket) => {...})` returns `{status, headers}`. */
export const connect = legacy.connect;

/** RFC 6455 §7.4.1: "no status code was actually present" / "closed abnormally". */
export const NO_STATUS = 1005;
export const ABNORMAL = 1006;

const CLOSE_ERROR = /websocket: close (\d+)(?:: ([\s\S]*))?$/;

/**
 * Register `callback(code, reason, error)` for the moment `ws` closes, once.
 *
 * `code` is the server's close code, 1000 for a close that k6 1.1 reports without an error
 * (the client's own close() included), or 1006 when the socket failed (never opened, or was
 * cut without a closing handshake); `error` is then k6's error text.
 */
export function onClose(ws, callback) {
  let failure = null;
  ws.addEventListener('error', (event) => {
    const text = String(event.error === undefined ? '' : event.error);
    const match = CLOSE_ERROR.exec(text);
    failure = match
      ? { code: Number(match[1]), reason: match[2] || '', error: '' }
      : { code: ABNORMAL, reason: '', error: text };
  });
  ws.addEventListener('close', (event) => {
    if (typeof event.code === 'number') {
      callback(event.code, event.reason || '', failure ? failure.error : '');
    } else if (failure) {
      callback(failure.code, failure.reason, failure.error);
    } else {
      callback(1000, '', '');
    }
  });
}
