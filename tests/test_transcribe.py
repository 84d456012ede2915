"""The engine end to end on real MNIST: outputs, accounting, resume, ledger and budget."""

import json

import pytest
import torch
from safetensors.torch import load_file

from synthgen.privacy.accounting import pld_epsilon
from synthgen.privacy.ledger import BudgetExceededError, Ledger
from synthgen.transcribe import REPORT_FILE, TranscriptionError, transcribe

from .conftest import small_config


def test_end_to_end_writes_all_artifacts(small_teacher, mnist_small, tmp_path):
    result = transcribe(small_config(small_teacher, tmp_path / "run", mnist_small))
    run = tmp_path / "run"
    assert result.completed
    for path in ("generator/config.json", "student/config.json", "samples.png", "metrics.jsonl", REPORT_FILE):
        assert (run / path).is_file(), path
    assert list((run / "generator").glob("*.safetensors"))
    report = json.loads((run / REPORT_FILE).read_text())
    assert report["unit"] == "teacher"
    assert report["queries"] == 6 * 16
    assert report["teacher_forward_examples"] == report["queries"]
    assert report["epsilon"] <= 10.0
    assert report["epsilon"] > 9.5  # the planned queries were all spent
    assert report["rdp_epsilon"] >= report["epsilon"]
    assert report["mechanism"]["noise_std"] == pytest.approx(report["mechanism"]["noise_multiplier"] * 2.0)
    assert report["accountant"]["library"] == "dp_accounting"
    assert report["evaluation"]["on_private_data"] is True
    assert 0 <= report["evaluation"]["student_accuracy"] <= 100
    assert not (run / "private" / "checkpoint.pt").exists()  # holds the noise secret; removed when done


def test_report_recomputes_from_its_events(small_teacher, mnist_small, tmp_path):
    from synthgen.privacy.accounting import PrivacyEvent

    transcribe(small_config(small_teacher, tmp_path / "run", mnist_small, mechanism="noisy-label"))
    report = json.loads((tmp_path / "run" / REPORT_FILE).read_text())
    events = [PrivacyEvent(**e) for e in report["events"]]
    assert events == [PrivacyEvent("randomized_response", report["mechanism"]["eps0"], 96)]
    assert pld_epsilon(events, report["delta"]) == pytest.approx(report["epsilon"])
    assert report["per_query_label_dp"]["epsilon"] == report["mechanism"]["eps0"]


def test_report_leaks_no_private_facts(small_teacher, mnist_small, tmp_path):
    from synthgen.data import load_image_data
    from synthgen.teacher import load_teacher

    transcribe(small_config(small_teacher, tmp_path / "run", mnist_small))
    text = (tmp_path / "run" / REPORT_FILE).read_text()
    data = load_image_data(mnist_small, "train")
    assert data.fingerprint.split(":")[1] not in text
    assert load_teacher(small_teacher).fingerprint.split(":")[1] not in text
    assert str(mnist_small) not in text
    assert str(small_teacher) not in text


def test_ledger_charged_before_use_equals_queries(small_teacher, mnist_small, tmp_path):
    config = small_config(small_teacher, tmp_path / "run", mnist_small)
    transcribe(config)
    with Ledger() as ledger:
        rows = ledger.summary()
    assert len(rows) == 1
    assert rows[0]["queries"] == 6 * 16
    assert rows[0]["unit"] == "teacher"


def test_second_transcription_adds_to_ledger(small_teacher, mnist_small, tmp_path):
    transcribe(small_config(small_teacher, tmp_path / "first", mnist_small, epsilon=2.0))
    second = transcribe(small_config(small_teacher, tmp_path / "second", mnist_small, epsilon=2.0))
    assert second.report["epsilon"] <= 2.0
    assert second.report["ledger_total_epsilon"] > 2.0  # both runs protect the same teacher
    assert second.report["ledger_total_epsilon"] <= 4.0


def test_budget_cap_rejects_with_amount_spent(small_teacher, mnist_small, tmp_path):
    # Two Gaussian runs at epsilon 3 compose to about 4.4 at delta 1e-5, above a cap of 4.
    transcribe(small_config(small_teacher, tmp_path / "first", mnist_small, epsilon=3.0, budget_epsilon=4.0))
    with pytest.raises(BudgetExceededError, match=r"already spent epsilon (2\.99|3)"):
        transcribe(small_config(small_teacher, tmp_path / "second", mnist_small, epsilon=3.0))
    assert not (tmp_path / "second").exists()
    small = transcribe(small_config(small_teacher, tmp_path / "third", mnist_small, epsilon=0.5))
    assert small.report["ledger_total_epsilon"] <= 4.0


