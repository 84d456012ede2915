"""The linear DP-SGD trainer of scripts/benchmark_scatter_proxy.py against Opacus's per-sample gradients."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import benchmark_scatter_proxy as proxy  # noqa: E402


@pytest.mark.parametrize("views", [1, 3])
def test_closed_form_clipping_matches_opacus(views):
    from opacus import GradSampleModule

    from synthgen.dp_training import average_over_copies

    torch.manual_seed(0)
    examples, dimension, classes = 12, 20, 5
    layer = torch.nn.Linear(dimension, classes).double()
    inputs = torch.randn(examples, views, dimension, dtype=torch.float64)
    labels = torch.randint(classes, (examples,))
    # Even examples get small inputs and the label that the bias favours, so their gradients stay
    # below the clipping norm while the others' exceed it.
    inputs[::2] *= 0.01
    labels[::2] = 0
    with torch.no_grad():
        layer.bias[0] = 8.0

    module = GradSampleModule(layer, loss_reduction="sum")
    logits = module(inputs.reshape(examples * views, dimension))
    F.cross_entropy(logits, labels.repeat_interleave(views), reduction="sum").backward()
    average_over_copies(module, views)
    samples = [layer.weight.grad_sample, layer.bias.grad_sample]  # (examples, ...) after averaging
    norms = torch.sqrt(sum(sample.flatten(1).pow(2).sum(1) for sample in samples))
    factors = (proxy.CLIP / norms).clamp(max=1.0)
    expected = [torch.einsum("b,b...->...", factors, sample) for sample in samples]

    assert (norms < proxy.CLIP).any()
    assert (norms > proxy.CLIP).any()
    weight_sum, bias_sum = proxy.clipped_sums(layer.weight.detach(), layer.bias.detach(), inputs, labels)
    torch.testing.assert_close(weight_sum, expected[0])
    torch.testing.assert_close(bias_sum, expected[1])
