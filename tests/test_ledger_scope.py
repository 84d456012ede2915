"""Spends on subsets of a dataset (train-teacher --limit) count against the whole dataset's budget."""

import logging

from synthgen.cli import main
from synthgen.data import load_image_data
from synthgen.transcribe import transcribe

from .conftest import small_config

DP = ["--dp", "--epsilon", "1", "--epochs", "1", "--batch-size", "64", "--width", "8", "--hidden", "32",
      "--eval-split", "", "--noise-seed", "0"]


def test_subsets_share_whole_dataset_budget(mnist_small, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="synthgen")
    whole = load_image_data(str(mnist_small), "train")
    ledger = tmp_path / "ledger.duckdb"
    assert main(["ledger", "--ledger", str(ledger), "set-budget", f"dataset:{whole.fingerprint}", "1.2"]) == 0

    first = ["train-teacher", "--data", str(mnist_small), "--out", str(tmp_path / "a"), "--limit", "300"]
    assert main([*first, *DP, "--ledger", str(ledger)]) == 0
    assert f"subset of dataset {whole.fingerprint}" in caplog.text

    # Another subset, or the whole dataset, would take the spend on these examples above 1.2.
    for limit in (["--limit", "299"], []):
        out = tmp_path / f"b{len(limit)}"
        code = main(["train-teacher", "--data", str(mnist_small), "--out", str(out), *limit, *DP,
                     "--ledger", str(ledger)])
        assert code == 3
        assert not out.exists()

    # The transcription finds the subset teacher's spend under the whole dataset.
    config = small_config(tmp_path / "a", tmp_path / "run", mnist_small, mechanism="dp-teacher", ledger=str(ledger))
    report = transcribe(config).report
    assert report["teacher_dp"]["verification"].startswith("matches the spend recorded")
