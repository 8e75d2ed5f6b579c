# The README's two commands are `make demo` and `make test`; both start with `make setup`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/cifar10-hvd
DEMO_DIR ?= demo
NP ?= 2
# Open MPI refuses to run as root unless told; CI and containers here run as root.
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1

.PHONY: setup demo test image bench lint clean gpu-check

# Idempotent: the stamp is newer than everything the install depends on, so a second
# `make setup` does nothing. Delete .venv to start over.
setup: $(VENV)/.stack-ok

$(VENV)/.stack-ok: setup.py scripts/install-stack.sh
	bash scripts/install-stack.sh $(VENV) dev
	touch $@

demo: setup
	@[ -d $(DEMO_DIR)/kaggle ] || $(CLI) demo-data --out $(DEMO_DIR)/kaggle --train 5000 --test 1000 --seed 0
	$(CLI) run --config configs/demo.yaml --data $(DEMO_DIR)/kaggle --workdir $(DEMO_DIR)/run --np $(NP)

# Two pytest workers, a test file each at a time: most tests wait on ranks, sshd, timeouts or containers for
# much of their time, so one worker leaves a core idle. A file stays on one worker, so the cluster tests
# (one set of network namespaces) never meet themselves. TEST_WORKERS=0 runs the suite in this process.
TEST_WORKERS ?= 2
test: setup image
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist loadfile

# The CPU image, localhost/cifar10-hvd:cpu (podman, installed with apt when missing; a Debian 12 base
# bootstrapped with mmdebstrap where no registry serves one). Seconds when nothing changed.
image:
	bash scripts/build-image.sh $(IMAGE)

bench: setup
	@set -e; for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b; done

# On a GPU machine: doctor, a short np-1 AMP run (prepare, tune, final, predict) and bench_h2d, in minutes.
gpu-check: setup
	bash scripts/gpu-check.sh $(GPU_CHECK_DIR)

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .ruff_cache
