"""Scattering classifiers: the fixed front end, DP-SGD on its features, and a student copied from a DP teacher."""

import json

import pytest
import torch

from synthgen.config import TeacherTrainConfig
from synthgen.data import load_image_data
from synthgen.dp_training import _ScatterHead, scatter_features
from synthgen.models import SCATTER_CHANNELS, Classifier
from synthgen.privacy.accounting import PrivacyEvent, pld_epsilon
from synthgen.privacy.ledger import Ledger
from synthgen.teacher import META_FILE, load_teacher, train_teacher_dp
from synthgen.transcribe import REPORT_FILE, TranscriptionError, _copy_of_teacher, transcribe

from .conftest import small_config


@pytest.fixture(scope="module")
def scatter_teacher(mnist_small, tmp_path_factory):
    import os

    os.environ["TQDM_DISABLE"] = "1"
    folder = tmp_path_factory.mktemp("scatter-teacher")
    config = TeacherTrainConfig(data=str(mnist_small), out=str(folder / "teacher"), dp=True, epsilon=8.0, delta=1e-5,
                                epochs=4, batch_size=128, lr=2.0, hidden=0, frontend="scatter", optimizer="sgd",
                                max_grad_norm=0.1, ema_decay=0.9, ledger=str(folder / "ledger.duckdb"),
                                noise_seed=5)
    train_teacher_dp(config, load_image_data(mnist_small, "train"), load_image_data(mnist_small, "test"))
    return folder / "teacher", folder / "ledger.duckdb"


def test_scatter_classifier_keeps_only_learned_weights(tmp_path):
    model = Classifier(frontend="scatter", hidden=0, mean=(0.0,), std=(1.0,)).eval()
    assert sorted(model.state_dict()) == ["fc2.bias", "fc2.weight"]
    assert model.fc2.in_features == SCATTER_CHANNELS * 7 * 7
    images = torch.rand(5, 1, 28, 28)
    model.save_pretrained(tmp_path)
    loaded = Classifier.from_pretrained(tmp_path).eval()
    assert torch.equal(model(images), loaded(images))
    # The generator learns through the student, so the front end must pass gradients to the pixels.
    images.requires_grad_(True)
    model(images).logsumexp(1).sum().backward()
    assert images.grad.abs().sum() > 0


def test_conv_head_saves_learned_weights_and_passes_gradients(tmp_path):
    torch.manual_seed(0)
    model = Classifier(frontend="scatter", head="conv", width=16, hidden=32, mean=(0.0,), std=(1.0,)).eval()
    # GroupNorm without parameters, two convolutions, two linear layers; the filters are not saved.
    assert sorted(model.state_dict()) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight", "features.1.bias",
                                          "features.1.weight", "features.3.bias", "features.3.weight"]
    assert model.features[1].in_channels == SCATTER_CHANNELS
    assert model.fc1.in_features == 32 * 4 * 4  # 7x7 scattering maps, halved by the stride-2 convolution
    images = torch.rand(5, 1, 28, 28)
    model.save_pretrained(tmp_path)
    loaded = Classifier.from_pretrained(tmp_path).eval()
    assert loaded.config.head == "conv"
    assert torch.equal(model(images), loaded(images))
    # Bounded activations: every penultimate value lies in (-1, 1).
    assert model.embed(images).abs().max() < 1
    images.requires_grad_(True)
    model(images).logsumexp(1).sum().backward()
    assert images.grad.abs().sum() > 0


def test_scatter_classifier_rejects_bad_settings():
    with pytest.raises(ValueError, match="frontend must be 'pixels' or 'scatter', got 'wavelet'"):
        Classifier(frontend="wavelet")
    with pytest.raises(ValueError, match="hidden must be >= 1"):
        Classifier(frontend="pixels", hidden=0)
    with pytest.raises(ValueError, match="head must be 'dense' or 'conv', got 'mlp'"):
        Classifier(frontend="scatter", head="mlp")
    with pytest.raises(ValueError, match="head='conv' needs frontend='scatter' and hidden >= 1"):
        Classifier(frontend="pixels", head="conv")
    with pytest.raises(ValueError, match="got frontend='scatter', hidden=0"):
        Classifier(frontend="scatter", head="conv", hidden=0)


@pytest.mark.parametrize(("frontend", "hidden"), [("pixels", 32), ("scatter", 0)])
def test_dp_teacher_rejects_conv_head_without_scattering(mnist_small, tmp_path, frontend, hidden):
    config = TeacherTrainConfig(data=str(mnist_small), out=str(tmp_path / "teacher"), dp=True, epsilon=8.0,
                                delta=1e-5, hidden=hidden, frontend=frontend, head="conv",
                                ledger=str(tmp_path / "ledger.duckdb"))
    with pytest.raises(ValueError, match=f"got frontend '{frontend}' and hidden {hidden}; use --head dense"):
        train_teacher_dp(config, load_image_data(mnist_small, "train"))
    assert not (tmp_path / "teacher").exists()
    assert not (tmp_path / "ledger.duckdb").exists()


