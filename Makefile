# Two entry points for a fresh machine: `make demo` (the main job) and `make test` (the suite).
VENV ?= .venv
BIN := $(VENV)/bin

$(BIN)/plait: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,hf,eval,data,tune]'
	# timm's Lamb/Lars are the optimizer tests' second opinion; its own dependencies (torchvision) are not needed
	$(BIN)/pip install -q --no-deps timm==1.0.31
	touch $@

.PHONY: demo test lint bench
demo: $(BIN)/plait
	$(BIN)/plait train configs/gpt-10m.toml

test: $(BIN)/plait
	$(BIN)/ruff check .
	$(BIN)/pytest tests

lint: $(BIN)/plait
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(BIN)/plait
	$(BIN)/python benchmarks/dp.py
