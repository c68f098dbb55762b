// The page: picks a model from app.json, answers on the device (wllama) or in the cloud (OpenAI-compatible), and
// says which side answered and why. window.edgelmApp exposes the state the browser tests read.
import { AppError, WllamaDevice } from './device.js';
import { CloudError, cloudComplete } from './cloud.js';
import { afterDraft, firstRoute, makeGuard, topEntropy } from './router.js';

const $ = (id) => document.getElementById(id);
const MiB = 2 ** 20;
const state = { app: null, guard: null, device: null, entry: null, server: null, busy: false, last: null,
                abort: null };
window.edgelmApp = state;

function showError(msg) {
  $('error').hidden = !msg;
  $('error').textContent = msg || '';
}

function setBusy(busy) {
  state.busy = busy;
  $('run').disabled = busy || !state.device;
  $('stop').disabled = !busy;
  $('model').disabled = busy;
}

function settings() {
  const saved = JSON.parse(localStorage.getItem('edgelm-settings') || '{}');
  for (const [k, id] of [['cloudUrl', 'cloud-url'], ['cloudKey', 'cloud-key'], ['cloudModel', 'cloud-model'],
                         ['threads', 'threads']]) {
    if (saved[k] !== undefined) $(id).value = saved[k];
    $(id).addEventListener('change', () => {
      saved[k] = $(id).value;
      localStorage.setItem('edgelm-settings', JSON.stringify(saved));
      if (k === 'threads') loadModel(state.entry.name);
    });
  }
}

function cloudBase() {
  return $('cloud-url').value.trim() || 'v1';  // relative: this server's /v1 proxy
}

function cloudAvailable() {
  if ($('cloud-url').value.trim()) return true;
  return Boolean(state.server && state.server.cloud);
}

async function loadModel(name) {
  const entry = state.app.models.find((m) => m.name === name);
  state.entry = entry;
  state.device = null;
  setBusy(false);
  showError('');
  $('model-info').textContent = `loading ${entry.name} (${(entry.bytes / MiB).toFixed(1)} MiB)…`;
  $('progress').hidden = false;
  let device;
  try {
    // ONNX artifacts load onnxruntime-web only when picked
    device = entry.runtime === 'ort' ? new (await import('./onnx.js')).OrtDevice(entry) : new WllamaDevice(entry);
    // auto: up to 4 of the cores (2 beat 1 on a 2-core desktop: docs/results.md); without cross-origin isolation
    // wllama runs single-threaded whatever is asked
    const threads = Number($('threads').value) || Math.min(4, navigator.hardwareConcurrency || 1);
    await device.load({ threads, onProgress: (got, total) => {
      $('progress').value = got / total;
    } });
  } catch (e) {
    $('progress').hidden = true;
    $('model-info').textContent = `${entry.name}: not loaded`;
    showError(e instanceof AppError ? e.message : `could not load ${entry.name}: ${e.message}`);
    state.loadError = e.message;
    return;
  }
  $('progress').hidden = true;
  state.device = device;
  state.loadError = null;
  $('model-info').textContent = `${entry.name} · ${(entry.bytes / MiB).toFixed(1)} MiB · ${entry.runtime}, ` +
    `${device.threads} thread(s) · loaded in ${device.loadSeconds.toFixed(1)} s`;
  setBusy(false);
}

/**
 * The answer box, repainted at most every FLUSH_MS while tokens stream in (and kept to its own box by CSS
 * containment). A repaint costs CPU that the model's threads need: on 2 cores a DOM update per token cost about 12%
 * of decode speed in Chromium (benchmarks/app.py: 50-52 against 58 tok/s with no updates; 56 at 100 ms, 61 at 250).
 */
const FLUSH_MS = 250;
const answer = {
  pending: '',
  timer: 0,
  set(text) {
    clearTimeout(this.timer);
    this.timer = 0;
    this.pending = '';
    $('answer').textContent = text;
  },
  add(text) {
    this.pending += text;
    if (!this.timer) this.timer = setTimeout(() => this.flush(), FLUSH_MS);
  },
  flush() {
    clearTimeout(this.timer);
    this.timer = 0;
    if (this.pending) $('answer').textContent += this.pending;
    this.pending = '';
  },
  text() {
    this.flush();
    return $('answer').textContent;
  },
};

function showRoute(side, reason) {
  $('route').hidden = false;
  $('route').dataset.side = side;
  $('route').textContent = `${side} · ${reason}`;
}

/** Device answer, streamed into the page. With `draft`, stop after k tokens if the router sends it to the cloud. */
async function onDevice(prompt, opts, draft = null) {
  const route = state.entry.route;
  const k = (route.params && route.params.k) || 8;
  const n = (route.params && route.params.n) || 5;
  const tops = [];
  let held = '';  // auto mode: the draft's text waits for the router's verdict
  let verdict = draft ? null : { side: 'device' };
  const ctl = new AbortController();
  state.abort = ctl;
  const decide = () => {
    verdict = afterDraft(route, topEntropy(tops));
    verdict.score = topEntropy(tops);
    if (verdict.side === 'cloud') ctl.abort();
    else { answer.add(held); showRoute('device', verdict.reason); }
  };
  const res = await state.device.complete(prompt, {
    maxTokens: opts.maxTokens, topN: n, topFor: draft ? k : 0, chat: opts.chat, signal: ctl.signal,
    onToken: ({ text, top }) => {
      if (verdict) { answer.add(text); return; }
      held += text;
      if (top === null) return;  // the tail of a character split over tokens, or past the draft
      tops.push(top);
      if (tops.length >= k) decide();
    },
  });
  if (!verdict && state.stopped) verdict = { side: 'device', reason: 'stopped' };
  if (!verdict) decide();  // fewer than k tokens: the draft is the whole answer
  return { ...res, verdict, tops };
}

