# Entry points for a fresh clone:
#   make sample   create .venv, run the extraction job on the bundled sample
#   make test     create .venv (and chromium for the browser test, as root), run the test suite
#   make test-quick   the suite without the heavy tests (pytest.ini's markers), for the edit-test loop
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp

# The heavy tests' markers (pytest.ini): a cluster, a browser, an S3 server, two DDP processes, over ~5 s.
HEAVY := cluster or browser or s3 or ddp or slow

.PHONY: sample test test-quick bench clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $(STAMP)

sample: $(STAMP)
	./spark-submit.sh jobs/extract.py --config conf/sample.toml --overwrite

test: $(STAMP)
	tests/install-browser.sh
	$(VENV)/bin/python -m pytest -q -rs --durations=15 tests

test-quick: $(STAMP)
	$(VENV)/bin/python -m pytest -q -rs --durations=15 -m "not ($(HEAVY))" tests

bench: $(STAMP)
	$(VENV)/bin/python bench/extract_throughput.py

clean:
	rm -rf stores/sample build
