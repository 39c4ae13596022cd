"""fedpipe-export through its console script on real models: a run's MiniLM classifier adapter (written by the
coordinator's own checkpoint code) merged into a plain transformers model or exported as a peft adapter, and
a tiny random GPT-2 causal LM with LoRA on its Conv1D c_attn merged. No federation and no model hub."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from common.adapters import GlobalAdapter, LoraPair, head_modules, init_global
from common.modeling import model_spec, resolve_model_path
from common.types import Quantization, TrainPlan
from coordinator.export import main
from coordinator.modes.lora import write_adapter
from coordinator.rundir import write_json

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),  # from peft
]

EXPORT = Path(sys.executable).parent / "fedpipe-export"
LABELS = ("negative", "neutral", "positive")  # three, so the base's default two-label head would not fit
TARGETS = ("bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.attention.self.value")
UNTOUCHED = "bert.encoder.layer.2.attention.self.query.weight"
SENTENCES = ["what a great day", "this is awful, never again", "the bus was on time", "meh"]
ALPHA = 16.0


@dataclass(frozen=True)
class Run:
    """A run directory as the coordinator leaves it: config.json, rounds/0001/, final/ (round 3)."""

    run_dir: Path
    base: str  # the resolved MiniLM directory


def export(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run the fedpipe-export console script."""
    return subprocess.run([str(EXPORT), *map(str, args)], capture_output=True, text=True, timeout=120)


def trained_global(round_: int, seed: int) -> GlobalAdapter:
    """A global adapter as after training: nonzero LoRA B on both targets (ranks 4 and 8), a moved head."""
    path = resolve_model_path("embedded")
    spec = model_spec(path, LABELS)
    plan = TrainPlan(
        plan_id="export-test",
        target_modules=TARGETS,
        rank_pattern={TARGETS[0]: 4, TARGETS[1]: 8},
        lora_alpha=ALPHA,
        lora_dropout=0.0,
        modules_to_save=head_modules(spec),
        batch_size=8,
        local_epochs=1,
        max_steps=0,
        learning_rate=1e-3,
        weight_decay=0.0,
        quantization=Quantization.NONE,
        max_seq_len=32,
        deadline_s=60.0,
        seed=seed,
    )
    fresh = init_global(spec, plan, seed)
    generator = torch.Generator().manual_seed(seed)
    lora = {m: LoraPair(a=p.a, b=torch.randn(p.b.shape, generator=generator) * 0.1) for m, p in fresh.lora.items()}
    heads = {n: t + torch.randn(t.shape, generator=generator) * 0.5 for n, t in fresh.heads.items()}
    return GlobalAdapter(round=round_, lora=lora, heads=heads)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Round 1 and the final round 3 written by coordinator.checkpoint, base named "embedded" as by default."""
    run_dir = tmp_path_factory.mktemp("export") / "run"
    (run_dir / "rounds").mkdir(parents=True)
    write_json(run_dir / "config.json", {"labels": list(LABELS), "run": {"run_dir": str(run_dir)}})
    write_adapter(run_dir / "rounds" / "0001", trained_global(1, seed=1), ALPHA, "embedded", ("classifier",), "seq-cls")
    final = trained_global(3, seed=3)
    write_adapter(run_dir / "rounds" / "0003", final, ALPHA, "embedded", ("classifier",), "seq-cls")
    write_adapter(run_dir / "final", final, ALPHA, "embedded", ("classifier",), "seq-cls")
    write_json(run_dir / "summary.json", {"final_round": 3})
    return Run(run_dir=run_dir, base=resolve_model_path("embedded"))


def classifier_base(base: str) -> Any:
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(base, num_labels=len(LABELS)).eval()


@torch.no_grad()
def classify(model: Any, tokenizer_dir: str | Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return model(**tokenizer(SENTENCES, padding=True, return_tensors="pt")).logits  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def final_logits(run: Run) -> torch.Tensor:
    """The final adapter's logits on SENTENCES through peft, unmerged: what every export must reproduce."""
    from peft import PeftModel

    return classify(PeftModel.from_pretrained(classifier_base(run.base), str(run.run_dir / "final")).eval(), run.base)


