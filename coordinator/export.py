"""fedpipe-export: a run's global adapter as a plain peft adapter, or merged into a standalone model.

    fedpipe-export RUN_DIR_OR_ADAPTER_DIR --out DIR [--merge] [--round N] [--base PATH] [--dtype D]

Without --merge, --out gets the adapter (adapter_config.json naming the base actually used) and the base's
tokenizer: load it with peft as usual. With --merge, the base is loaded in full precision, the adapter is
applied with peft and merged into the weights (LoRA products added, trained heads put in place), and --out
holds a transformers model of exactly the base architecture that loads with AutoModelFor*.from_pretrained
alone. Either way --out also gets fedpipe_export.json: what was exported from what.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common import logs
from common.base_id import KNOWN, METADATA, local_name, read_metadata, write_metadata
from common.errors import ConfigError, FedPipeError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("fedpipe.export")

PROG = "fedpipe-export"
EMBEDDED = "embedded"  # common.modeling.EMBEDDED, repeated so that importing this module stays cheap
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
RECORD = "fedpipe_export.json"
PEFT_PREFIX = "base_model.model."
# peft task_type -> the transformers Auto class that builds the base for it
AUTO_CLASSES = {"SEQ_CLS": "AutoModelForSequenceClassification", "CAUSAL_LM": "AutoModelForCausalLM"}
DTYPES = ("float32", "float16", "bfloat16")
SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
# files any one of which means the base directory carries a tokenizer
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)


@dataclass(frozen=True)
class Source:
    """The adapter to export and what its run directory says about it."""

    adapter_dir: Path
    weights: Path  # adapter_model.safetensors (or .bin)
    config: Mapping[str, Any]  # adapter_config.json
    task_type: str  # a key of AUTO_CLASSES
    run_dir: Path | None  # the run the adapter belongs to, when it lies in one
    round: int | None
    labels: tuple[str, ...] | None  # class names from the run's config.json
    tensors: Mapping[str, tuple[str, tuple[int, ...]]]  # safetensors header: key -> (dtype, shape); {} for .bin

    def head_tensors(self) -> dict[str, tuple[int, ...]]:
        """Tensors the adapter holds in full (peft modules_to_save), under base-model parameter names."""
        heads: dict[str, tuple[int, ...]] = {}
        for key, (_, shape) in self.tensors.items():
            if ".lora_" in key or not key.startswith(PEFT_PREFIX):
                continue
            name = key[len(PEFT_PREFIX) :].replace(".modules_to_save.default.", ".")
            heads[name] = shape
        return heads

    def adapter_dtype(self) -> str | None:
        """dtype of the stored LoRA tensors, e.g. "float32"; None when not known (.bin)."""
        for key, (dtype, _) in self.tensors.items():
            if ".lora_" in key:
                return SAFETENSORS_DTYPES.get(dtype, dtype)
        return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path} is not readable JSON: {err}") from err


def _rounds(run_dir: Path) -> list[int]:
    """Round numbers with an adapter under run_dir/rounds/."""
    rounds_dir = run_dir / "rounds"
    if not rounds_dir.is_dir():
        return []
    return sorted(int(d.name) for d in rounds_dir.iterdir() if d.name.isdigit() and (d / ADAPTER_CONFIG).is_file())


def _run_dir_of(adapter_dir: Path) -> Path | None:
    """The run directory holding adapter_dir as final/ or rounds/NNNN/, if it is one."""
    if adapter_dir.name == "final":
        candidate = adapter_dir.parent
    elif adapter_dir.parent.name == "rounds" and adapter_dir.name.isdigit():
        candidate = adapter_dir.parent.parent
    else:
        return None
    return candidate if (candidate / "config.json").is_file() or (candidate / "summary.json").is_file() else None


def _run_labels(run_dir: Path | None) -> tuple[str, ...] | None:
    """The coordinator config's labels (class names in index order), when the run has a config.json."""
    if run_dir is None or not (run_dir / "config.json").is_file():
        return None
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError) as err:
        log.warning("%s unreadable (%s): label names unknown", run_dir / "config.json", err)
        return None
    labels = config.get("labels") if isinstance(config, dict) else None
    if isinstance(labels, list) and labels and all(isinstance(label, str) for label in labels):
        return tuple(labels)
    return None


