# Two commands a fresh machine needs: `make demo` and `make test`. Each creates .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/imgalign: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned to the CPU-usable release that pip takes from this machine's disk
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	touch $(BIN)/imgalign

venv: $(BIN)/imgalign

demo: venv
	$(BIN)/imgalign demo

test: venv
	$(BIN)/python -m pytest tests

lint: venv
	$(BIN)/ruff check imgalign tests scripts

.PHONY: venv demo test lint
