# The two set-up commands of the README: `make demo` and `make test`. Each installs what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
ASGA := $(VENV)/bin/asga
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo test test-avx2 install data lint clean

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[onnx,dev]'
	touch $@

install: $(VENV)/.installed

# Fashion-MNIST from Debian (offline); needs root, as on these machines and in CI
data:
	@if [ ! -f $(FMNIST)/train-images-idx3-ubyte.gz ]; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist; fi

demo: install data
	$(ASGA) demo

test: install
	$(VENV)/bin/pytest

# the export tests on an emulated AVX2 CPU without VNNI (QEMU user mode; installs qemu-user, needs root)
test-avx2: install
	.ci/test-avx2

lint: install
	$(VENV)/bin/ruff check asga_deploy tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache
