// The device side: the model's bytes (downloaded once, kept in Cache Storage, sha256-checked before every use) and
// wllama (llama.cpp in WebAssembly) running them.
import { sha256 } from './sha256.js';

export const MODEL_CACHE = 'edgelm-models-v1';
const MiB = 2 ** 20;
// llama.cpp's sampler as plain argmax: one candidate, no penalties
const GREEDY = { temp: 0, top_k: 1, penalty_repeat: 1, penalty_freq: 0, penalty_present: 0 };

export class AppError extends Error {}  // a message meant for the user, shown as it is

/** One file of a model entry (app.json's files[]): from the cache, else downloaded and cached; sha256-checked. */
async function modelFile(entry, f, cache, onBytes) {
  let blob = null;
  const hit = cache && (await cache.match(f.path));
  if (hit) blob = await hit.blob();
  if (!blob) {
    let resp;
    try {
      resp = await fetch(f.path);
    } catch (e) {
      throw new AppError(`could not download ${f.path} (${e.message}); check the connection to the app's server`);
    }
    if (!resp.ok) throw new AppError(`${f.path}: the server answered HTTP ${resp.status}; rebuild the app`);
    const reader = resp.body.getReader();
    const parts = [];
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      parts.push(value);
      onBytes(value.length);
    }
    blob = new Blob(parts);
  }
  const digest = await sha256(blob);
  if (digest !== f.sha256) {
    if (cache) await cache.delete(f.path);
    throw new AppError(`${entry.name}: ${f.name}'s sha256 does not match app.json (got ${digest.slice(0, 12)}…, ` +
      `want ${f.sha256.slice(0, 12)}…); it is corrupt or was changed, so it is not used`);
  }
  if (cache && !hit) {
    try {
      await cache.put(f.path, new Response(blob, { headers: { 'Content-Type': 'application/octet-stream' } }));
    } catch (e) {
      throw new AppError(`${entry.name} (${(entry.bytes / MiB).toFixed(1)} MiB) does not fit the browser's storage ` +
        `(${e.name}); free some storage or pick a smaller model`);
    }
  }
  return blob;
}

/** Every file of a model entry of app.json, by name: from the cache, else downloaded (with progress) and cached. */
export async function modelFiles(entry, onProgress = () => {}) {
  const cache = globalThis.caches ? await caches.open(MODEL_CACHE) : null;  // none outside a secure context
  const cached = cache ? await Promise.all(entry.files.map((f) => cache.match(f.path))) : entry.files.map(() => null);
  const missing = entry.files.filter((f, i) => !cached[i]).reduce((n, f) => n + f.bytes, 0);
  if (missing && navigator.storage && navigator.storage.estimate) {
    const { quota, usage } = await navigator.storage.estimate();
    if (quota !== undefined && quota - (usage || 0) < missing) {
      throw new AppError(`${entry.name} needs ${(missing / MiB).toFixed(1)} MiB but this browser lets the app ` +
        `store only ${((quota - (usage || 0)) / MiB).toFixed(1)} MiB more; free some storage or pick a smaller model`);
    }
  }
  let got = 0;
  const out = {};
  for (const f of entry.files) {
    out[f.name] = await modelFile(entry, f, cache, (n) => { got += n; onProgress(got, missing); });
  }
  return out;
}

/**
 * wllama (llama.cpp in WebAssembly) over one GGUF model, through its low-level API: tokenize, decode, the top-n
 * probabilities of the next token, detokenize. Greedy decoding happens here, one token at a time, so the page gets
 * token ids and log-probs and decodes partial UTF-8 itself. (wllama 3.x's OpenAI-style results fail on a token that
 * is an incomplete UTF-8 sequence, which emoji produce; see android_demo/README.md.)
 */
export class WllamaDevice {
  constructor(entry) {
    this.entry = entry;
    this.wllama = null;
    this.loadSeconds = 0;
  }

