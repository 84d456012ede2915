"""Query selection, stroke queries, shifted inputs, pseudo-labels and the image priors: charged exactly, reproducible."""

import importlib
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from synthgen.models import Classifier
from synthgen.transcribe import (ShapeCritic, TranscriptionError, pseudo_label_loss, render_silhouettes,
                                 render_strokes, select_queries, transcribe)

from .conftest import small_config
from .forward_counter import ForwardCounter, install
from .test_invariants import ledger_queries

# The module, not the function of the same name that the package exports.
transcribe_module = importlib.import_module("synthgen.transcribe")
EXTRAS = dict(query_pool=3, student_shift=2, pseudo_label_weight=1.0, pseudo_label_threshold=0.5,
              procedural_fraction=0.25, stroke_prior_weight=1.0)


def probs_with_margins(rows: list[tuple[int, float]], classes: int = 3) -> torch.Tensor:
    """Rows whose argmax is the given class and whose top-two margin is the given value."""
    probs = torch.zeros(len(rows), classes)
    for index, (label, margin) in enumerate(rows):
        second = (label + 1) % classes
        probs[index, label] = (1 + margin) / 2
        probs[index, second] = (1 - margin) / 2
    return probs


def test_selection_takes_classes_in_turn_smallest_margin_first():
    probs = probs_with_margins([(0, 0.14), (0, 0.1), (2, 0.6), (0, 0.12), (1, 0.5)])
    # By margin alone the three class-0 images would come first. In turns, the first round takes
    # the least sure image of each predicted class, smallest margin first, then class 0 again.
    assert select_queries(probs, 3).tolist() == [1, 4, 2]
    assert select_queries(probs, 5).tolist() == [1, 4, 2, 3, 0]


def test_selection_is_balanced_when_one_class_dominates():
    probs = probs_with_margins([(0, 0.01 * i) for i in range(20)] + [(1, 0.8), (2, 0.9)])
    chosen = select_queries(probs, 6).tolist()
    assert chosen[:3] == [0, 20, 21]
    assert chosen[3:] == [1, 2, 3]


def test_teacher_receives_only_chosen_images(small_teacher, mnist_small, tmp_path, monkeypatch):
    counter = ForwardCounter()
    install(counter, monkeypatch.setattr)
    result = transcribe(small_config(small_teacher, tmp_path / "run", mnist_small, **EXTRAS))
    # 3 x 12 candidates are generated per iteration and 12 are sent with 4 stroke images. The
    # pseudo-labels cost no query.
    assert counter.examples == 6 * 16
    assert ledger_queries(Path(os.environ["SYNTHGEN_LEDGER"])) == counter.examples
    assert result.report["queries"] == counter.examples
    hyperparameters = result.report["public_facts"]["hyperparameters"]
    assert {name: hyperparameters[name] for name in EXTRAS} == EXTRAS


def test_generator_learns_from_its_own_rows_only(small_teacher, mnist_small, tmp_path, monkeypatch):
    from synthgen import transcribe as engine

    calls = []
    original = engine._Run._generator_update

    def record_rows(run, images, targets):
        # The buffer contains this iteration's images and targets in the order they were sent.
        calls.append({"images": (images.detach() * 255).round().to(torch.uint8), "targets": targets.clone(),
                      "sent_images": run.buffer.images[:16].clone(), "sent_targets": run.buffer.targets[:16].clone()})
        return original(run, images, targets)

    monkeypatch.setattr(engine._Run, "_generator_update", record_rows)
    transcribe(small_config(small_teacher, tmp_path / "run", mnist_small, steps=1, **EXTRAS))
    # 16 images per batch: 12 generator images, chosen from 36 candidates, then 4 strokes.
    assert len(calls) == 1
    call = calls[0]
    assert call["images"].shape[0] == 12
    assert torch.equal(call["images"], call["sent_images"][:12])
    assert torch.equal(call["targets"], call["sent_targets"][:12])


@pytest.mark.parametrize("extras", [EXTRAS, dict(EXTRAS, stroke_prior_weight=0.0, silhouette_prior_weight=1.0)],
                         ids=["stroke-prior", "silhouette-prior"])
def test_resume_with_selection_equals_uninterrupted_run(small_teacher, mnist_small, tmp_path, extras):
    whole = transcribe(small_config(small_teacher, tmp_path / "whole", mnist_small, steps=7, **extras))
    transcribe(small_config(small_teacher, tmp_path / "split", mnist_small, steps=7, stop_after=5, **extras))
    resumed = transcribe(small_config(small_teacher, tmp_path / "split", mnist_small, steps=7, resume=True, **extras))
    for part in ("student", "generator"):
        a = load_file(str(next((tmp_path / "whole" / part).glob("*.safetensors"))))
        b = load_file(str(next((tmp_path / "split" / part).glob("*.safetensors"))))
        for name in a:
            assert torch.equal(a[name], b[name]), f"{part}.{name}"
    assert whole.report["epsilon"] == resumed.report["epsilon"]


