# Two commands do everything on a fresh machine (Python 3.10+ only):
#   make demo   - create .venv if missing, install torch 2.13.0 (CPU) then deltakd, run the quickstart
#                 (LoRA teacher, then a 3-layer student distilled from it)
#   make test   - the same set-up, then the default test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deltakd-installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-slow bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/deltakd train recipes/quickstart.yaml
	$(VENV)/bin/deltakd train recipes/quickstart_student.yaml

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

bench: setup
	$(PY) benchmarks/train_overhead.py
	$(PY) benchmarks/kd_throughput.py

clean:
	rm -rf runs .pytest_cache
