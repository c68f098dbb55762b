"""Format converters, installed as edgelm.converters: GGUF (gguf-py + llama.cpp's quantizer) and ONNX
(onnxruntime-genai's model builder). edgelm.artifact.targets wires them into the target registry."""
