# The two commands: `make run` and `make test`. Everything else they need is set up here.
VENV   := .venv
DATA   ?= $(CURDIR)/data
PYTHON ?= python3

.PHONY: run test bench clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

## run: server + import daemon with an embedded PostgreSQL under ./data
run: $(VENV)/.installed
	$(VENV)/bin/modelcache run --data-dir $(DATA)

## test: the whole suite on an embedded PostgreSQL
test: $(VENV)/.installed
	$(VENV)/bin/pytest -q

## bench: the serving benchmark against nginx (see bench/README.md)
bench: $(VENV)/.installed
	bench/serve

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