async function run() {
  showError('');
  const prompt = $('prompt').value;
  const maxTokens = Number($('max-tokens').value);
  const invalid = !prompt.trim() ? 'type a prompt first'
    : !(maxTokens >= 1 && maxTokens <= 1024) ? 'max tokens must be between 1 and 1024' : null;
  if (invalid) {
    showError(invalid);
    state.last = { prompt, side: null, ids: [], error: invalid };
    return;
  }
  const opts = { maxTokens, chat: $('chat').checked };
  if (opts.chat && !state.entry.chat) {
    showError(`${state.entry.name} has no chat template; untick Chat`);
    state.last = { prompt, side: null, ids: [], error: 'no chat template' };
    return;
  }
  const mode = document.querySelector('input[name=mode]:checked').value;
  const flags = state.guard.flags(prompt).concat($('private').checked ? ['marked private'] : []);
  let route = firstRoute(mode, flags, cloudAvailable());
  answer.set('');
  $('stats').textContent = '';
  $('route').hidden = true;
  setBusy(true);
  const last = { prompt, mode, side: null, reason: null, score: null, ids: [], text: '', ttft: null, tps: null,
                 cloudError: null };
  state.last = null;
  state.stopped = false;
  try {
    let res = null;
    if (route.side === 'draft') {
      res = await onDevice(prompt, opts, true);
      last.score = res.verdict.score;
      route = res.verdict;
      if (route.side === 'device') last.ids = res.ids;
    } else if (route.side === 'device') {
      showRoute('device', route.reason);
      res = await onDevice(prompt, opts);
      last.ids = res.ids;
    }
    if (route.side === 'cloud') {
      answer.set('');
      showRoute('cloud', route.reason);
      try {
        res = await cloudComplete(cloudBase(), prompt, { ...opts, key: $('cloud-key').value.trim(),
                                                         model: $('cloud-model').value.trim(),
                                                         onText: (d) => answer.add(d) });
      } catch (e) {
        if (!(e instanceof CloudError)) throw e;
        last.cloudError = e.reason;
        route = { side: 'device', reason: `cloud failed (${e.message}): answered on the device` };
        answer.set('');
        showRoute('device', route.reason);
        res = await onDevice(prompt, opts);
        last.ids = res.ids;
      }
    }
    last.side = route.side;
    last.reason = route.reason;
    last.text = answer.text();
    last.ttft = res.ttft;
    if (route.side === 'device' && res.ids.length > 1 && res.decodeSeconds > 0) {
      last.tps = (res.ids.length - 1) / res.decodeSeconds;
    }
    const parts = [];
    if (last.ttft !== null) parts.push(`TTFT ${(1000 * last.ttft).toFixed(0)} ms`);
    if (last.tps) parts.push(`${last.tps.toFixed(1)} tok/s`);
    if (route.side === 'device') parts.push(`${res.ids.length} tokens`);
    $('stats').textContent = parts.join(' · ');
  } catch (e) {
    showError(e instanceof AppError ? e.message : `something failed: ${e.message}`);
    last.error = e.message;
  } finally {
    answer.flush();  // what streamed before an error stays shown
    state.last = last;
    state.abort = null;
    setBusy(false);
  }
}

async function main() {
  settings();
  if ('serviceWorker' in navigator) {
    navigator.serviceWorker.register('sw.js').catch(() => { /* not a secure context: no offline mode */ });
  }
  try {
    state.app = await (await fetch('app.json')).json();
  } catch (e) {
    showError('app.json is missing or broken: build the app with `edgelm app build`');
    return;
  }
  state.guard = makeGuard(state.app.privacy);
  try {
    const r = await fetch('edgelm-serve.json');
    state.server = r.ok ? await r.json() : null;
  } catch { state.server = null; }  // offline, or served by another web server: the cloud URL setting decides
  for (const m of state.app.models) $('model').add(new Option(`${m.name} (${(m.bytes / MiB).toFixed(0)} MiB)`, m.name));
  const query = new URLSearchParams(location.search);  // ?model=NAME&threads=N: a link that picks both
  const asked = query.get('model');
  if (asked && !state.app.models.some((m) => m.name === asked)) showError(`no model ${asked} in this app`);
  $('model').value = asked && state.app.models.some((m) => m.name === asked) ? asked : state.app.default_model;
  if (query.get('threads')) $('threads').value = query.get('threads');
  $('model').addEventListener('change', () => loadModel($('model').value));
  $('run').addEventListener('click', run);
  $('stop').addEventListener('click', () => {
    state.stopped = true;
    if (state.abort) state.abort.abort();
  });
  await loadModel($('model').value);
}

state.ready = main();
