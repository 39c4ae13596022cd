"""The agent's local data: its shard of the configured source, split into train and validation."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from common.data import (
    SEQ_CLS,
    DataSource,
    Example,
    embedded_split,
    label_counts,
    load_examples,
    take_shard,
    train_val_split,
)
from edge_agent.config import DataSection

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalData:
    """Training and validation examples that never leave this agent."""

    train: list[Example]
    val: list[Example]


def load_local(section: DataSection, task: str = SEQ_CLS) -> LocalData:
    """Read the source, take this agent's shard, and split it; the embedded corpus excludes held-out tweets."""
    source = DataSource(
        section.path,
        section.text_column,
        section.label_column,
        tuple(section.labels),
        task,
        section.prompt_column,
        section.response_column,
    )
    pool = embedded_split(source)[0] if section.path == "embedded" else load_examples(source)
    index, count = section.shard_index()
    shard = take_shard(pool, index, count, len(section.labels), section.label_skew, section.max_samples, section.seed)
    train, val = train_val_split(shard, section.val_fraction, section.seed + index)
    log.info(
        "data: shard %s of %s: %d train %s, %d validation",
        section.shard,
        section.path,
        len(train),
        label_counts(train, source.labels),
        len(val),
    )
    return LocalData(train=train, val=val)
