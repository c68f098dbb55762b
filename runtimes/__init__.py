"""Runtime backends (PyTorch, ONNX Runtime, llama.cpp, TVM), installed as edgelm.runtimes. Built in issue 4."""
