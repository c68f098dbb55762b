// The bench page of `edgelm bench --device browser`: asks the CLI for its plan, runs every row (model x threads)
// on the page's runtimes (wllama for GGUF, onnxruntime-web for ONNX) with the same timing as `edgelm bench`
// (prefill, time to first token, decode over gen_len tokens, after one warm-up), and posts each row back.
import { AppError, WllamaDevice, modelFiles } from './device.js';

const $ = (id) => document.getElementById(id);
const key = new URLSearchParams(location.hash.slice(1)).get('key') || '';  // in the fragment: never sent in a URL
const state = { done: false, error: null, rows: [] };
window.edgelmBench = state;

async function api(path, body) {
  const headers = { 'content-type': 'application/json', ...(key ? { authorization: `Bearer ${key}` } : {}) };
  const r = await fetch(`edgelm-bench/${path}`, body === undefined ? { headers }
    : { method: 'POST', headers, body: JSON.stringify(body) });
  if (!r.ok) throw new AppError(`edgelm bench answered HTTP ${r.status}: ${(await r.text()).slice(0, 200)}`);
  return r.json();
}

async function facts() {
  const f = { user_agent: navigator.userAgent, cores: navigator.hardwareConcurrency || null,
              device_memory_gib: navigator.deviceMemory || null, cross_origin_isolated: self.crossOriginIsolated,
              screen: `${screen.width}x${screen.height}@${devicePixelRatio}` };
  if (navigator.userAgentData && navigator.userAgentData.getHighEntropyValues) {
    const ua = await navigator.userAgentData.getHighEntropyValues(['platform', 'platformVersion', 'model',
                                                                    'architecture']);
    Object.assign(f, { platform: ua.platform, platform_version: ua.platformVersion, model: ua.model,
                       architecture: ua.architecture });
  }
  return f;
}

/** The page's memory after the runs: measureUserAgentSpecificMemory (JS and WebAssembly, cross-origin isolated
 * pages only), or null and the reason. Chromium may take a while to answer; 20 s at most. */
async function pageMemory(dev) {
  if (dev.wllama) {  // measured in Chromium 156: 2.7 MB for a page whose wllama holds a 5 MB model
    return [null, 'page memory: wllama\'s WebAssembly memory (shared, in its worker) is not counted by ' +
                  'measureUserAgentSpecificMemory'];
  }
  if (!performance.measureUserAgentSpecificMemory) return [null, 'this browser has no measureUserAgentSpecificMemory'];
  if (!self.crossOriginIsolated) return [null, 'page memory needs cross-origin isolation'];
  const timeout = new Promise((resolve) => setTimeout(() => resolve(null), 20000));
  const m = await Promise.race([performance.measureUserAgentSpecificMemory(), timeout]);
  if (!m) return [null, 'measureUserAgentSpecificMemory did not answer in 20 s'];
  return [m.bytes, null];
}

async function device(entry) {
  return entry.runtime === 'ort' ? new (await import('./onnx.js')).OrtDevice(entry) : new WllamaDevice(entry);
}

function show(row) {
  const f = (v, d = 1) => (v === null || v === undefined ? '' : Number(v).toFixed(d));
  const tr = document.createElement('tr');
  for (const v of [row.model, row.threads, f(row.load_s, 2), f(row.pp_tps_mean), f(row.tg_tps_mean),
                   f(row.ttft_ms_mean, 0)]) {
    const td = document.createElement('td');
    td.textContent = v;
    tr.append(td);
  }
  if (row.error) tr.title = row.error;
  $('rows').tBodies[0].append(tr);
}

async function runRow(plan, entry, files, threads) {
  const dev = await device(entry);
  const row = { model: entry.name, threads, notes: [] };
  try {
    await dev.load({ threads, files });
    row.load_s = dev.loadSeconds;  // the runtime's load of bytes already in the page (not the download)
    row.threads = dev.threads;
    if (dev.threads !== threads) row.notes.push(`asked for ${threads} threads, the runtime runs ${dev.threads}`);
    const ids = (await dev.encode(plan.prompt)).slice(0, plan.prompt_len);
    if (ids.length < plan.prompt_len) throw new AppError(`the prompt has only ${ids.length} tokens`);
    await dev.benchRun(ids, Math.min(plan.gen_len, 8));  // warm-up
    const runs = [];
    for (let i = 0; i < plan.repeat; i++) runs.push(await dev.benchRun(ids, plan.gen_len));
    const sustained = [];
    for (let i = 0; i < plan.sustained; i++) {
      $('status').textContent = `${entry.name}, ${threads} thread(s): sustained decode ${i + 1}/${plan.sustained}`;
      sustained.push((await dev.benchRun(ids, plan.gen_len)).decodeS);
    }
    // seconds only: edgelm computes the figures (edgelm.metrics), as for every other device
    row.timings = { n_prompt: ids.length, prefill_s: runs.map((r) => r.prefillS), ttft_s: runs.map((r) => r.ttftS),
                    decode_s: runs.map((r) => r.decodeS), sustained_decode_s: sustained };
    const [bytes, why] = await pageMemory(dev);
    row.page_memory_bytes = bytes;
    row.notes.push(why || 'page_memory_bytes: the whole page (JS and WebAssembly) after the runs, not a peak');
    row.notes.push('peak_rss_bytes: a page cannot read its process\'s RSS');
  } catch (e) {
    row.error = e instanceof AppError ? e.message : `${e.name}: ${e.message}`;
  } finally {
    try { await dev.unload(); } catch (e) { /* the next row loads afresh either way */ }
  }
  row.notes = row.notes.join('; ');
  return row;
}

async function main() {
  let plan;
  try {
    plan = await api('plan');
  } catch (e) {
    throw new AppError(`could not reach edgelm bench (${e.message}); open the URL it printed`);
  }
  const me = { id: plan.browser, ...(await facts()) };
  await api('hello', { browser: plan.browser, facts: me });
  const app = await (await fetch('app.json')).json();
  let n = 0;
  for (const name of plan.models) {
    const entry = app.models.find((m) => m.name === name);
    $('status').textContent = `downloading ${name}…`;
    const files = await modelFiles(entry);
    for (const threads of plan.threads.length ? plan.threads : [Math.min(4, navigator.hardwareConcurrency || 1)]) {
      n += 1;
      $('status').textContent = `row ${n}: ${name}, ${threads} thread(s)…`;
      const row = await runRow(plan, entry, files, threads);
      row.test_time = new Date().toISOString().replace(/\.\d+Z$/, 'Z');
      const figures = await api('row', { browser: plan.browser, row });  // the row as edgelm computed it
      state.rows.push(figures);
      show(figures);
    }
  }
  await api('done', { browser: plan.browser });
  $('status').textContent = `done: ${n} row(s) sent to edgelm bench; this tab can be closed`;
}

main().catch((e) => {
  state.error = e.message;
  $('error').hidden = false;
  $('error').textContent = e.message;
  $('status').textContent = 'stopped';
  api('done', { error: e.message }).catch(() => {});
}).finally(() => { state.done = true; });
