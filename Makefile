# The two commands: `make test` and `make demo`. Each bootstraps a fresh Debian/Ubuntu host:
# system packages (scripts/ensure-sysdeps.sh), a .venv with kvmkit installed editable, then runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kvmkit-installed
BUILD_INPUTS := pyproject.toml setup.py $(wildcard csrc/*.py csrc/*.h csrc/*.c)

.PHONY: all sysdeps venv test demo lint bench clean

all: test

sysdeps:
	@scripts/ensure-sysdeps.sh

$(STAMP): $(BUILD_INPUTS) | sysdeps
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

venv: sysdeps $(STAMP)

# pytest exits 5 when it collects nothing; make treats that as a failure, as it should.
test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

demo: venv
	$(VENV)/bin/kvmkit demo $(DEMO_ARGS)

bench: venv
	$(PY) -m benchmarks --report report/bench --json report/bench/results.json $(BENCH_ARGS)

lint: venv
	$(VENV)/bin/ruff check kvmkit tests benchmarks csrc
	$(VENV)/bin/ruff format --check kvmkit tests benchmarks csrc
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) build *.egg-info kvmkit/_kvm*.so kvmkit/_kvm.c
