"""A teacher that synthgen did not train can back a dp-teacher run only through a DP statement
the user supplies, and that statement is reported and printed on the card as unverified."""

import json

import pytest
import torch

from synthgen.cards import render_card
from synthgen.models import Classifier
from synthgen.privacy.accounting import PrivacyEvent, pld_epsilon
from synthgen.privacy.ledger import Ledger
from synthgen.transcribe import TranscriptionError, transcribe

from .conftest import small_config

# Stated as Opacus would report it (add/remove-one); synthgen recomputes it under replace-one.
STATED_EVENT = {"kind": "poisson_gaussian", "parameter": 1.1, "count": 900, "sampling_rate": 0.01}
STATED_DP = {"epsilon": 1.5, "delta": 1e-5, "unit": "example", "mechanism": "dp-sgd", "events": [STATED_EVENT]}


@pytest.fixture()
def scripted_teacher(small_teacher, tmp_path):
    """The small teacher as a TorchScript archive, a format that carries no synthgen metadata."""
    model = Classifier.from_pretrained(str(small_teacher)).eval()
    path = tmp_path / "teacher.pt"
    torch.jit.save(torch.jit.trace(model, torch.rand(2, 1, 28, 28)), str(path))
    return path


def write_meta(path, dp):
    meta = {"input_shape": [1, 28, 28], "class_names": [str(digit) for digit in range(10)]}
    if dp is not None:
        meta["dp"] = dp
    path.write_text(json.dumps(meta))
    return path


def test_foreign_teacher_without_statement_rejected(scripted_teacher, mnist_small, tmp_path):
    meta = write_meta(tmp_path / "meta.json", dp=None)
    config = small_config(scripted_teacher, tmp_path / "run", mnist_small, mechanism="dp-teacher",
                          teacher_meta=str(meta), private_data=str(mnist_small))
    with pytest.raises(TranscriptionError, match="records no DP training"):
        transcribe(config)
    assert not (tmp_path / "run").exists()


def test_user_statement_reported_and_carded(scripted_teacher, mnist_small, tmp_path):
    meta = write_meta(tmp_path / "meta.json", dp=dict(STATED_DP, source="synthgen"))
    config = small_config(scripted_teacher, tmp_path / "run", mnist_small, mechanism="dp-teacher",
                          teacher_meta=str(meta), private_data=str(mnist_small))
    report = transcribe(config).report

    # A "source": "synthgen" claim in user metadata is not believed: only the ledger can verify it.
    assert report["teacher_dp"]["source"] == "user statement"
    assert report["teacher_dp"]["verification"].startswith("not verified by synthgen")
    recomputed = pld_epsilon([PrivacyEvent(**STATED_EVENT)], 1e-5)
    assert report["epsilon"] == pytest.approx(recomputed)
    assert report["epsilon"] > STATED_DP["epsilon"]  # replace-one costs more than the add/remove statement
    assert report["teacher_dp"]["stated_epsilon"] == STATED_DP["epsilon"]
    assert report["unit"] == "example"
    with Ledger(config.ledger) as ledger:
        assert ledger.summary() == []  # post-processing of a DP teacher charges nothing

    card = render_card(report)
    assert "user statement" in card
    assert "synthgen did not\n  train the teacher and could not verify them" in card


@pytest.mark.parametrize("dp, message", [
    ({"epsilon": 2.0, "delta": 1e-5, "unit": "example"}, "without the privacy events behind it"),
    ({"epsilon": 2.0, "delta": 1e-5, "unit": "teacher", "events": [STATED_EVENT]}, "states unit 'teacher'"),
    ({"epsilon": 2.0, "delta": 1e-5, "unit": "example", "events": [{"kind": "laplace", "parameter": 1.0, "count": 1}]},
     "unknown privacy event kind 'laplace'"),
    ({"epsilon": 2.0, "delta": 0.5, "unit": "example", "events": [STATED_EVENT]}, "delta must be < 1/n"),
])
def test_unusable_statement_rejected(scripted_teacher, mnist_small, tmp_path, dp, message):
    meta = write_meta(tmp_path / "meta.json", dp=dp)
    config = small_config(scripted_teacher, tmp_path / "run", mnist_small, mechanism="dp-teacher",
                          teacher_meta=str(meta), private_data=str(mnist_small))
    with pytest.raises(TranscriptionError, match=message):
        transcribe(config)
    assert not (tmp_path / "run").exists()
