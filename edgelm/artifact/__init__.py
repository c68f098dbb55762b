"""Export: GGUF (llama.cpp) and ONNX (ONNX Runtime) artifacts, each checked against PyTorch."""
