"""Augmentation multiplicity and weight standardisation in DP-SGD teacher training."""

import json

import pytest
import torch
from torch.nn import functional as F

from synthgen.config import TeacherTrainConfig
from synthgen.data import load_image_data
from synthgen.dp_training import AUGMENT_SHIFT, augmented_copies, average_over_copies
from synthgen.models import Classifier, StandardizedConv2d
from synthgen.teacher import META_FILE, load_teacher, train_teacher, train_teacher_dp


def shifted_interior(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Return the part of a (H, W) image that a shift by (dy, dx) moves into the interior."""
    height, width = image.shape
    return image[AUGMENT_SHIFT + dy:height - AUGMENT_SHIFT + dy, AUGMENT_SHIFT + dx:width - AUGMENT_SHIFT + dx]


def test_augmented_copies_shift_own_image():
    images = torch.rand(3, 1, 12, 12)
    copies = augmented_copies(images, 4, torch.Generator().manual_seed(0))
    assert copies.shape == (12, 1, 12, 12)
    inner = slice(AUGMENT_SHIFT, 12 - AUGMENT_SHIFT)
    offsets = range(-AUGMENT_SHIFT, AUGMENT_SHIFT + 1)
    shifts_seen = set()
    for row, copy in enumerate(copies):
        source = images[row // 4, 0]
        # The interior of each copy must equal its own image moved by one of the allowed offsets.
        matches = set()
        for dy in offsets:
            for dx in offsets:
                if torch.equal(copy[0, inner, inner], shifted_interior(source, dy, dx)):
                    matches.add((dy, dx))
        assert matches, f"copy {row} is not a shift of image {row // 4}"
        shifts_seen.update(matches)
    assert len(shifts_seen) > 1  # the shifts are random, not all the same
    again = augmented_copies(images, 4, torch.Generator().manual_seed(0))
    assert torch.equal(copies, again)


def test_averaged_gradients_match_mean_loss():
    # After averaging, Opacus must hold each example's gradient of the mean loss over its copies.
    # StandardizedConv2d has no Opacus grad sampler, so this also checks Opacus's functorch path.
    from opacus import GradSampleModule

    torch.manual_seed(0)
    model = Classifier(image_size=8, width=4, hidden=8, norm="group", weight_standardization=True)
    reference = Classifier.from_config(model.config)
    reference.load_state_dict(model.state_dict())
    sampled = GradSampleModule(model)
    images = torch.rand(3, 1, 8, 8)
    labels = torch.tensor([1, 4, 7])
    copies = augmented_copies(images, 2, torch.Generator().manual_seed(1))
    loss = F.cross_entropy(sampled(copies), labels.repeat_interleave(2))
    loss.backward()
    average_over_copies(sampled, 2)
    for example in range(3):
        own = F.cross_entropy(reference(copies[2 * example:2 * example + 2]), labels[example].repeat(2))
        grads = torch.autograd.grad(own, list(reference.parameters()))
        for parameter, expected in zip(model.parameters(), grads):
            assert parameter.grad_sample.shape[0] == 3
            torch.testing.assert_close(parameter.grad_sample[example], expected, rtol=1e-4, atol=1e-6)


def test_averaging_rejects_two_backward_passes():
    from opacus import GradSampleModule

    sampled = GradSampleModule(Classifier(image_size=8, width=4, hidden=8, norm="group"))
    copies = augmented_copies(torch.rand(2, 1, 8, 8), 2, torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 0, 3, 3])
    for _ in range(2):  # no zero_grad in between: Opacus keeps both passes as a list
        F.cross_entropy(sampled(copies), labels).backward()
    with pytest.raises(RuntimeError, match="several backward passes; call zero_grad"):
        average_over_copies(sampled, 2)


def test_standardized_convolution_ignores_weight_scale():
    torch.manual_seed(0)
    conv = StandardizedConv2d(2, 3, 3, padding=1)
    images = torch.rand(4, 2, 6, 6)
    before = conv(images)
    with torch.no_grad():
        conv.weight.mul_(7.0).add_(0.3)  # per-channel affine changes of the weights cancel out
    # Equal up to the 1e-5 added to the variance, which is small next to the variance of these weights.
    torch.testing.assert_close(conv(images), before, rtol=2e-3, atol=2e-3)
    standardized = conv.weight - conv.weight.mean(dim=(1, 2, 3), keepdim=True)
    standardized = standardized / standardized.pow(2).mean(dim=(1, 2, 3), keepdim=True).add(1e-5).sqrt()
    torch.testing.assert_close(conv(images), F.conv2d(images, standardized, conv.bias, padding=1), rtol=1e-4,
                               atol=1e-5)


def test_dp_training_augmented_and_standardised(mnist_small, tmp_path):
    import duckdb

    config = TeacherTrainConfig(data=str(mnist_small), out=str(tmp_path / "teacher"), dp=True, epsilon=8.0,
                                delta=1e-5, epochs=2, batch_size=64, lr=1e-2, width=8, hidden=32,
                                ledger=str(tmp_path / "ledger.duckdb"), noise_seed=3, augment_multiplicity=3,
                                weight_standardization=True, physical_batch_size=32)
    train = load_image_data(mnist_small, "train")
    test = load_image_data(mnist_small, "test")
    teacher = train_teacher_dp(config, train, test)
    dp = json.loads((tmp_path / "teacher" / META_FILE).read_text())["dp"]
    assert dp["augment_multiplicity"] == 3
    assert dp["weight_standardization"] is True
    assert dp["epsilon"] <= 8.0 + 1e-6
    # The copies do not change the spend: one charge that covers the planned Poisson steps.
    with duckdb.connect(str(tmp_path / "ledger.duckdb"), read_only=True) as db:
        assert db.execute("SELECT count(*), sum(queries) FROM spends").fetchone() == (1, dp["steps"])
    # The saved teacher rebuilds the standardised convolutions from its config.
    loaded = load_teacher(tmp_path / "teacher")
    assert isinstance(loaded.module.features[0], StandardizedConv2d)
    images = torch.from_numpy(test.images[:20]).float() / 255
    torch.testing.assert_close(loaded.module(images), teacher.module(images))
    assert teacher.meta.test_accuracy > 20.0  # above chance after 2 epochs on 600 images


def test_augmentation_rejected_where_inapplicable(mnist_small, tmp_path):
    train = load_image_data(mnist_small, "train")
    base = dict(data=str(mnist_small), dp=True, epsilon=8.0, epochs=1, batch_size=64,
                ledger=str(tmp_path / "ledger.duckdb"))
    with pytest.raises(ValueError, match=r"augment_multiplicity must be an integer >= 1 \(1: no augmentation\), got 0"):
        train_teacher_dp(TeacherTrainConfig(out=str(tmp_path / "a"), augment_multiplicity=0, **base), train)
    with pytest.raises(ValueError, match="pixels front end only"):
        train_teacher_dp(TeacherTrainConfig(out=str(tmp_path / "b"), augment_multiplicity=4, frontend="scatter",
                                            hidden=0, **base), train)
    with pytest.raises(ValueError, match="DP-SGD settings; add --dp"):
        train_teacher(TeacherTrainConfig(data=str(mnist_small), out=str(tmp_path / "c"), weight_standardization=True),
                      train)
    with pytest.raises(ValueError, match="weight_standardization needs frontend='pixels' and norm='group'"):
        Classifier(norm="none", weight_standardization=True)
    assert not any((tmp_path / name).exists() for name in "abc")
    assert not (tmp_path / "ledger.duckdb").exists()
