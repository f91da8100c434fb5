"""Sequence log-likelihoods of a causal LM: response tokens only, one concatenated forward, padding-invariant."""

from __future__ import annotations

import math

import pytest
import torch

from imgalign.llm.data import collate
from imgalign.llm.logprobs import concatenated_pair_logps, masked_sequence_logps, sequence_logps, token_logps
from imgalign.llm.synthetic import tiny_llama


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_llama(seed=0).eval()


def hand_logp(model, prompt: list[int], response: list[int]) -> float:
    """sum_{t in response} log softmax(logits at t-1)[x_t], one token at a time on the unpadded sequence."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]  # [T, V]
    total = 0.0
    for t in range(len(prompt), len(prompt) + len(response)):
        total += torch.log_softmax(logits[t - 1].double(), dim=-1)[ids[0, t]].item()
    return total


ITEMS = [  # prompt ids, (chosen ids, rejected ids); different lengths so padding is exercised
    {"prompt_ids": [1, 4, 9, 11, 5], "response_ids": [[9, 11, 2], [11, 9, 7, 2]], "rewards": [1.0, 0.0]},
    {"prompt_ids": [1, 4, 6, 5], "response_ids": [[6, 2], [8, 6, 13, 12, 2]], "rewards": [1.0, 0.0]},
    {"prompt_ids": [1, 4, 12, 13, 7, 8, 5], "response_ids": [[7, 8, 12, 13, 2], [8, 2]], "rewards": [1.0, 0.0]},
]


def test_concatenated_forward_matches_a_hand_loop_over_tokens(model):
    batch = collate(ITEMS, pad_token_id=0)
    assert batch["input_ids"].shape[0] == 6  # [chosen_1..chosen_3, rejected_1..rejected_3]
    with torch.no_grad():
        out = concatenated_pair_logps(model, batch)
    for i, it in enumerate(ITEMS):
        assert out.chosen[i].item() == pytest.approx(hand_logp(model, it["prompt_ids"], it["response_ids"][0]), abs=1e-4)
        assert out.rejected[i].item() == pytest.approx(hand_logp(model, it["prompt_ids"], it["response_ids"][1]), abs=1e-4)
        assert out.chosen_lengths[i] == len(it["response_ids"][0])
        assert out.rejected_lengths[i] == len(it["response_ids"][1])
    torch.testing.assert_close(out.chosen_mean, out.chosen / out.chosen_lengths)


def test_prompt_and_padding_do_not_count(model):
    """Changing a padding token or the pad id changes nothing; the prompt only conditions (its own tokens
    are never scored): the masked sum equals the hand loop, which never visits prompt positions."""
    b0 = collate(ITEMS, pad_token_id=0)
    b1 = collate(ITEMS, pad_token_id=3)
    with torch.no_grad():
        s0, n0 = sequence_logps(model, b0["input_ids"], b0["attention_mask"], b0["completion_mask"])
        s1, n1 = sequence_logps(model, b1["input_ids"], b1["attention_mask"], b1["completion_mask"])
    torch.testing.assert_close(s0, s1, atol=1e-5, rtol=0)
    torch.testing.assert_close(n0, n1)
    # completion_mask marks exactly the response tokens
    assert b0["completion_mask"].sum().item() == sum(len(r) for it in ITEMS for r in it["response_ids"])


def test_masked_sequence_logps_by_hand():
    """Uniform logits over V = 4 give log(1/4) per scored token; mask [0, 0, 1, 1] scores tokens 2 and 3:
    l = 2 * log(1/4) = -2.772589, n = 2. The first position is never scored."""
    logits = torch.zeros(1, 4, 4)
    ids = torch.tensor([[0, 1, 2, 3]])
    total, count = masked_sequence_logps(logits, ids, torch.tensor([[1, 0, 1, 1]]))
    assert total.item() == pytest.approx(2 * math.log(0.25), abs=1e-6)
    assert count.item() == 2
    # a peaked logit on the right token: log p = 10 - log(e^10 + 3)
    logits[0, 1, 2] = 10.0
    assert token_logps(logits, ids)[0, 1].item() == pytest.approx(10 - math.log(math.exp(10) + 3), abs=1e-6)


def test_gradient_flows_only_through_response_positions(model):
    batch = collate(ITEMS[:1], pad_token_id=0)
    emb = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    logits = model(inputs_embeds=emb, attention_mask=batch["attention_mask"]).logits
    total, _ = masked_sequence_logps(logits, batch["input_ids"], batch["completion_mask"])
    total.sum().backward()
    # padding, and the last real token (it predicts nothing), receive no gradient (causal attention);
    # the prompt tokens do: they condition the scored response tokens
    for row in range(batch["input_ids"].shape[0]):
        last = int(batch["attention_mask"][row].sum())
        assert emb.grad[row, last - 1:].abs().sum().item() == 0.0
        assert (emb.grad[row, : last - 1].abs().sum(dim=-1) > 0).all()
