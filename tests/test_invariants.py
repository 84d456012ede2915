"""Privacy invariants: each test fails when one of the classic ways DP code leaks happens.

- every teacher forward pass is a charged query, in one process and summed over processes;
- the generator's loss graph contains no teacher tensor (parameters or BatchNorm statistics);
- the noise matches the sensitivity of each mechanism and unit (mean over K teachers,
  replace-one 2C/K, per sample);
- a restart, even after SIGKILL, never lowers the spent budget;
- no released file of a run carries teacher weights, teacher BatchNorm buffers, private paths,
  private label counts or the exact training-set size;
- student evaluation on the real test split does not steer training.

Each detector also has a test that plants the leak it looks for, so that a detector that
cannot fire does not pass silently.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from synthgen.data import load_idx, load_image_data
from synthgen.privacy.accounting import GAUSSIAN, PrivacyEvent, pld_epsilon
from synthgen.privacy.ledger import Ledger, LedgerKey
from synthgen.privacy.mechanism import LabelMechanism, MechanismConfig
from synthgen.teacher import TeacherBank, load_teacher
from synthgen.transcribe import REPORT_FILE, _prepare, _Run, transcribe

from .conftest import small_config, write_idx
from .forward_counter import ForwardCounter, install
from .release_scan import PrivateFacts, released_files, scan_release, teacher_tensors

ROOT = Path(__file__).resolve().parent.parent
# Per-class counts of the private set: distinct odd three-digit numbers that no hyperparameter,
# shape or byte offset of a release uses, so finding one in a released file means a leak.
LABEL_COUNTS = (101, 103, 107, 109, 113, 127, 131, 137, 139, 151)
TRAINING_SET_SIZE = sum(LABEL_COUNTS)  # 1218, not a multiple of 4, so never a float32 byte offset
BATCHNORM_FACTORY = "tests.test_invariants:build_batchnorm_teacher"


def build_batchnorm_teacher() -> torch.nn.Module:
    """A teacher with a BatchNorm layer, built through its import path by the engine."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(8 * 14 * 14, 10),
    )


@pytest.fixture(scope="module")
def counted_private_data(mnist_dir, tmp_path_factory) -> Path:
    """Real MNIST training images with the per-class counts of LABEL_COUNTS."""
    full = load_idx(mnist_dir, "train")
    index = np.concatenate([np.flatnonzero(full.labels == label)[:count] for label, count in enumerate(LABEL_COUNTS)])
    folder = tmp_path_factory.mktemp("private-counted-mnist")
    write_idx(folder / "train-images-idx3-ubyte", full.images[index, 0])
    write_idx(folder / "train-labels-idx1-ubyte", full.labels[index].astype("uint8"))
    return folder


@pytest.fixture(scope="module")
def batchnorm_teacher(counted_private_data, tmp_path_factory) -> Path:
    """Safetensors weights of a BatchNorm teacher trained for one epoch, so its running statistics are real."""
    data = load_image_data(counted_private_data, "train")
    torch.manual_seed(3)
    model = build_batchnorm_teacher()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    images = torch.from_numpy(data.images).float() / 255
    labels = torch.from_numpy(data.labels)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    for batch in order.split(64):
        loss = torch.nn.functional.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("private-teacher") / "teacher.safetensors"
    save_file(model.state_dict(), str(path))
    return path


def test_batchnorm_teacher_loads_with_its_counter(batchnorm_teacher, counted_private_data):
    # BatchNorm keeps a 0-dim int64 counter, num_batches_tracked, among its buffers.
    teacher = load_teacher(batchnorm_teacher, factory=BATCHNORM_FACTORY,
                           data=load_image_data(counted_private_data, "train"))
    assert teacher.module[1].num_batches_tracked.dim() == 0
    assert teacher.fingerprint.startswith("sha256:")


def batchnorm_config(teacher: Path, private: Path, out: Path, eval_data: Path, **overrides):
    return small_config(teacher, out, eval_data, teacher_factory=BATCHNORM_FACTORY, private_data=str(private),
                        **overrides)


def ledger_queries(path: Path) -> int:
    """Sum of charged queries, read from the DuckDB file without synthgen's Ledger class."""
    with duckdb.connect(str(path), read_only=True) as db:
        return int(db.execute("SELECT COALESCE(SUM(queries), 0) FROM spends").fetchone()[0])


# ---------------------------------------------------------------- forward passes = charged queries


