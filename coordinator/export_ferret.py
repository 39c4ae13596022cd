"""fedpipe-export for a Ferret run: the trained blocks and heads written into the base, saved as a plain
transformers model (save_pretrained) that loads without peft or FedPipe.

A Ferret round leaves `weights.safetensors` (each trained block as `<module>.weight`, and the heads) and
`fedpipe_ferret.json` (base, task, labels, blocks); there is no adapter form, so the export is always a
full model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from common.errors import ConfigError

ARTEFACT = "fedpipe_ferret.json"
WEIGHTS = "weights.safetensors"
RECORD = "fedpipe_export.json"


def locate_ferret(path: Path, round_: int | None) -> Path | None:
    """The Ferret artefact directory that path (a run directory or the directory itself) and --round name, or
    None when path holds no Ferret run (then it is a LoRA one, for export.locate)."""
    if (path / ARTEFACT).is_file():
        return path
    candidate = path / "rounds" / f"{round_:04d}" if round_ is not None else path / "final"
    return candidate if (candidate / ARTEFACT).is_file() else None


def export_ferret(directory: Path, base_override: str | None, out: Path, dtype_name: str) -> dict[str, Any]:
    """Write the full model into out (built beside it, then moved into place); fedpipe_export.json's content."""
    import torch
    from safetensors.torch import load_file

    from common.modeling import auto_class, resolve_model_path, write_blocks

    info = json.loads((directory / ARTEFACT).read_text())
    base = resolve_model_path(base_override or str(info["base_model"]))
    labels = list(info.get("labels") or [])
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if info["task"] == "seq-cls":
        kwargs.update(
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
        )
    model = auto_class(info["task"]).from_pretrained(base, **kwargs)
    architecture = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    tensors = load_file(str(directory / WEIGHTS))
    blocks = {name: tensors[f"{name}.weight"] for name in info["blocks"]}
    heads = {name: tensors[name] for name in info["heads"]}
    try:
        write_blocks(model, blocks, heads)
    except (AttributeError, KeyError, RuntimeError) as err:
        raise ConfigError(f"{directory} does not fit base {base}: {err}") from err
    model = model.to(getattr(torch, dtype_name)).eval()
    if {name: tuple(t.shape) for name, t in model.state_dict().items()} != architecture:
        raise ConfigError(f"writing {directory} into {base} changed its architecture; nothing written")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(str(tmp))
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(base).save_pretrained(str(tmp))
        record = {
            "source": str(directory.resolve()),
            "round": info["round"],
            "base": base,
            "mode": "ferret",
            "task": info["task"],
            "labels": labels or None,
            "blocks": len(blocks),
            "dtype": dtype_name,
            "parameters": int(sum(p.numel() for p in model.parameters())),
        }
        (tmp / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record
