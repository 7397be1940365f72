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

.PHONY: setup build run test test-priv lint bench deb install uninstall clean

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

bench: build
	$(PY) -m pip install --quiet matplotlib
	cd bench && ../$(PY) run.py

# The Debian package (see debian/); needs: apt-get install devscripts debhelper dh-python
deb:
	dpkg-buildpackage -us -uc -b
	mv ../rtpproxy_*.deb ../rtpproxy_*.buildinfo ../rtpproxy_*.changes . 2>/dev/null || true

# Hosts without packages: the package into $(DESTDIR)$(PREFIX), the unit, config and defaults into
# $(DESTDIR)/etc and $(DESTDIR)$(PREFIX)/lib/systemd/system. Needs python3-cffi, python3-typer and
# python3-nftables (or pip equivalents) at run time.
SITE   = $(shell $(PYTHON) -c "import sysconfig; print(sysconfig.get_path('purelib', vars={'base': '$(PREFIX)'}))")
install:
	$(PYTHON) -m pip install --quiet --no-deps --no-build-isolation --ignore-installed --root="$(DESTDIR)/" --prefix="$(PREFIX)" .
	install -D -m 644 packaging/rtpproxy.service "$(DESTDIR)$(PREFIX)/lib/systemd/system/rtpproxy.service"
	sed -i 's|/usr/bin/rtpproxy|$(PREFIX)/bin/rtpproxy|g' "$(DESTDIR)$(PREFIX)/lib/systemd/system/rtpproxy.service"
	test -e "$(DESTDIR)/etc/rtpproxy/rtpproxy.conf" || install -D -m 644 packaging/rtpproxy.conf "$(DESTDIR)/etc/rtpproxy/rtpproxy.conf"
	test -e "$(DESTDIR)/etc/default/rtpproxy" || install -D -m 644 packaging/rtpproxy.default "$(DESTDIR)/etc/default/rtpproxy"

# Removes exactly what `make install` put there (the wheel's RECORD), keeps /etc (your config).
uninstall:
	@record=$$(ls -d "$(DESTDIR)$(SITE)"/rtpproxy-*.dist-info/RECORD 2>/dev/null | head -1); \
	if [ -z "$$record" ]; then echo "rtpproxy is not installed under $(DESTDIR)$(PREFIX)"; exit 1; fi; \
	root="$(DESTDIR)$(SITE)"; \
	cut -d, -f1 "$$record" | while read -r f; do rm -f "$$root/$$f"; done; \
	find "$$root/rtpproxy" "$$(dirname $$record)" -depth -type d -empty -delete 2>/dev/null || true
	rm -f "$(DESTDIR)$(PREFIX)/lib/systemd/system/rtpproxy.service"

lint: setup
	$(PY) -m pip install --quiet ruff
	$(VENV)/bin/ruff check rtpproxy tests bench csrc/build_relay.py

clean:
	rm -rf build dist *.egg-info debian/.debhelper debian/rtpproxy debian/files debian/*.substvars debian/*.log rtpproxy/_relay*.so rtpproxy/_relay.c rtpproxy/_relay.o .pytest_cache .hypothesis
	find . -name __pycache__ -prune -exec rm -rf {} +
