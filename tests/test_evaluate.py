"""Train-on-synthetic evaluation: a fixed classifier trained on a dataset alone, the epoch chosen
on a synthetic validation split, real test accuracy recorded in the catalog and result records."""

import json
import re

import numpy as np
import pytest

from synthgen.catalog import Catalog
from synthgen.cli import main
from synthgen.data import load_image_data
from synthgen.evaluate import EvaluateConfig, EvaluationError, evaluate_synthetic

from .conftest import write_idx
from .dataset_builds import build, read_rows


@pytest.fixture(scope="module")
def synthetic(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluate") / "synthetic"
    build(run_dir, out, num_samples=200, shard_size=100)
    return out


@pytest.fixture(scope="module")
def labelled_parquet(mnist_small, tmp_path_factory):
    """The real small training split as one parquet file: a stand-in for useful synthetic data."""
    path = tmp_path_factory.mktemp("parquet") / "train.parquet"
    load_image_data(mnist_small, "train").to_dataset().to_parquet(str(path))
    return path


def config(dataset, real_test, **changes) -> EvaluateConfig:
    values = dict(dataset=str(dataset), real_test=str(real_test), epochs=2, results="", record=False, device="cpu")
    values.update(changes)
    return EvaluateConfig(**values)


def test_single_label_dataset_scores_class_frequency(synthetic, mnist_small):
    labels = set(read_rows(synthetic).column("label").to_pylist())
    assert len(labels) == 1, f"the tiny run's student should label every sample alike, got {labels}"
    (label,) = labels
    real = load_image_data(mnist_small, "test")
    result = evaluate_synthetic(config(synthetic, mnist_small, epochs=1))
    assert result.test_accuracy == pytest.approx(100.0 * np.mean(real.labels == label))


def test_selection_ignores_test_labels(labelled_parquet, mnist_small, tmp_path):
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    test = load_image_data(mnist_small, "test")
    write_idx(shuffled / "t10k-images-idx3-ubyte", test.images[:, 0])
    write_idx(shuffled / "t10k-labels-idx1-ubyte", ((test.labels + 1) % 10).astype("uint8"))
    write_idx(shuffled / "train-images-idx3-ubyte", test.images[:1, 0])  # the loader looks for a train file
    write_idx(shuffled / "train-labels-idx1-ubyte", test.labels[:1].astype("uint8"))

    true_labels = evaluate_synthetic(config(labelled_parquet, mnist_small))
    wrong_labels = evaluate_synthetic(config(labelled_parquet, shuffled))
    assert true_labels.train_rows == 540
    assert true_labels.validation_rows == 60
    assert true_labels.test_rows == 300
    assert true_labels.test_accuracy > 50.0  # informative labels: chance is 10 %
    for left, right in zip(true_labels.per_seed, wrong_labels.per_seed):
        assert left["selected_epoch"] == right["selected_epoch"]
        assert left["validation_accuracy"] == right["validation_accuracy"]
    assert wrong_labels.test_accuracy < true_labels.test_accuracy


def test_seeds_give_mean_and_spread(labelled_parquet, mnist_small):
    result = evaluate_synthetic(config(labelled_parquet, mnist_small, epochs=1, seeds=2, limit=200))
    values = [entry["test_accuracy"] for entry in result.per_seed]
    assert [entry["seed"] for entry in result.per_seed] == [0, 1]
    assert result.test_accuracy == pytest.approx(np.mean(values))
    assert result.test_accuracy_std == pytest.approx(np.std(values, ddof=1))


def test_cli_records_catalog_and_results(synthetic, run_dir, mnist_small, tmp_path, capsys):
    results = tmp_path / "results.json"
    catalog = tmp_path / "catalog.duckdb"
    args = ["evaluate", "synthetic", str(synthetic), "--real-test", str(mnist_small), "--epochs", "1",
            "--results", str(results), "--catalog", str(catalog), "--dataset-name", "mnist-small", "--device", "cpu"]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert main(args) == 0  # a second run replaces the record instead of adding one
    capsys.readouterr()

    report = json.loads((run_dir / "privacy_report.json").read_text())
    records = json.loads(results.read_text())
    assert len(records) == 1
    record = records[0]
    assert record["benchmark"] == "synthetic_utility"
    assert record["metric"] == "synthetic_accuracy"
    assert record["dataset"] == "mnist-small"
    assert record["value"] == pytest.approx(printed["test_accuracy"])
    assert record["unit"] == report["unit"]
    assert record["epsilon"] == report["epsilon"]
    assert record["delta"] == report["delta"]
    assert record["mechanism"] == report["mechanism"]["name"]
    assert record["seeds"] == 1
    assert record["spread"] is None
    for field in ("commit", "hardware", "command", "date", "method"):
        assert record[field], field
    with Catalog(catalog) as opened:
        rows = opened.sql("SELECT dataset_id, test_accuracy, epsilon FROM evaluations")
    assert len(rows) == 2
    assert set(rows["dataset_id"]) == {str(synthetic.resolve())}
    assert rows["test_accuracy"].tolist() == pytest.approx([printed["test_accuracy"]] * 2)


def test_quick_run_keeps_full_record(synthetic, mnist_small, tmp_path, capsys):
    results = tmp_path / "results.json"
    base = ["evaluate", "synthetic", str(synthetic), "--real-test", str(mnist_small), "--results", str(results),
            "--no-catalog", "--device", "cpu"]
    assert main(base + ["--epochs", "2"]) == 0
    assert main(base + ["--epochs", "1", "--limit", "20"]) == 0
    capsys.readouterr()
    records = json.loads(results.read_text())
    assert [(record["epochs"], record.get("limit")) for record in records] == [(2, None), (1, 20)]
    assert "limit" not in records[0]  # stored only when set, so records without it keep their key

    assert main(base + ["--epochs", "2"]) == 0  # the same settings replace their record
    records = json.loads(results.read_text())
    assert [(record["epochs"], record.get("limit")) for record in records] == [(1, 20), (2, None)]


def test_record_key_includes_training_settings(synthetic, mnist_small, tmp_path):
    results = tmp_path / "results.json"
    variants = [{}, {"epochs": 2}, {"limit": 40}, {"seeds": 2}, {"seed": 1}, {"validation_fraction": 0.2}]
    for changes in variants:
        settings = {"epochs": 1, "limit": 20, **changes}
        evaluate_synthetic(config(synthetic, mnist_small, results=str(results), **settings))
    records = json.loads(results.read_text())
    assert len(records) == len(variants)
    assert [record.get("first_seed") for record in records] == [None, None, None, None, 1, None]
    assert [record.get("validation_fraction") for record in records] == [None, None, None, None, None, 0.2]
    assert [record["seeds"] for record in records] == [1, 1, 1, 2, 1, 1]

    evaluate_synthetic(config(synthetic, mnist_small, results=str(results), epochs=1, limit=20, seed=1))
    assert len(json.loads(results.read_text())) == len(variants)


def test_record_without_new_fields_keeps_key(tmp_path):
    from synthgen.evaluate import write_result_record

    # A record written before epochs, limit, first_seed and validation_fraction were key fields.
    old = {"benchmark": "synthetic_utility", "metric": "synthetic_accuracy", "dataset": "mnist", "unit": "example",
           "mechanism": "gaussian", "epsilon": 10, "method": "synthgen", "synthetic_dataset": "datasets/a",
           "seeds": 1, "value": 90.0}
    results = tmp_path / "results.json"
    results.write_text(json.dumps([old]))
    write_result_record(results, {**old, "epochs": 10, "value": 91.0})
    assert [record["value"] for record in json.loads(results.read_text())] == [91.0]

    write_result_record(results, {**old, "epochs": 2, "value": 80.0})
    assert [record["value"] for record in json.loads(results.read_text())] == [91.0, 80.0]


def test_results_file_off_by_default(synthetic, mnist_small, tmp_path, monkeypatch, capsys):
    # The working folder looks like a synthgen checkout, whose benchmark records are tracked files.
    benchmark_results = tmp_path / "benchmarks" / "results"
    benchmark_results.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", "synthetic", str(synthetic), "--real-test", str(mnist_small), "--epochs", "1",
                 "--limit", "20", "--no-catalog", "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["results"] is None
    assert list(benchmark_results.iterdir()) == []


@pytest.mark.parametrize("contents, expected", [
    ("not json", "is not valid JSON"),
    ('{"value": 1}', "is not a JSON list of result records"),
    ("[1, 2]", "is not a JSON list of result records"),
])
def test_invalid_results_file_fails_early(synthetic, mnist_small, tmp_path, monkeypatch, caplog, contents, expected):
    import synthgen.evaluate

    trained = []
    real_train = synthgen.evaluate.train_and_select

    def counting_train(*args, **kwargs):
        trained.append(1)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(synthgen.evaluate, "train_and_select", counting_train)
    results = tmp_path / "results.json"
    results.write_text(contents)
    code = main(["evaluate", "synthetic", str(synthetic), "--real-test", str(mnist_small), "--epochs", "1",
                 "--limit", "20", "--results", str(results), "--no-catalog", "--device", "cpu"])
    assert code == 2
    assert str(results) in caplog.text
    assert expected in caplog.text
    assert trained == []
    assert results.read_text() == contents


@pytest.mark.parametrize("args, expected", [
    (["--epochs", "0"], "--epochs must be an integer >= 1"),
    (["--seeds", "0"], "--seeds must be an integer >= 1"),
    (["--validation-fraction", "1.5"], "--validation-fraction must be in (0, 1)"),
    (["--limit", "1"], "--limit must be an integer >= 2"),
])
def test_cli_bad_settings_exit_2(synthetic, mnist_small, tmp_path, caplog, args, expected):
    code = main(["evaluate", "synthetic", str(synthetic), "--real-test", str(mnist_small), "--results", "",
                 "--no-catalog", *args])
    assert code == 2
    assert expected in caplog.text


def test_missing_dataset_exit_2(mnist_small, tmp_path, caplog):
    code = main(["evaluate", "synthetic", str(tmp_path / "none"), "--real-test", str(mnist_small), "--results", "",
                 "--no-catalog"])
    assert code == 2
    assert "not found" in caplog.text


def test_class_count_mismatch_is_rejected(labelled_parquet, tmp_path):
    from datasets import ClassLabel, Dataset, Features, Image

    real = tmp_path / "five-classes.parquet"
    pictures = [np.zeros((28, 28), dtype=np.uint8)] * 5
    features = Features({"image": Image(), "label": ClassLabel(names=[str(i) for i in range(5)])})
    Dataset.from_dict({"image": pictures, "label": list(range(5))}, features=features).to_parquet(str(real))
    with pytest.raises(EvaluationError, match="10 classes but the real test data has 5"):
        evaluate_synthetic(config(labelled_parquet, real, real_split="train"))


def test_unfinished_build_is_rejected(synthetic, mnist_small, tmp_path):
    import shutil

    copy = tmp_path / "unfinished"
    shutil.copytree(synthetic, copy)
    manifest = json.loads((copy / "synthgen_dataset.json").read_text())
    manifest["complete"] = False
    (copy / "synthgen_dataset.json").write_text(json.dumps(manifest))
    with pytest.raises(EvaluationError, match="not complete"):
        evaluate_synthetic(config(copy, mnist_small))


# ---------------------------------------------------------------- soft targets


def with_probabilities(labelled_parquet, path, labels_shift: int = 0):
    """Copy `labelled_parquet`, give it a probabilities column (the one-hot of its labels), and
    shift its label column by `labels_shift` classes."""
    from datasets import Dataset, Sequence, Value

    dataset = Dataset.from_parquet(str(labelled_parquet))
    labels = np.asarray(dataset["label"])
    one_hot = np.eye(10, dtype=np.float32)[labels]
    dataset = dataset.add_column("probabilities", one_hot.tolist(),
                                 feature=Sequence(Value("float32"), length=10))
    dataset = dataset.map(lambda row: {"label": (row["label"] + labels_shift) % 10})
    dataset.to_parquet(str(path))
    return path


def test_soft_one_hot_targets_train_as_hard_labels(labelled_parquet, mnist_small, tmp_path):
    soft = with_probabilities(labelled_parquet, tmp_path / "one-hot.parquet")
    hard_result = evaluate_synthetic(config(labelled_parquet, mnist_small, limit=300))
    soft_result = evaluate_synthetic(config(soft, mnist_small, limit=300, targets="soft", temperature=1.0))
    # At temperature 1 one-hot targets give the gradients of cross-entropy on the labels.
    assert [entry["test_accuracy"] for entry in soft_result.per_seed] == \
        [entry["test_accuracy"] for entry in hard_result.per_seed]
    assert [entry["selected_epoch"] for entry in soft_result.per_seed] == \
        [entry["selected_epoch"] for entry in hard_result.per_seed]


def test_soft_targets_come_from_probabilities_column(labelled_parquet, mnist_small, tmp_path):
    # The label column is wrong for every row, and the probabilities contain the true classes.
    mislabelled = with_probabilities(labelled_parquet, tmp_path / "mislabelled.parquet", labels_shift=1)
    hard_result = evaluate_synthetic(config(mislabelled, mnist_small))
    soft_result = evaluate_synthetic(config(mislabelled, mnist_small, targets="soft", temperature=1.0))
    # The hard-label classifier learns the shifted classes, and the soft one the true classes. So
    # the soft one is above chance (10 %) even at the epoch that the wrong validation labels select.
    assert hard_result.test_accuracy < 10.0
    assert soft_result.test_accuracy > 20.0
    assert "soft targets" in soft_result.record["classifier"]
    assert soft_result.record["targets"] == "soft, T=1"
    assert "targets" not in hard_result.record


def test_built_dataset_evaluates_with_soft_targets(synthetic, mnist_small, tmp_path):
    results = tmp_path / "results.json"
    catalog = tmp_path / "catalog.duckdb"
    base = ["evaluate", "synthetic", str(synthetic), "--real-test", str(mnist_small), "--epochs", "1",
            "--results", str(results), "--catalog", str(catalog), "--device", "cpu"]
    assert main(base) == 0
    assert main(base + ["--targets", "soft", "--temperature", "2"]) == 0
    assert main(base + ["--targets", "soft", "--temperature", "4"]) == 0
    records = json.loads(results.read_text())
    # One record per kind of target: none replaced another.
    assert [record.get("targets") for record in records] == [None, "soft, T=2", "soft, T=4"]
    with Catalog(catalog) as opened:
        rows = opened.sql("SELECT classifier FROM evaluations ORDER BY classifier")
    assert [("temperature 2" in text, "temperature 4" in text) for text in rows["classifier"]] == \
        [(False, False), (True, False), (False, True)]


def test_soft_targets_need_probabilities_column(labelled_parquet, mnist_small, tmp_path, caplog):
    code = main(["evaluate", "synthetic", str(labelled_parquet), "--real-test", str(mnist_small), "--results", "",
                 "--no-catalog", "--targets", "soft"])
    assert code == 2
    assert "no probabilities column" in caplog.text
    assert "--targets hard" in caplog.text


def test_distillation_loss_gradient():
    import torch

    from synthgen.evaluate import distillation_loss

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 10, generator=generator, dtype=torch.float64, requires_grad=True)
    probabilities = torch.softmax(torch.randn(8, 10, generator=generator, dtype=torch.float64) * 3, dim=1)
    temperature = 4.0
    distillation_loss(logits, probabilities, temperature).backward()
    targets = torch.softmax(probabilities.log() / temperature, dim=1)
    expected = temperature * (torch.softmax(logits.detach() / temperature, dim=1) - targets) / len(logits)
    torch.testing.assert_close(logits.grad, expected)