@pytest.mark.parametrize("mechanism", ["gaussian", "noisy-label"])
def test_teacher_forwards_equal_charged_queries(small_teacher, mnist_small, tmp_path, monkeypatch, mechanism):
    counter = ForwardCounter()
    install(counter, monkeypatch.setattr)
    result = transcribe(small_config(small_teacher, tmp_path / "run", mnist_small, mechanism=mechanism))
    assert counter.teachers == 1
    assert counter.examples == 6 * 16
    assert ledger_queries(Path(os.environ["SYNTHGEN_LEDGER"])) == counter.examples
    assert result.report["queries"] == counter.examples


def test_forwards_equal_charges_summed_over_processes(small_teacher, mnist_small, tmp_path):
    # The first process queries iterations 0-2 and stops before any checkpoint. The second resumes,
    # replays those three answers from the ledger without a teacher pass, and queries iterations 3-5.
    base = small_config(small_teacher, tmp_path / "run", mnist_small, checkpoint_every=4)
    counts = []
    for name, overrides in (("first", {"stop_after": 3}), ("second", {"resume": True})):
        config = asdict(base) | overrides
        (tmp_path / f"{name}.json").write_text(json.dumps(config))
        count_file = tmp_path / f"{name}-count.json"
        process = subprocess.run(
            [sys.executable, "-m", "tests.forward_counter", str(count_file), "transcribe", "--config",
             str(tmp_path / f"{name}.json")], cwd=ROOT, capture_output=True, text=True, timeout=300,
        )
        assert process.returncode == 0, process.stderr[-3000:]
        counts.append(json.loads(count_file.read_text())["teacher_forward_examples"])
    assert counts == [3 * 16, 3 * 16]
    assert ledger_queries(Path(os.environ["SYNTHGEN_LEDGER"])) == sum(counts)
    report = json.loads((tmp_path / "run" / REPORT_FILE).read_text())
    assert report["replayed_examples"] == 3 * 16
    assert report["queries"] == sum(counts)


# ---------------------------------------------------------------- the generator never sees the teacher


def _graph_tensors(root: torch.Tensor) -> list[torch.Tensor]:
    """Return every tensor the autograd graph of `root` holds: leaves and tensors saved for backward."""
    found, seen, stack = [], set(), [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            found.append(node.variable)
        for name in dir(node):
            if not name.startswith("_saved_"):
                continue
            try:
                value = getattr(node, name)
            except RuntimeError:  # already freed by a backward pass
                continue
            values = value if isinstance(value, (tuple, list)) else [value]
            found.extend(v for v in values if isinstance(v, torch.Tensor))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def _teacher_tensors_in(tensors: list[torch.Tensor], teacher: dict[str, torch.Tensor]) -> set[str]:
    """Names of teacher tensors that share storage with any of `tensors`."""
    storage = {t.untyped_storage().data_ptr(): name for name, t in teacher.items() if t.numel()}
    return {storage[t.untyped_storage().data_ptr()] for t in tensors
            if t.numel() and t.untyped_storage().data_ptr() in storage}


def _teacher_of(run) -> dict[str, torch.Tensor]:
    """The floating-point parameters and buffers of a run's teachers, made to require gradients.

    A tensor that requires gradients becomes a leaf of every graph that uses it, even through
    operations that save nothing for backward (a subtraction of BatchNorm statistics does not).
    """
    teacher = {f"parameter {n}": p for n, p in run.bank.named_parameters()}
    teacher.update({f"buffer {n}": b for n, b in run.bank.named_buffers() if b.is_floating_point()})
    for tensor in teacher.values():
        tensor.requires_grad_(True)
    return teacher


def _value_with_teacher_scrambled(compute, teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    """Recompute a value with every teacher tensor replaced by noise, then restore the teacher.

    Any dependence on the teacher changes the value, also one through detach() or item(),
    which leaves no trace in the graph.
    """
    kept = {name: tensor.detach().clone() for name, tensor in teacher.items()}
    generator = torch.Generator().manual_seed(0)
    try:
        with torch.no_grad():
            for tensor in teacher.values():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 3)
        return compute().detach().clone()
    finally:
        with torch.no_grad():
            for name, tensor in teacher.items():
                tensor.copy_(kept[name])


@pytest.fixture
def batchnorm_run(batchnorm_teacher, counted_private_data, mnist_small, tmp_path):
    """An engine run on the BatchNorm teacher, before its first iteration, with its own ledger."""
    config = batchnorm_config(batchnorm_teacher, counted_private_data, tmp_path / "run", mnist_small)
    setup = _prepare(config)
    (tmp_path / "run").mkdir()
    with Ledger(tmp_path / "graph-ledger.duckdb") as ledger:
        yield _Run(config, setup, tmp_path / "run", "graph-run", ledger)


def test_generator_loss_independent_of_teacher(batchnorm_run):
    run = batchnorm_run
    teacher = _teacher_of(run)
    assert any("running_mean" in name for name in teacher), "the test teacher must have BatchNorm statistics"
    before = {name: tensor.detach().clone() for name, tensor in teacher.items()}
    saved_during_loss: list[torch.Tensor] = []
    graphs: list[list[torch.Tensor]] = []
    values: list[tuple[torch.Tensor, torch.Tensor]] = []
    compute_loss = run.generator_loss

    def watched_loss(images, targets):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved_during_loss.append(t) or t, lambda t: t):
            loss = compute_loss(images, targets)
        graphs.append(_graph_tensors(loss))
        scrambled = _value_with_teacher_scrambled(lambda: compute_loss(images, targets), teacher)
        values.append((loss.detach().clone(), scrambled))
        return loss

    run.generator_loss = watched_loss
    for _ in range(3):  # the first iteration has an empty replay buffer, later ones do not
        run.iterate()
        run.step += 1
    assert len(graphs) == 3
    generator_parameters = {p.untyped_storage().data_ptr() for p in run.generator.parameters()}
    assert generator_parameters <= {t.untyped_storage().data_ptr() for t in graphs[0]}, "graph walk found no generator"
    for graph in graphs:
        assert _teacher_tensors_in(graph, teacher) == set()
    assert _teacher_tensors_in(saved_during_loss, teacher) == set()
    for loss, scrambled in values:
        assert torch.equal(loss, scrambled)
    assert run.bank.forward_examples == 3 * 16  # the queries went to the teacher, nothing else
    for name, tensor in teacher.items():
        assert torch.equal(tensor, before[name]), f"{name} changed during transcription"


