"""Causal-LM encoding on hand-made examples: the loss covers the response only, padding and truncation
never drop the response silently, and the instruction form of the tweet task."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch

from common.batching import IGNORE, RESPONSES_CUT, encode_causal, evaluate_causal, fit, task_loss
from common.data import CAUSAL_LM, Example, instruct

CPU = torch.device("cpu")


class WordTokenizer:
    """A word-level tokenizer with a chat template: 'USER <prompt> ASSISTANT' around the prompt."""

    eos_token_id = 1
    pad_token_id = 0
    chat_template = "fake"

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {"<pad>": 0, "<eos>": 1}

    def _id(self, word: str) -> int:
        return self.vocab.setdefault(word, len(self.vocab))

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [self._id(w) for w in text.split()]}

    def apply_chat_template(self, messages: list[dict[str, str]], **kwargs: Any) -> str:
        assert kwargs == {"add_generation_prompt": True, "tokenize": False}
        return f"USER {messages[0]['content']} ASSISTANT"


def test_fit_cuts_the_prompt_from_the_left_before_touching_the_response() -> None:
    # Execute
    short = fit([1, 2, 3], [7, 8], 10)
    tight = fit([1, 2, 3, 4, 5], [7, 8], 4)
    long_response = fit([1, 2, 3], [7, 8, 9, 10, 11], 4)

    # Assert
    assert short == ([1, 2, 3], [7, 8], False)
    assert tight == ([4, 5], [7, 8], False)
    assert long_response == ([3], [7, 8, 9], True)  # one prompt token is always kept


def test_labels_cover_exactly_the_response_and_its_end_token() -> None:
    # Prepare
    tokenizer = WordTokenizer()
    batch = [Example("good movie", 1, "positive"), Example("a very bad long movie", 0, "negative")]

    # Execute
    out = encode_causal(tokenizer, batch, 16, CPU)

    # Assert: USER good movie ASSISTANT | positive <eos> | pad...
    v = tokenizer.vocab
    first = [v["USER"], v["good"], v["movie"], v["ASSISTANT"], v["positive"], 1]
    second = [v["USER"], v["a"], v["very"], v["bad"], v["long"], v["movie"], v["ASSISTANT"], v["negative"], 1]
    assert out["input_ids"].tolist() == [[*first, 0, 0, 0], second]
    assert out["attention_mask"].tolist() == [[1] * 6 + [0] * 3, [1] * 9]
    assert out["labels"].tolist() == [
        [IGNORE] * 4 + [v["positive"], 1] + [IGNORE] * 3,
        [IGNORE] * 7 + [v["negative"], 1],
    ]


def test_a_response_that_cannot_fit_is_cut_and_reported(caplog: pytest.LogCaptureFixture) -> None:
    # Prepare
    tokenizer = WordTokenizer()
    batch = [Example("tweet", 0, "one two three four five six")]
    before = RESPONSES_CUT.total

    # Execute
    with caplog.at_level(logging.WARNING):
        out = encode_causal(tokenizer, batch, 5, CPU)

    # Assert: one prompt token and four response tokens; the cut is counted and logged
    assert out["input_ids"].shape == (1, 5)
    assert (out["labels"] != IGNORE).sum() == 4
    assert RESPONSES_CUT.total == before + 1
    assert "did not fit in max_seq_len 5" in caplog.text


def test_causal_loss_is_next_token_cross_entropy_over_the_response_only() -> None:
    # Prepare: logits that make the response tokens certain, and garbage elsewhere
    labels = torch.tensor([[IGNORE, IGNORE, 3, 4]])
    logits = torch.zeros(1, 4, 6)
    logits[0, 1, 3] = 50.0  # position 1 predicts token 2 (label 3)
    logits[0, 2, 4] = 50.0  # position 2 predicts token 3 (label 4)
    logits[0, 0] = torch.randn(6) * 10  # predicts a prompt token: ignored

    # Execute
    certain = float(task_loss(logits, labels, CAUSAL_LM))
    uniform = float(task_loss(torch.zeros(1, 4, 6), labels, CAUSAL_LM))

    # Assert
    assert certain == pytest.approx(0.0, abs=1e-6)
    assert uniform == pytest.approx(float(torch.log(torch.tensor(6.0))), rel=1e-6)


def test_instruction_form_of_the_tweet_task() -> None:
    # Execute
    example = instruct(Example("I love it!", 1), ("negative", "positive"))

    # Assert
    assert example.text == (
        "Tweet: I love it!\nIs the sentiment of this tweet negative or positive? Answer with one word."
    )
    assert (example.response, example.label) == ("positive", 1)


class Scripted(torch.nn.Module):
    """A 'model' whose next-token choice at each position is given: argmax = scripted[b][t]."""

    def __init__(self, scripted: list[list[int]], vocab: int) -> None:
        super().__init__()
        self.scripted = scripted
        self.vocab = vocab

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for b, row in enumerate(self.scripted):
            for t, token in enumerate(row[: input_ids.shape[1]]):
                logits[b, t, token] = 10.0
        return type("Out", (), {"logits": logits})()


def test_exact_match_counts_an_answer_right_only_when_every_answer_token_is_the_greedy_choice() -> None:
    # Prepare: "USER x ASSISTANT <answer> <eos>": position t predicts token t+1
    tokenizer = WordTokenizer()
    batch = [Example("x", 1, "very good"), Example("y", 0, "very bad"), Example("z", 0, "bad")]
    ids = encode_causal(tokenizer, batch, 16, CPU)["input_ids"].tolist()
    v = tokenizer.vocab
    right = ids[0][1:]  # predicts exactly the next token everywhere
    second_wrong = [*ids[1][1:3], v["very"], v["good"], 1]  # "very" right, then "good" instead of "bad"
    eos_wrong = [*ids[2][1:3], v["bad"], 0]  # the answer right, the end token wrong: still a right answer
    model = Scripted([right, second_wrong, eos_wrong], len(v) + 1)

    # Execute
    result = evaluate_causal(model, tokenizer, batch, 16, CPU, batch_size=8)

    # Assert
    assert result.accuracy == pytest.approx(2 / 3)
    assert result.samples == 3
