"""The learned quantizer of GETA/DJPQ: analytic gradients match finite differences, the grid is
as many bits as it claims, initialisation, projection and freezing do what GETA's optimizer needs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from jpqbench.accounting.plan import plan_from_model
from jpqbench.accounting.verify import verify_plan
from jpqbench.nn.learned_quant import (
    LearnedQuantizer,
    calibrate_inputs,
    freeze_all,
    install_learned_quantizers,
    layer_bits,
    learned_quantizers,
)


def _quantizer(signed: bool, d: float, q_m: float, t: float, frozen_bits: int = 0) -> LearnedQuantizer:
    q = LearnedQuantizer(signed=signed).double()
    q.initialize(torch.ones(1))
    with torch.no_grad():
        q.d.fill_(d)
        q.q_m.fill_(q_m)
        q.t.fill_(t)
    if frozen_bits:
        q.freeze(frozen_bits)
    return q


def _surrogate(q: LearnedQuantizer, x: torch.Tensor, g: torch.Tensor):
    """sum(g * Q(x)) with the rounding offset round(u) - u held at its value for the current
    parameters: the function whose exact gradients the straight-through rules are."""
    signed = bool(q.signed)
    with torch.no_grad():
        offset = _levels(q, x, q.q_m, q.t, q.step())
        offset = torch.round(offset) - offset

    def value(d: torch.Tensor | None, q_m: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if d is None:  # frozen: d follows q_m and t
            levels = 2 ** (q.frozen_bits - 1) - 1 if signed else 2 ** q.frozen_bits - 1
            d = q_m.abs() ** t / levels
        sign = torch.sign(x) if signed else (x > 0).double()
        return (g * sign * d * (_levels(q, x, q_m, t, d) + offset)).sum()
    return value


def _levels(q: LearnedQuantizer, x: torch.Tensor, q_m: torch.Tensor, t: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    v = torch.minimum(x.abs() if bool(q.signed) else x.clamp_min(0), q_m.abs())
    return torch.where(v > 0, v.clamp_min(1e-300) ** t, torch.zeros_like(v)) / d


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("t", [1.0, 0.7, 1.3])
def test_gradients_of_d_qm_t_match_finite_differences(signed: bool, t: float) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, dtype=torch.float64) * 0.8  # a few entries beyond q_m, some negative
    x[0, 0, 0] = 0.0
    g = torch.randn_like(x)
    q = _quantizer(signed, d=0.11, q_m=1.05, t=t)
    assert (x.abs() > 1.05).any() and (x.abs() < 1.05).any()
    (q(x) * g).sum().backward()
    value, h = _surrogate(q, x, g), 1e-6
    with torch.no_grad():
        d, q_m, tt = q.d.clone(), q.q_m.clone(), q.t.clone()
        fd_d = (value(d + h, q_m, tt) - value(d - h, q_m, tt)) / (2 * h)
        fd_qm = (value(d, q_m + h, tt) - value(d, q_m - h, tt)) / (2 * h)
        fd_t = (value(d, q_m, tt + h) - value(d, q_m, tt - h)) / (2 * h)
    assert q.d.grad.item() == pytest.approx(fd_d.item(), rel=1e-6, abs=1e-9)
    assert q.q_m.grad.item() == pytest.approx(fd_qm.item(), rel=1e-6, abs=1e-9)
    assert q.t.grad.item() == pytest.approx(fd_t.item(), rel=1e-6, abs=1e-9)
    assert q.q_m.grad.item() != 0 and q.t.grad.item() != 0 and q.d.grad.item() != 0


def test_frozen_gradients_flow_through_the_step_of_the_frozen_bit_width() -> None:
    torch.manual_seed(1)
    x = torch.randn(40, dtype=torch.float64)
    g = torch.randn_like(x)
    q = _quantizer(True, d=0.05, q_m=1.2, t=0.9, frozen_bits=4)
    (q(x) * g).sum().backward()
    value, h = _surrogate(q, x, g), 1e-6
    with torch.no_grad():
        q_m, t = q.q_m.clone(), q.t.clone()
        fd_qm = (value(None, q_m + h, t) - value(None, q_m - h, t)) / (2 * h)
        fd_t = (value(None, q_m, t + h) - value(None, q_m, t - h)) / (2 * h)
    assert q.d.grad is None  # d is computed from q_m and t once frozen
    assert q.q_m.grad.item() == pytest.approx(fd_qm.item(), rel=1e-6, abs=1e-9)
    assert q.t.grad.item() == pytest.approx(fd_t.item(), rel=1e-6, abs=1e-9)


def test_straight_through_gradient_for_x() -> None:
    q = _quantizer(True, d=0.1, q_m=1.0, t=1.0)
    x = torch.tensor([-2.0, -0.5, 0.0, 0.33, 0.999, 1.5], dtype=torch.float64, requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    wide = LearnedQuantizer(signed=True, ste_clip=2.0).double()  # upstream's fixed clip
    wide.initialize(torch.ones(1))
    x.grad = None
    wide(x).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]


def test_initialised_at_16_bits_with_range_max_abs() -> None:
    w = torch.randn(8, 4, 3, 3)
    q = LearnedQuantizer()
    q.initialize(w)
    assert q.q_m.item() == pytest.approx(w.abs().max().item())
    assert q.bits == 16 and q.bit_width().item() == pytest.approx(16.0, abs=1e-4)
    assert q.d.item() == pytest.approx(w.abs().max().item() / (2 ** 15 - 1), rel=1e-6)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_bit_width_formula_and_grid_size(signed: bool, bits: int) -> None:
    """d(b) gives a continuous width of exactly b, and the grid has at most 2^b values."""
    q = _quantizer(signed, d=0.1, q_m=0.9, t=0.8)
    with torch.no_grad():
        q.d.copy_(q.step_for_bits(bits))
    assert q.bit_width().item() == pytest.approx(bits, abs=1e-9)
    assert q.bits == bits
    out = q(torch.linspace(-2, 2, 10001, dtype=torch.float64))
    assert torch.unique(out).numel() <= 2 ** bits
    assert torch.unique(out).numel() >= 2 ** (bits - 1)  # the bits are really used


def test_integer_bits_are_honest_between_bit_widths() -> None:
    """A step between d(5) and d(4) needs 5 bits -- never reported as 4."""
    q = _quantizer(True, d=0.1, q_m=1.0, t=1.0)
    with torch.no_grad():
        q.d.copy_((q.step_for_bits(4) + q.step_for_bits(5)) / 2)
    assert 4 < q.bit_width().item() < 5 and q.bits == 5
    assert torch.unique(q(torch.linspace(-1, 1, 5001, dtype=torch.float64))).numel() <= 2 ** q.bits


def test_projection_clamps_the_bit_width_into_the_range() -> None:
    q = _quantizer(True, d=1e-6, q_m=1.0, t=0.9)  # ~21 bits
    q.project(3, 6)
    assert q.bit_width().item() == pytest.approx(6.0, abs=1e-9)
    with torch.no_grad():
        q.d.fill_(0.9)  # ~2 bits
    q.project(3, 6)
    assert q.bit_width().item() == pytest.approx(3.0, abs=1e-9)
    with torch.no_grad():
        q.d.copy_(q.step_for_bits(4.5))
    q.project(3, 6)
    assert q.bit_width().item() == pytest.approx(4.5, abs=1e-9)  # inside: untouched (partial projection)


def test_freeze_keeps_the_integer_bit_width_while_q_m_and_t_train() -> None:
    """A 4.4-bit grid has 21 values, so it needs (and is counted at) 5 bits: freezing keeps those 5
    bits -- the one integer-bit rule -- and they hold while q_m and t keep training."""
    q = _quantizer(True, d=0.1, q_m=1.0, t=1.0)
    with torch.no_grad():
        q.d.copy_(q.step_for_bits(4.4))
    assert q.bits == 5
    q.freeze()
    assert q.frozen and q.bits == 5
    opt = torch.optim.SGD([q.q_m, q.t], lr=0.05)
    x = torch.randn(200, dtype=torch.float64) * 2
    for _ in range(5):
        opt.zero_grad()
        ((q(x) - 0.3 * x) ** 2).mean().backward()
        opt.step()
        assert q.bit_width().item() == pytest.approx(5.0, abs=1e-9) and q.bits == 5
    assert q.q_m.item() != 1.0


def test_unsigned_after_relu_is_detected_at_initialisation() -> None:
    relu_input = LearnedQuantizer(signed=None)
    relu_input.initialize(torch.rand(100))
    signed_input = LearnedQuantizer(signed=None)
    signed_input.initialize(torch.randn(100))
    assert not bool(relu_input.signed) and bool(signed_input.signed)
    with torch.no_grad():
        relu_input.d.copy_(relu_input.step_for_bits(3))
    assert torch.unique(relu_input(torch.rand(1000))).numel() == 8  # all 2^3 levels, no sign bit


def test_uninitialised_quantizer_refuses_eval() -> None:
    q = LearnedQuantizer().eval()
    with pytest.raises(RuntimeError, match="before initialisation"):
        q(torch.ones(3))


def test_installed_model_gives_an_honest_plan() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 5))
    layers = install_learned_quantizers(model, weights=True, activations=True, learn_exponent=False)
    batches = [torch.randn(4, 3, 4, 4) for _ in range(2)]
    calibrate_inputs(model, batches)
    assert set(layers) == {"0", "4"} and len(learned_quantizers(model)) == 4
    assert not model[0].weight_quantizer.t.requires_grad  # the linear variant
    assert bool(model[0].input_quantizer.signed) and not bool(model[4].input_quantizer.signed)
    for quantizer in learned_quantizers(model).values():
        with torch.no_grad():
            quantizer.d.copy_(quantizer.step_for_bits(3.6))
    freeze_all(model)
    assert layer_bits(model) == {"0": {"w": 4, "a": 4}, "4": {"w": 4, "a": 4}}
    plan = plan_from_model(model, "learned")
    assert plan.layers["0"].w_bits == 4 and plan.layers["4"].a_bits == 4
    verify_plan(plan, model, batches[0])