def test_teacher_use_detected_in_planted_losses(batchnorm_run):
    # Three ways a generator loss could use the teacher; each detector above must catch its
    # case, or the test above proves nothing.
    run = batchnorm_run
    teacher = _teacher_of(run)
    images = run.generator(run.generator.sample_latents(4))
    batchnorm = next(m for m in run.bank.modules() if isinstance(m, torch.nn.BatchNorm2d))

    def statistics_loss():  # DeepInversion-style: match the teacher's BatchNorm statistics
        return ((images.mean() - batchnorm.running_mean) ** 2).sum()

    found = _teacher_tensors_in(_graph_tensors(statistics_loss()), teacher)
    assert "buffer members.0.1.running_mean" in found
    assert not torch.equal(statistics_loss(), _value_with_teacher_scrambled(statistics_loss, teacher))

    # BatchNorm refuses statistics that require gradients in a differentiable forward pass.
    batchnorm.running_mean.requires_grad_(False)
    batchnorm.running_var.requires_grad_(False)
    through_teacher = run.bank.members[0](images).logsumexp(dim=1).mean()
    assert "parameter members.0.0.weight" in _teacher_tensors_in(_graph_tensors(through_teacher), teacher)

    def detached_loss():  # no graph edge to the teacher at all
        return images.mean() + run.bank.members[0](images.detach()).detach().mean()

    assert _teacher_tensors_in(_graph_tensors(detached_loss()), teacher) == set()
    assert not torch.equal(detached_loss(), _value_with_teacher_scrambled(detached_loss, teacher))


# ---------------------------------------------------------------- noise matches sensitivity


class OneHotTeacher(torch.nn.Module):
    """A teacher sure of one class whatever the image: the extreme points of replace-one."""

    def __init__(self, label: int, num_classes: int):
        super().__init__()
        logits = torch.full((num_classes,), -30.0)
        logits[label] = 30.0
        self.register_buffer("logits", logits)

    def forward(self, images):
        return self.logits.expand(images.shape[0], -1)


def _answer(teachers: list[torch.nn.Module], images, prior, config: MechanismConfig, step: int = 0):
    bank = TeacherBank(teachers, [0.0], [1.0])
    return LabelMechanism(bank, config, lambda *args: None, noise_secret=17).annotate(images, prior, step)


