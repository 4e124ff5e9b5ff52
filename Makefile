# Two entry points for a fresh machine: `make quickstart` and `make test` (README).
VENV ?= .venv
PY := $(VENV)/bin/python
FASHION := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

# The unit tests: no Ray cluster, no MLflow server, under 3 minutes on 2 cores. $(wildcard)
# leaves out a file not written yet; test_data_*.py takes the data tests however they split.
UNIT_TESTS := $(wildcard tests/test_losses.py tests/test_objective.py tests/test_metrics.py \
	tests/test_data_*.py tests/test_longtail.py tests/test_augment.py tests/test_config.py \
	tests/test_models.py tests/test_checkpoint.py tests/test_layers.py tests/test_space.py \
	tests/test_storage.py tests/test_pretrained.py tests/test_own_images.py tests/test_bench_gpu.py \
	tests/test_stream.py)
# pytest exits 5 when it collects no test: say so instead of failing on it.
PYTEST_EXIT = code=$$?; if [ $$code -eq 5 ]; then echo "pytest: no tests collected"; exit 0; fi; exit $$code

.PHONY: install fashion-mnist quickstart test test-fast lint

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
	$(VENV)/bin/jdcl-tune --space tune_spaces/quickstart.yaml

# Everything, slow tests included: what CI runs.
test: install fashion-mnist
	$(PY) -m ruff check jdcl_ray tests benchmarks
	$(PY) -m pytest -q --durations=15; $(PYTEST_EXIT)

# The unit tests only, for the edit-test loop. (pytest given no file would run the whole suite.)
test-fast: install
ifeq ($(UNIT_TESTS),)
	@echo "pytest: no tests collected"
else
	$(PY) -m pytest -q -m "not slow" --durations=5 $(UNIT_TESTS); $(PYTEST_EXIT)
endif

lint: install
	$(PY) -m ruff check jdcl_ray tests benchmarks
	$(PY) -m ruff format --check jdcl_ray tests benchmarks
