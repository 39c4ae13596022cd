"""The Prometheus configs and rules pass promtool (and the alert unit tests), the alerts fire when they
should, and the dashboard and alerts use only metrics from docs/metrics.md."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from deploy_files import (
    DEPLOY,
    PROMETHEUS,
    alert_rules,
    compose,
    dashboard,
    dashboard_panels,
    dashboard_queries,
    documented_metrics,
    load_one,
    metric_names,
    run,
    undocumented,
)

pytestmark = pytest.mark.integration


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def promtool(prometheus_tools: tuple[Path, Path]) -> str:
    """promtool from Debian's `prometheus` package (conftest installs it when it is missing)."""
    return str(prometheus_tools[1])


# ------------------------------------------------------------------------------------------- Prometheus


@pytest.mark.parametrize("name", ["prometheus.yml", "prometheus-compose.yml"])
def test_prometheus_configs_pass_promtool(promtool: str, name: str) -> None:
    """promtool accepts each scrape configuration and the rule file it loads."""
    # Execute
    output = run([promtool, "check", "config", str(PROMETHEUS / name)])

    # Assert
    assert "SUCCESS" in output


def test_alert_rules_pass_promtool(promtool: str) -> None:
    """promtool accepts alerts.yml (PromQL, durations, templates)."""
    # Execute
    output = run([promtool, "check", "rules", str(PROMETHEUS / "alerts.yml")])

    # Assert
    assert "SUCCESS" in output


def test_alerts_fire_when_they_should_and_only_then(promtool: str) -> None:
    """alerts_test.yml's cases pass: a stalled round fires but a finished run does not, a first rejection fires, ..."""
    # Execute
    output = run([promtool, "test", "rules", str(PROMETHEUS / "alerts_test.yml")])

    # Assert
    assert "SUCCESS" in output


def test_alerts_are_labelled_and_explained() -> None:
    """Every alert has a severity, a summary and a description; the per-agent ones name the agent."""
    # Prepare
    rules = alert_rules()

    # Execute
    names = {rule["alert"] for rule in rules}

    # Assert
    assert names >= {
        "FedPipeAgentDown",
        "FedPipeRoundStalled",
        "FedPipeAccuracyRegression",
        "FedPipeUpdatesRejected",
        "FedPipeCoordinatorDown",
    }
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        if "agent" in rule["alert"].lower():
            assert "$labels.agent" in rule["annotations"]["summary"], rule["alert"]


def test_dashboard_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    """Every dashboard query parses, checked by promtool as recording rules (Grafana variables filled in)."""
    # Prepare
    rules = [
        {
            "record": f"dashboard:query_{i}:check",
            "expr": re.sub(r"\$__\w+", "5m", expr).replace("$agent", ".*"),
        }
        for i, (_, expr) in enumerate(dashboard_queries())
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))

    # Execute
    output = run([promtool, "check", "rules", str(path)])

    # Assert
    assert f"SUCCESS: {len(rules)} rules found" in output


# ----------------------------------------------------------------------------------- metrics and Grafana


def test_deploy_files_use_only_documented_metrics() -> None:
    """Every fedpipe_* name in the dashboard's queries, in alerts.yml (expressions and texts) and in the
    Prometheus configs is in docs/metrics.md (histograms by their _bucket/_sum/_count series)."""
    # Prepare
    documented = documented_metrics()
    used: dict[str, set[str]] = {"dashboard": set(), "alerts.yml": set(), "prometheus configs": set()}

    # Execute
    for _, expr in dashboard_queries():
        used["dashboard"] |= metric_names(expr)
    for variable in dashboard()["templating"]["list"]:
        used["dashboard"] |= metric_names(json.dumps(variable.get("query", "")))
    for rule in alert_rules():
        used["alerts.yml"] |= metric_names(rule["expr"]) | metric_names(json.dumps(rule["annotations"]))
    for name in ("prometheus.yml", "prometheus-compose.yml"):
        used["prometheus configs"] |= metric_names(json.dumps(load_one(PROMETHEUS / name)))

    # Assert
    assert len(used["dashboard"]) > 20 and len(used["alerts.yml"]) > 10
    for where, names in used.items():
        assert not undocumented(names, documented), (
            f"{where}: not in docs/metrics.md: {undocumented(names, documented)}"
        )


def test_dashboard_is_a_sound_grafana_dashboard() -> None:
    """Unique panel ids, a data source variable every query uses, the agent variable, panels inside the grid,
    and the views the operators need (straggler bar gauge, accuracy, memory headroom, RPC latency, ...)."""
    # Prepare
    data = dashboard()
    panels = dashboard_panels()
    variables = {variable["name"]: variable for variable in data["templating"]["list"]}

    # Execute
    ids = [panel["id"] for panel in panels]
    exprs = " ".join(expr for _, expr in dashboard_queries())
    by_type: dict[str, list[str]] = {}
    for panel in panels:
        by_type.setdefault(panel["type"], []).append(" ".join(target["expr"] for target in panel.get("targets", [])))

    # Assert
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    assert data["schemaVersion"] >= 36 and data["uid"] == "fedpipe"
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert variables["agent"]["query"]["query"] == "label_values(fedpipe_agent_up, agent)"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            assert panel["targets"], panel["title"]
            refs = [target["refId"] for target in panel["targets"]]
            assert len(refs) == len(set(refs)), panel["title"]
            assert all(target["datasource"]["uid"] == "${DS_PROMETHEUS}" for target in panel["targets"])
    assert any("fedpipe_agent_train_seconds" in text for text in by_type["bargauge"])
    assert any("fedpipe_rounds_completed_total" in text for text in by_type["stat"])
    assert any("fedpipe_current_round" in text for text in by_type["stat"])
    for needle in [
        'fedpipe_global_accuracy{source="heldout"}',
        "fedpipe_round_duration_seconds_bucket",
        "fedpipe_agent_flops_per_second",
        "fedpipe_plan_batch_size",
        "fedpipe_plan_max_rank",
        "1 - fedpipe_agent_peak_memory_bytes",
        "fedpipe_plan_predicted_memory_bytes",
        "sum by (method, le) (rate(fedpipe_rpc_duration_seconds_bucket",
        "sum by (method, code)",
        "fedpipe_upload_bytes_total",
        "fedpipe_download_bytes_total",
        "sum by (reason) (increase(fedpipe_updates_rejected_total",
        "fedpipe_stragglers_total",
        "fedpipe_agent_deaths_total",
    ]:
        assert needle in exprs, needle


def test_grafana_provisioning_matches_compose() -> None:
    """The provisioned data source is the compose Prometheus; the dashboard provider reads where compose mounts
    the dashboard."""
    # Prepare
    services = compose()["services"]
    datasource = load_one(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")["datasources"][0]
    provider = load_one(DEPLOY / "grafana" / "provisioning" / "dashboards" / "fedpipe.yml")["providers"][0]

    # Execute
    mounts = dict(volume.split(":")[:2] for volume in services["grafana"]["volumes"])

    # Assert
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    assert mounts["./grafana/fedpipe.json"] == f"{provider['options']['path']}/fedpipe.json"
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    assert {v.split(":")[1] for v in services["prometheus"]["volumes"]} >= {
        "/etc/prometheus/prometheus.yml",
        "/etc/prometheus/alerts.yml",
    }