@pytest.mark.parametrize("num_teachers", [1, 2, 5])
def test_gaussian_noise_scales_with_mean_sensitivity(num_teachers):
    # Neighbouring ensembles differ in one teacher (one shard under the example-level unit, the
    # whole teacher under the teacher-level unit). The same secret and step draw the same noise,
    # so the difference of the two answers is the exact change of the released mean.
    clip, multiplier, classes = 0.5, 3.0, 4
    config = MechanismConfig(mode="gaussian", top_k=classes, clip_norm=clip, noise_multiplier=multiplier)
    images, prior = torch.zeros(8, 1, 2, 2), torch.full((8, classes), 1 / classes)
    agreeing = [OneHotTeacher(0, classes) for _ in range(num_teachers)]
    neighbour = [OneHotTeacher(1, classes)] + agreeing[1:]
    change = _answer(agreeing, images, prior, config).values - _answer(neighbour, images, prior, config).values
    moved = change.norm(dim=1)
    # Two norm-C vectors of non-negative probabilities are at most sqrt(2) C apart: the mean over
    # K teachers moves by sqrt(2) C / K. Summing instead of averaging would move it by sqrt(2) C.
    assert torch.allclose(moved, torch.full_like(moved, math.sqrt(2) * clip / num_teachers), atol=1e-5)
    mechanism = LabelMechanism(TeacherBank(agreeing, [0.0], [1.0]), config, lambda *args: None, noise_secret=0)
    assert mechanism.sensitivity == pytest.approx(2 * clip / num_teachers)  # replace-one bound, never below the change
    assert moved.max().item() <= mechanism.sensitivity
    assert mechanism.noise_std == pytest.approx(multiplier * 2 * clip / num_teachers)


def test_gaussian_noise_per_sample_and_coordinate():
    # One image per call over many calls must see the same noise as one call with many images:
    # noise scaled to a batch norm, or drawn once per batch, would not.
    config = MechanismConfig(mode="gaussian", top_k=3, clip_norm=1.0, noise_multiplier=2.0)
    teachers = [OneHotTeacher(0, 3)]
    prior = torch.full((1, 3), 1 / 3)
    single = torch.cat([_answer(teachers, torch.zeros(1, 1, 2, 2), prior, config, step).values for step in range(3000)])
    batch = _answer(teachers, torch.zeros(3000, 1, 2, 2), prior.expand(3000, -1), config).values
    clean = torch.tensor([1.0, 0.0, 0.0])
    expected = 2.0 * 2 * 1.0  # multiplier x 2C / K
    for answers in (single, batch):
        residual = answers - clean
        assert residual.std().item() == pytest.approx(expected, rel=0.04)
        correlation = torch.corrcoef(residual.T)
        assert correlation.fill_diagonal_(0).abs().max().item() < 0.08  # independent per coordinate


def test_gaussian_scaling_is_per_sample():
    # A teacher whose answer depends on the image: every sample's vector is scaled to norm C on
    # its own, whatever else is in the batch.
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 5))
    config = MechanismConfig(mode="gaussian", top_k=5, clip_norm=0.7, noise_multiplier=1e-9)
    images = torch.rand(64, 1, 2, 2) * torch.linspace(0.01, 10, 64).view(-1, 1, 1, 1)
    values = _answer([teacher], images, torch.full((64, 5), 0.2), config).values
    assert torch.allclose(values.norm(dim=1), torch.full((64,), 0.7), atol=1e-6)


def test_randomized_response_ratio_equals_eps0():
    # RRWithPrior is charged as eps0-DP: for any two teachers the probability of any output may
    # differ by at most e^eps0. 100,000 draws per teacher, priors with k = 3 and k = 4 members.
    eps0, draws = 0.8, 100_000
    config = MechanismConfig(mode="noisy-label", top_k=5, eps0=eps0)
    for prior_row in ([0.3, 0.3, 0.3, 0.05, 0.05], [0.24, 0.24, 0.24, 0.24, 0.04]):
        prior = torch.tensor([prior_row]).expand(draws, -1)
        table = torch.stack([
            torch.bincount(_answer([OneHotTeacher(label, 5)], torch.zeros(draws, 1, 2, 2), prior, config)
                           .targets.argmax(dim=1), minlength=5).double() / draws
            for label in range(5)
        ])  # (teacher label, output label)
        observed = table[:, table.min(dim=0).values > 0]
        ratio = (observed.max(dim=0).values / observed.min(dim=0).values).max().item()
        assert ratio <= math.exp(eps0) * 1.04  # one ratio's sampling error at 100k draws is below 1%
        assert ratio >= math.exp(eps0) * 0.96  # tight: the noise is not larger than charged either


