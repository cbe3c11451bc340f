"""deploy/prometheus: promtool (config, rules, rule unit tests), and every metric name in the alerts
is one bdserve exports."""

from __future__ import annotations

import re

from deploy_helpers import METRICS, PROM, _allowed, _promtool, _run, _selector_names, yaml


def test_promtool_check_config():
    r = _run([_promtool(), "check", "config", str(PROM / "prometheus.yml")])
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_check_rules():
    r = _run([_promtool(), "check", "rules", str(PROM / "alerts.yml")])
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_test_rules():
    """Unit tests: each alert fires on the series meant to trigger it, and not before."""
    r = _run([_promtool(), "test", "rules", str(PROM / "alerts_test.yml")], cwd=PROM)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_alerts_cover_the_issue():
    rules = yaml.safe_load((PROM / "alerts.yml").read_text())
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert {"BdserveHighErrorRate", "BdserveHighP99Latency", "BdserveSuspectedTriggers"} <= set(alerts)
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    tested = yaml.safe_load((PROM / "alerts_test.yml").read_text())
    fired = {t["alertname"] for test in tested["tests"] for t in test.get("alert_rule_test", []) if t["exp_alerts"]}
    assert fired == set(alerts), f"alerts without a firing unit test: {set(alerts) - fired}"


def test_metric_list_matches_what_bdserve_exports():
    """The list this file checks against is what bdserve.serve.metrics really registers
    (its own series; the standard process_* and python_* ones come beside them)."""
    from bdserve.serve.metrics import Metrics

    text = Metrics().render().decode()
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.M))
    assert {k: v for k, v in types.items() if k.startswith("bdserve_")} == METRICS
    assert types.get("process_resident_memory_bytes") == "gauge"


def test_selector_extraction_is_live():
    got = _selector_names('sum by (le) (rate(a_bucket{x="1"}[5m])) / on(model) group_left b + count({__name__="c"})')
    assert got == {"a_bucket", "b", "c"}
    assert not _allowed("bdserve_requests_total_bucket") and not _allowed("bdserve_request_duration_seconds")
    assert _allowed("bdserve_request_duration_seconds_bucket") and not _allowed("bdserve_made_up_total")


def test_alert_rules_name_only_bdserve_metrics():
    rules = yaml.safe_load((PROM / "alerts.yml").read_text())
    records = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    for g in rules["groups"]:
        for r in g["rules"]:
            for name in _selector_names(r["expr"]):
                assert _allowed(name, records | {"up"}), f"{r.get('alert') or r.get('record')}: unknown metric {name}"
