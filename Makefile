# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# Two pytest workers, one test file each at a time (module fixtures are built once): compiling is
# single-threaded, so two workers keep both cores busy (the suite: 18.5 -> 14 min on 2 cores).
TEST_WORKERS ?= 2

.PHONY: venv demo test bench clean

venv: $(STAMP)

# Re-run the install whenever the dependency list changes.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -e '.[dev,data,ode,serve]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/langflow-jax demo --workdir runs/demo

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# Training throughput, then the serving benchmark (LangFlow vs AR; writes experiments/results/serving.md).
bench: $(STAMP)
	$(PY) experiments/bench_train.py
	$(PY) experiments/bench_serving.py

clean:
	rm -rf runs/demo .pytest_cache
