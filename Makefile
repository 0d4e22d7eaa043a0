# The two set-up commands of the README: `make demo` trains the offline demo, `make test` runs the suite.
# Each creates the Python >= 3.12 virtual environment .venv when it is missing and installs this
# package into it (editable) at the versions pinned in constraints.txt: the demo needs the package
# alone, the tests add the tf and dev extras and the TPU compiler.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdir/demo
# A persistent XLA compilation cache makes reruns of the demo and the tests much faster.
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.jax_cache
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS ?= 0
export JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES ?= 0

.PHONY: demo test lint format venv clean

venv: $(VENV)/.installed-test $(VENV)/tpu-compiler/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	@set -e; \
	if [ ! -x $(PY) ]; then \
	  py=""; \
	  for c in python3.12 python3.13 python3; do \
	    if command -v $$c >/dev/null 2>&1 && $$c -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then py=$$c; break; fi; \
	  done; \
	  if [ -z "$$py" ] && command -v pyenv >/dev/null 2>&1; then \
	    for v in $$(pyenv versions --bare | grep -E '^3\.1[2-9]' | sort -V); do \
	      if PYENV_VERSION=$$v python -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then py="env PYENV_VERSION=$$v python"; break; fi; \
	    done; \
	  fi; \
	  if [ -z "$$py" ]; then echo "error: Python >= 3.12 not found (jax >= 0.11 needs it); install python3.12 and retry" >&2; exit 1; fi; \
	  echo "creating $(VENV) with $$py"; $$py -m venv $(VENV); \
	fi; \
	set -o pipefail; \
	$(PY) -m pip install -q -c constraints.txt -e . 2>&1 | { grep -v "Location '.*' is ignored" || true; }; \
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	@set -o pipefail; \
	$(PY) -m pip install -q -c constraints.txt -e ".[tf,dev]" 2>&1 | { grep -v "Location '.*' is ignored" || true; }; \
	touch $@

# libtpu (the version jax[tpu] pins) beside the venv, not in it: jax loads it only to compile for
# compile-only TPU chips (tests/test_scan_tpu.py, benchmarks/tpu_lowering.py), never as a backend.
$(VENV)/tpu-compiler/.installed: $(VENV)/.installed-test
	@set -o pipefail; \
	pin=$$($(PY) -c 'from importlib.metadata import requires; print(next(r.split(";")[0] for r in requires("jax") if r.startswith("libtpu")))'); \
	if $(PY) -m pip install -q --no-deps --upgrade --target $(VENV)/tpu-compiler "$$pin" 2>&1 | \
	  { grep -v "Location '.*' is ignored" || true; }; then touch $@; \
	else echo "$$pin could not be installed: the TPU compile tests will skip" >&2; fi

# On a CPU, XLA allocates each step's temporaries afresh (about 0.5 GB for the demo) and glibc
# hands them back to the OS, so every step faults them in again, as system time. These settings
# keep freed memory in the process (benchmarks/cpu_allocator.py measures each).
CPU_MALLOC := glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184:glibc.malloc.arena_max=1

demo: $(VENV)/.installed
	GLIBC_TUNABLES=$${GLIBC_TUNABLES:-$(CPU_MALLOC)} $(PY) -m dim_jax.main --config=configs/demo.py --workdir=$(WORKDIR)

test: venv
	$(PY) -m ruff check dim_jax tests benchmarks configs
	$(PY) -m ruff format --check dim_jax tests benchmarks configs
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=30 tests

lint: venv
	$(PY) -m ruff check dim_jax tests benchmarks configs

format: venv
	$(PY) -m ruff format dim_jax tests benchmarks configs
	$(PY) -m ruff check --fix dim_jax tests benchmarks configs

clean:
	rm -rf $(VENV) .jax_cache .pytest_cache .ruff_cache
