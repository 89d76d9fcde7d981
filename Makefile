# Every target sets up .venv first (pinned by constraints.txt), so each works on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup bench test export clean-nbs

$(STAMP): constraints.txt settings.ini setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=23.2"
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

bench: $(STAMP)
	$(BIN)/lgl2o-demo

test: $(STAMP)
	$(BIN)/python -m pytest tests

export: $(STAMP)
	$(BIN)/nbdev_export && $(BIN)/nbdev_clean
