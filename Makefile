# Two entry points for a fresh clone:
#   make sample   create .venv, run the extraction job on the bundled sample
#   make test     create .venv (and chromium for the browser test, as root), run the test suite
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp

.PHONY: sample test bench clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $(STAMP)

sample: $(STAMP)
	./spark-submit.sh jobs/extract.py --config conf/sample.toml --overwrite

test: $(STAMP)
	tests/install-browser.sh
	$(VENV)/bin/python -m pytest -q -rs tests

bench: $(STAMP)
	$(VENV)/bin/python bench/extract_throughput.py

clean:
	rm -rf stores/sample build
