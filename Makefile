# make demo / make test create the virtual environment when it is missing, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,serving]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m pytest -q -ra tests

test-fast: $(STAMP)
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m pytest -q -ra -m "not slow" tests

demo: $(STAMP)
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m stsc_tf.demo

bench: $(STAMP)
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) benchmarks/pipeline.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
