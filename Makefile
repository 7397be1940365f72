# rtpproxy: build, test and run from a checkout.
#   make setup   create .venv with the package (C engine built) and its test tools
#   make run     setup, then run the relay in the foreground (ARGS="..." to override flags)
#   make test    the whole suite; privileged tests (netns, nft) run when root, skip otherwise
# Debian's interpreter, so the venv sees python3-nftables from apt (what the .deb depends on too).
PYTHON ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || echo python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
PREFIX ?= /usr/local
ARGS   ?= -l 127.0.0.1 -s udp:127.0.0.1:22222 -F

.PHONY: setup build run test test-priv lint clean

$(PY):
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

setup: $(PY)
	@# a stray build by another interpreter (python csrc/build_relay.py) would shadow the abi3 one
	rm -f rtpproxy/_relay.cpython-*.so rtpproxy/_relay.c rtpproxy/_relay.o
	$(PY) -m pip install --quiet -e '.[test]'

build: setup
	$(PY) -c "from rtpproxy.relay import c_engine_available as c; import sys; w = c(); print('C engine:', w or 'built'); sys.exit(1 if w else 0)"

run: build
	$(VENV)/bin/rtpproxy run $(ARGS)

test: build
	$(PY) -m pytest -q

test-priv: build
	$(PY) -m pytest -q -m privileged

lint: setup
	$(PY) -m pip install --quiet ruff
	$(VENV)/bin/ruff check rtpproxy tests csrc/build_relay.py

clean:
	rm -rf build dist *.egg-info rtpproxy/_relay*.so rtpproxy/_relay.c rtpproxy/_relay.o .pytest_cache .hypothesis
	find . -name __pycache__ -prune -exec rm -rf {} +