def test_resume_equals_uninterrupted_run(small_teacher, mnist_small, tmp_path):
    whole = transcribe(small_config(small_teacher, tmp_path / "whole", mnist_small, steps=7))
    stopped = transcribe(small_config(small_teacher, tmp_path / "split", mnist_small, steps=7, stop_after=5))
    assert not stopped.completed
    resumed = transcribe(small_config(small_teacher, tmp_path / "split", mnist_small, steps=7, resume=True))
    assert resumed.completed
    for part in ("student", "generator"):
        a = load_file(str(next((tmp_path / "whole" / part).glob("*.safetensors"))))
        b = load_file(str(next((tmp_path / "split" / part).glob("*.safetensors"))))
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), f"{part}.{name}"
    for field in ("epsilon", "queries", "events", "rdp_epsilon"):
        assert whole.report[field] == resumed.report[field], field
    # Iteration 5 was answered before the stop and replayed from the ledger after it.
    assert resumed.report["replayed_examples"] == 16
    assert resumed.report["teacher_forward_examples"] + resumed.report["replayed_examples"] == resumed.report["queries"]
    whole_metrics = (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()
    split_metrics = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert len(whole_metrics) == len(split_metrics)


def test_resume_replays_answers_charged_after_checkpoint(small_teacher, mnist_small, tmp_path):
    # Stop at iteration 5 with checkpoints every 4: iteration 4's answer is charged but not checkpointed.
    config = small_config(small_teacher, tmp_path / "run", mnist_small, steps=6, checkpoint_every=4, stop_after=5)
    transcribe(config)
    with Ledger() as ledger:
        charged = ledger.summary()[0]["queries"]
    assert charged == 5 * 16
    result = transcribe(small_config(small_teacher, tmp_path / "run", mnist_small, steps=6, checkpoint_every=4, resume=True))
    assert result.report["queries"] == 6 * 16
    # Iteration 4 is replayed from the ledger; iteration 5 asks the teacher.
    assert result.report["replayed_examples"] == 16
    assert result.report["teacher_forward_examples"] == 5 * 16
    with Ledger() as ledger:
        assert ledger.summary()[0]["queries"] == 6 * 16


def test_generator_loss_graph_has_no_teacher(small_teacher, mnist_small, tmp_path):
    from synthgen.transcribe import _prepare, _Run

    config = small_config(small_teacher, tmp_path / "run", mnist_small, mechanism="none")
    setup = _prepare(config)
    (tmp_path / "run").mkdir()
    run = _Run(config, setup, tmp_path / "run", "graph-test", None)
    teacher_parameters = list(run.bank.parameters())
    for parameter in teacher_parameters:
        parameter.requires_grad_(True)  # so that any use would show up in the graph
    before = run.bank.forward_examples
    z = run.generator.sample_latents(8)
    loss = run.generator_loss(run.generator(z), torch.full((8, 10), 0.1))
    assert run.bank.forward_examples == before
    seen, stack = set(), [loss.grad_fn]
    leaves = set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            leaves.add(id(node.variable))
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    assert leaves, "the graph should reach the generator's parameters"
    assert {id(p) for p in run.generator.parameters()} <= leaves
    assert not leaves & {id(p) for p in teacher_parameters}


def test_finished_run_folder_not_overwritten(small_teacher, mnist_small, tmp_path):
    transcribe(small_config(small_teacher, tmp_path / "run", mnist_small))
    report = (tmp_path / "run" / REPORT_FILE).read_bytes()
    with pytest.raises(TranscriptionError, match="finished run"):
        transcribe(small_config(small_teacher, tmp_path / "run", mnist_small))
    assert (tmp_path / "run" / REPORT_FILE).read_bytes() == report


def test_interrupted_run_needs_resume(small_teacher, mnist_small, tmp_path):
    transcribe(small_config(small_teacher, tmp_path / "run", mnist_small, stop_after=2))
    with pytest.raises(TranscriptionError, match="--resume"):
        transcribe(small_config(small_teacher, tmp_path / "run", mnist_small))
    with pytest.raises(TranscriptionError, match="epsilon differ"):
        transcribe(small_config(small_teacher, tmp_path / "run", mnist_small, epsilon=5.0, resume=True))


def test_group_norm_student_saved_and_reloaded(small_teacher, mnist_small, tmp_path):
    from synthgen.models import Classifier

    transcribe(small_config(small_teacher, tmp_path / "run", mnist_small, mechanism="none", student_norm="group"))
    student = Classifier.from_pretrained(str(tmp_path / "run" / "student"))
    norms = [module for module in student.modules() if isinstance(module, torch.nn.GroupNorm)]
    assert student.config.norm == "group"
    assert norms


def test_unknown_student_norm_rejected(small_teacher, mnist_small, tmp_path):
    with pytest.raises(TranscriptionError, match="student_norm must be 'none' or 'group', got 'batch'"):
        transcribe(small_config(small_teacher, tmp_path / "run", mnist_small, student_norm="batch"))
    assert not (tmp_path / "run").exists()
