# Two entry points for a fresh machine: `make quickstart` and `make test` (README).
VENV ?= .venv
PY := $(VENV)/bin/python
FASHION := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: install fashion-mnist quickstart test lint

install: $(VENV)/.installed

# torch first, pinned, so pip takes the local build rather than resolving a newer one.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# Fashion-MNIST ships as a Debian package (no download at run time).
fashion-mnist: $(FASHION)
$(FASHION):
	$(if $(filter 0,$(shell id -u)),,sudo) apt-get update -qq
	$(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -qq dataset-fashion-mnist

quickstart: install
	$(PY) -m jdcl_ray.tune --space tune_spaces/quickstart.yaml

# pytest exits 5 when it collects no test: say so instead of failing on it.
test: install fashion-mnist
	$(PY) -m ruff check jdcl_ray tests benchmarks
	$(PY) -m pytest -q --durations=15; code=$$?; if [ $$code -eq 5 ]; then echo "pytest: no tests collected"; exit 0; fi; exit $$code

lint: install
	$(PY) -m ruff check jdcl_ray tests benchmarks
	$(PY) -m ruff format --check jdcl_ray tests benchmarks
