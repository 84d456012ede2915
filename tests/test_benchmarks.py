"""The benchmark page and the benchmark suite's quick mode."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

import bench_common  # noqa: E402
import benchmark_suite  # noqa: E402
import render_benchmarks  # noqa: E402


def test_committed_page_matches_results():
    fresh = render_benchmarks.render()
    assert render_benchmarks.DOC.read_text() == fresh, (
        "docs/benchmarks.md is out of date: run python scripts/render_benchmarks.py and commit it")


def test_record_errors_catch_bad_records():
    good = bench_common.record("utility", "student_accuracy", 91.5, unit="teacher", mechanism="gaussian",
                               epsilon=1.0, delta=1e-5, seeds=3, spread=0.4)
    assert bench_common.record_errors(good) == []
    assert bench_common.record_errors({k: v for k, v in good.items() if k != "hardware"}) == ["missing field 'hardware'"]
    assert "value must be int or float" in bench_common.record_errors(dict(good, value="91.5"))[0]
    assert "must state epsilon and delta" in bench_common.record_errors(dict(good, epsilon=None))[0]
    assert "unit must be one of" in bench_common.record_errors(dict(good, unit="user"))[0]
    assert "seeds must be >= 1" in bench_common.record_errors(dict(good, seeds=0))[0]


# The example-level case adds a DP-SGD teacher and a second transcription: about twice the time.
@pytest.mark.parametrize("cases", ["teacher-level", pytest.param("teacher-level,dp-teacher", marks=pytest.mark.slow)])
def test_quick_suite_writes_valid_records(mnist_small, tmp_path, cases):
    work = tmp_path / "suite"
    status = benchmark_suite.main([
        "--quick", "--work", str(work), "--data", f"mnist={mnist_small}", "--epsilons", "10", "--cases", cases,
        "--mechanisms", "gaussian", "--train-limit", "300", "--steps", "3", "--batch-size", "16",
        "--eval-limit", "100", "--synthetic-rows", "60", "--synthetic-epochs", "1",
    ])
    assert status == 0
    results = {path.stem: json.loads(path.read_text()) for path in (work / "results").glob("*.json")}
    assert sorted(results) == ["speed", "suite-runs", "utility"]
    for name, records in results.items():
        assert records, name
        for entry in records:
            assert bench_common.record_errors(entry) == [], (name, entry)

    runs = results["suite-runs"]
    metrics = {(e["metric"], e["unit"], e["mechanism"]) for e in runs}
    assert ("teacher_accuracy", None, "none") in metrics  # the non-private teacher
    settings = [("teacher", "gaussian")]
    if "dp-teacher" in cases:
        assert ("teacher_accuracy", "example", "dp-sgd") in metrics  # the DP-SGD baseline
        settings.append(("example", "dp-teacher"))
    for unit, mechanism in settings:
        assert ("student_accuracy", unit, mechanism) in metrics
        assert ("synthetic_accuracy", unit, mechanism) in metrics
    for entry in runs:
        assert 0 <= entry["value"] <= 100
        if entry["unit"] is not None:
            assert entry["epsilon"] <= 10.0
            assert entry["delta"] == 1e-5
    speed = {e["metric"] for e in results["speed"]}
    assert speed == {"transcribe_seconds", "steps_per_second", "queries_per_second"}
    assert all(e["seeds"] == 1 and e["target_epsilon"] in (10.0, None) for e in results["utility"])

    page = (work / "benchmarks.md").read_text()
    assert "| mnist | synthgen | teacher | gaussian | student_accuracy |" in page
    assert "published: DPImageBench (CCS 2025)" in page
    assert (work / "plots" / "utility-mnist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (work / "plots" / "samples-mnist-gaussian-teacher-eps10.png").is_file()
    assert "plots/samples-mnist-gaussian-teacher-eps10.png" in page


def test_rewritten_measurement_keeps_its_provenance(tmp_path):
    first = bench_common.record("speed", "steps_per_second", 0.5, unit="example", mechanism="dp-teacher",
                                epsilon=1.0, delta=1e-5, seeds=1, method="synthgen")
    first.update(commit="aaaaaaa", hardware="machine A", command="first run", date="2026-01-01")
    bench_common.write_records("speed", [first], results_dir=tmp_path)

    rescan = dict(first, commit="bbbbbbb", hardware="machine B", command="rescan", date="2026-02-02")
    bench_common.write_records("speed", [rescan], results_dir=tmp_path)
    assert json.loads((tmp_path / "speed.json").read_text()) == [first]

    changed = dict(rescan, value=0.6)
    bench_common.write_records("speed", [changed], results_dir=tmp_path)
    assert json.loads((tmp_path / "speed.json").read_text()) == [changed]


def test_aggregate_groups_seeds_by_target():
    records = [bench_common.record("suite", "student_accuracy", value, unit="teacher", mechanism="gaussian",
                                   epsilon=spent, delta=1e-5, seed=seed)
               for seed, (value, spent) in enumerate([(90.0, 0.9993), (92.0, 0.9991), (94.0, 0.9995)])]
    (summary,) = benchmark_suite.aggregate(records, [1.0, 10.0])
    assert summary["value"] == 92.0
    assert summary["spread"] == pytest.approx(2.0)
    assert summary["seeds"] == 3
    assert summary["epsilon"] == 0.9995  # the largest spent
    assert summary["target_epsilon"] == 1.0


@pytest.mark.parametrize("dataset, epochs, rate, expected", [
    ("mnist", 20, 4.0, "-scatter-20ep-adv0"),
    ("mnist", 40, 8.0, "-scatter-40ep-adv0"),
    ("mnist", 40, 16.0, "-scatter-40ep-lr16-adv0"),
    ("fashion-mnist", 40, 16.0, "-scatter-40ep-adv0"),
    ("fashion-mnist", 20, 8.0, "-scatter-20ep-lr8-adv0"),
])
def test_run_tag_names_off_recipe_rates(dataset, epochs, rate, expected):
    report = {"teacher_dp": {"frontend": "scatter", "epochs": epochs, "learning_rate": rate},
              "public_facts": {"hyperparameters": {"adversarial_weight": 0.0}}}
    assert benchmark_suite.run_tag(report, dataset) == expected


@pytest.mark.parametrize("teacher, dataset, expected", [
    ({}, "kmnist", ""),  # a pixel teacher on a dataset without scattering recipes
    ({"frontend": "scatter", "epochs": 40, "learning_rate": 1.0, "head": "conv"}, "mnist", "-scatter-40ep"),
    ({"frontend": "scatter", "epochs": 40, "learning_rate": 8.0, "head": "conv"}, "mnist", "-scatter-40ep-lr8"),
    ({"frontend": "scatter", "epochs": 40, "learning_rate": 1.0, "head": "dense"}, "mnist", "-scatter-40ep-lr1"),
])
def test_run_tag_matches_recipes_by_head(teacher, dataset, expected):
    report = {"teacher_dp": teacher, "public_facts": {"hyperparameters": {"silhouette_prior_weight": 0.0}}}
    assert benchmark_suite.run_tag(report, dataset) == expected


def test_run_tag_names_the_silhouette_prior():
    report = {"public_facts": {"hyperparameters": {"silhouette_prior_weight": 1.0, "generator_steps": 4}}}
    assert benchmark_suite.run_tag(report, "fashion-mnist") == "-silhouette-prior1-g4"