def test_resume_with_a_changed_option_is_rejected(small_teacher, mnist_small, tmp_path):
    transcribe(small_config(small_teacher, tmp_path / "run", mnist_small, steps=4, stop_after=2, **EXTRAS))
    changed = dict(EXTRAS, query_pool=1, procedural_fraction=0.5, stroke_prior_weight=2.0)
    with pytest.raises(TranscriptionError, match="query_pool, procedural_fraction, stroke_prior_weight differ from the "
                                                 "interrupted run"):
        transcribe(small_config(small_teacher, tmp_path / "run", mnist_small, steps=4, resume=True, **changed))


def test_pseudo_label_loss_uses_confident_predictions_only():
    torch.manual_seed(0)
    student = Classifier(image_size=28, width=4, hidden=8)
    images = torch.rand(6, 1, 28, 28)
    with torch.no_grad():
        probs = torch.softmax(student(images), dim=1)
    labels = probs.argmax(dim=1)
    everything = pseudo_label_loss(student, images, 0.0, lambda x: x)
    expected = torch.nn.functional.cross_entropy(student(images), labels)
    assert torch.allclose(everything, expected)
    everything.backward()
    assert student.fc2.weight.grad.abs().sum() > 0
    # Above every prediction's confidence, no image counts and nothing is learnt.
    nothing = pseudo_label_loss(student, images, float(probs.max()) + 1e-6, lambda x: x)
    assert nothing.item() == 0.0
    # Only the images above the threshold count, and the mean is over all images.
    threshold = float(probs.max(dim=1).values.median())
    kept = probs.max(dim=1).values >= threshold
    partial = pseudo_label_loss(student, images, threshold, lambda x: x)
    losses = torch.nn.functional.cross_entropy(student(images), labels, reduction="none")
    assert torch.allclose(partial, losses[kept].sum() / 6)


def test_pseudo_labels_change_the_student(small_teacher, mnist_small, tmp_path):
    plain = dict(EXTRAS, pseudo_label_weight=0.0)
    transcribe(small_config(small_teacher, tmp_path / "plain", mnist_small, steps=3, **plain))
    transcribe(small_config(small_teacher, tmp_path / "pseudo", mnist_small, steps=3, **EXTRAS))
    a = load_file(str(next((tmp_path / "plain" / "student").glob("*.safetensors"))))
    b = load_file(str(next((tmp_path / "pseudo" / "student").glob("*.safetensors"))))
    assert any(not torch.equal(a[name], b[name]) for name in a)


@pytest.mark.parametrize("prior, renderer", [("stroke_prior_weight", "render_strokes"),
                                             ("silhouette_prior_weight", "render_silhouettes")])
