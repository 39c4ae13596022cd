"""docs/metrics.md and the metric declarations are the same catalogue, and every name keeps the rules."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from coordinator.metrics import CoordinatorMetrics
from edge_agent.metrics import AgentMetrics

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
ROW = re.compile(r"^\| `(fedpipe_[a-z0-9_]+)` \| (\w+) \| ([^|]+) \|")
SUFFIX = {"counter": "_total", "info": "_info", "gauge": "", "histogram": ""}


def documented(section: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    """name -> (type, labels) from the table under the given '## ' heading."""
    text = DOC.read_text()
    start = text.index(f"## {section}")
    end = text.find("\n## ", start + 1)
    rows: dict[str, tuple[str, tuple[str, ...]]] = {}
    for line in text[start : end if end > 0 else None].splitlines():
        match = ROW.match(line)
        if match:
            labels = tuple(re.findall(r"`(\w+)`", match.group(3)))
            rows[match.group(1)] = (match.group(2), labels)
    return rows


def declared(registry: CollectorRegistry) -> dict[str, tuple[str, tuple[str, ...]]]:
    """name as scraped -> (type, labels) of every metric declared on a registry (with or without samples)."""
    rows: dict[str, tuple[str, tuple[str, ...]]] = {}
    for collector in registry._collector_to_names:
        assert isinstance(collector, MetricWrapperBase)
        kind: str = getattr(collector, "_type")  # noqa: B009  (not in prometheus_client's public API)
        rows[getattr(collector, "_name") + SUFFIX[kind]] = (kind, tuple(getattr(collector, "_labelnames")))  # noqa: B009
    return rows


@pytest.mark.parametrize(
    ("section", "make"),
    [("Coordinator", lambda: CoordinatorMetrics().registry), ("Agent", lambda: AgentMetrics().registry)],
)
def test_the_page_lists_exactly_the_declared_metrics(section: str, make: Callable[[], CollectorRegistry]) -> None:
    # Prepare
    registry = make()

    # Execute
    rows = documented(section)

    # Assert: same names, types and label names
    assert rows == declared(registry)


def test_names_follow_the_rules() -> None:
    # Prepare
    rows = {**documented("Coordinator"), **documented("Agent")}

    # Execute
    bad_labels = {name: labels for name, (_, labels) in rows.items() if {"round", "plan_id", "step"} & set(labels)}
    counters_without_total = [n for n, (kind, _) in rows.items() if kind == "counter" and not n.endswith("_total")]
    edge_with_agent_label = [n for n, (_, labels) in rows.items() if n.startswith("fedpipe_edge") and labels]

    # Assert: bounded labels only, units in names, agents' own metrics identify the agent by scrape labels
    assert bad_labels == {}
    assert counters_without_total == []
    assert edge_with_agent_label == ["fedpipe_edge_rpc_retries_total"]  # its label is the RPC method
    assert all(n.startswith("fedpipe_") for n in rows)
    assert all(n.endswith(("_seconds", "_bytes")) for n, (kind, _) in rows.items() if kind == "histogram")
