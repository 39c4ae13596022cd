"""Data loading, held-out split and non-IID shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.data import (
    DataSource,
    Example,
    embedded_split,
    load_examples,
    shard_indices,
    split_heldout,
    take_shard,
    train_val_split,
)
from common.errors import ConfigError


def test_csv_and_jsonl_load_and_skip_other_labels(tmp_path: Path) -> None:
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("txt,lab\nhello,pos\nmeh,neutral\nbad,neg\n")
    jsonl_path = tmp_path / "d.jsonl"
    jsonl_path.write_text("\n".join(json.dumps({"txt": t, "lab": lab}) for t, lab in [("a", "neg"), ("b", "pos")]))
    source = DataSource(str(csv_path), "txt", "lab", ("neg", "pos"))
    assert load_examples(source) == [Example("hello", 1), Example("bad", 0)]
    assert load_examples(DataSource(str(jsonl_path), "txt", "lab", ("neg", "pos"))) == [
        Example("a", 0),
        Example("b", 1),
    ]


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [
        ("a,b\n1,2\n", ".csv", "column 'txt' not in"),
        ("{not json\n", ".jsonl", "line 1 is not JSON"),
        ("txt,lab\nx,other\n", ".csv", "no row of"),
        ("txt,lab\n", ".txt", "must end in .csv or .jsonl"),
    ],
)
def test_bad_data_is_named(tmp_path: Path, content: str, suffix: str, message: str) -> None:
    path = tmp_path / f"d{suffix}"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_examples(DataSource(str(path), "txt", "lab", ("neg", "pos")))


def test_embedded_split_reserves_1000_disjoint_tweets() -> None:
    pool, held = embedded_split(DataSource("embedded"))
    assert len(held) == 1000
    assert len(pool) + len(held) == 16186 + 6954  # negatives + positives of the corpus
    assert embedded_split(DataSource("embedded"))[1] == held  # the same on every call and host


@settings(max_examples=40, deadline=None)
@given(
    labels=st.lists(st.integers(0, 2), min_size=10, max_size=200),
    shards=st.integers(1, 6),
    alpha=st.one_of(st.none(), st.floats(0.05, 10.0)),
    seed=st.integers(0, 1000),
)
def test_shards_partition_every_index_exactly_once(
    labels: list[int], shards: int, alpha: float | None, seed: int
) -> None:
    parts = shard_indices(labels, shards, 3, alpha, seed)
    flat = sorted(i for part in parts for i in part)
    assert flat == list(range(len(labels)))
    assert parts == shard_indices(labels, shards, 3, alpha, seed)  # deterministic


def test_small_alpha_skews_labels_more_than_iid() -> None:
    labels = [i % 2 for i in range(2000)]

    def worst_share(alpha: float | None) -> float:
        parts = shard_indices(labels, 4, 2, alpha, seed=1)
        return max(abs(sum(labels[i] for i in part) / max(len(part), 1) - 0.5) for part in parts)

    assert worst_share(None) < 0.05
    assert worst_share(0.1) > 0.3


def test_take_shard_caps_and_rejects_bad_index() -> None:
    pool = [Example(str(i), i % 2) for i in range(100)]
    assert len(take_shard(pool, 0, 2, 2, None, 10, seed=0)) == 10
    with pytest.raises(ConfigError, match="outside"):
        take_shard(pool, 2, 2, 2, None, 0, seed=0)


def test_heldout_and_train_val_splits() -> None:
    examples = [Example(str(i), i % 2) for i in range(50)]
    pool, held = split_heldout(examples, 10)
    assert len(held) == 10 and not {e.text for e in pool} & {e.text for e in held}
    train, val = train_val_split(examples, 0.1, seed=3)
    assert len(val) == 5 and len(train) == 45
    with pytest.raises(ConfigError):
        train_val_split(examples[:1], 0.5, seed=0)