def locate(path: Path, round_: int | None = None) -> Source:
    """The adapter that path (a run directory or an adapter directory) and --round name; ConfigError if none."""
    if not path.exists():
        raise ConfigError(f"{path} does not exist: give a run directory or a peft adapter directory")
    if not path.is_dir():
        raise ConfigError(f"{path} is not a directory: give a run directory or a peft adapter directory")
    if (path / ADAPTER_CONFIG).is_file():
        if round_ is not None:
            raise ConfigError(f"--round {round_}: {path} is an adapter directory; --round needs a run directory")
        adapter_dir = path
    elif (path / "final").is_dir() or (path / "rounds").is_dir():
        available = _rounds(path)
        if round_ is not None:
            adapter_dir = path / "rounds" / f"{round_:04d}"
            if not adapter_dir.is_dir():
                raise ConfigError(
                    f"--round {round_}: {path} has no {adapter_dir.name}/ under rounds/ (rounds: {available})"
                )
        else:
            adapter_dir = path / "final"
            if not adapter_dir.is_dir():
                raise ConfigError(
                    f"{path} has no final/ adapter (run not finished?); export a round with --round N "
                    f"(rounds: {available})"
                )
    else:
        raise ConfigError(
            f"{path} is neither a peft adapter directory (no {ADAPTER_CONFIG}) "
            "nor a run directory (no final/ or rounds/)"
        )
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise ConfigError(f"{adapter_dir} has no {ADAPTER_CONFIG}: not a peft adapter directory")
    config = _read_json(adapter_dir / ADAPTER_CONFIG)
    if not isinstance(config, dict):
        raise ConfigError(f"{adapter_dir / ADAPTER_CONFIG} must hold a JSON object")
    task_type = config.get("task_type")
    if task_type not in AUTO_CLASSES:
        raise ConfigError(
            f"{adapter_dir / ADAPTER_CONFIG}: task_type {task_type!r} is not one fedpipe-export knows "
            f"({', '.join(AUTO_CLASSES)})"
        )
    weights = next((adapter_dir / name for name in ADAPTER_WEIGHTS if (adapter_dir / name).is_file()), None)
    if weights is None:
        raise ConfigError(f"{adapter_dir} has no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    metadata: dict[str, str] = {}
    if weights.suffix == ".safetensors":
        from coordinator.rundir import tensor_header  # torch comes with it: not at import time

        tensors, metadata = tensor_header(weights)
    found_round = round_
    if metadata.get("fedpipe_round", "").isdigit():
        found_round = int(metadata["fedpipe_round"])
    elif found_round is None and adapter_dir.parent.name == "rounds" and adapter_dir.name.isdigit():
        found_round = int(adapter_dir.name)
    run_dir = _run_dir_of(adapter_dir)
    return Source(
        adapter_dir=adapter_dir,
        weights=weights,
        config=config,
        task_type=str(task_type),
        run_dir=run_dir,
        round=found_round,
        labels=_run_labels(run_dir),
        tensors=tensors,
    )


def given_base(source: Source, override: str | None) -> tuple[str | None, str]:
    """(the base as named, where that name comes from): --base, else the local path in the adapter's
    fedpipe_adapter.json, else its base_model_name_or_path (an embedded model's public id as FedPipe's name)."""
    if override is not None:
        return override, "--base"
    recorded = read_metadata(source.adapter_dir).get("base_path")
    if recorded:
        return recorded, f"base_path in {source.adapter_dir / METADATA}"
    given = source.config.get("base_model_name_or_path")
    origin = f"base_model_name_or_path in {source.adapter_dir / ADAPTER_CONFIG}"
    return (local_name(given) or given if isinstance(given, str) else None), origin


def resolve_base(source: Source, override: str | None) -> str:
    """The base model directory the adapter names (given_base); names such as "embedded" (MiniLM) or
    "embedded-llm" resolve as everywhere in FedPipe (common.modeling.resolve_model_path)."""
    given, origin = given_base(source, override)
    if not isinstance(given, str) or not given:
        raise ConfigError(f"{origin} names no base model: give the base model directory with --base")
    path = Path(given).expanduser()
    if (path / "config.json").is_file():
        return str(path.resolve())
    if not path.exists() and os.sep not in given:  # perhaps a name FedPipe knows
        from common.modeling import resolve_model_path

        try:
            return str(Path(resolve_model_path(given)).resolve())
        except ConfigError as err:
            if given == EMBEDDED or given.startswith(EMBEDDED + "-"):
                raise ConfigError(f"base model not found: {given} ({origin}): {err}") from err
    raise ConfigError(
        f"base model not found: {given} ({origin}) is not a model directory (no config.json); "
        "give the base model directory with --base"
    )


def _num_labels_from_head(heads: Mapping[str, tuple[int, ...]]) -> int | None:
    """Classes the adapter's trained head outputs: rows of its last projection (x.weight, x.out_proj.weight)."""
    matrices = {name: shape for name, shape in heads.items() if name.endswith(".weight") and len(shape) == 2}
    for name, shape in matrices.items():
        if name.endswith("out_proj.weight"):
            return shape[0]  # RoBERTa-style head: dense then out_proj
    for name, shape in matrices.items():
        if name.count(".") == 1:  # "classifier.weight", "score.weight"
            return shape[0]
    return None


def _seq_cls_kwargs(source: Source) -> dict[str, Any]:
    """num_labels, id2label and label2id for the base: the run's labels, else the saved head's shape."""
    heads = source.head_tensors()
    from_head = _num_labels_from_head(heads)
    if source.labels is not None:
        if from_head is not None and from_head != len(source.labels):
            raise ConfigError(
                f"{source.run_dir}/config.json names {len(source.labels)} labels but the adapter's head in "
                f"{source.weights} has {from_head} outputs"
            )
        labels = source.labels
        return {
            "num_labels": len(labels),
            "id2label": dict(enumerate(labels)),
            "label2id": {label: i for i, label in enumerate(labels)},
        }
    if from_head is not None:
        log.info("no run config.json with labels beside the adapter: %d classes from the saved head", from_head)
        return {"num_labels": from_head}
    return {}  # the base's own config decides; a head the base lacks is caught after loading


def _reversible(conversion: Any) -> bool:
    """Whether a transformers weight conversion can be undone when saving."""
    try:
        conversion.reverse_transform()
    except NotImplementedError:
        return False
    return True


def _drop_quantization(model: Any, dtype: torch.dtype) -> Any:
    """The model with any quantization undone and quantization_config gone from its config."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", "?")
        method = getattr(method, "value", method)  # a QuantizationMethod enum
        try:
            model = model.dequantize(dtype=dtype)
        except (NotImplementedError, ValueError) as err:
            if getattr(quantizer.quantization_config, "dequantize", False):
                return _forget_quantizer(model)  # e.g. GGUF: unpacked to plain weights while loading
            raise ConfigError(
                f"the base is quantized ({method}) and cannot be dequantized ({err}): give a full-precision copy "
                "with --base"
            ) from err
        log.info("dequantized the %s base to %s", method, dtype)
        # transformers 5 remembers the load-time conversions (here: the quantized-format deserializer) to redo
        # them in reverse on save_pretrained; after dequantizing there is nothing to re-quantize, and the
        # deserializer has no reverse (save_pretrained raises NotImplementedError), so drop those.
        conversions = getattr(model, "_weight_conversions", None)
        if conversions:
            model._weight_conversions = [c for c in conversions if _reversible(c)]
    return _forget_quantizer(model)


def _forget_quantizer(model: Any) -> Any:
    """The model without quantization_config and quantizer, which would make save_pretrained refuse or
    label plain weights as quantized."""
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    for attribute in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attribute):
            delattr(model, attribute)
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    return model


def _load_base(source: Source, base: str, dtype: torch.dtype) -> Any:
    """The base in dtype with the Auto class of the adapter's task; ConfigError if weights would stay random."""
    import transformers

    auto = getattr(transformers, AUTO_CLASSES[source.task_type])
    kwargs: dict[str, Any] = {"dtype": dtype}
    heads = source.head_tensors()
    if source.task_type == "SEQ_CLS":
        kwargs.update(_seq_cls_kwargs(source))
        if heads:
            kwargs["ignore_mismatched_sizes"] = True  # a head of another size in the base is replaced anyway
    try:
        model, info = auto.from_pretrained(base, output_loading_info=True, **kwargs)
    except (OSError, ValueError, RuntimeError) as err:
        raise ConfigError(f"base model {base} does not load as {auto.__name__}: {err}") from err
    absent = {key if isinstance(key, str) else key[0] for key in info.get("missing_keys", ())}
    absent |= {key if isinstance(key, str) else key[0] for key in info.get("mismatched_keys", ())}
    uncovered = sorted(absent - set(heads))
    if uncovered:
        raise ConfigError(
            f"base model {base} lacks {uncovered[:4]} and the adapter does not carry them: the exported model "
            "would hold random weights there"
        )
    model = _drop_quantization(model, dtype)
    model.eval()
    return model


def _save_tokenizer(base: str, out: Path) -> bool:
    """Copy the base's tokenizer into out; False (with a warning) when the base directory has none."""
    if not any((Path(base) / name).is_file() for name in TOKENIZER_FILES):
        log.warning("%s has no tokenizer files: none written to the export", base)
        return False
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(base).save_pretrained(str(out))
    return True


def _merge(source: Source, base: str, dtype_name: str, out: Path) -> dict[str, Any]:
    """Load base + adapter, merge, save a plain transformers model into out; facts for the record."""
    import torch
    from peft import PeftModel

    dtype = getattr(torch, dtype_name)
    log.info("loading %s in %s as %s", base, dtype_name, AUTO_CLASSES[source.task_type])
    model = _load_base(source, base, dtype)
    architecture = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    parameters = sum(p.numel() for p in model.parameters())
    log.info("applying %s and merging", source.adapter_dir)
    try:
        peft_model = PeftModel.from_pretrained(model, str(source.adapter_dir))
    except (ValueError, RuntimeError, KeyError) as err:
        raise ConfigError(f"adapter {source.adapter_dir} does not fit base {base}: {err}") from err
    merged = peft_model.merge_and_unload(safe_merge=True)
    merged = _drop_quantization(merged, dtype)
    now = {name: tuple(tensor.shape) for name, tensor in merged.state_dict().items()}
    if now != architecture or sum(p.numel() for p in merged.parameters()) != parameters:
        extra = sorted(set(now) - set(architecture))[:4]
        raise FedPipeError(f"merging left the model unlike its base (e.g. {extra}); nothing written")
    merged.save_pretrained(str(out))  # transformers 5 writes safetensors only
    tokenizer = _save_tokenizer(base, out)
    return {"parameters": int(parameters), "tokenizer": tokenizer, "dtype": dtype_name}


def _copy_adapter(source: Source, base: str, out: Path, override: str | None) -> dict[str, Any]:
    """The adapter as is, its config naming the base by the portable id of the base actually used, the local
    path in fedpipe_adapter.json, plus the base's tokenizer."""
    shutil.copyfile(source.weights, out / source.weights.name)
    given = given_base(source, override)[0]
    named = given if given in KNOWN else base  # "embedded" stays "embedded", a directory is named by its path
    config = {**source.config, "base_model_name_or_path": write_metadata(out, named)["base_id"]}
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    tokenizer = _save_tokenizer(base, out)
    return {"tokenizer": tokenizer, "dtype": source.adapter_dtype()}


def _check_out(out: Path, source: Source, base: str) -> None:
    """--out must be new, empty or an earlier export, and neither the adapter nor the base."""
    resolved = out.resolve()
    if resolved in (source.adapter_dir.resolve(), Path(base).resolve()):
        raise ConfigError(f"--out {out} is the adapter or base directory itself; choose another directory")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / RECORD).is_file():
        raise ConfigError(f"--out {out} is not empty and holds no earlier export ({RECORD}); choose another directory")


