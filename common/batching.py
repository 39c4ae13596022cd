"""Examples into model inputs, and scores out of a model: batching, tokenizing both tasks, the task loss, and
the evaluation of a model on a split (used by agents' training and probes, and the held-out evaluator).

Causal-LM examples are a prompt and a response; only response tokens are scored (labels elsewhere IGNORE),
and a pair longer than max_seq_len loses prompt tokens first (responses that must be cut are counted in
RESPONSES_CUT).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from common.data import CAUSAL_LM, SEQ_CLS, Example
from common.scores import confusion_matrix
from common.types import Evaluation

log = logging.getLogger(__name__)

IGNORE = -100  # label of tokens the loss skips (prompt and padding)


def batches(examples: Sequence[Example], batch_size: int) -> list[Sequence[Example]]:
    """Consecutive batches of at most batch_size."""
    return [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]


def encode(
    tokenizer: Any, batch: Sequence[Example], max_seq_len: int, device: torch.device, task: str = SEQ_CLS
) -> dict[str, torch.Tensor]:
    """Tokenize a batch, padded to its longest member, with labels (causal-lm: response tokens only)."""
    if task == CAUSAL_LM:
        return encode_causal(tokenizer, batch, max_seq_len, device)
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


class _CutCounter:
    """Responses cut to fit max_seq_len: never silent, but one warning per 100 rather than per batch."""

    def __init__(self) -> None:
        self.total = 0

    def add(self, count: int, max_seq_len: int) -> None:
        before, self.total = self.total, self.total + count
        if count and (before == 0 or before // 100 != self.total // 100):
            log.warning(
                "%d responses so far did not fit in max_seq_len %d and were cut at the end (the prompt is "
                "cut first); raise training.max_seq_len",
                self.total,
                max_seq_len,
            )


RESPONSES_CUT = _CutCounter()


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The prompt as the model sees it: in its chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt + "\n", add_special_tokens=True)["input_ids"])


def response_ids(tokenizer: Any, response: str) -> list[int]:
    """The response and the end-of-turn token, which the model must learn to write too."""
    return [*tokenizer(response, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]


def fit(prompt: list[int], response: list[int], max_seq_len: int) -> tuple[list[int], list[int], bool]:
    """Cut a pair to max_seq_len: the prompt loses its beginning first; the response is cut (and the cut
    reported) only when it alone leaves no room for one prompt token. Returns (prompt, response, cut)."""
    cut = len(response) > max_seq_len - 1
    if cut:
        response = response[: max_seq_len - 1]
    room = max_seq_len - len(response)
    return prompt[-room:] if len(prompt) > room else prompt, response, cut


def encode_causal(
    tokenizer: Any, batch: Sequence[Example], max_seq_len: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Prompt + response token ids, right-padded; labels are the response tokens, -100 elsewhere."""
    rows: list[tuple[list[int], list[int]]] = []
    cut = 0
    for example in batch:
        prompt, response, was_cut = fit(
            prompt_ids(tokenizer, example.text), response_ids(tokenizer, example.response), max_seq_len
        )
        rows.append((prompt, response))
        cut += was_cut
    RESPONSES_CUT.add(cut, max_seq_len)
    width = max(len(p) + len(r) for p, r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prompt, response) in enumerate(rows):
        n = len(prompt) + len(response)
        ids[i, :n] = torch.tensor(prompt + response)
        labels[i, len(prompt) : n] = torch.tensor(response)
        mask[i, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def task_loss(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """The training loss from logits: cross-entropy over classes, or over next tokens where labels != -100."""
    if task == CAUSAL_LM:
        return F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE
        )
    return F.cross_entropy(logits.float(), labels)


def is_split(model: Any) -> bool:
    """Whether the model's layers sit on more than one device (common.modeling.layer_split)."""
    placed = getattr(model, "hf_device_map", None) or {}  # peft passes the attribute through to the base
    return len({str(where) for where in placed.values()}) > 1


def forward(model: Any, inputs: dict[str, torch.Tensor], task: str) -> tuple[Any, Any]:
    """The model's output on a batch and its loss. A model split over devices puts its logits on the last one
    while the labels sit on the first, and transformers' BERT-family classifiers do not move them: such a model's
    loss is task_loss with the labels moved to the logits."""
    if not is_split(model):
        out = model(**inputs)
        return out, out.loss
    labels = inputs["labels"]
    out = model(**{name: value for name, value in inputs.items() if name != "labels"})
    return out, task_loss(out.logits, labels.to(out.logits.device), task)


@torch.no_grad()
def evaluate(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    max_seq_len: int,
    device: torch.device,
    batch_size: int = 64,
    task: str = SEQ_CLS,
) -> Evaluation:
    """Mean loss and accuracy on examples: a classifier's cross-entropy, argmax accuracy and confusion matrix,
    or a causal LM's per-token loss on the responses and exact match of its greedy answer."""
    if not examples:
        return Evaluation(loss=0.0, accuracy=0.0, samples=0)
    if task == CAUSAL_LM:
        return evaluate_causal(model, tokenizer, examples, max_seq_len, device, min(batch_size, 32))
    was_training = model.training
    model.eval()
    loss_sum = 0.0
    predicted: list[int] = []
    classes = 0
    for batch in batches(examples, batch_size):
        inputs = encode(tokenizer, batch, max_seq_len, device)
        out, loss = forward(model, inputs, SEQ_CLS)
        loss_sum += float(loss) * len(batch)
        predicted.extend(out.logits.argmax(dim=-1).tolist())
        classes = out.logits.shape[-1]
    model.train(was_training)
    truth = [e.label for e in examples]
    correct = sum(p == t for p, t in zip(predicted, truth, strict=True))
    return Evaluation(
        loss=loss_sum / len(examples),
        accuracy=correct / len(examples),
        samples=len(examples),
        confusion=confusion_matrix(truth, predicted, classes),
    )


def evaluate_causal(
    model: Any, tokenizer: Any, examples: Sequence[Example], max_seq_len: int, device: torch.device, batch_size: int
) -> Evaluation:
    """Token-weighted response loss (perplexity = exp(loss)) and exact-match accuracy of greedy answers.

    One teacher-forced forward per batch gives both: greedy decoding reproduces the reference's tokens
    exactly when the argmax at every reference position is the reference token (given the reference
    prefix, which greedy decoding has produced so far exactly when all earlier ones matched). So this is
    the exact-match rate of `generate(do_sample=False)`, without generating.
    """
    was_training = model.training
    model.eval()
    loss_sum = 0.0
    tokens = 0
    correct = 0
    for batch in batches(examples, batch_size):
        inputs = encode_causal(tokenizer, batch, max_seq_len, device)
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        labels = inputs["labels"].to(logits.device)  # a model split over devices gives them on its last
        targets = labels[:, 1:]
        scored = targets != IGNORE
        count = int(scored.sum())
        loss_sum += float(task_loss(logits, labels, CAUSAL_LM)) * count
        tokens += count
        # The answer is the response without its end-of-turn token: match it token by token.
        answer = scored & (targets != tokenizer.eos_token_id)
        hits = (logits[:, :-1].argmax(dim=-1) == targets) | ~answer
        correct += int((hits.all(dim=1) & answer.any(dim=1)).sum())
    model.train(was_training)
    return Evaluation(loss=loss_sum / max(tokens, 1), accuracy=correct / len(examples), samples=len(examples))
