"""UniformQuantizer: grid, straight-through gradients, LSQ, asymmetric zero point, per-channel steps."""
from __future__ import annotations

import pytest
import torch

from jpqbench.nn.quant import MinMaxObserver, UniformQuantizer, round_ste, scale_grad


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _calibrated(x: torch.Tensor, bits: int, mode: str = "symmetric", channels: int = 1) -> UniformQuantizer:
    q = UniformQuantizer(bits, mode, channels=channels)
    flat = x.reshape(channels, -1)
    q.calibrate(flat.amin(dim=1), flat.amax(dim=1))
    return q.eval()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_output_lies_on_the_grid(bits: int) -> None:
    x = torch.randn(4096, generator=_gen())
    q = _calibrated(x, bits)
    y = q(x)
    step = q.step.item()
    levels = y / step
    assert torch.allclose(levels, levels.round(), atol=1e-4)  # integer multiples of the step
    assert levels.round().min() >= -(2 ** (bits - 1)) + 1 and levels.round().max() <= 2 ** (bits - 1) - 1
    assert torch.unique(y).numel() <= 2 ** bits
    assert q(torch.zeros(3)).eq(0).all()  # zero is on the symmetric grid
    # range max maps to itself; rounding error inside the range is at most half a step
    assert (y - x).abs().max() <= step / 2 + 1e-6
    assert y.abs().max() == pytest.approx(x.abs().max().item(), rel=1e-5)


def test_per_channel_grid_and_steps_differ_per_channel() -> None:
    scales = torch.tensor([0.01, 1.0, 100.0])
    w = torch.randn(3, 64, generator=_gen()) * scales[:, None]
    q = UniformQuantizer(4, "symmetric", channels=3)
    q.train()
    y = q(w)  # first training batch initialises from min/max per channel
    assert bool(q.initialized)
    expected = w.abs().amax(dim=1) / 7
    assert torch.allclose(q.step.detach(), expected, rtol=1e-5)
    assert q.step[0] < q.step[1] < q.step[2]
    for c in range(3):
        assert torch.unique(y[c]).numel() <= 16
        assert (y[c] - w[c]).abs().max() <= q.step[c].item() / 2 + 1e-6 * scales[c]


def test_per_channel_on_conv_weight_uses_axis_zero() -> None:
    w = torch.randn(8, 4, 3, 3, generator=_gen())
    w[5] *= 50
    q = _calibrated(w, 3, channels=8)
    y = q(w)
    assert y.shape == w.shape
    for c in range(8):
        assert torch.unique(y[c]).numel() <= 2 ** 3
        assert q.step[c].item() == pytest.approx(w[c].abs().max().item() / 3, rel=1e-5)


