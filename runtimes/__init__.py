"""Runtime backends, installed as edgelm.runtimes: one API (runtimes/base.py) over PyTorch, ONNX Runtime and
llama.cpp. ``edgelm.load(path)`` picks the backend from the artifact's manifest."""
