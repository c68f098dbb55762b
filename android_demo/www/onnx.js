// ONNX artifacts in the page: onnxruntime-web (WebAssembly) runs the onnxruntime-genai graph one token at a time with
// its KV cache, and the artifact's tokenizer.json runs in the page (@huggingface/tokenizers), so the ids equal the
// Python tokenizer's. Same interface as WllamaDevice (device.js).
import * as ort from './vendor/ort/ort.wasm.min.mjs';
import { Tokenizer } from './vendor/tokenizers/tokenizers.min.mjs';
import { AppError, modelFiles } from './device.js';

/** The n largest of logits[off, off + V) as log-probs (log-softmax in float64), largest first, with the argmax. */
export function topLogprobs(logits, off, V, n) {
  let max = -Infinity;
  let arg = 0;
  for (let i = 0; i < V; i++) if (logits[off + i] > max) { max = logits[off + i]; arg = i; }
  let sum = 0;
  for (let i = 0; i < V; i++) sum += Math.exp(logits[off + i] - max);
  const lse = max + Math.log(sum);
  const best = [];  // [logit, id], kept sorted, at most n
  for (let i = 0; i < V; i++) {
    const x = logits[off + i];
    if (best.length < n || x > best[best.length - 1][0]) {
      best.push([x, i]);
      best.sort((a, b) => b[0] - a[0] || a[1] - b[1]);
      if (best.length > n) best.pop();
    }
  }
  return { id: arg, top: best.map(([x]) => x - lse) };
}

export class OrtDevice {
  constructor(entry) {
    this.entry = entry;
    this.session = null;
    this.loadSeconds = 0;
  }

  async load({ threads = 1, onProgress, files = null } = {}) {
    const t0 = performance.now();
    const blobs = files || await modelFiles(this.entry, onProgress);
    const json = async (name) => JSON.parse(await blobs[name].text());
    this.config = (await json('genai_config.json')).model;
    this.tokenizer = new Tokenizer(await json('tokenizer.json'), await json('tokenizer_config.json'));
    const dec = this.config.decoder;
    this.layers = dec.num_hidden_layers;
    this.kvHeads = dec.num_key_value_heads;
    this.headSize = dec.head_size;
    this.names = dec.inputs;
    this.outNames = dec.outputs;
    const eos = this.config.eos_token_id;
    this.eos = new Set(Array.isArray(eos) ? eos : [eos]);
    this.context = this.config.context_length || 2048;
    ort.env.wasm.wasmPaths = new URL('./vendor/ort/', import.meta.url).href;
    ort.env.wasm.numThreads = self.crossOriginIsolated ? threads : 1;
    const bytes = async (n) => new Uint8Array(await blobs[n].arrayBuffer());
    const external = Object.keys(blobs).filter((n) => n.startsWith('model.onnx.'));
    try {
      this.session = await ort.InferenceSession.create(await bytes('model.onnx'), {
        executionProviders: ['wasm'], graphOptimizationLevel: 'all',
        externalData: await Promise.all(external.map(async (n) => ({ path: n, data: await bytes(n) }))),
      });
    } catch (e) {
      throw new AppError(`onnxruntime-web could not load ${this.entry.name} (${e.message})`);
    }
    // the cache's type as the graph declares it (edgelm's CPU exports keep it float32)
    const pastMeta = (this.session.inputMetadata || []).find((m) => m.name.startsWith('past_key_values'));
    this.kvType = pastMeta && pastMeta.type === 'float16' ? 'float16' : 'float32';
    this.threads = ort.env.wasm.numThreads;
    this.loadSeconds = (performance.now() - t0) / 1000;
  }

  encode(text) {
    return this.tokenizer.encode(text, { add_special_tokens: false }).ids;
  }

