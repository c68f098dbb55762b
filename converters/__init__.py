"""Export targets (GGUF, ONNX, TVM), installed as edgelm.converters. Built in issue 3."""
