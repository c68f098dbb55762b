// Copies the runtimes' browser files from node_modules into www/vendor, where the page, `edgelm app build` and
// Capacitor's Android project take them (the app never loads anything from node_modules or a CDN).
import { copyFileSync, mkdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const FILES = {  // destination under www/vendor -> source under node_modules
  'wllama/index.js': '@wllama/wllama/esm/index.js',
  'wllama/single-thread/wllama.wasm': '@wllama/wllama/esm/single-thread/wllama.wasm',
  'wllama/multi-thread/wllama.wasm': '@wllama/wllama/esm/multi-thread/wllama.wasm',
  // onnxruntime-web's WebAssembly build alone (no WebGPU), and the tokenizer for ONNX artifacts
  'ort/ort.wasm.min.mjs': 'onnxruntime-web/dist/ort.wasm.min.mjs',
  'ort/ort-wasm-simd-threaded.mjs': 'onnxruntime-web/dist/ort-wasm-simd-threaded.mjs',
  'ort/ort-wasm-simd-threaded.wasm': 'onnxruntime-web/dist/ort-wasm-simd-threaded.wasm',
  'tokenizers/tokenizers.min.mjs': '@huggingface/tokenizers/dist/tokenizers.min.mjs',
};
for (const [dest, src] of Object.entries(FILES)) {
  const to = join(root, 'www', 'vendor', dest);
  mkdirSync(dirname(to), { recursive: true });
  copyFileSync(join(root, 'node_modules', src), to);
}
console.log(`copied ${Object.keys(FILES).length} runtime files into www/vendor`);
