# Every target sets up .venv first (pinned by constraints.txt), so each works on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup bench test export chromium docs docs-small readme

$(STAMP): constraints.txt settings.ini setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=23.2"
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

bench: $(STAMP)
	$(BIN)/lgl2o-bench --overwrite

test: $(STAMP) chromium
	$(BIN)/python -m pytest tests

# Debian's Chromium and its driver, for the docs site's browser test (no browser download); CI runs as root.
chromium:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	    --no-install-recommends chromium chromium-driver fonts-dejavu-core >/dev/null; \
	fi

# The docs site in _docs/: papermill runs every notebook (full parameters of nbs/params/*.yml), nbdev
# processes them, Quarto renders them where it is installed, nbconvert where it is not.
docs: $(STAMP)
	$(BIN)/python -m lgl2o.docs site

# The same site from the notebooks' small defaults (what the tests run).
docs-small: $(STAMP)
	$(BIN)/python -m lgl2o.docs site --small

# README.md from nbs/index.ipynb (no execution); the tests check it is up to date.
readme: $(STAMP)
	$(BIN)/python -m lgl2o.docs readme

export: $(STAMP)
	$(BIN)/nbdev_export && $(BIN)/nbdev_clean
