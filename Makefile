# Two commands set everything up on a fresh machine: `make demo` and `make test`; `make docs` builds the site.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# CPU build first (a local file on the project's machines); the range in pyproject keeps it.
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[assets,test,docs]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/polypeft demo

test: $(STAMP)
	# pytest's exit 5 means no test ran: a failure, said out loud (make itself then exits 2).
	$(PY) -m pytest -q tests || { rc=$$?; [ $$rc -ne 5 ] || echo "pytest collected no tests: failing" >&2; exit $$rc; }

# The edit loop's tier: every test not marked slow (under two minutes on a 2-core CPU).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

# The documentation site, offline, into site/ (warnings are errors: see mkdocs.yml).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 PYTHONPATH=src $(PY) -m mkdocs build --strict

bench-deps: $(STAMP)
	$(PY) -m pip install -e ".[bench]"

.PHONY: install demo test test-fast bench-deps
