"""Guidance combiners against hand-computed tensors."""

import torch

from imgalign.guidance import cfg, npo, rlg, rlg_cfg


def test_cfg_hand_computed():
    """u = [1, 2], c = [3, 0], s = 2.5: u + 2.5 (c - u) = [1 + 5, 2 - 5] = [6, -3]."""
    out = cfg(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.0]), 2.5)
    torch.testing.assert_close(out, torch.tensor([6.0, -3.0]))


def test_rlg_interpolates_and_extrapolates():
    """B = [1, -1], A = [3, 1]; A - B = [2, 2]. w = 0.5: [2, 0]; w = 2: [5, 3]; w = -1: [-1, -3]."""
    b, a = torch.tensor([1.0, -1.0]), torch.tensor([3.0, 1.0])
    torch.testing.assert_close(rlg(b, a, 0.5), torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(rlg(b, a, 2.0), torch.tensor([5.0, 3.0]))
    torch.testing.assert_close(rlg(b, a, -1.0), torch.tensor([-1.0, -3.0]))


def test_rlg_endpoints_are_exact():
    """w = 0 and w = 1 return the inputs bit for bit (no (1 - w) b + w a rounding)."""
    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g) * 1e3
    assert torch.equal(rlg(b, a, 0.0), b) and torch.equal(rlg(b, a, 1.0), a)


def test_rlg_with_cfg_inside_each_model():
    """Base: u = 0, c = 1 -> CFG(s=3) = 3. Aligned: u = 1, c = 3 -> 1 + 3 * 2 = 7. RLG w = 1.5: 3 + 1.5 * 4 = 9.
    Expanded form: v_B^u + s(v_B^c - v_B^u) + w[(v_A^u - v_B^u) + s((v_A^c - v_A^u) - (v_B^c - v_B^u))]
                 = 0 + 3 + 1.5 [1 + 3 (2 - 1)] = 9."""
    t = lambda v: torch.tensor([v])  # noqa: E731
    torch.testing.assert_close(rlg_cfg(t(0.0), t(1.0), t(1.0), t(3.0), 3.0, 1.5), t(9.0))


def test_rlg_commutes_with_cfg():
    """Both rules are affine, so RLG per branch then CFG == CFG per model then RLG (what the pipeline hook uses)."""
    g = torch.Generator().manual_seed(1)
    bu, bc, au, ac = (torch.randn(3, 4, generator=g) for _ in range(4))
    for s, w in [(4.5, 1.6), (1.0, 0.3), (7.5, -0.5)]:
        torch.testing.assert_close(cfg(rlg(bu, au, w), rlg(bc, ac, w), s), rlg_cfg(bu, bc, au, ac, s, w))


def test_npo_hand_computed_and_reduces_to_cfg():
    """neg(empty) = [2], pos(c) = [5], s = 3: 2 + 3 (5 - 2) = 11. With neg == base model, NPO is plain CFG."""
    torch.testing.assert_close(npo(torch.tensor([2.0]), torch.tensor([5.0]), 3.0), torch.tensor([11.0]))
    u, c = torch.randn(5), torch.randn(5)
    assert torch.equal(npo(u, c, 6.5), cfg(u, c, 6.5))
