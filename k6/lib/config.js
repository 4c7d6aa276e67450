/**
 * Knobs from the environment (`k6 run -e NAME=value`, or exported variables) and the target.
 *
 * Every value is checked once at init time: a typo fails the run at once with the knob's name
 * instead of measuring something else.
 */

function raw(name) {
  const value = __ENV[name];
  return value === undefined || value === '' ? undefined : String(value).trim();
}

export function str(name, fallback) {
  const value = raw(name);
  return value === undefined ? fallback : value;
}

export function int(name, fallback, min = 0) {
  const value = raw(name);
  if (value === undefined) return fallback;
  if (!/^-?\d+$/.test(value) || Number(value) < min) {
    throw new Error(`${name} must be an integer >= ${min}, got ${JSON.stringify(value)}`);
  }
  return Number(value);
}

export function num(name, fallback, min = 0) {
  const value = raw(name);
  if (value === undefined) return fallback;
  const parsed = Number(value);
  if (!Number.isFinite(parsed) || parsed < min) {
    throw new Error(`${name} must be a number >= ${min}, got ${JSON.stringify(value)}`);
  }
  return parsed;
}

export function bool(name, fallback) {
  const value = raw(name);
  if (value === undefined) return fallback;
  if (/^(1|true|yes|on)$/i.test(value)) return true;
  if (/^(0|false|no|off)$/i.test(value)) return false;
  throw new Error(`${name} must be true or false, got ${JSON.stringify(value)}`);
}

const UNITS = { ms: 1, s: 1000, m: 60000, h: 3600000 };

/** A k6 duration (`500ms`, `30s`, `2m`, `1h30m`; a bare number is seconds) in milliseconds. */
export function parseDuration(text) {
  if (/^\d+(\.\d+)?$/.test(text)) return Number(text) * 1000;
  const parts = /^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?!s))?(?:(\d+(?:\.\d+)?)s)?(?:(\d+)ms)?$/.exec(text);
  if (!parts || text === '') return NaN;
  const [, h, m, s, ms] = parts;
  return (Number(h || 0) * UNITS.h + Number(m || 0) * UNITS.m + Number(s || 0) * UNITS.s
    + Number(ms || 0) * UNITS.ms);
}

/** `{text, ms}` for a duration knob, e.g. `duration('DURATION', '30s')`. */
export function duration(name, fallback) {
  const text = str(name, fallback);
  const ms = parseDuration(text);
  if (!(ms > 0)) throw new Error(`${name} must be a duration such as 30s, 5m or 2h, got ${JSON.stringify(text)}`);
  return { text, ms };
}

/**
 * The gateway's base URL from TARGET (default ws://127.0.0.1:8083, `make run`'s address).
 * http(s):// is accepted and turned into ws(s)://; a trailing /ws or /ws/echo is dropped so
 * that either the base or a full endpoint URL may be given.
 */
export function target() {
  let base = str('TARGET', 'ws://127.0.0.1:8083').replace(/\/+$/, '');
  base = base.replace(/^http(s?):\/\//, 'ws$1://').replace(/\/ws(\/echo)?$/, '');
  if (!/^wss?:\/\/[^/]+$/.test(base)) {
    throw new Error(`TARGET must look like ws://host:port, got ${JSON.stringify(str('TARGET'))}`);
  }
  return base;
}

export function wsUrl(path) {
  return target() + path;
}

/** The same server over HTTP, for /metrics and /healthz. */
export function httpUrl(path) {
  return target().replace(/^ws/, 'http') + path;
}

/** Uniform random integer in [min, max]. */
export function randomInt(min, max) {
  return min + Math.floor(Math.random() * (max - min + 1));
}

/** A string of `size` ASCII characters, to pad payloads to a chosen size. */
export function padding(size) {
  return size > 0 ? 'x'.repeat(size) : '';
}