  /** `files`: the model's blobs when already fetched (the bench page times the runtime's load alone). */
  async load({ threads = 1, context = 2048, onProgress, files = null } = {}) {
    const t0 = performance.now();
    const blob = (files || await modelFiles(this.entry, onProgress))[this.entry.file];
    const wasm = (kind) => new URL(`./vendor/wllama/${kind}/wllama.wasm`, import.meta.url).href;
    // loaded on first use: an app built from ONNX artifacts only ships no wllama
    const { Wllama } = await import('./vendor/wllama/index.js');
    this.wllama = new Wllama({ 'single-thread/wllama.wasm': wasm('single-thread'),
                               'multi-thread/wllama.wasm': wasm('multi-thread') }, { suppressNativeLog: true });
    try {
      // flash attention off, as in llama-cpp-python: the page's log-probs then match the Python router's.
      // An f32 KV cache: WebAssembly has no f16 conversion instruction, and f32 decodes faster here
      // (benchmarks/app.py, about 5-10%).
      await this.wllama.loadModel([blob], { n_threads: threads, n_ctx: context, flash_attn: false,
                                            cache_type_k: 'f32', cache_type_v: 'f32' });
    } catch (e) {
      throw new AppError(`wllama could not load ${this.entry.name} (${e.message})`);
    }
    this.context = this.wllama.getLoadedContextInfo().n_ctx;
    this.threads = this.wllama.getNumThreads();
    this.loadSeconds = (performance.now() - t0) / 1000;
  }

  async encode(text) {
    return Array.from(await this.wllama.tokenize(text, false));
  }

  /**
   * One timed greedy run for the bench page: prefill `ids`, then `nGen` tokens (end-of-generation ignored, so every
   * run makes them all). Seconds: prefill (ids in -> logits out), ttft (-> first token), decode (first -> last).
   */
  async benchRun(ids, nGen) {
    const w = this.wllama;
    await w.kvClear();
    await w.samplingInit(GREEDY);
    const t0 = performance.now();
    await w.decode(ids, {});
    const t1 = performance.now();
    let { token } = await w.samplingSample();
    const t2 = performance.now();
    for (let i = 1; i < nGen; i++) {
      await w.decode([token], {});
      ({ token } = await w.samplingSample());
    }
    const t3 = performance.now();
    return { prefillS: (t1 - t0) / 1000, ttftS: (t2 - t0) / 1000, decodeS: (t3 - t2) / 1000 };
  }

  async unload() {
    if (this.wllama) await this.wllama.exit();
    this.wllama = null;
  }

  /**
   * Greedy completion of `prompt` (a user message with `chat`), streamed: onToken({id, text, top}) per token. For
   * the first `topFor` tokens, top = their top-`topN` log-probs, largest first (what the router reads); later tokens
   * come from llama.cpp's greedy sampler, which skips the softmax over the vocabulary (top = null).
   * Returns {ids, text, finish, ttft, seconds, decodeSeconds}. `signal` stops it (the router's verdict after the
   * draft, or the Stop button).
   */
  async complete(prompt, { maxTokens, topN = 5, topFor = 0, onToken, signal, chat = false }) {
    const w = this.wllama;
    const t0 = performance.now();
    const text0 = chat ? this.entry.chat.prefix + prompt + this.entry.chat.suffix : prompt;  // Python's template
    const prompt_ids = await w.tokenize(text0, true);
    if (prompt_ids.length + maxTokens > this.context) {
      throw new AppError(`the prompt has ${prompt_ids.length} tokens and the answer may take ${maxTokens} more, but ` +
        `the model's context holds ${this.context}; shorten the prompt or lower max tokens`);
    }
    const ids = [];
    const utf8 = new TextDecoder('utf-8');  // streaming: a character split over byte tokens comes out whole
    let text = '';
    let finish = 'length';
    let tFirst = null;
    try {
      await w.kvClear();
      await w.samplingInit(GREEDY);
      await w.decode(prompt_ids, {});
      while (ids.length < maxTokens) {
        if (signal && signal.aborted) { finish = 'stopped'; break; }
        let id;
        let bytes;
        let top = null;
        if (ids.length < topFor) {
          const probs = await w.getLogits(topN);  // [{token, p}], most probable first
          id = probs[0].token;
          top = probs.map((t) => Math.log(t.p));
          bytes = w.isTokenEOG(id) ? null : await w.detokenize([id]);
        } else {
          ({ token: id, piece: bytes } = await w.samplingSample());
        }
        if (tFirst === null) tFirst = performance.now();
        if (w.isTokenEOG(id)) { finish = 'stop'; break; }
        ids.push(id);
        const piece = utf8.decode(bytes, { stream: true });
        text += piece;
        onToken({ id, text: piece, top });
        if (ids.length < maxTokens) await w.decode([id], {});
      }
    } catch (e) {
      throw new AppError(`the device model failed (${e.message || e})`);
    }
    const tail = utf8.decode();
    if (tail) { text += tail; onToken({ id: null, text: tail, top: null }); }
    const end = performance.now();
    return { ids, text, finish, ttft: tFirst === null ? null : (tFirst - t0) / 1000, seconds: (end - t0) / 1000,
             decodeSeconds: tFirst === null ? 0 : (end - tFirst) / 1000 };
  }
}
