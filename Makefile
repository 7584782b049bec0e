# make test        install everything (system packages when root, a virtualenv), lint, build
#                  the docs site (strict), and run the suite: on this machine (vsock
#                  emulated), then the guest stage: the tests marked `guest` or `vsock` in a
#                  throw-away QEMU guest with real AF_VSOCK, then the hybrid stage: the tests
#                  marked `hybrid`, here, against a guest whose vsock is behind
#                  vhost-device-vsock (Firecracker's hybrid vsock)
# make docs        the docs site, `mkdocs build --strict`, into build/site
# make man         a man page per command into build/man/man1 (`man -l build/man/man1/X.1`)
# make test-guest  only the guest stage
# make test-hybrid only the hybrid stage
# make bench-hybrid the hybrid vsock hop against a direct client, in one hybrid-stage guest
#                  (benchmarks/hybridpath.py)
# make demo        install, then a short live demonstration with emulated vsock
# make bench       install, then the benchmarks (numbers, never pass/fail)
# make bench-guest the pair over real vsock against socat over vsock, in the guest
#                  (benchmarks/vsockpath.py; results in benchmarks/results-vsock.md)

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SYSTEM_PACKAGES := iptables ipset iproute2 socat iperf3 curl prometheus python3-venv \
	qemu-system-x86 busybox-static cpio kmod dnsmasq bind9-dnsutils dnsperf openssl \
	groff-base man-db tinyproxy librust-env-logger+default-dev
# (librust-env-logger+default-dev: a crate ../shared/hybrid/build.sh needs and does not install)
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: test test-guest test-hybrid demo bench bench-guest bench-hybrid system-packages lint \
	docs man clean

$(BIN)/.installed: pyproject.toml
	@$(MAKE) --no-print-directory system-packages
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,docs]'
	touch $@

system-packages:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		missing=""; \
		for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
		if [ -n "$$missing" ]; then \
			echo "installing system packages:$$missing"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
		fi; \
	else \
		echo "not root (or no apt-get): skipping system packages $(SYSTEM_PACKAGES)"; \
	fi

lint: $(BIN)/.installed
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/mypy src

# --strict: a broken link or anchor, a missing page or a page left out of the nav fails
# (mkdocs.yml's `validation` makes each a warning). The command reference is generated from
# the click commands while the site builds (scripts/reference.py, an mkdocs hook).
docs: $(BIN)/.installed  # not --quiet: it hides the warnings that --strict counts
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# Built, not installed with the package: see docs/development/docs.md.
man: $(BIN)/.installed
	$(BIN)/python scripts/reference.py man build/man

test: lint docs
	$(BIN)/python -m pytest tests -ra -m "not guest and not hybrid"
	@$(MAKE) --no-print-directory test-guest
	@$(MAKE) --no-print-directory test-hybrid

# The guest stage (tests/vsock/guest.py): pytest, tests selected by the marker expression
# GUEST_TESTS, in a QEMU guest with real AF_VSOCK. Exit 77 from the harness means "cannot run
# here" (it says why): a skip, unless PF_PROXY_REQUIRE_GUEST=1 (.ci/run) makes it a failure.
GUEST_TESTS ?= guest or vsock
test-guest: $(BIN)/.installed
	$(BIN)/python -m tests.vsock.guest -- $(BIN)/python -m pytest -m "$(GUEST_TESTS)" tests -ra \
		|| [ $$? -eq 77 ]

# The hybrid stage (tests/hybrid): pytest runs here, selecting the tests marked `hybrid`, with a
# guest booted behind vhost-device-vsock (found on PATH or in PF_PROXY_VHOST_DEVICE_VSOCK, or
# built by ../shared/hybrid/build.sh). Exit 77 as for the guest stage.
test-hybrid: $(BIN)/.installed
	$(BIN)/python -m tests.vsock.guest --hybrid -- $(BIN)/python -m pytest -m hybrid tests -ra \
		|| [ $$? -eq 77 ]

demo: $(BIN)/.installed
	$(BIN)/python scripts/demo.py

bench: $(BIN)/.installed
	$(BIN)/python -m benchmarks

bench-guest: $(BIN)/.installed
	$(BIN)/python -m tests.vsock.guest --collect benchmarks -- \
		sh -c '$(BIN)/python -m benchmarks.vsockpath --output "$$PF_PROXY_GUEST_COLLECT/results-vsock.md"'

bench-hybrid: $(BIN)/.installed
	$(BIN)/python -m tests.vsock.guest --hybrid --collect benchmarks -- \
		sh -c '$(BIN)/python -m benchmarks.hybridpath --output "$$PF_PROXY_GUEST_COLLECT/results-hybrid.md"'

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis \
		.cache/vsock-guest
