"""Runtime backends, installed as edgelm.runtimes: llama.cpp (GGUF) and ONNX Runtime. Each exposes
``logits(ids)`` and ``greedy(ids, n)``; the full runtime API (sampling, streaming, bench) is issue 4."""
