# Grafana dashboard and Prometheus rules (docs/observability.md).

.PHONY: dashboard dashboard-check rules-check

## Regenerate deploy/grafana/rtgateway.json from deploy/grafana/generate.py.
dashboard:
	$(PYTHON) deploy/grafana/generate.py

## Fail if the committed dashboard JSON is not the generator's output.
dashboard-check:
	$(PYTHON) deploy/grafana/generate.py --check

## promtool: check the rules and the example config, run the rule unit tests.
rules-check:
	promtool check rules deploy/prometheus/rules/rtgateway.yml
	promtool check config deploy/prometheus/prometheus.yml
	cd deploy/prometheus/rules && promtool test rules rtgateway_test.yml