@pytest.mark.parametrize("column, expected", [
    ([[0.5, 0.5]] * 599 + [None], "empty (null) rows"),
    ([[0.5, 0.5]] * 599 + [[1.0]], "rows of [9, 10] values"),
    ([[0.7, 0.7]] * 600, "do not sum to 1"),
    ([[1.5, -0.5]] * 600, "negative"),
])
def test_bad_probabilities_column_is_rejected(labelled_parquet, mnist_small, tmp_path, column, expected):
    from datasets import Dataset

    dataset = Dataset.from_parquet(str(labelled_parquet))
    padded = [None if row is None else row + [0.0] * 8 for row in column]  # ten values per valid row
    dataset = dataset.add_column("probabilities", padded)
    path = tmp_path / "bad.parquet"
    dataset.to_parquet(str(path))
    with pytest.raises(EvaluationError, match=re.escape(expected)):
        evaluate_synthetic(config(path, mnist_small, targets="soft"))
    hard = evaluate_synthetic(config(path, mnist_small, epochs=1, limit=100))  # hard labels never read the column
    assert hard.train_rows == 90


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_bad_temperature_exit_2(synthetic, mnist_small, caplog, value):
    code = main(["evaluate", "synthetic", str(synthetic), "--real-test", str(mnist_small), "--results", "",
                 "--no-catalog", "--targets", "soft", "--temperature", value])
    assert code == 2
    assert f"--temperature must be a finite number > 0, got {float(value)!r}" in caplog.text