def export(
    source: Source, base: str, out: Path, merge: bool, dtype: str, override: str | None = None
) -> dict[str, Any]:
    """Write the export into out (built beside it, then moved into place); returns fedpipe_export.json's content.
    override: the --base given, if any."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        facts = _merge(source, base, dtype, tmp) if merge else _copy_adapter(source, base, tmp, override)
        record = {
            "source": str(source.adapter_dir.resolve()),
            "run_dir": str(source.run_dir.resolve()) if source.run_dir is not None else None,
            "round": source.round,
            "base": base,
            "task_type": source.task_type,
            "labels": list(source.labels) if source.labels is not None and source.task_type == "SEQ_CLS" else None,
            "merged": merge,
            **facts,
        }
        (tmp / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Export a FedPipe adapter as a plain peft adapter, or merged into a standalone transformers "
        "model (--merge).",
    )
    parser.add_argument("source", type=Path, metavar="RUN_DIR_OR_ADAPTER_DIR", help="a run directory or an adapter")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="directory to write")
    parser.add_argument("--merge", action="store_true", help="merge into the base weights (a model without peft)")
    parser.add_argument(
        "--round", type=int, default=None, metavar="N", help="a run's rounds/NNNN/ adapter instead of final/"
    )
    parser.add_argument(
        "--base", default=None, metavar="PATH", help="base model directory (default: the adapter's own)"
    )
    parser.add_argument(
        "--dtype", choices=DTYPES, default=None, help="dtype of the merged model (--merge only; default float32)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of fedpipe-export; returns the exit code (2: bad input, 1: the export failed)."""
    args_list = sys.argv[1:] if argv is None else list(argv)
    try:
        args = _parser().parse_args(args_list)
    except SystemExit as exit_:
        # argparse exits on --help and usage errors; callers expect an exit code from us, not an exception.
        return 0 if exit_.code is None else exit_.code if isinstance(exit_.code, int) else 2
    from coordinator.export_ferret import locate_ferret

    ferret = locate_ferret(args.source, args.round) if args.source.is_dir() else None
    if ferret is not None:
        return _export_ferret(ferret, args.base, args.out, args.dtype or "float32")
    try:
        if args.dtype is not None and not args.merge:
            raise ConfigError("--dtype applies to --merge only; an adapter is copied as it was saved")
        if args.round is not None and args.round < 0:
            raise ConfigError(f"--round {args.round}: rounds count from 0")
        source = locate(args.source, args.round)
        base = resolve_base(source, args.base)
        _check_out(args.out, source, base)
        seq_cls = _seq_cls_kwargs(source) if source.task_type == "SEQ_CLS" else {}  # run labels agree with the head
    except ConfigError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 2
    logs.setup("export")
    from transformers.utils import logging as hf_logging

    # Importing transformers resets its logger's level; its load report and progress bars would only repeat
    # what this command checks and reports itself (a base weight left random is an error here).
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers deprecations peft still triggers
            record = export(source, base, args.out, args.merge, args.dtype or "float32", args.base)
    except ConfigError as err:
        log.error("%s", err)
        return 2
    except (FedPipeError, OSError, RuntimeError, ValueError) as err:
        log.error("export failed: %s", err)
        return 1
    written = sorted(p.name for p in args.out.iterdir())
    what = "merged model" if args.merge else "peft adapter"
    round_text = f"round {record['round']}" if record["round"] is not None else "round unknown"
    print(f"wrote {what} to {args.out}: {', '.join(written)}")
    print(f"from {source.adapter_dir} ({round_text}) on base {base} ({record['dtype']})")
    auto = AUTO_CLASSES[source.task_type]
    if args.merge:
        print(f"load: transformers.{auto}.from_pretrained({str(args.out)!r})")
    else:
        extra = f", num_labels={seq_cls['num_labels']}" if "num_labels" in seq_cls else ""
        print(
            f"load: peft.PeftModel.from_pretrained(transformers.{auto}.from_pretrained({base!r}{extra}), "
            f"{str(args.out)!r})"
        )
    return 0


def _export_ferret(directory: Path, base: str | None, out: Path, dtype: str) -> int:
    """A Ferret run's weights as a full model (there is no adapter form: --merge is implied)."""
    from coordinator.export_ferret import export_ferret

    logs.setup("export")
    try:
        record = export_ferret(directory, base, out, dtype)
    except ConfigError as err:
        log.error("%s", err)
        return 2
    except (FedPipeError, OSError, RuntimeError, ValueError) as err:
        log.error("export failed: %s", err)
        return 1
    print(f"wrote the full model of a Ferret run to {out} (round {record['round']}, {record['blocks']} trained blocks)")
    print(f"load: transformers.{AUTO_CLASSES['SEQ_CLS' if record['task'] == 'seq-cls' else 'CAUSAL_LM']}"
          f".from_pretrained({str(out)!r})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
