"""Weight-space merges: theta_base + delta_neg + (1 - beta) delta_pos, from full weights or LoRA."""

import pytest
import torch
from torch import nn

from imgalign.guidance import (
    clean_state_dict,
    lora_deltas,
    lora_deltas_from_model,
    merge_weights,
    weight_delta,
)


def test_merge_arithmetic_hand_computed():
    """base w = [1, 2], pos = [2, 2] (delta_pos = [1, 0]), neg = [1, 5] (delta_neg = [0, 3]), beta = 0.25:
    [1, 2] + [0, 3] + 0.75 [1, 0] = [1.75, 5]. Untouched keys are copied; integer buffers are not deltas."""
    base = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.5]), "n": torch.tensor([3])}
    pos = {"w": torch.tensor([2.0, 2.0]), "b": torch.tensor([0.5]), "n": torch.tensor([3])}
    neg = {"w": torch.tensor([1.0, 5.0]), "b": torch.tensor([0.5]), "n": torch.tensor([3])}
    d_pos, d_neg = weight_delta(pos, base), weight_delta(neg, base)
    assert "n" not in d_pos
    merged = merge_weights(base, d_neg, d_pos, beta=0.25)
    torch.testing.assert_close(merged["w"], torch.tensor([1.75, 5.0]))
    torch.testing.assert_close(merged["b"], torch.tensor([0.5]))
    assert torch.equal(merged["n"], torch.tensor([3]))
    # beta = 0: negative offset transferred onto the positive model; beta = 1: onto the base
    torch.testing.assert_close(merge_weights(base, d_neg, d_pos, 0.0)["w"], torch.tensor([2.0, 5.0]))
    torch.testing.assert_close(merge_weights(base, d_neg, d_pos, 1.0)["w"], torch.tensor([1.0, 5.0]))


def test_merge_rejects_unknown_keys():
    with pytest.raises(KeyError, match="not base parameters"):
        merge_weights({"a": torch.zeros(1)}, {"b": torch.zeros(1)})


def test_lora_deltas_hand_computed_with_alpha_and_prefix():
    """down [r=1, in=2] = [[1, 2]], up [out=2, r=1] = [[1], [3]]: up @ down = [[1, 2], [3, 6]]; alpha 2 / r 1 = x2."""
    sd = {"unet.blk.to_q.lora.down.weight": torch.tensor([[1.0, 2.0]]),
          "unet.blk.to_q.lora.up.weight": torch.tensor([[1.0], [3.0]]),
          "unet.blk.to_q.alpha": torch.tensor(2.0)}
    d = lora_deltas(sd, strip_prefix="unet.")
    torch.testing.assert_close(d["blk.to_q.weight"], torch.tensor([[2.0, 4.0], [6.0, 12.0]]))


def test_lora_deltas_match_peft_and_merged_forward():
    """Deltas from a peft-attached layer equal peft's own merge: base + delta gives the adapted forward."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3))
    base = {k: v.clone() for k, v in net.state_dict().items()}
    net = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=["0"], init_lora_weights=False), net)
    x = torch.randn(5, 4)
    adapted = net(x)
    deltas = lora_deltas_from_model(net, "default")
    assert set(deltas) == {"0.weight"}
    plain = nn.Sequential(nn.Linear(4, 3))
    plain.load_state_dict(merge_weights(base, deltas))
    torch.testing.assert_close(plain(x), adapted, atol=1e-6, rtol=0)
    assert set(clean_state_dict(net)) == set(base)
    # the same deltas from the peft state dict (lora_A/lora_B keys, scale alpha / r = 2 given explicitly)
    from peft.utils import get_peft_model_state_dict

    torch.testing.assert_close(lora_deltas(get_peft_model_state_dict(net), scale=2.0)["0.weight"], deltas["0.weight"])
