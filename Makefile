# relay: make setup | make test | make demo | make bench | make dist
# Every target installs what it needs: Debian packages (when root) and the venv in .venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
DEB_PACKAGES := nftables iproute2 iperf3 haproxy socat procps util-linux libcap2-bin wrk nginx-light libnginx-mod-stream sockperf dnsmasq-base bind9-dnsutils systemd
CORE_SRC := $(wildcard relay_ext/*.pyx relay_ext/*.pxd relay_ext/*.pxi relay_ext/includes/*) setup.py

.PHONY: setup build test lint bench bench-quick demo dist soak clean system-packages

setup: $(VENV)/.installed build

system-packages:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then echo "installing Debian packages:$$missing"; \
	    (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi; \
	else echo "not root (or no apt-get): skipping Debian packages ($(DEB_PACKAGES)); tests needing them will skip"; fi

$(VENV)/.installed: pyproject.toml
	$(MAKE) system-packages
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip 'setuptools>=77' 'Cython>=3.0,<4'
	@# python-liburing 2024.5.3 builds from source (1.5-2 min); install it once, outside build isolation
	$(PIP) install -q 'liburing==2024.5.3'
	$(PIP) install -q --no-build-isolation -e '.[test,bench]'
	touch $@

build: $(VENV)/.installed relay_ext/.built

# Build outside the tree, then rename into place: overwriting the .so in place would crash
# every process that has the old one mapped (tests, a running relay).  _build_info.py (what the
# core reports about its build: it must not import Cython at run time) goes first.
relay_ext/.built: $(CORE_SRC)
	$(PY) setup.py -q build_ext --build-lib build/ext --build-temp build/tmp
	@for so in build/ext/relay_ext/_build_info.py build/ext/relay_ext/_core*.so build/ext/relay_ext/_udp*.so \
	  build/ext/relay_ext/_limits*.so build/ext/relay_ext/_flowfmt*.so; do \
	  cp "$$so" "relay_ext/.$${so##*/}.new" && mv -f "relay_ext/.$${so##*/}.new" "relay_ext/$${so##*/}"; done
	touch $@

test: setup
	$(PY) -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check relay bench tests
	$(VENV)/bin/mypy
	$(PY) -m pytest -q bench/tests

bench: setup
	$(PY) -m bench
	@# the reload handoff pause with 1,000 active connections (docs/handoff.md)
	$(PY) -m bench.handoff_pause | tee bench/results/LATEST-handoff.txt

bench-quick: setup
	$(PY) -m bench --quick

demo: setup
	$(PY) -m relay demo

# The sdist, then a wheel built from that sdist (not from the checkout: proves the sdist is
# complete).  Without build isolation: the venv already has Cython and python-liburing, which
# an isolated build would fetch and compile again (python-liburing: 1.5-2 min).
dist: $(VENV)/.installed
	rm -rf dist
	$(PY) -m build --sdist --no-isolation --outdir dist
	$(PIP) wheel -q --no-deps --no-build-isolation --wheel-dir dist dist/relay-*.tar.gz

# relay(1), generated from the command-line parser (`relay gen man`); `man -l docs/relay.1`.
man: docs/relay.1

docs/relay.1: relay/cli.py relay/cli_docs.py relay/config/settings.py
	PYTHONPATH=$(CURDIR) $(PY) -m relay gen man -o $@

# A bounded churn soak through `relay run` (tests/soak/soak.py): fails on a resource growth trend.
SOAK_SECONDS ?= 60
soak: setup
	$(PY) tests/soak/soak.py --seconds $(SOAK_SECONDS)

clean:
	rm -rf build dist relay_ext/*.so relay_ext/_core.c relay_ext/_udp.c relay_ext/_limits.c relay_ext/_flowfmt.c \
	  relay_ext/_build_info.py \
	  relay_ext/.built *.egg-info
