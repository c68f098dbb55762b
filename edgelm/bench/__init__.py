"""`edgelm bench`: every artifact and runtime side by side, each run in its own process (llama-bench style)."""