@pytest.mark.parametrize("head", ["dense", "conv"])
def test_scatter_head_matches_model(mnist_small, head):
    # DP-SGD trains _ScatterHead on features computed once; the saved model must compute the same function.
    torch.manual_seed(0)
    model = Classifier(frontend="scatter", head=head, hidden=16, mean=(0.0,), std=(1.0,)).eval()
    images = load_image_data(mnist_small, "test").images[:40]
    features = scatter_features(model, images, chunk=16)
    from_features = _ScatterHead(model)(features)
    from_pixels = model(torch.from_numpy(images).float() / 255)
    torch.testing.assert_close(from_features, from_pixels)


def test_scatter_dp_teacher_records_spend(scatter_teacher):
    teacher, ledger_path = scatter_teacher
    meta = json.loads((teacher / META_FILE).read_text())
    dp = meta["dp"]
    assert dp["frontend"] == "scatter"
    assert dp["optimizer"] == "sgd"
    assert dp["epsilon"] == pytest.approx(pld_epsilon([PrivacyEvent(**e) for e in dp["events"]], 1e-5))
    assert 7.9 <= dp["epsilon"] <= 8.0
    with Ledger(ledger_path) as ledger:
        rows = ledger.summary()
    assert [row["queries"] for row in rows] == [dp["steps"]]
    # 600 training images at epsilon 8: well above the 10% of chance on the real test split.
    assert meta["test_accuracy"] > 50.0
    loaded = load_teacher(teacher)
    assert loaded.module.config.frontend == "scatter"


@pytest.mark.parametrize("mechanism", ["gaussian", "noisy-label", "none"])
def test_student_copy_needs_dp_teacher(small_teacher, mnist_small, tmp_path, mechanism):
    config = small_config(small_teacher, tmp_path / "run", mnist_small, mechanism=mechanism, student_init="teacher")
    with pytest.raises(TranscriptionError, match="private only when the teacher itself is DP"):
        transcribe(config)
    assert not (tmp_path / "run").exists()


def test_student_copied_from_dp_teacher(scatter_teacher, mnist_small, tmp_path):
    teacher, ledger = scatter_teacher
    loaded = load_teacher(teacher)
    config = small_config(teacher, tmp_path / "run", mnist_small, mechanism="dp-teacher", ledger=str(ledger),
                          student_init="teacher")
    copy = _copy_of_teacher(loaded, config).eval()
    images = torch.rand(8, 1, 28, 28)
    assert torch.equal(copy(images), loaded.module(images))
    report = transcribe(config).report
    saved = json.loads((tmp_path / "run" / REPORT_FILE).read_text())
    assert saved["public_facts"]["hyperparameters"]["student_init"] == "teacher"
    assert report["public_facts"]["student"]["frontend"] == "scatter"
    assert report["epsilon"] == json.loads((teacher / META_FILE).read_text())["dp"]["epsilon"]
    with Ledger(ledger) as book:
        assert len(book.summary()) == 1  # the teacher's training only; the copy and the transcription are free


def test_conv_head_teacher_learns(mnist_small, tmp_path):
    ledger = tmp_path / "ledger.duckdb"
    config = TeacherTrainConfig(data=str(mnist_small), out=str(tmp_path / "teacher"), dp=True, epsilon=8.0,
                                delta=1e-5, epochs=6, batch_size=128, lr=1.0, width=16, hidden=32, frontend="scatter",
                                head="conv", optimizer="sgd", max_grad_norm=0.1, ema_decay=0.9, ledger=str(ledger),
                                noise_seed=5)
    train_teacher_dp(config, load_image_data(mnist_small, "train"), load_image_data(mnist_small, "test"))
    meta = json.loads((tmp_path / "teacher" / META_FILE).read_text())
    assert meta["dp"]["head"] == "conv"
    # 600 training images at epsilon 8: the convolutional head must learn, well above the 10% of chance.
    assert meta["test_accuracy"] > 40.0
    loaded = load_teacher(tmp_path / "teacher")
    assert loaded.module.config.head == "conv"
    run = small_config(tmp_path / "teacher", tmp_path / "run", mnist_small, mechanism="dp-teacher",
                       ledger=str(ledger), student_init="teacher")
    report = transcribe(run).report
    assert report["epsilon"] == meta["dp"]["epsilon"]
    student = Classifier.from_pretrained(tmp_path / "run" / "student")
    assert student.config.head == "conv"
