# Browser client and demo page (docs/browser.md).
#
#   make browser-test     the tests in a real headless Chromium; leaves artifacts/demo.png
#   make demo-screenshot  the same, then copies the screenshot to docs/img/demo.png
#
# Chromium comes from the Debian package (.ci/setup.d/50-browser.sh, run by `make system-deps`).

.PHONY: browser-test demo-screenshot

## Run the browser tests in headless Chromium; the demo page's screenshot lands in artifacts/demo.png
browser-test: venv
	$(BIN)/python -m pytest tests/test_browser.py $(PYTEST_ARGS)

## Refresh docs/img/demo.png (the README's picture) from a fresh browser-test run
demo-screenshot: browser-test
	@test -f artifacts/demo.png || { echo "no artifacts/demo.png: is chromium installed?" >&2; exit 1; }
	mkdir -p docs/img
	cp artifacts/demo.png docs/img/demo.png