def test_report_noise_and_accountant_agree(released_run):
    run_dir, _ = released_run
    report = json.loads((run_dir / REPORT_FILE).read_text())
    mechanism = report["mechanism"]
    assert mechanism["num_teachers"] == 1
    assert mechanism["l2_sensitivity"] == pytest.approx(2 * mechanism["clip_norm"] / mechanism["num_teachers"])
    assert mechanism["noise_std"] == pytest.approx(mechanism["noise_multiplier"] * mechanism["l2_sensitivity"])
    assert report["events"] == [PrivacyEvent(GAUSSIAN, mechanism["noise_multiplier"], report["queries"]).to_dict()]
    # One query's epsilon by the exact Gaussian formula (Balle and Wang 2018, Theorem 8) at the
    # ratio sensitivity / noise std of the report, against the accountant's value for one event.
    from scipy.stats import norm

    ratio = mechanism["l2_sensitivity"] / mechanism["noise_std"]

    def delta_of(eps: float) -> float:
        return norm.cdf(ratio / 2 - eps / ratio) - math.exp(eps) * norm.cdf(-ratio / 2 - eps / ratio)

    low, high = 0.0, 50.0
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (low, middle) if delta_of(middle) <= report["delta"] else (middle, high)
    accountant = pld_epsilon([PrivacyEvent(GAUSSIAN, mechanism["noise_multiplier"], 1)], report["delta"])
    assert accountant == pytest.approx(high, rel=1e-6)


# ---------------------------------------------------------------- restarts never lower the budget


def test_sigkill_and_resume_never_lower_spent_budget(small_teacher, mnist_small, tmp_path):
    ledger_path = Path(os.environ["SYNTHGEN_LEDGER"])
    settings = dict(steps=20, eval_every=1, eval_limit=32, checkpoint_every=4)
    config = small_config(small_teacher, tmp_path / "run", mnist_small, **settings)
    (tmp_path / "run.json").write_text(json.dumps(asdict(config)))
    process = subprocess.Popen([sys.executable, "-m", "synthgen", "transcribe", "--config", str(tmp_path / "run.json")],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 6:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the transcription ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)

    key = LedgerKey("", load_teacher(small_teacher).fingerprint, "teacher")
    with Ledger(ledger_path) as ledger:
        killed_spend = ledger.spent_epsilon(key, config.delta)
    killed_queries = ledger_queries(ledger_path)
    assert killed_queries >= 6 * 16  # every iteration logged had been charged
    assert killed_spend > 0

    # A new run on the same teacher starts from the killed run's spend, not from zero.
    other = transcribe(small_config(small_teacher, tmp_path / "other", mnist_small, epsilon=1.0))
    assert other.report["ledger_total_epsilon"] >= killed_spend
    assert other.report["ledger_total_epsilon"] > other.report["epsilon"]
    with Ledger(ledger_path) as ledger:
        before_resume = ledger.spent_epsilon(key, config.delta)

    resumed = transcribe(small_config(small_teacher, tmp_path / "run", mnist_small, resume=True, **settings))
    with Ledger(ledger_path) as ledger:
        assert ledger.spent_epsilon(key, config.delta) >= before_resume
    assert resumed.report["queries"] == 20 * 16
    assert ledger_queries(ledger_path) == 20 * 16 + 6 * 16  # no iteration charged twice
    spent = [json.loads(line)["epsilon_spent"] for line in metrics.read_text().splitlines()]
    assert spent == sorted(spent), "the run's own spend went down between iterations"


# ---------------------------------------------------------------- released files carry no private facts


@pytest.fixture(scope="module")
def released_run(batchnorm_teacher, counted_private_data, mnist_small, tmp_path_factory):
    """A finished Gaussian run on the BatchNorm teacher; returns its folder and its ledger."""
    folder = tmp_path_factory.mktemp("released")
    ledger = folder / "ledger.duckdb"  # explicit: module fixtures run before the per-test environment
    config = batchnorm_config(batchnorm_teacher, counted_private_data, folder / "run", mnist_small,
                              ledger=str(ledger))
    transcribe(config)
    return folder / "run", ledger


def private_facts(teacher_path: Path, private_data: Path) -> PrivateFacts:
    teacher = load_teacher(teacher_path, factory=BATCHNORM_FACTORY, data=load_image_data(private_data, "train"))
    data = load_image_data(private_data, "train")
    counts = np.bincount(data.labels, minlength=10).tolist()
    assert counts == list(LABEL_COUNTS)
    facts = PrivateFacts(
        strings={
            "private data path": str(private_data), "private data folder name": private_data.name,
            "teacher path": str(teacher_path), "teacher folder name": teacher_path.parent.name,
            "dataset fingerprint": data.fingerprint.split(":")[1],
            "teacher fingerprint": teacher.fingerprint.split(":")[1],
        },
        integers={"training-set size": len(data), **{f"count of label {i}": c for i, c in enumerate(counts)}},
        binary_integers={"training-set size": len(data)},
        tensors=teacher_tensors(teacher.module),
    )
    assert any("running_mean" in name for name in facts.tensors)
    return facts


