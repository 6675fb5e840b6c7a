# The two commands: `make run` and `make test` (and `make fidelity-quick`). Each creates .venv and installs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch, pinned and installed before the project so that pip never fetches another (a multi-GB
# CUDA build) to satisfy the dev extra. Which build comes is the index's: a CPU wheel where pip's
# configured indexes hold one; from PyPI on Linux, the CUDA build. For the CPU build from PyTorch's
# index: make test TORCH_PIN="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
TORCH_PIN ?= torch==2.13.0

.PHONY: run test fidelity-quick install install-dev bench clean

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: $(VENV)/bin/activate pyproject.toml
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/bin/activate pyproject.toml
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e '.[dev]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# The main job: SME vs MME vs IC plans for the default fleet, with the HTML report.
run: $(VENV)/.installed
	$(VENV)/bin/capsim compare scenarios/compare_small_models.yaml --report --out results/compare

test: $(VENV)/.installed-dev
	$(PY) -m pytest

# The simulator against the real serving testbed on this machine (capsim fidelity --quick, about
# 10 minutes on a quiet 2-core machine, up to 25 where cases miss and run again): its own step,
# after make test, in .ci/run. A case that misses its tolerance on a machine too noisy to measure
# is reported as such (xfail), not failed.
fidelity-quick: $(VENV)/.installed-dev
	$(PY) -m pytest -m fidelity -rxs

bench: $(VENV)/.installed
	$(VENV)/bin/capsim bench

clean:
	rm -rf $(VENV) results .pytest_cache
