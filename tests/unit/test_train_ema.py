"""EMA of trainable weights: hand-computed update, update interval, swap and restore, checkpoint round trip."""

import pytest
import torch

from imgalign.train.ema import EMA


def _net():
    net = torch.nn.Linear(2, 1, bias=False)
    frozen = torch.nn.Linear(1, 1)
    frozen.requires_grad_(False)
    return torch.nn.ModuleDict({"a": net, "frozen": frozen})


def test_update_every_and_swap():
    net = _net()
    with torch.no_grad():
        net["a"].weight.fill_(0.0)
    ema = EMA(net, decay=0.9, every=2)
    assert list(ema.shadow) == ["a.weight"]  # only trainable parameters
    with torch.no_grad():
        net["a"].weight.fill_(1.0)
    ema.step(1)  # not a multiple of `every`: no update
    assert ema.num_updates == 0 and torch.equal(ema.shadow["a.weight"], torch.zeros(1, 2))
    ema.step(2)  # 0.9 * 0 + 0.1 * 1
    ema.step(4)  # 0.9 * 0.1 + 0.1 * 1 = 0.19
    torch.testing.assert_close(ema.shadow["a.weight"], torch.full((1, 2), 0.19))
    with ema.swapped():
        torch.testing.assert_close(net["a"].weight.detach(), torch.full((1, 2), 0.19))
    assert torch.equal(net["a"].weight.detach(), torch.ones(1, 2))  # restored


def test_save_load_round_trip_and_mismatch(tmp_path):
    net = _net()
    ema = EMA(net, decay=0.5, name="teacher")
    with torch.no_grad():
        net["a"].weight.add_(1.0)
    ema.step(1)
    ema.save(tmp_path)
    other = EMA(net, decay=0.5, name="teacher")
    other.load(tmp_path)
    assert other.num_updates == 1 and torch.equal(other.shadow["a.weight"], ema.shadow["a.weight"])
    wrong = EMA(torch.nn.Linear(3, 1), decay=0.5, name="teacher")
    with pytest.raises(KeyError, match="teacher.safetensors does not match"):
        wrong.load(tmp_path)
