"""Hardware cost models (jpqbench/accounting/hardware.py, jpqbench/cost_models/): at hard assignments the built-in size
and bops models equal the harness counter, soft assignments give expectations, mpic follows its
table, and a user's cost model is one decorated class in one file."""
from __future__ import annotations

import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import jpqbench.base.registry as registry
from jpqbench.accounting.counter import LayerShape, count, input_liveness
from jpqbench.accounting.hardware import LayerCostInput, get_cost_model, layer_shapes
from jpqbench.accounting.plan import CompressionPlan, LayerPlan
from jpqbench.base.errors import UserError
from jpqbench.base.registry import COST_MODELS, MODELS

W_BITS = (0, 2, 4, 8)
A_BITS = (2, 4, 8)


def _random_plan(model: nn.Module, generator: torch.Generator) -> CompressionPlan:
    """Per-channel bits drawn from W_BITS (0 = pruned, never all of a layer), a_bits from A_BITS."""
    plan = CompressionPlan.dense(model)
    for layer in plan.layers.values():
        bits = torch.tensor(W_BITS)[torch.randint(len(W_BITS), (layer.out_channels,), generator=generator)]
        bits[0] = 8
        layer.w_bits = bits.tolist()
        layer.pruned = torch.nonzero(bits == 0).flatten().tolist()
        layer.a_bits = A_BITS[int(torch.randint(len(A_BITS), (1,), generator=generator))]
    return plan


def _hard_inputs(model: nn.Module, input_shape: tuple[int, ...], plan: CompressionPlan) -> list[LayerCostInput]:
    """The cost models' view of a plan: one-hot probabilities (float64: exact integers), the counter's liveness."""
    alive = input_liveness(model, input_shape, plan)
    out = []
    for name, shape in layer_shapes(model, input_shape).items():
        claim: LayerPlan = plan.layers[name]
        w_index = torch.tensor([W_BITS.index(b) for b in claim.channel_bits()])
        out.append(LayerCostInput(shape, F.one_hot(w_index, len(W_BITS)).T.double(), W_BITS,
                                  F.one_hot(torch.tensor(A_BITS.index(claim.a_bits)), len(A_BITS)).double(),
                                  A_BITS, alive[name].double()))
    return out


@pytest.mark.parametrize("model_name, input_shape", [("digits_cnn", (1, 8, 8)), ("resnet8", (3, 32, 32)),
                                                     ("ds_cnn", (1, 49, 10)), ("vgg7", (3, 32, 32))])
def test_size_and_bops_equal_the_counter_at_hard_assignments(model_name: str, input_shape: tuple[int, ...]) -> None:
    """Mixed per-channel bits, pruned channels (residual, depthwise, flatten) and mixed input bits."""
    model = MODELS.get(model_name)(10, input_shape)
    plan = _random_plan(model, torch.Generator().manual_seed(0))
    report = count(model, input_shape, plan)
    layers = _hard_inputs(model, input_shape, plan)
    assert float(get_cost_model("size").total(layers)) == report.weight_bits
    assert float(get_cost_model("bops").total(layers)) == report.bops


def _conv_input(w_probs: torch.Tensor, a_probs: torch.Tensor, in_alive: torch.Tensor,
                groups: int = 1) -> LayerCostInput:
    shape = LayerShape("conv", in_channels=4, out_channels=w_probs.shape[1], groups=groups, kernel_area=9,
                       in_pixels=36, out_pixels=25, has_bias=True)
    return LayerCostInput(shape, w_probs, W_BITS, a_probs, A_BITS, in_alive)


def test_mpic_is_macs_over_the_tables_throughput() -> None:
    """Two kept channels (8 and 2 bits) and a pruned one, 4-bit input, one dead input channel."""
    w_probs = F.one_hot(torch.tensor([3, 1, 0]), 4).T.float()
    layer = _conv_input(w_probs, torch.tensor([0.0, 1.0, 0.0]), torch.tensor([1.0, 1.0, 0.0, 1.0]))
    macs = 3 * 9 * 25
    assert float(get_cost_model("mpic").layer_cost(layer)) == pytest.approx(macs / 2.1 + macs / 3.9)


def test_soft_assignment_costs_the_expectation() -> None:
    """Every layer cost is linear in each probability vector: a 50/50 mixture costs the mean."""
    a, b = F.one_hot(torch.tensor([3, 1, 0]), 4).T.float(), F.one_hot(torch.tensor([1, 2, 2]), 4).T.float()
    act, alive = torch.tensor([0.2, 0.3, 0.5]), torch.tensor([1.0, 0.5, 0.25, 1.0])
    for name in ("size", "bops", "mpic"):
        model = get_cost_model(name)
        mixed = model.layer_cost(_conv_input((a + b) / 2, act, alive))
        mean = (model.layer_cost(_conv_input(a, act, alive)) + model.layer_cost(_conv_input(b, act, alive))) / 2
        assert float(mixed) == pytest.approx(float(mean)), name


def test_grouped_fan_in_counts_the_inputs_of_each_group() -> None:
    """Two conv groups: output channel c only sees the alive inputs of its own group."""
    w_probs = F.one_hot(torch.tensor([3, 3, 3, 3]), 4).T.float()
    layer = _conv_input(w_probs, torch.tensor([0.0, 0.0, 1.0]), torch.tensor([1.0, 0.0, 1.0, 1.0]), groups=2)
    assert layer.fan_in.tolist() == [9.0, 9.0, 18.0, 18.0]


def test_mpic_refuses_precisions_outside_its_table() -> None:
    with pytest.raises(ValueError, match="mpic"):
        get_cost_model("mpic").check((0, 3, 8), (8,))
    get_cost_model("mpic").check((0, 2, 4, 8), (2, 4, 8))


def test_unknown_cost_model_names_the_known_ones() -> None:
    with pytest.raises(UserError) as info:
        get_cost_model("no_such_model")
    assert {"size", "bops", "mpic"} <= set(COST_MODELS.names())
    assert all(name in info.value.fix for name in ("size", "bops", "mpic"))


def test_a_user_cost_model_is_one_decorated_class_in_a_plugin_folder(tmp_path, monkeypatch) -> None:
    folder = tmp_path / "my_plugins"
    folder.mkdir()
    (folder / "my_npu.py").write_text(textwrap.dedent("""
        from jpqbench.accounting.hardware import CostModel
        from jpqbench.base.registry import register_cost_model

        @register_cost_model("my_npu")
        class MyNPU(CostModel):
            '''Cycles = MACs x w_bits / 8.'''

            def layer_cost(self, layer):
                return (layer.macs * layer.expected(lambda w, a: w / 8)).sum()
    """))
    registry.discover_plugins()
    monkeypatch.setattr(COST_MODELS, "_items", dict(COST_MODELS._items))
    monkeypatch.setattr(COST_MODELS, "_origin", dict(COST_MODELS._origin))
    monkeypatch.setattr(registry, "_discovered", False)
    monkeypatch.setenv(registry.PLUGIN_PATH_ENV, str(folder))
    try:
        model = get_cost_model("my_npu")
        layer = _conv_input(F.one_hot(torch.tensor([3, 1]), 4).T.float(), torch.tensor([0.0, 0.0, 1.0]),
                            torch.ones(4))
        assert float(model.layer_cost(layer)) == 36 * 25 * (8 + 2) / 8
    finally:
        sys.modules.pop("jpqbench_plugins.my_plugins.my_npu", None)