def test_merged_classifier_loads_without_peft_and_matches_the_adapter(
    run: Run, final_logits: torch.Tensor, tmp_path: Path
) -> None:
    from transformers import AutoModelForSequenceClassification

    # Prepare
    out = tmp_path / "merged"
    base = classifier_base(run.base)

    # Execute
    proc = export(run.run_dir, "--merge", "--out", out)

    # Assert
    assert proc.returncode == 0, proc.stderr
    assert f"wrote merged model to {out}" in proc.stdout
    assert {"config.json", "model.safetensors", "tokenizer.json", "fedpipe_export.json"} <= {
        p.name for p in out.iterdir()
    }
    assert not (out / "adapter_config.json").exists()
    merged = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    assert type(merged) is type(base)
    assert merged.config.id2label == dict(enumerate(LABELS))
    assert getattr(merged.config, "quantization_config", None) is None
    merged_state, base_state = merged.state_dict(), base.state_dict()
    assert list(merged_state) == list(base_state)
    assert not any("lora_" in name or "modules_to_save" in name for name in merged_state)
    assert {n: t.shape for n, t in merged_state.items()} == {n: t.shape for n, t in base_state.items()}
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in base.parameters())
    for target in TARGETS:  # the LoRA products went into exactly the targets
        assert not torch.equal(merged_state[f"{target}.weight"], base_state[f"{target}.weight"])
    assert torch.equal(merged_state[UNTOUCHED], base_state[UNTOUCHED])
    torch.testing.assert_close(classify(merged, out), final_logits, atol=1e-4, rtol=0)
    record = json.loads((out / "fedpipe_export.json").read_text())
    assert record == {
        "source": str((run.run_dir / "final").resolve()),
        "run_dir": str(run.run_dir.resolve()),
        "round": 3,
        "base": run.base,
        "task_type": "SEQ_CLS",
        "labels": list(LABELS),
        "merged": True,
        "dtype": "float32",
        "parameters": sum(p.numel() for p in base.parameters()),
        "tokenizer": True,
    }


