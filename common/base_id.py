"""How a saved adapter names its base model: by a portable id in peft's config, by a local path in ours.

peft's `base_model_name_or_path` travels with the adapter to other machines, so it holds the model's own
name (a hub id such as "sentence-transformers/all-MiniLM-L6-v2"), never a path into one machine's virtual
environment or cache. Where the base lies on the machine that trained it goes in FedPipe's own
`fedpipe_adapter.json` beside the adapter, which fedpipe-export reads first.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

METADATA = "fedpipe_adapter.json"
# FedPipe's embedded model names and the public ids of the checkpoints their packages ship.
KNOWN = {
    "embedded": "sentence-transformers/all-MiniLM-L6-v2",
    "embedded-llm": "HuggingFaceTB/SmolLM2-135M-Instruct",
}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def portable_id(base_path: str) -> str:
    """The id a saved adapter names its base by: the public id of an embedded model, a hub id from the
    model directory's config.json (`_name_or_path`) when it holds one, else the directory's name."""
    if base_path in KNOWN:
        return KNOWN[base_path]
    path = Path(base_path)
    if not path.is_dir():
        return base_path  # already a name (a hub id, or a FedPipe name)
    try:
        config: Any = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    named = config.get("_name_or_path") if isinstance(config, dict) else None
    if isinstance(named, str) and HUB_ID.match(named):
        return named
    return path.resolve().name


def local_name(base_id: str) -> str | None:
    """The FedPipe name of an embedded model from its public id ("embedded" for all-MiniLM-L6-v2), if any."""
    return next((name for name, known in KNOWN.items() if known == base_id), None)


def write_metadata(directory: Path, base_path: str) -> dict[str, str]:
    """fedpipe_adapter.json: the base's portable id and its path (or FedPipe name) on this machine."""
    record = {"base_id": portable_id(base_path), "base_path": base_path}
    (directory / METADATA).write_text(json.dumps(record, indent=2) + "\n")
    return record


def read_metadata(directory: Path) -> dict[str, str]:
    """fedpipe_adapter.json of an adapter directory; {} when it has none or it is unreadable."""
    try:
        record = json.loads((directory / METADATA).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in record.items() if isinstance(v, str)} if isinstance(record, dict) else {}