def test_ste_gradient_is_one_inside_range_zero_outside() -> None:
    q = _calibrated(torch.tensor([-1.0, 1.0]), 4)  # step 1/7, levels -7..7
    x = torch.tensor([-0.9, -0.33, 0.0, 0.123, 0.77, 0.9, -3.0, 2.5, 1.2], requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [1, 1, 1, 1, 1, 1, 0, 0, 0]


def test_ste_gradient_is_one_up_to_the_range_ends() -> None:
    """Regression: clamping after rounding gave zero gradient to every in-range value that rounds to
    q_min / q_max (at 2 bits: every weight not rounded to 0)."""
    q = _calibrated(torch.tensor([-1.0, 1.0]), 4)  # step 1/7: x/step in [-7, 7] is inside the range
    x = torch.tensor([-0.999, -0.95, 0.95, 0.999], requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [1, 1, 1, 1]


def test_round_ste_and_scale_grad() -> None:
    x = torch.tensor([0.4, 1.6], requires_grad=True)
    y = round_ste(x)
    assert y.tolist() == [0.0, 2.0]
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0]
    s = torch.tensor(3.0, requires_grad=True)
    out = scale_grad(s, 0.25)
    assert out.item() == 3.0
    out.backward()
    assert s.grad.item() == pytest.approx(0.25)


def test_lsq_step_is_initialised_and_receives_a_gradient() -> None:
    x = torch.randn(2, 256, generator=_gen())
    q = UniformQuantizer(4, "symmetric", channels=1, learn_step=True).train()
    assert q.step.requires_grad
    y = q(x)
    assert q.step.item() == pytest.approx(2 * x.abs().mean().item() / 7 ** 0.5, rel=1e-5)
    ((y - 0.5 * x) ** 2).sum().backward()
    assert q.step.grad is not None and q.step.grad.abs().item() > 0
    # a learned step moves under an optimizer
    before = q.step.item()
    torch.optim.SGD(q.parameters(), lr=0.1).step()
    assert q.step.item() != before


def test_calibrated_step_is_not_learned() -> None:
    q = UniformQuantizer(4)
    assert not q.step.requires_grad
    assert [p for p in q.parameters() if p.requires_grad] == []


def test_asymmetric_all_positive_inputs_keep_zero_exact() -> None:
    x = torch.rand(1000, generator=_gen()) * 5 + 1  # in [1, 6]: no zero in the data
    q = _calibrated(x, 4, "asymmetric")
    assert q.zero_point.item() == 0  # the range is extended down to 0
    assert q(torch.zeros(5)).eq(0).all()
    y = q(x)
    assert torch.unique(y).numel() <= 16
    assert (y - x).abs().max() <= q.step.item() / 2 + 1e-6
    assert (y >= 0).all()


def test_asymmetric_post_relu_uses_all_levels() -> None:
    x = torch.relu(torch.randn(4096, generator=_gen()))
    q = _calibrated(x, 3, "asymmetric")
    y = q(x)
    assert torch.unique(y).numel() == 8  # unsigned: 2**bits levels, none wasted on negatives
    assert q(torch.zeros(1)).item() == 0.0


def test_asymmetric_mixed_sign_zero_exact() -> None:
    x = torch.randn(1000, generator=_gen()) + 0.7
    q = _calibrated(x, 4, "asymmetric")
    assert 0 <= q.zero_point.item() <= 15
    assert q(torch.zeros(2)).eq(0).all()
    y = q(x)
    assert torch.unique(y).numel() <= 16
    assert (y - x).abs().max() <= q.step.item() / 2 + 1e-5


def test_asymmetric_all_negative_inputs_keep_zero_exact() -> None:
    """Regression: x_max was not extended up to 0, so the zero point fell outside [q_min, q_max]."""
    x = -(torch.rand(1000, generator=_gen()) * 4 + 1)  # in [-5, -1]
    q = _calibrated(x, 4, "asymmetric")
    assert q.q_min <= q.zero_point.item() <= q.q_max
    assert q(torch.zeros(1)).item() == 0.0


@pytest.mark.parametrize("bits", [0, 1, 17, 32])
def test_bits_outside_2_16_are_refused(bits: int) -> None:
    with pytest.raises(ValueError, match="bits"):
        UniformQuantizer(bits)


@pytest.mark.parametrize("bits", [2, 16])
def test_bits_at_the_limits_are_accepted(bits: int) -> None:
    assert UniformQuantizer(bits).bits == bits


def test_eval_before_initialisation_is_refused() -> None:
    q = UniformQuantizer(8).eval()
    with pytest.raises(RuntimeError, match="calibrat"):
        q(torch.randn(4))
    q.calibrate(torch.tensor([-1.0]), torch.tensor([1.0]))
    assert q(torch.tensor([0.5])).shape == (1,)


def test_initialised_state_survives_state_dict() -> None:
    q = _calibrated(torch.randn(100, generator=_gen()), 4)
    fresh = UniformQuantizer(4)
    fresh.load_state_dict(q.state_dict())
    x = torch.randn(50, generator=_gen(1))
    assert torch.equal(fresh.eval()(x), q(x))


def test_minmax_observer_tracks_running_range() -> None:
    obs = MinMaxObserver(channels=2)
    obs(torch.tensor([[1.0, -2.0], [3.0, 4.0]]))
    obs(torch.tensor([[-5.0, 0.0], [2.0, 9.0]]))
    assert obs.x_min.tolist() == [-5.0, 2.0] and obs.x_max.tolist() == [1.0, 9.0]


def test_lsq_evaluation_does_not_depend_on_the_batch_it_is_part_of() -> None:
    """The gradient scale is for training only: under no_grad a sample quantizes the same alone
    or inside any batch (the exported artifact reads quantizers on tensors of its own size)."""
    q = UniformQuantizer(4, "symmetric", channels=1, learn_step=True).train()
    q(torch.randn(64, 3))
    q.step.data.fill_(0.1)  # (s - s*f) + s*f rounds away from s = 0.1 for some sizes, e.g. 12 elements
    q.eval()
    sample = torch.linspace(-1, 1, 12).reshape(4, 3)
    with torch.no_grad():
        alone, in_batch = q(sample), q(torch.cat([sample, torch.randn(5, 3)]))[:4]
    assert torch.equal(alone, in_batch)
    assert torch.equal(alone, torch.clamp(torch.round(sample / 0.1), -7, 7) * torch.tensor(0.1))
