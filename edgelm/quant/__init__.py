"""Quantization: named presets (RTN, GPTQ, llama.cpp types) and the GPTQ-format checkpoint they produce."""