def test_unmerged_round_export_is_a_plain_peft_adapter(run: Run, tmp_path: Path) -> None:
    from peft import PeftModel

    # Prepare
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "fedpipe_export.json").write_text("{}")  # an earlier export is replaced
    expected = classify(
        PeftModel.from_pretrained(classifier_base(run.base), str(run.run_dir / "rounds" / "0001")), run.base
    )

    # Execute
    proc = export(run.run_dir, "--round", "1", "--out", out)

    # Assert
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "fedpipe_adapter.json",
        "fedpipe_export.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    config = json.loads((out / "adapter_config.json").read_text())
    original = json.loads((run.run_dir / "rounds" / "0001" / "adapter_config.json").read_text())
    # peft's config names the base by its public id, on the coordinator and in the export; the local
    # name or path is in FedPipe's own metadata
    assert original["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert config == original
    assert json.loads((out / "fedpipe_adapter.json").read_text()) == {
        "base_id": "sentence-transformers/all-MiniLM-L6-v2",
        "base_path": "embedded",
    }
    assert run.base not in (out / "adapter_config.json").read_text()
    loaded = PeftModel.from_pretrained(classifier_base(run.base), str(out)).eval()
    assert torch.equal(classify(loaded, out), expected)
    record = json.loads((out / "fedpipe_export.json").read_text())
    assert (record["round"], record["merged"], record["dtype"], record["base"]) == (1, False, "float32", run.base)
    assert record["source"] == str((run.run_dir / "rounds" / "0001").resolve())


def test_a_quantized_base_is_dequantized_and_saved_without_quantization_config(
    run: Run, final_logits: torch.Tensor, tmp_path: Path
) -> None:
    from transformers import AutoModelForSequenceClassification

    from common.modeling import load_base, load_tokenizer

    # Prepare: an int8 (bitsandbytes) checkpoint of MiniLM, as an agent loads it; its head has two classes, not
    # three, so the run's trained head replaces one of another shape
    quantized = tmp_path / "minilm-int8"
    int8: Any = load_base(run.base, ("a", "b"), Quantization.INT8, torch.device("cpu"))
    int8.save_pretrained(str(quantized))
    load_tokenizer(run.base).save_pretrained(str(quantized))
    assert "quantization_config" in json.loads((quantized / "config.json").read_text())
    out = tmp_path / "merged"

    # Execute
    proc = export(run.run_dir, "--merge", "--base", quantized, "--out", out)

    # Assert
    assert proc.returncode == 0, proc.stderr
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    merged = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    base = classifier_base(run.base)
    assert {n: t.shape for n, t in merged.state_dict().items()} == {n: t.shape for n, t in base.state_dict().items()}
    assert {type(m).__name__ for m in merged.modules() if hasattr(m, "weight")} <= {"Linear", "Embedding", "LayerNorm"}
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    assert json.loads((out / "fedpipe_export.json").read_text())["base"] == str(quantized.resolve())
    # int8 rounding of the base is all that separates it from the full-precision merge
    torch.testing.assert_close(classify(merged, out), final_logits, atol=0.15, rtol=0)


def tiny_gpt2(directory: Path) -> None:
    """A random 2-layer GPT-2 with a byte-level BPE tokenizer trained here (GPT-2's tokenizer kind, offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(SENTENCES * 4, trainer)
    end = "<|endoftext|>"
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=end, eos_token=end)  # type: ignore[no-untyped-call]
    tokenizer.save_pretrained(str(directory))
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=len(tokenizer))
    GPT2LMHeadModel(config).save_pretrained(str(directory))


def test_merged_causal_lm_with_conv1d_lora(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Prepare
    base_dir, adapter_dir = tmp_path / "gpt2", tmp_path / "adapter"
    tiny_gpt2(base_dir)
    lora = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base_dir)), lora).eval()
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    peft_model.save_pretrained(str(adapter_dir))
    ids = AutoTokenizer.from_pretrained(str(base_dir))(SENTENCES[1], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    base = AutoModelForCausalLM.from_pretrained(str(base_dir))
    out, half = tmp_path / "merged", tmp_path / "merged-bf16"

    # Execute
    proc = export(adapter_dir, "--merge", "--out", out)
    proc_bf16 = export(adapter_dir, "--merge", "--dtype", "bfloat16", "--out", half)

    # Assert
    assert proc.returncode == 0, proc.stderr
    assert proc_bf16.returncode == 0, proc_bf16.stderr
    merged: Any = AutoModelForCausalLM.from_pretrained(str(out))
    merged.eval()
    assert type(merged) is type(base)
    merged_state, base_state = merged.state_dict(), base.state_dict()
    assert list(merged_state) == list(base_state)
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in base.parameters())
    assert not torch.equal(
        merged_state["transformer.h.0.attn.c_attn.weight"], base_state["transformer.h.0.attn.c_attn.weight"]
    )
    assert torch.equal(
        merged_state["transformer.h.0.attn.c_proj.weight"], base_state["transformer.h.0.attn.c_proj.weight"]
    )
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-4, rtol=0)
    assert (out / "tokenizer.json").is_file()
    record = json.loads((out / "fedpipe_export.json").read_text())
    assert (record["task_type"], record["round"], record["run_dir"], record["labels"]) == (
        "CAUSAL_LM",
        None,
        None,
        None,
    )
    assert record["base"] == str(base_dir.resolve())
    low = AutoModelForCausalLM.from_pretrained(str(half))
    assert {p.dtype for p in low.parameters()} == {torch.bfloat16}
    assert json.loads((half / "fedpipe_export.json").read_text())["dtype"] == "bfloat16"
    torch.testing.assert_close(
        low.state_dict()["transformer.h.0.attn.c_attn.weight"].float(),
        merged_state["transformer.h.0.attn.c_attn.weight"],
        atol=1e-2,
        rtol=1e-2,
    )


def test_missing_directory_exits_2_through_the_console_script(tmp_path: Path) -> None:
    # Execute
    proc = export(tmp_path / "nowhere", "--merge", "--out", tmp_path / "out")

    # Assert
    assert proc.returncode == 2
    assert f"fedpipe-export: {tmp_path / 'nowhere'} does not exist" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_base_without_the_head_the_adapter_lacks_is_refused(run: Run, tmp_path: Path) -> None:
    # Prepare
    headless = trained_global(2, seed=2)
    adapter = tmp_path / "headless"
    write_adapter(adapter, GlobalAdapter(round=2, lora=headless.lora, heads={}), ALPHA, "embedded", (), "seq-cls")

    # Execute
    proc = export(adapter, "--merge", "--out", tmp_path / "out")

    # Assert
    assert proc.returncode == 2
    assert "lacks ['classifier.bias', 'classifier.weight'] and the adapter does not carry them" in proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def _no_adapter_config(run: Run, tmp: Path) -> list[str]:
    shutil.copytree(run.run_dir / "final", tmp / "run" / "final")
    (tmp / "run" / "final" / "adapter_config.json").unlink()
    return [str(tmp / "run"), "--out", str(tmp / "out")]


def _task_type(run: Run, tmp: Path) -> list[str]:
    shutil.copytree(run.run_dir / "final", tmp / "adapter")
    config = json.loads((tmp / "adapter" / "adapter_config.json").read_text())
    (tmp / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "task_type": "TOKEN_CLS"}))
    return [str(tmp / "adapter"), "--merge", "--out", str(tmp / "out")]


def _foreign_out(run: Run, tmp: Path) -> list[str]:
    (tmp / "out").mkdir()
    (tmp / "out" / "notes.txt").write_text("mine")
    return [str(run.run_dir), "--out", str(tmp / "out")]


def _labels_unlike_head(run: Run, tmp: Path) -> list[str]:
    shutil.copytree(run.run_dir, tmp / "run")
    write_json(tmp / "run" / "config.json", {"labels": ["negative", "positive"]})
    return [str(tmp / "run"), "--merge", "--out", str(tmp / "out")]


CASES: dict[str, tuple[Callable[[Run, Path], list[str]], str]] = {
    "not a run or adapter": (
        lambda run, tmp: [str(tmp), "--out", str(tmp / "out")],
        "is neither a peft adapter directory (no adapter_config.json) nor a run directory",
    ),
    "no adapter_config.json": (_no_adapter_config, "final has no adapter_config.json"),
    "unknown task_type": (_task_type, "task_type 'TOKEN_CLS' is not one fedpipe-export knows (SEQ_CLS, CAUSAL_LM)"),
    "base not found": (
        lambda run, tmp: [str(run.run_dir), "--base", str(tmp / "nobase"), "--out", str(tmp / "out")],
        "base model not found: ",
    ),
    "round not in run": (
        lambda run, tmp: [str(run.run_dir), "--round", "7", "--out", str(tmp / "out")],
        "--round 7: ",
    ),
    "round of an adapter": (
        lambda run, tmp: [str(run.run_dir / "final"), "--round", "1", "--out", str(tmp / "out")],
        "--round needs a run directory",
    ),
    "dtype without merge": (
        lambda run, tmp: [str(run.run_dir), "--dtype", "float16", "--out", str(tmp / "out")],
        "--dtype applies to --merge only",
    ),
    "foreign out": (_foreign_out, "is not empty and holds no earlier export"),
    "labels unlike the head": (_labels_unlike_head, "config.json names 2 labels but the adapter's head in "),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exits_2_naming_the_problem(
    case: str, run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    build, message = CASES[case]
    argv = build(run, tmp_path)

    # Execute
    code = main(argv)

    # Assert
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("fedpipe-export: ") and message in err, err
