# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv when missing and install
# torch first (the CPU build where no CUDA GPU answers nvidia-smi, so pip never pulls a multi-GB CUDA build),
# then vidgen with its test extras.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch release vidgen is tested with on CPU; on GPU nodes pip picks the newest CUDA build.
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
STAMP := $(VENV)/.vidgen-installed
PYTEST_ARGS ?=
# Test processes (pytest-xdist), each with its own local Ray cluster and servers; a test file stays in one
# process (its module fixtures start once), the longest files first (tests/conftest.py). 0, the default, runs
# everything in one process. TEST_JOBS=2 on 2 cores took 54-55 min against 67-73 serially on slow days, but Ray
# clusters the tests start can fail under that load: a `ray start --head` of tests/test_job_submit.py stopped
# answering mid-module in one such run, so it is not the default.
TEST_JOBS ?= 0

.PHONY: setup demo test lint bench clean browser

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
		|| { echo "vidgen needs Python >= 3.11: run make PYTHON=python3.11 ..."; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if $(PY) -c 'import torch' 2>/dev/null; then \
		echo "torch already installed: $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	elif nvidia-smi -L >/dev/null 2>&1; then \
		echo "CUDA GPU found: installing torch from PyPI"; $(PY) -m pip install -q torch; \
	else \
		echo "no CUDA GPU: installing the CPU build of torch $(TORCH_VERSION)"; \
		$(PY) -m pip install -q --retries 1 --timeout 20 "torch==$(TORCH_VERSION)" --extra-index-url $(TORCH_CPU_INDEX); \
	fi
	$(PY) -m pip install -q -e ".[test]"
	@touch $@

demo: setup
	$(VENV)/bin/vidgen demo

test: setup
	$(PY) -m pytest -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# Headless Chromium for tests/test_report.py (the nightly report opened as a browser sees it). CI runs this
# before `make test`; it installs Debian's package only as root and only when it is missing. Elsewhere the
# test skips, naming the binary, unless $$CI is set.
browser:
	@if command -v chromium >/dev/null 2>&1; then echo "chromium: $$(command -v chromium)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; \
	else echo "chromium missing and not root (or no apt-get): install Debian's chromium to run the report test"; fi

# ruff, and the architecture's import rules ([tool.importlinter] in pyproject.toml: layers, independent families)
lint: setup
	$(VENV)/bin/ruff check vidgen tests jobs benchmarks
	$(VENV)/bin/lint-imports

clean:
	rm -rf work .pytest_cache
