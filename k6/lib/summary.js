/**
 * The end-of-test summary every script shares: results/<scenario>.json and results/<scenario>.md.
 *
 *     import { summaryTrendStats, summaryFor } from './lib/summary.js';
 *     export const options = { summaryTrendStats, ... };
 *     export const handleSummary = summaryFor('rooms', knobs);
 *
 * The JSON is k6's own summary data (metrics with their values and threshold results, options,
 * state) plus `scenario`, `target`, `knobs` and `ok` (every threshold held). The markdown has one
 * table per kind of metric: p50 / p95 / p99 / max of every latency (Trend) figure, counters with
 * their rate, rates, gauges, then each threshold and whether it held. The same markdown goes to
 * stdout, since k6 prints no summary of its own once handleSummary is defined.
 *
 * RESULTS_DIR (default `results`) must exist: k6 does not create directories for these files.
 * SUMMARY_NAME replaces <scenario> in the file names, for a second run of a script with other
 * knobs that should not overwrite the first (k6/smoke.py's storm-503).
 */
import { target } from './config.js';

export const summaryTrendStats = ['avg', 'min', 'p(50)', 'p(95)', 'p(99)', 'max', 'count'];

function fmt(value) {
  if (value === undefined || value === null || Number.isNaN(value)) return '-';
  if (!Number.isFinite(value)) return String(value);
  const abs = Math.abs(value);
  if (abs === 0 || Number.isInteger(value)) return String(value);
  if (abs < 10) return value.toFixed(2);
  if (abs < 100) return value.toFixed(1);
  return value.toFixed(0);
}

function row(cells) {
  return `| ${cells.join(' | ')} |`;
}

function table(header, align, rows) {
  if (rows.length === 0) return [];
  return [row(header), row(align), ...rows.map(row), ''];
}

/** The scenario's own metrics first (they carry its prefix), then k6's built-in ones. */
function ordered(metrics, scenario) {
  const own = (name) => (name.startsWith(`${scenario}_`) || name.startsWith('server_') ? 0 : 1);
  return Object.keys(metrics).sort((a, b) => own(a) - own(b) || (a < b ? -1 : a > b ? 1 : 0));
}

function thresholdsHeld(metrics) {
  const crossed = [];
  for (const [name, metric] of Object.entries(metrics)) {
    for (const [expr, result] of Object.entries(metric.thresholds || {})) {
      if (!result.ok) crossed.push(`${name}: ${expr}`);
    }
  }
  return crossed;
}

export function markdown(scenario, data, knobs) {
  const metrics = data.metrics;
  const names = ordered(metrics, scenario);
  const crossed = thresholdsHeld(metrics);
  const seconds = (data.state && data.state.testRunDurationMs) / 1000;
  const lines = [`# k6 ${scenario}: ${target()}`, ''];
  lines.push(crossed.length === 0
    ? 'Result: **passed**, every threshold held.'
    : `Result: **FAILED**, ${crossed.length} threshold(s) crossed: ${crossed.map((c) => `\`${c}\``).join(', ')}.`);
  lines.push('');
  const knobText = Object.entries(knobs).map(([k, v]) => `\`${k}=${v}\``).join(' ');
  lines.push(`Ran ${fmt(seconds)} s. Knobs: ${knobText || '(defaults)'}`, '');

  const trends = [];
  const counters = [];
  const rates = [];
  const gauges = [];
  for (const name of names) {
    const { type, contains, values } = metrics[name];
    let label = name;
    if (contains === 'data') label = `${name} (bytes)`;
    else if (type === 'trend' && contains !== 'time') label = `${name} (not ms)`;
    if (type === 'trend') {
      trends.push([label, ...['p(50)', 'p(95)', 'p(99)', 'max', 'avg'].map((k) => fmt(values[k])), fmt(values.count)]);
    } else if (type === 'counter') {
      counters.push([label, fmt(values.count), fmt(values.rate)]);
    } else if (type === 'rate') {
      rates.push([label, fmt(values.rate), fmt(values.passes), fmt(values.fails)]);
    } else if (type === 'gauge') {
      gauges.push([label, fmt(values.value), fmt(values.min), fmt(values.max)]);
    }
  }
  if (trends.length) lines.push('## Latency (ms)', '');
  lines.push(...table(['metric', 'p50', 'p95', 'p99', 'max', 'avg', 'count'],
    ['---', '--:', '--:', '--:', '--:', '--:', '--:'], trends));
  if (counters.length) lines.push('## Counters', '');
  lines.push(...table(['metric', 'count', 'per s'], ['---', '--:', '--:'], counters));
  if (rates.length) lines.push('## Rates', '');
  lines.push(...table(['metric', 'rate', 'true', 'false'], ['---', '--:', '--:', '--:'], rates));
  if (gauges.length) lines.push('## Gauges', '');
  lines.push(...table(['metric', 'last', 'min', 'max'], ['---', '--:', '--:', '--:'], gauges));

  const checks = [];
  for (const name of names) {
    for (const [expr, result] of Object.entries(metrics[name].thresholds || {})) {
      checks.push([name, `\`${expr}\``, result.ok ? 'held' : '**crossed**']);
    }
  }
  if (checks.length) lines.push('## Thresholds', '');
  lines.push(...table(['metric', 'threshold', 'result'], ['---', '---', '---'], checks));
  return lines.join('\n');
}

/** handleSummary for `scenario`; `knobs` are the settings worth recording next to the figures. */
export function summaryFor(scenario, knobs = {}) {
  return function handleSummary(data) {
    const dir = (__ENV.RESULTS_DIR || 'results').replace(/\/+$/, '');
    const name = __ENV.SUMMARY_NAME || scenario;
    const report = markdown(scenario, data, knobs);
    const crossed = thresholdsHeld(data.metrics);
    const json = Object.assign({ scenario, target: target(), knobs, ok: crossed.length === 0, crossed }, data);
    return {
      [`${dir}/${name}.json`]: JSON.stringify(json, null, 2),
      [`${dir}/${name}.md`]: report,
      stdout: `\n${report}\n`,
    };
  };
}
