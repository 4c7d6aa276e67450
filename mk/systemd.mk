# The systemd appliance: deploy/install.sh, deploy/systemd/ (docs/systemd.md).

.PHONY: install uninstall verify-systemd

# make install WHEELS=DIR installs offline from `deploy/install.sh wheels DIR`.
WHEELS ?=

## Install as a systemd service (root): venv in /opt/rtgateway, unit, sysctl, /etc/default.
install:
	deploy/install.sh install $(if $(WHEELS),--wheels $(WHEELS))

## Stop and remove the service; /etc/default/rtgateway stays.
uninstall:
	deploy/install.sh uninstall

## Lint the unit: `systemd-analyze verify` silent, exposure score 2.0 or lower.
verify-systemd: venv
	@tmp=$$(mktemp -d); \
	sed 's|^ExecStart=/opt/rtgateway/bin/|ExecStart=$(abspath $(BIN))/|' \
		deploy/systemd/rtgateway.service >"$$tmp/rtgateway.service"; \
	out=$$(systemd-analyze verify "$$tmp/rtgateway.service" 2>&1); rc=$$?; rm -rf "$$tmp"; \
	if [ $$rc -ne 0 ] || [ -n "$$out" ]; then echo "$$out"; exit 1; fi; \
	echo "systemd-analyze verify: clean"
	@out=$$(systemd-analyze security --offline=yes --threshold=20 \
		deploy/systemd/rtgateway.service); rc=$$?; echo "$$out" | tail -n 1; exit $$rc
	$(BIN)/python -m pytest -q -m 'not system' tests/test_systemd.py