  /** One forward: `ids` after `past` (null: none). Returns {logits (Float32Array [T*V]), T, V, present}. */
  async forward(ids, past, pastLen) {
    const T = ids.length;
    const feeds = {
      [this.names.input_ids]: new ort.Tensor('int64', BigInt64Array.from(ids, BigInt), [1, T]),
      [this.names.attention_mask]: new ort.Tensor('int64', new BigInt64Array(pastLen + T).fill(1n), [1, pastLen + T]),
    };
    const empty = this.kvType === 'float16' ? new Uint16Array(0) : new Float32Array(0);
    for (let l = 0; l < this.layers; l++) {
      for (const [kind, pattern] of [['key', this.names.past_key_names], ['value', this.names.past_value_names]]) {
        const name = pattern.replace('%d', l);
        feeds[name] = past ? past[`${kind}${l}`]
          : new ort.Tensor(this.kvType, empty, [1, this.kvHeads, 0, this.headSize]);
      }
    }
    const out = await this.session.run(feeds);
    const present = {};
    for (let l = 0; l < this.layers; l++) {  // by name: the outputs come as all keys, then all values
      present[`key${l}`] = out[this.outNames.present_key_names.replace('%d', l)];
      present[`value${l}`] = out[this.outNames.present_value_names.replace('%d', l)];
    }
    const logits = out[this.outNames.logits];
    return { logits: logits.data, T, V: logits.dims[2], present };
  }

  /** The bench page's timed greedy run; the same contract as WllamaDevice.benchRun (device.js). */
  async benchRun(ids, nGen) {
    const t0 = performance.now();
    let { logits, T, V, present } = await this.forward(ids, null, 0);
    const t1 = performance.now();
    let { id } = topLogprobs(logits, (T - 1) * V, V, 1);
    const t2 = performance.now();
    for (let i = 1, pastLen = ids.length; i < nGen; i++, pastLen++) {
      ({ logits, present } = await this.forward([id], present, pastLen));
      ({ id } = topLogprobs(logits, 0, V, 1));
    }
    const t3 = performance.now();
    return { prefillS: (t1 - t0) / 1000, ttftS: (t2 - t0) / 1000, decodeS: (t3 - t2) / 1000 };
  }

  async unload() {
    if (this.session) await this.session.release();
    this.session = null;
  }

  /** Greedy completion, streamed; the same contract as WllamaDevice.complete (device.js). */
  async complete(prompt, { maxTokens, topN = 5, topFor = 0, onToken, signal, chat = false }) {
    const t0 = performance.now();
    const text0 = chat ? this.entry.chat.prefix + prompt + this.entry.chat.suffix : prompt;
    const promptIds = this.encode(text0);
    if (promptIds.length + maxTokens > this.context) {
      throw new AppError(`the prompt has ${promptIds.length} tokens and the answer may take ${maxTokens} more, but ` +
        `the model's context holds ${this.context}; shorten the prompt or lower max tokens`);
    }
    const ids = [];
    let text = '';
    let finish = 'length';
    let tFirst = null;
    try {
      let { logits, T, V, present } = await this.forward(promptIds, null, 0);
      let off = (T - 1) * V;
      let pastLen = promptIds.length;
      while (ids.length < maxTokens) {
        if (signal && signal.aborted) { finish = 'stopped'; break; }
        const { id, top } = topLogprobs(logits, off, V, ids.length < topFor ? topN : 1);
        if (tFirst === null) tFirst = performance.now();
        if (this.eos.has(id)) { finish = 'stop'; break; }
        ids.push(id);
        const full = this.tokenizer.decode(ids, { skip_special_tokens: false });
        if (!full.endsWith('\uFFFD')) {  // a character split over byte tokens waits until it is whole
          const piece = full.slice(text.length);
          text = full;
          onToken({ id, text: piece, top: ids.length <= topFor ? top : null });
        } else {
          onToken({ id, text: '', top: ids.length <= topFor ? top : null });
        }
        if (ids.length >= maxTokens) break;
        ({ logits, present } = await this.forward([id], present, pastLen));
        pastLen += 1;
        off = 0;
      }
    } catch (e) {
      if (e instanceof AppError) throw e;
      throw new AppError(`the device model failed (${e.message || e})`);
    }
    const full = this.tokenizer.decode(ids, { skip_special_tokens: false });
    if (full.length > text.length) { onToken({ id: null, text: full.slice(text.length), top: null }); text = full; }
    const end = performance.now();
    return { ids, text, finish, ttft: tFirst === null ? null : (tFirst - t0) / 1000, seconds: (end - t0) / 1000,
             decodeSeconds: tFirst === null ? 0 : (end - tFirst) / 1000 };
  }
}