def test_image_prior_keeps_spend(small_teacher, mnist_small, tmp_path, monkeypatch, prior, renderer):
    calls = {"render_strokes": 0, "render_silhouettes": 0}
    for name in calls:
        original = getattr(transcribe_module, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(transcribe_module, name, counted)
    plain = dict(EXTRAS, stroke_prior_weight=0.0)
    first = transcribe(small_config(small_teacher, tmp_path / "plain", mnist_small, steps=3, **plain))
    plain_calls = dict(calls)
    second = transcribe(small_config(small_teacher, tmp_path / "prior", mnist_small, steps=3,
                                     **dict(plain, **{prior: 1.0})))
    assert calls[renderer] > plain_calls[renderer]  # the critic is trained on the chosen prior's shapes
    plain_weights = load_file(str(next((tmp_path / "plain" / "generator").glob("*.safetensors"))))
    prior_weights = load_file(str(next((tmp_path / "prior" / "generator").glob("*.safetensors"))))
    assert any(not torch.equal(plain_weights[name], prior_weights[name]) for name in plain_weights)
    assert first.report["queries"] == second.report["queries"]
    assert first.report["epsilon"] == second.report["epsilon"]


# Silhouettes and strokes are both dark-background shapes, so telling them apart takes more steps.
@pytest.mark.parametrize("render, other, steps", [
    (render_strokes, lambda count, shape: torch.rand(count, *shape), 30),
    (render_silhouettes, lambda count, shape: torch.rand(count, *shape), 30),
    (render_silhouettes, render_strokes, 150),
])
def test_critic_tells_shapes_from_others(render, other, steps):
    torch.manual_seed(0)
    critic = ShapeCritic(1, 28)
    optimizer = torch.optim.Adam(critic.parameters(), lr=2e-4, betas=(0.5, 0.999))
    shapes, noise = render(64, (1, 28, 28)), other(64, (1, 28, 28))

    def loss() -> torch.Tensor:
        return (torch.nn.functional.softplus(-critic(shapes)).mean()
                + torch.nn.functional.softplus(critic(noise)).mean())

    before = loss().item()
    for _ in range(steps):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    with torch.no_grad():
        assert loss().item() < 0.5 * before
        assert (critic(shapes) > 0).float().mean() > 0.9
        assert (critic(noise) < 0).float().mean() > 0.9


def test_strokes_are_drawn_inside_the_image():
    torch.manual_seed(0)
    images = render_strokes(64, (1, 28, 28))
    assert images.shape == (64, 1, 28, 28)
    assert images.min() >= 0
    assert images.max() <= 1
    ink = images.flatten(1)
    assert (ink.max(dim=1).values > 0.9).all()  # every image has a stroke
    assert (ink.mean(dim=1) < 0.4).all()  # and most of it stays background
    border = torch.cat([images[..., :2, :].flatten(1), images[..., -2:, :].flatten(1),
                        images[..., :, :2].flatten(1), images[..., :, -2:].flatten(1)], dim=1)
    assert border.max() < 0.5  # control points stay in the central 70%
    torch.manual_seed(0)
    assert torch.equal(render_strokes(64, (1, 28, 28)), images)
    assert render_strokes(2, (3, 32, 32)).shape == (2, 3, 32, 32)


def test_silhouettes_are_filled_shapes_on_dark_corners():
    torch.manual_seed(0)
    images = render_silhouettes(256, (1, 28, 28))
    assert images.shape == (256, 1, 28, 28)
    assert images.min() >= 0
    assert images.max() <= 1
    pixels = images.flatten(1)
    covered = (pixels > 0.1).float().mean(dim=1)
    assert (covered > 0.02).all()  # every image has a shape
    assert covered.mean() > 0.2  # filled areas, not thin strokes
    assert covered.mean() < 0.7  # on a background
    corners = torch.stack([images[:, 0, 0, 0], images[:, 0, 0, -1], images[:, 0, -1, 0], images[:, 0, -1, -1]])
    assert corners.max() < 0.5
    mirrored = (images - images.flip(-1)).abs().flatten(1).mean(dim=1)
    assert (mirrored < 0.1).float().mean() > 0.5  # most are upright and close to mirror-symmetric
    torch.manual_seed(0)
    assert torch.equal(render_silhouettes(256, (1, 28, 28)), images)
    assert render_silhouettes(2, (3, 32, 32)).shape == (2, 3, 32, 32)


def test_silhouettes_have_no_seam_without_legs():
    # Without a leg gap the centre columns are filled like their neighbours. A leg cut that is
    # applied to every shape darkens them to about 0.78 of the neighbours at this height.
    torch.manual_seed(0)
    lower = render_silhouettes(4096, (1, 28, 28))[:, 0, 20:26].mean(dim=(0, 1))
    assert lower[13:15].mean() / lower[[10, 17]].mean() > 0.9


def test_silhouette_knots_are_checked():
    with pytest.raises(ValueError, match="knots must be >= 2"):
        render_silhouettes(4, (1, 28, 28), knots=1)


def test_two_image_priors_are_rejected(small_teacher, mnist_small, tmp_path):
    with pytest.raises(TranscriptionError, match="choose one image prior"):
        transcribe(small_config(small_teacher, tmp_path / "run", mnist_small, stroke_prior_weight=1.0,
                                silhouette_prior_weight=1.0))
    assert not (tmp_path / "run").exists()
    assert not Path(os.environ["SYNTHGEN_LEDGER"]).exists()


@pytest.mark.parametrize("field, value", [
    ("procedural_fraction", 1.0), ("procedural_fraction", -0.1),
    ("query_pool", 0), ("query_pool", True), ("student_shift", -1), ("student_shift", 28),
    ("procedural_fraction", 0.01), ("pseudo_label_weight", -0.5),
    ("pseudo_label_weight", float("nan")), ("pseudo_label_threshold", 0.0), ("pseudo_label_threshold", 1.5),
    ("stroke_prior_weight", -1.0), ("stroke_prior_weight", float("inf")), ("stroke_prior_weight", True),
    ("silhouette_prior_weight", -1.0), ("silhouette_prior_weight", float("nan")),
])
def test_bad_settings_are_rejected_before_anything_is_written(small_teacher, mnist_small, tmp_path, field, value):
    with pytest.raises(TranscriptionError, match=field):
        transcribe(small_config(small_teacher, tmp_path / "run", mnist_small, **{field: value}))
    assert not (tmp_path / "run").exists()
    assert not Path(os.environ["SYNTHGEN_LEDGER"]).exists()
