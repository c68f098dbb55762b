"""Models: loading any causal LM (folder, GGUF, built-in name, hub id), the student zoo, and pruning."""
