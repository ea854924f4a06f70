# cachenode: two commands matter. `make run` starts a local 3-node cluster;
# `make test` runs the test suite. Both install everything first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
NATIVE := $(VENV)/.native
PROTO  := proto/cachenode/v1/cache.proto
GEN    := cachenode/v1/cache_pb2.py
RUN_DIR ?= .cluster
NODES  ?= 3
SHARDS ?= 16

.PHONY: install proto run test test-fast check jepsen bench bench-vs clean system-deps net-deps server-deps native clean-native

install: $(STAMP) $(NATIVE)

TOOLS := $(VENV)/.tools

# The codegen tools come first: the package includes the generated stubs.
$(TOOLS):
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet grpcio-tools mypy-protobuf
	touch $(TOOLS)

$(STAMP): pyproject.toml $(GEN)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Stubs are generated, never edited, never committed (cachenode/v1 is ignored).
proto: $(TOOLS)
	rm -f $(GEN)
	$(MAKE) $(GEN)

$(GEN): $(PROTO) $(TOOLS)
	mkdir -p cachenode/v1
	PATH=$(CURDIR)/$(BIN):$$PATH $(PY) -m grpc_tools.protoc -Iproto \
	  --python_out=. --grpc_python_out=. --mypy_out=. --mypy_grpc_out=. $(PROTO)
	touch cachenode/v1/__init__.py

# The hot modules compiled with mypyc (cachenode/_compiled.py lists them),
# 90-145 s on 2 cores, nearly all of it gcc on ONE C file: mypyc puts every
# module in one library so calls between them are direct (two libraries built
# in parallel took 59-71 s but ran mset100 and linearizable gets about 10 %
# slower, session 30).  Without a C compiler (and not root to install one)
# everything runs interpreted, about 10 % more CPU per write.
# Rebuilt when any module of the package changes: mypyc compiles each module
# against the types of everything it imports.
NATIVE_SRC := $(wildcard cachenode/*.py cachenode/*/*.py)

native: $(NATIVE)

$(NATIVE): $(STAMP) $(NATIVE_SRC)
	@# What the build needs and the machine lacks, in one apt-get when root:
	@# gcc, and Python's C headers (Debian's own python3.X ships them as python3.X-dev).
	@pkgs=""; \
	command -v $${CC:-cc} >/dev/null 2>&1 || pkgs=" gcc libc6-dev"; \
	$(PY) -c "import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))" \
	  || pkgs="$$pkgs python$$($(PY) -c "import sys; print('%d.%d' % sys.version_info[:2])")-dev"; \
	if [ -n "$$pkgs" ] && [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing$$pkgs (to compile cachenode's hot modules with mypyc)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$pkgs >/dev/null) \
	  || echo "warning: could not install$$pkgs"; \
	fi
	@if CACHENODE_NATIVE_CHECK=0 $(PY) -m cachenode.native build; then \
	  echo compiled > $(NATIVE); \
	else \
	  CACHENODE_NATIVE_CHECK=0 $(PY) -m cachenode.native clean >/dev/null; \
	  echo interpreted > $(NATIVE); \
	  echo "warning: mypyc could not compile cachenode (see above); it runs interpreted. Fix the cause, then: make native"; \
	fi

clean-native:
	find cachenode -name '*.so' -delete
	rm -f $(NATIVE)

# What the tests need from Debian and the machine lacks, when root: one
# apt-get per purpose, so a package the distribution lacks costs only its
# own group.  Services are not started by the install (a policy-rc.d that
# says no, while it runs): nothing may listen on a default port behind a
# test's back.  $(call apt_install,PRESENT-CHECK,PACKAGES,WHAT-IF-MISSING)
define apt_install
	@if ! ( $(1) ) >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing $(2)"; \
	    created=""; \
	    if [ ! -e /usr/sbin/policy-rc.d ]; then \
	      printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && created=1; \
	    fi; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2) >/dev/null) \
	      || echo "warning: could not install $(2); $(3)"; \
	    if [ -n "$$created" ]; then rm -f /usr/sbin/policy-rc.d; fi; \
	  else \
	    echo "warning: $(2) missing (install as root); $(3)"; \
	  fi; \
	fi
endef

# iptables + iproute2: jepsen-lite's network faults (namespaces + drops).
net-deps:
	$(call apt_install,command -v iptables && command -v ip,iptables iproute2,jepsen-lite falls back to the transport fault filter)

# etcd + Redis: the test that drives them with the benchmark's load generator
# (make bench-vs installs them too).
server-deps:
	$(call apt_install,command -v etcd && command -v redis-server,etcd-server redis-server,the etcd/redis benchmark test is skipped)

system-deps: net-deps server-deps

run: install
	$(BIN)/cachectl local up --nodes $(NODES) --shards $(SHARDS) --dir $(RUN_DIR) --foreground

# Two pytest-xdist workers, one test file each at a time (conftest.py: the
# suite mostly waits, so 2 cores run two files side by side; longest first).
# TEST_WORKERS=0 runs everything in this one process.
TEST_WORKERS ?= 2
PYTEST_PARALLEL := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

test: install system-deps
	CACHENODE_EXPECT_NATIVE=$$(cat $(NATIVE)) $(BIN)/pytest -q -p no:cacheprovider $(PYTEST_PARALLEL)

test-fast: install
	$(BIN)/pytest -q -m "not cluster and not jepsen" $(PYTEST_PARALLEL)

check: install
	$(BIN)/ruff check cachenode cli jepsen-lite tests
	$(BIN)/mypy cachenode

jepsen: install net-deps
	$(BIN)/jepsen-lite matrix --out jepsen-results --doc docs/jepsen.md

bench: install
	$(BIN)/cachectl bench --out bench/results

bench-vs: install
	$(BIN)/cachectl bench --vs etcd,redis --out bench/results

clean: clean-native
	rm -rf build $(VENV) cachenode/v1 .pytest_cache .mypy_cache .ruff_cache $(RUN_DIR) *.egg-info
