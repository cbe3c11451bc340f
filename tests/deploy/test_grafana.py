"""deploy/grafana: the dashboard loads, has the operator's panels, and its PromQL parses and names
only metrics bdserve exports."""

from __future__ import annotations

import json
import re

import pytest

from deploy_helpers import DASHBOARD, METRICS, _allowed, _grafana_to_promql, _promtool, _run, _selector_names, yaml


@pytest.fixture(scope="module")
def dashboard():
    return json.loads(DASHBOARD.read_text())


def _panels(dashboard):
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def test_dashboard_loads_and_is_well_formed(dashboard):
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert "model" in variables
    # Panels lie on the 24-column grid without overlapping.
    cells = set()
    for p in dashboard["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['title']!r} overlaps another at {(x, y)}"
                cells.add((x, y))
    for p in _panels(dashboard):
        assert p["datasource"]["uid"] == "${datasource}", f"{p['title']}: use the data source variable"
        assert p["targets"], f"{p['title']} has no query"


def test_dashboard_promql_names_only_bdserve_metrics(dashboard):
    for p in _panels(dashboard):
        for t in p["targets"]:
            names = _selector_names(_grafana_to_promql(t["expr"]))
            assert names, f"{p['title']}: no metric in {t['expr']}"
            for name in names:
                assert _allowed(name), f"panel {p['title']!r} queries {name}, which bdserve does not export"
    var_query = next(v for v in dashboard["templating"]["list"] if v["name"] == "model")["definition"]
    assert re.fullmatch(r"label_values\((\w+), model\)", var_query).group(1) in METRICS


def test_dashboard_has_the_panels_an_operator_needs(dashboard):
    exprs = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in _panels(dashboard)}

    def some(pred, what):
        assert any(pred(e) for e in exprs.values()), f"no panel shows {what}"

    some(lambda e: "rate(bdserve_requests_total" in e, "the request rate")
    some(lambda e: "histogram_quantile(0.5," in e and "bdserve_request_duration_seconds_bucket" in e, "p50 latency")
    some(lambda e: "histogram_quantile(0.99," in e and "bdserve_request_duration_seconds_bucket" in e, "p99 latency")
    some(lambda e: "bdserve_batch_size" in e, "the batch size")
    some(lambda e: "bdserve_defense_duration_seconds_bucket" in e, "the defense time")
    some(lambda e: "bdserve_predictions_total" in e and "by (label)" in e, "the class distribution")
    some(lambda e: "bdserve_suspected_triggers_total" in e, "suspected triggers")


def test_dashboard_promql_parses_with_promtool(dashboard, tmp_path):
    """Prometheus' own parser on every panel query (as recording rules)."""
    exe = _promtool()
    rules = []
    for p in _panels(dashboard):
        for t in p["targets"]:
            rules.append({"record": f"dashboard:panel_{p['id']}_{t['refId']}", "expr": _grafana_to_promql(t["expr"])})
    f = tmp_path / "dashboard_rules.yml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = _run([exe, "check", "rules", str(f)])
    assert r.returncode == 0, r.stdout + r.stderr