def test_released_files_carry_no_private_facts(released_run, batchnorm_teacher, counted_private_data):
    run_dir, _ = released_run
    files = released_files(run_dir)
    names = {str(p.relative_to(run_dir)) for p in files}
    assert {"privacy_report.json", "samples.png", "metrics.jsonl", "generator/config.json",
            "student/config.json"} <= names
    assert any(name.endswith(".safetensors") for name in names)
    findings = scan_release(files, private_facts(batchnorm_teacher, counted_private_data))
    assert findings == []


def test_hub_release_carries_no_private_facts(released_run, batchnorm_teacher, counted_private_data, mnist_small,
                                              tmp_path):
    # Everything a push would upload: the staged release folder with its card and the audit.
    hub = pytest.importorskip("synthgen.hub", reason="the Hub release code is not in this checkout")
    from synthgen.audit import AuditConfig, run_audit

    run_dir = tmp_path / "run"
    shutil.copytree(released_run[0], run_dir)
    run_audit(AuditConfig(run_dir=str(run_dir), private_data=str(counted_private_data), heldout_data=str(mnist_small),
                          audit_size=100, shadow_models=2, shadow_epochs=1, synthetic_samples=100, bootstrap=20))
    staged = hub.stage_release(run_dir, tmp_path / "release", repo_id="tester/scan")
    files = released_files(tmp_path / "release")
    assert {"README.md", "audit.json", "privacy_report.json", "model_index.json"} <= {p.name for p in files}
    assert len(files) == len(staged)
    assert scan_release(files, private_facts(batchnorm_teacher, counted_private_data)) == []


def test_release_scan_finds_planted_leaks(released_run, batchnorm_teacher, counted_private_data, tmp_path):
    run_dir, _ = released_run
    facts = private_facts(batchnorm_teacher, counted_private_data)
    teacher = load_file(str(batchnorm_teacher))
    student = next((run_dir / "student").glob("*.safetensors"))
    planted = {
        "weights.safetensors": lambda path: save_file(
            {**load_file(str(student)), "extra": teacher["0.weight"].flatten()[5:40].clone()}, str(path)),
        "half.safetensors": lambda path: save_file({"w": teacher["5.bias"].half()}, str(path)),
        "stats.json": lambda path: path.write_text(json.dumps({"bn": teacher["1.running_mean"].tolist()})),
        "card.md": lambda path: path.write_text(f"Trained on {TRAINING_SET_SIZE} images.\n"),
        "labels.json": lambda path: path.write_text(json.dumps({"label_counts": {"3": 109}})),
        "config.json": lambda path: path.write_text(json.dumps({"data": str(counted_private_data)})),
        "size.bin": lambda path: path.write_bytes(b"\x00" * 7 + TRAINING_SET_SIZE.to_bytes(8, "little")),
    }
    for name, plant in planted.items():
        path = tmp_path / name
        plant(path)
        assert scan_release([path], facts), f"planted leak in {name} not found"
    assert scan_release([student, run_dir / "samples.png", run_dir / REPORT_FILE], facts) == []


# ---------------------------------------------------------------- evaluation does not steer training


def test_private_evaluation_does_not_change_training(small_teacher, mnist_small, tmp_path):
    # Accuracy on the real test split is reported, never used: no early stopping, no selection.
    with_eval = transcribe(small_config(small_teacher, tmp_path / "eval", mnist_small, eval_every=1, eval_limit=64))
    without = transcribe(small_config(small_teacher, tmp_path / "plain", mnist_small, eval_data=None))
    assert with_eval.report["evaluation"]["student_accuracy"] is not None
    assert without.report["evaluation"]["student_accuracy"] is None
    for part in ("student", "generator"):
        a = load_file(str(next((tmp_path / "eval" / part).glob("*.safetensors"))))
        b = load_file(str(next((tmp_path / "plain" / part).glob("*.safetensors"))))
        for name in a:
            assert torch.equal(a[name], b[name]), f"{part}.{name}"
    assert with_eval.report["steps"] == without.report["steps"] == 6
