# The two entry points of README.md. Each sets up .venv first (quick when done).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test info
setup:
	@bash scripts/setup_env.sh

demo: setup
	@bash examples/demo/run.sh

test: setup
	@$(PY) -m pytest -q -ra tests

info: setup
	@$(PY) -m fairseq_clustered.info
