"""The bad-input catalogue: each case is one test that pins the exact error the user sees.

Every case checks the message (a template: ``{name}`` stands for a value of the case, ``…``
for text that a library writes), the exit status or exception, that nothing was half-written
in the workspace, and that no file that existed before was changed or lost. Cases marked as
gaps pin today's behaviour, which falls short of that aim in the way their ``gap`` says.

docs/bad-input.md is generated from CATALOGUE by scripts/render_bad_input.py;
test_catalogue_doc_matches_cases fails when the two differ.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import subprocess
import sys
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch

from synthgen.cli import main
from synthgen.config import TranscribeConfig
from synthgen.transcribe import TranscriptionError, transcribe

from .conftest import small_config, write_idx

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--steps", "4", "--batch-size", "8", "--replay-size", "32", "--replay-batch", "8", "--latent-dim", "16",
         "--generator-width", "8", "--student-width", "8", "--student-hidden", "32", "--top-k", "3",
         "--noise-seed", "5", "--device", "cpu"]


@dataclass(frozen=True)
class Case:
    test: str  # name of the test function
    surface: str  # "CLI" or "Python"
    given: str  # the bad input, as the user would describe it
    sees: str  # the message template
    outcome: str  # exit status or exception type
    gap: str | None = None  # how today's behaviour falls short, for known gaps


CATALOGUE: list[Case] = []


def case(surface: str, given: str, sees: str, outcome: str, gap: str | None = None):
    """Register a test as a catalogue case."""

    def register(test):
        CATALOGUE.append(Case(test.__name__, surface, given, sees, outcome, gap))
        return test

    return register


def expected(request) -> Case:
    return next(c for c in CATALOGUE if c.test == request.node.originalname)


def assert_sees(request, message: str, **values) -> None:
    """Assert that `message` is the case's template with `values` filled in, in full."""
    template = expected(request).sees
    pattern = ".*?".join(re.escape(part.format(**values)) for part in template.split("…"))
    assert re.fullmatch(pattern, message, flags=re.DOTALL), f"\n  got:      {message}\n  expected: {template}"


def cli(args: list[str], caplog, capsys) -> tuple[int, str]:
    """Run the command line in this process; return the exit status and the last error line."""
    caplog.clear()
    try:
        status = main(args)
    except SystemExit as exit:  # argparse rejects the arguments
        return exit.code, capsys.readouterr().err.strip().splitlines()[-1]
    except Exception as error:  # escapes main(): Python prints a traceback and exits with 1
        return 1, "Traceback … " + traceback.format_exception_only(error)[-1].strip()
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR" and r.name == "synthgen"]
    return status, errors[-1] if errors else ""


def snapshot(folder: Path) -> dict[str, str]:
    """Map every file and folder under `folder` to a hash of its content."""
    state = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        state[key] = "folder" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def charged_queries() -> int:
    path = Path(os.environ["SYNTHGEN_LEDGER"])
    if not path.exists():
        return 0
    with duckdb.connect(str(path), read_only=True) as db:
        if not db.execute("SELECT COUNT(*) FROM information_schema.tables WHERE table_name = 'spends'").fetchone()[0]:
            return 0
        return int(db.execute("SELECT COALESCE(SUM(queries), 0) FROM spends").fetchone()[0])


@pytest.fixture
def workspace(tmp_path):
    """A folder for the case's inputs and outputs; afterwards it must be exactly as before."""
    folder = tmp_path / "workspace"
    folder.mkdir()
    return folder


class Unchanged:
    """Check that a workspace and the ledger end as they were when the check began.

    With `ledger` False the ledger is not read, because another process holds its lock.
    """

    def __init__(self, folder: Path, ledger: bool = True):
        self.folder = folder
        self.before = snapshot(folder)
        self.queries = charged_queries() if ledger else None

    def check(self) -> None:
        after = snapshot(self.folder)
        assert sorted(set(after) - set(self.before)) == [], "files were written"
        assert sorted(set(self.before) - set(after)) == [], "files were lost"
        assert {k: v for k, v in after.items() if self.before[k] != v} == {}, "files were changed"
        if self.queries is not None:
            assert charged_queries() == self.queries, "the ledger was charged"


def transcribe_args(teacher, out, *extra) -> list[str]:
    return ["transcribe", "--teacher", str(teacher), "--out", str(out), *SMALL, *extra]


def write_idx_split(folder: Path, images: np.ndarray, labels: np.ndarray, prefix: str = "train") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / f"{prefix}-images-idx3-ubyte", images)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels.astype(np.uint8))
    return folder


def fails_cli(request, caplog, capsys, workspace, args, status, ledger: bool = True, **values) -> None:
    """Run a CLI case and check status, message and an untouched workspace and ledger."""
    unchanged = Unchanged(workspace, ledger)
    got_status, message = cli(args, caplog, capsys)
    assert got_status == status, message
    assert_sees(request, message, **values)
    unchanged.check()


def fails_python(request, workspace, config: TranscribeConfig, exception: type, **values) -> None:
    unchanged = Unchanged(workspace)
    with pytest.raises(exception) as raised:
        transcribe(config)
    assert_sees(request, str(raised.value), **values)
    unchanged.check()


# ---------------------------------------------------------------- privacy parameters


@case("CLI", "`--epsilon 0`", "epsilon must be a finite number > 0, got 0.0; pass for example --epsilon 10", "exit 2")
def test_epsilon_zero(request, caplog, capsys, small_teacher, workspace):
    fails_cli(request, caplog, capsys, workspace, transcribe_args(small_teacher, workspace / "run", "--epsilon", "0"), 2)


@case("CLI", "`--epsilon nan`", "epsilon must be a finite number > 0, got nan; pass for example --epsilon 10", "exit 2")
def test_epsilon_nan(request, caplog, capsys, small_teacher, workspace):
    fails_cli(request, caplog, capsys, workspace, transcribe_args(small_teacher, workspace / "run", "--epsilon", "nan"), 2)


@case("CLI", "`--epsilon inf`", "epsilon must be a finite number > 0, got inf; pass for example --epsilon 10", "exit 2")
def test_epsilon_infinite(request, caplog, capsys, small_teacher, workspace):
    fails_cli(request, caplog, capsys, workspace, transcribe_args(small_teacher, workspace / "run", "--epsilon", "inf"), 2)


@case("CLI", "`--epsilon ten`", "synthgen transcribe: error: argument --epsilon: invalid float value: 'ten'", "exit 2")
def test_epsilon_not_a_number(request, caplog, capsys, small_teacher, workspace):
    fails_cli(request, caplog, capsys, workspace, transcribe_args(small_teacher, workspace / "run", "--epsilon", "ten"), 2)


@case("CLI", "config file with `epsilon: ten`", "epsilon must be a number > 0, got 'ten'", "exit 2")
def test_epsilon_text_in_config_file(request, caplog, capsys, small_teacher, workspace):
    (workspace / "run.yaml").write_text("epsilon: ten\n")
    args = transcribe_args(small_teacher, workspace / "run", "--config", str(workspace / "run.yaml"))
    fails_cli(request, caplog, capsys, workspace, args, 2)


@case("Python", "`TranscribeConfig(epsilon=-1.0)`",
      "epsilon must be a finite number > 0, got -1.0; pass for example --epsilon 10", "TranscriptionError")
def test_epsilon_negative_python(request, small_teacher, mnist_small, workspace):
    config = small_config(small_teacher, workspace / "run", mnist_small, epsilon=-1.0)
    fails_python(request, workspace, config, TranscriptionError)


@case("Python", "`TranscribeConfig(delta=0.0)`", "delta must be in (0, 1), got 0.0; a common choice is 1e-5",
      "TranscriptionError")
def test_delta_zero_python(request, small_teacher, mnist_small, workspace):
    config = small_config(small_teacher, workspace / "run", mnist_small, delta=0.0)
    fails_python(request, workspace, config, TranscriptionError)


@case("Python", "`TranscribeConfig(delta=float('nan'))`", "delta must be in (0, 1), got nan; a common choice is 1e-5",
      "TranscriptionError")
def test_delta_nan_python(request, small_teacher, mnist_small, workspace):
    config = small_config(small_teacher, workspace / "run", mnist_small, delta=float("nan"))
    fails_python(request, workspace, config, TranscriptionError)


@case("CLI", "`--delta 0.01` for a teacher trained on 600 examples (delta >= 1/n)",
      "delta must be < 1/n = 0.00167 for a private dataset of n = 600 examples, got 0.01; pass a smaller --delta, "
      "such as 1e-04", "exit 2")
def test_delta_at_least_one_over_n(request, caplog, capsys, small_teacher, workspace):
    fails_cli(request, caplog, capsys, workspace, transcribe_args(small_teacher, workspace / "run", "--delta", "0.01"), 2)


@case("CLI", "`--budget-epsilon -2`",
      "budget_epsilon must be a finite number > 0, got -2.0; pass for example --budget-epsilon 10", "exit 2")
def test_budget_epsilon_negative(request, caplog, capsys, small_teacher, workspace):
    args = transcribe_args(small_teacher, workspace / "run", "--budget-epsilon", "-2")
    fails_cli(request, caplog, capsys, workspace, args, 2)


@case("CLI", "a second run whose spend would pass the ledger's budget cap",
      "budget of teacher:{fingerprint} exceeded: already spent epsilon … at delta 1e-05; this run would bring it to …, "
      "above the cap of 2. Lower --epsilon, or raise the cap with 'synthgen ledger set-budget' if the data owner "
      "allows it", "exit 3")
def test_budget_cap_exceeded(request, caplog, capsys, small_teacher, workspace):
    from synthgen.teacher import load_teacher

    first = transcribe_args(small_teacher, workspace / "first", "--epsilon", "2", "--budget-epsilon", "2")
    assert cli(first, caplog, capsys)[0] == 0
    fingerprint = load_teacher(small_teacher).fingerprint
    fails_cli(request, caplog, capsys, workspace, transcribe_args(small_teacher, workspace / "second", "--epsilon", "1"),
              3, fingerprint=fingerprint)


@case("CLI", "`ledger set-budget everything 3`",
      "scope must be 'teacher:<fingerprint>' or 'dataset:<fingerprint>', got 'everything'", "exit 2")
def test_ledger_budget_scope_invalid(request, caplog, capsys, workspace):
    fails_cli(request, caplog, capsys, workspace, ["ledger", "set-budget", "everything", "3"], 2)


# ---------------------------------------------------------------- run settings


@case("CLI", "`--steps 0`", "steps must be an integer >= 1, got 0", "exit 2")
def test_steps_zero(request, caplog, capsys, small_teacher, workspace):
    fails_cli(request, caplog, capsys, workspace, transcribe_args(small_teacher, workspace / "run", "--steps", "0"), 2)


@case("CLI", "`--top-k 11` for a 10-class teacher", "top_k must be <= the number of classes (10), got 11", "exit 2")
def test_top_k_above_classes(request, caplog, capsys, small_teacher, workspace):
    fails_cli(request, caplog, capsys, workspace, transcribe_args(small_teacher, workspace / "run", "--top-k", "11"), 2)


@case("CLI", "`--mechanism laplace`",
      "mechanism must be one of gaussian, noisy-label, dp-teacher, none, got 'laplace'", "exit 2")
def test_mechanism_unknown(request, caplog, capsys, small_teacher, workspace):
    args = transcribe_args(small_teacher, workspace / "run", "--mechanism", "laplace")
    fails_cli(request, caplog, capsys, workspace, args, 2)


@case("CLI", "`--mechanism dp-teacher` with a teacher trained without DP",
      "mechanism 'dp-teacher' needs a teacher trained with DP-SGD, but {teacher} records no DP training; train one "
      "with 'synthgen train-teacher --dp' or use --mechanism gaussian or noisy-label", "exit 2")
def test_dp_teacher_mode_without_dp_teacher(request, caplog, capsys, small_teacher, workspace):
    args = transcribe_args(small_teacher, workspace / "run", "--mechanism", "dp-teacher")
    fails_cli(request, caplog, capsys, workspace, args, 2, teacher=small_teacher)


@case("CLI", "`--device tpu`", "device must be 'auto', 'cpu' or 'cuda[:N]', got 'tpu'", "exit 2")
def test_device_unknown(request, caplog, capsys, small_teacher, workspace):
    args = transcribe_args(small_teacher, workspace / "run", "--device", "tpu")
    fails_cli(request, caplog, capsys, workspace, args, 2)


# ---------------------------------------------------------------- config files


@case("CLI", "`--config` file that does not exist", "config file {config} not found", "exit 2")
def test_config_file_missing(request, caplog, capsys, small_teacher, workspace):
    config = workspace / "missing.yaml"
    args = transcribe_args(small_teacher, workspace / "run", "--config", str(config))
    fails_cli(request, caplog, capsys, workspace, args, 2, config=config)


@case("CLI", "`--config` file that holds a list", "config file {config} must hold a mapping of option names to values",
      "exit 2")
def test_config_file_not_mapping(request, caplog, capsys, small_teacher, workspace):
    config = workspace / "list.yaml"
    config.write_text("- epsilon\n- 3\n")
    args = transcribe_args(small_teacher, workspace / "run", "--config", str(config))
    fails_cli(request, caplog, capsys, workspace, args, 2, config=config)


@case("CLI", "`--config` file with an unknown option `epsilonn`",
      "unknown option(s) epsilonn for TranscribeConfig; see --help for the names", "exit 2")
def test_config_file_unknown_option(request, caplog, capsys, small_teacher, workspace):
    config = workspace / "run.json"
    config.write_text(json.dumps({"epsilonn": 3.0}))
    args = transcribe_args(small_teacher, workspace / "run", "--config", str(config))
    fails_cli(request, caplog, capsys, workspace, args, 2)


@case("CLI", "`--config` JSON file cut off mid-object",
      "config file {config} is not valid JSON: Expecting value: line 1 column 13 (char 12); fix the file", "exit 2")
def test_config_json_truncated(request, caplog, capsys, small_teacher, workspace):
    config = workspace / "run.json"
    config.write_text('{"epsilon": ')
    args = transcribe_args(small_teacher, workspace / "run", "--config", str(config))
    fails_cli(request, caplog, capsys, workspace, args, 2, config=config)


@case("CLI", "`--config` YAML file with a syntax error",
      "config file {config} is not valid YAML: expected ',' or ']', but got '<stream end>' at line 2, column 1; "
      "fix the file", "exit 2")
def test_config_yaml_syntax_error(request, caplog, capsys, small_teacher, workspace):
    config = workspace / "run.yaml"
    config.write_text("epsilon: [1\n")
    args = transcribe_args(small_teacher, workspace / "run", "--config", str(config))
    fails_cli(request, caplog, capsys, workspace, args, 2, config=config)


# ---------------------------------------------------------------- teachers


@case("CLI", "`--teacher` path that does not exist", "teacher {teacher} not found", "exit 2")
def test_teacher_missing(request, caplog, capsys, workspace):
    teacher = workspace / "no-teacher"
    fails_cli(request, caplog, capsys, workspace, transcribe_args(teacher, workspace / "run"), 2, teacher=teacher)


@case("Python", "`TranscribeConfig(teacher='')`", "no teacher given: pass --teacher PATH", "TranscriptionError")
def test_teacher_empty_python(request, mnist_small, workspace):
    config = small_config("", workspace / "run", mnist_small)
    config.teacher = ""
    fails_python(request, workspace, config, TranscriptionError)


@case("CLI", "`--teacher` folder without synthgen_teacher.json",
      "{teacher} is a folder without synthgen_teacher.json; give a teacher saved by 'synthgen train-teacher'", "exit 2")
def test_teacher_folder_without_metadata(request, caplog, capsys, workspace):
    teacher = workspace / "folder"
    teacher.mkdir()
    fails_cli(request, caplog, capsys, workspace, transcribe_args(teacher, workspace / "run"), 2, teacher=teacher)


@case("CLI", "teacher folder whose safetensors file holds random bytes",
      "{weights} is not a valid safetensors file (Error while deserializing header: …); it is corrupted or "
      "truncated: copy or save it again", "exit 2")
def test_teacher_safetensors_corrupted(request, caplog, capsys, small_teacher, workspace):
    import shutil

    teacher = workspace / "teacher"
    shutil.copytree(small_teacher, teacher)
    weights = next(teacher.glob("*.safetensors"))
    weights.write_bytes(os.urandom(300))
    fails_cli(request, caplog, capsys, workspace, transcribe_args(teacher, workspace / "run"), 2, weights=weights)


@case("CLI", "`--teacher` .safetensors file cut to half its length (with `--teacher-factory`)",
      "{weights} is not a valid safetensors file (Error while deserializing header: …); it is corrupted or "
      "truncated: copy or save it again", "exit 2")
def test_teacher_safetensors_truncated(request, caplog, capsys, mnist_small, workspace):
    from safetensors.torch import save_file

    from .test_teacher import make_small_cnn

    weights = workspace / "teacher.safetensors"
    save_file(make_small_cnn().state_dict(), str(weights))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    args = transcribe_args(weights, workspace / "run", "--teacher-factory", "tests.test_teacher:make_small_cnn",
                           "--private-data", str(mnist_small))
    fails_cli(request, caplog, capsys, workspace, args, 2, weights=weights)


@case("CLI", "`--teacher` .safetensors file without `--teacher-factory`",
      "{teacher} contains only weights: pass --teacher-factory package.module:function to build the model", "exit 2")
def test_teacher_safetensors_without_factory(request, caplog, capsys, mnist_small, workspace):
    from safetensors.torch import save_file

    teacher = workspace / "teacher.safetensors"
    save_file({"weight": torch.zeros(2)}, str(teacher))
    args = transcribe_args(teacher, workspace / "run", "--private-data", str(mnist_small))
    fails_cli(request, caplog, capsys, workspace, args, 2, teacher=teacher)


@case("CLI", "`--teacher-factory nocolon`",
      "teacher factory must look like 'package.module:function', got 'nocolon'", "exit 2")
def test_teacher_factory_malformed(request, caplog, capsys, mnist_small, workspace):
    from safetensors.torch import save_file

    teacher = workspace / "teacher.safetensors"
    save_file({"weight": torch.zeros(2)}, str(teacher))
    args = transcribe_args(teacher, workspace / "run", "--teacher-factory", "nocolon", "--private-data", str(mnist_small))
    fails_cli(request, caplog, capsys, workspace, args, 2)


@case("CLI", "`--teacher-factory` naming a module that does not exist",
      "cannot import teacher factory 'nowhere.models:build': No module named 'nowhere'", "exit 2")
def test_teacher_factory_not_importable(request, caplog, capsys, mnist_small, workspace):
    from safetensors.torch import save_file

    teacher = workspace / "teacher.safetensors"
    save_file({"weight": torch.zeros(2)}, str(teacher))
    args = transcribe_args(teacher, workspace / "run", "--teacher-factory", "nowhere.models:build",
                           "--private-data", str(mnist_small))
    fails_cli(request, caplog, capsys, workspace, args, 2)


@case("CLI", "`--teacher` pickle checkpoint (`torch.save` of a module) without `--trust-pickle`",
      "{teacher} is a pickle checkpoint, and loading it can run any code it contains. Convert it to safetensors "
      "(with --teacher-factory), TorchScript or torch.export, or pass --trust-pickle if you trust the file", "exit 2")
def test_teacher_pickle_checkpoint(request, caplog, capsys, mnist_small, workspace):
    from .test_teacher import make_small_cnn

    teacher = workspace / "teacher.pth"
    torch.save(make_small_cnn(), str(teacher))
    args = transcribe_args(teacher, workspace / "run", "--private-data", str(mnist_small))
    fails_cli(request, caplog, capsys, workspace, args, 2, teacher=teacher)


class _PlantedCode:
    """Unpickling this object would create a marker file: it stands in for malicious code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@case("CLI", "teacher folder whose weights are a pickle `.bin` file carrying code",
      "{teacher} carries pickle weights ['diffusion_pytorch_model.bin'] and no .safetensors file; synthgen loads "
      "safetensors weights only, because unpickling can run code. Convert the weights with "
      "safetensors.torch.save_file or train the teacher again with 'synthgen train-teacher'", "exit 2")
def test_teacher_folder_with_pickle_weights(request, caplog, capsys, small_teacher, workspace, tmp_path):
    import shutil

    from safetensors.torch import load_file

    teacher = workspace / "teacher"
    shutil.copytree(small_teacher, teacher)
    safetensors = next(teacher.glob("*.safetensors"))
    weights = teacher / "diffusion_pytorch_model.bin"
    marker = tmp_path / "code-ran"
    torch.save({**load_file(str(safetensors)), "planted": _PlantedCode(marker)}, str(weights))
    safetensors.unlink()
    fails_cli(request, caplog, capsys, workspace, transcribe_args(teacher, workspace / "run"), 2, teacher=teacher)
    assert not marker.exists(), "unpickling the weights ran the planted code"


# ---------------------------------------------------------------- data that does not fit the teacher


@case("CLI", "`--private-data` with 7 classes for a 10-class teacher",
      "teacher predicts 10 classes but the data has 7; use the teacher trained on this dataset", "exit 2")
def test_teacher_class_count_mismatch(request, caplog, capsys, small_teacher, workspace):
    data = write_idx_split(workspace / "seven", np.zeros((14, 28, 28), np.uint8), np.arange(14) % 7)
    args = transcribe_args(small_teacher, workspace / "run", "--private-data", str(data))
    fails_cli(request, caplog, capsys, workspace, args, 2)


@case("CLI", "`--private-data` with 32x32 images for a 28x28 teacher",
      "teacher expects images of shape (1, 28, 28) but the data has (1, 32, 32); use the teacher trained on this "
      "dataset", "exit 2")
def test_teacher_input_shape_mismatch(request, caplog, capsys, small_teacher, workspace):
    data = write_idx_split(workspace / "large", np.zeros((20, 32, 32), np.uint8), np.arange(20) % 10)
    args = transcribe_args(small_teacher, workspace / "run", "--private-data", str(data))
    fails_cli(request, caplog, capsys, workspace, args, 2)


@case("CLI", "`--eval-data` with 32x32 images for a 28x28 teacher",
      "--eval-data {data} has images (1, 32, 32) and 10 classes but the teacher takes (1, 28, 28) and predicts 10; "
      "use the test split of the teacher's dataset", "exit 2")
def test_eval_data_shape_mismatch(request, caplog, capsys, small_teacher, workspace):
    data = write_idx_split(workspace / "large", np.zeros((20, 32, 32), np.uint8), np.arange(20) % 10, prefix="t10k")
    args = transcribe_args(small_teacher, workspace / "run", "--eval-data", str(data))
    fails_cli(request, caplog, capsys, workspace, args, 2, data=data)


@case("CLI", "`--private-data` that is not the data the teacher was trained on",
      "--private-data {data} is not the dataset teacher {teacher} was trained on (fingerprints differ); pass the "
      "teacher's own training data", "exit 2")
def test_private_data_not_the_teachers(request, caplog, capsys, small_teacher, mnist_small, workspace):
    from synthgen.data import load_image_data

    train = load_image_data(mnist_small, "train")
    data = write_idx_split(workspace / "other", train.images[1:, 0], train.labels[1:])
    args = transcribe_args(small_teacher, workspace / "run", "--private-data", str(data))
    fails_cli(request, caplog, capsys, workspace, args, 2, data=data, teacher=small_teacher)


@case("CLI", "`train-teacher` without `--data`", "no private data given: pass --data FOLDER_OR_HUB_ID", "exit 2")
def test_train_teacher_without_data(request, caplog, capsys, workspace):
    fails_cli(request, caplog, capsys, workspace, ["train-teacher", "--out", str(workspace / "teacher")], 2)


@case("CLI", "`train-teacher --data` folder with a parquet shard cut in half",
      "parquet shard {shard} cannot be read (Parquet magic bytes not found in footer. Either the file is corrupted "
      "or this is not a parquet file.); it is corrupted or truncated: download or write it again", "exit 2")
def test_parquet_shard_truncated(request, caplog, capsys, mnist_small, workspace):
    from synthgen.data import load_image_data

    shard = workspace / "data" / "data" / "train-00000.parquet"
    shard.parent.mkdir(parents=True)
    load_image_data(mnist_small, "test").to_dataset().to_parquet(str(shard))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    args = ["train-teacher", "--data", str(workspace / "data"), "--out", str(workspace / "teacher"), "--epochs", "1"]
    fails_cli(request, caplog, capsys, workspace, args, 2, shard=shard)


@case("CLI", "`train-teacher --data` IDX file with a bad magic number",
      "{path} is not an IDX file (bad magic number)", "exit 2")
def test_idx_bad_magic(request, caplog, capsys, workspace):
    data = write_idx_split(workspace / "data", np.zeros((4, 28, 28), np.uint8), np.arange(4))
    images = data / "train-images-idx3-ubyte"
    images.write_bytes(b"\x12\x34" + images.read_bytes()[2:])
    args = ["train-teacher", "--data", str(data), "--out", str(workspace / "teacher"), "--epochs", "1"]
    fails_cli(request, caplog, capsys, workspace, args, 2, path=images)


@case("CLI", "`train-teacher --data` image folder with images of two sizes",
      "image 1 of '{data}' has shape (1, 32, 32), expected (1, 28, 28); resize the images to one size first", "exit 2")
def test_image_folder_mixed_sizes(request, caplog, capsys, workspace):
    from PIL import Image

    data = workspace / "images"
    for name, size in (("a.png", 28), ("b.png", 32)):
        (data / "train" / "zero").mkdir(parents=True, exist_ok=True)
        Image.new("L", (size, size)).save(data / "train" / "zero" / name)
    args = ["train-teacher", "--data", str(data), "--out", str(workspace / "teacher"), "--epochs", "1"]
    fails_cli(request, caplog, capsys, workspace, args, 2, data=data)


@pytest.mark.slow  # the Hub client retries with back-off for about 30 s
@case("CLI", "`train-teacher --data user/name` while the Hub does not answer",
      "could not load 'someone/mnist' from the Hugging Face Hub (ConnectionError: …); check the id and the "
      "network, or give a local folder of IDX, parquet or image files", "exit 2")
def test_hub_unreachable(request, caplog, capsys, workspace, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens there
    args = ["train-teacher", "--data", "someone/mnist", "--out", str(workspace / "teacher"), "--epochs", "1"]
    fails_cli(request, caplog, capsys, workspace, args, 2)


# ---------------------------------------------------------------- run folders


@case("CLI", "`--out` folder that exists and contains a file", "{out} exists and is not empty; choose another --out",
      "exit 2")
def test_out_folder_not_empty(request, caplog, capsys, small_teacher, workspace):
    out = workspace / "run"
    out.mkdir()
    (out / "notes.txt").write_text("kept\n")
    fails_cli(request, caplog, capsys, workspace, transcribe_args(small_teacher, out), 2, out=out)


@case("CLI", "`--out` folder with a finished run", "{out} already contains a finished run; choose another --out",
      "exit 2")
def test_out_folder_finished_run(request, caplog, capsys, small_teacher, workspace):
    out = workspace / "run"
    assert cli(transcribe_args(small_teacher, out), caplog, capsys)[0] == 0
    fails_cli(request, caplog, capsys, workspace, transcribe_args(small_teacher, out), 2, out=out)


@case("CLI", "`--out` folder with an interrupted run, without `--resume`",
      "{out} contains an interrupted run: pass --resume to continue it, or choose another --out", "exit 2")
def test_interrupted_run_without_resume(request, caplog, capsys, small_teacher, workspace):
    out = workspace / "run"
    assert cli(transcribe_args(small_teacher, out, "--stop-after", "2"), caplog, capsys)[0] == 0
    fails_cli(request, caplog, capsys, workspace, transcribe_args(small_teacher, out), 2, out=out)


@case("CLI", "`--resume` on a folder without an interrupted run",
      "--resume given but {out} contains no interrupted run; drop --resume to start one", "exit 2")
def test_resume_without_interrupted_run(request, caplog, capsys, small_teacher, workspace):
    out = workspace / "run"
    fails_cli(request, caplog, capsys, workspace, transcribe_args(small_teacher, out, "--resume"), 2, out=out)


@case("CLI", "`--resume` with a different `--epsilon` than the interrupted run",
      "cannot resume {out}: epsilon differ from the interrupted run; use the same settings", "exit 2")
def test_resume_with_changed_settings(request, caplog, capsys, small_teacher, workspace):
    out = workspace / "run"
    assert cli(transcribe_args(small_teacher, out, "--stop-after", "2"), caplog, capsys)[0] == 0
    args = transcribe_args(small_teacher, out, "--resume", "--epsilon", "5")
    fails_cli(request, caplog, capsys, workspace, args, 2, out=out)


class _DiskFullWriter:
    """A file whose second write of a checkpoint fails half-way with ENOSPC."""

    def __init__(self, handle):
        self.handle = handle

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()

    def write(self, data: bytes) -> int:
        self.handle.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.handle, name)


@case("CLI", "the disk fills up while a checkpoint is written (ENOSPC, simulated)",
      "transcribe failed: No space left on device (ENOSPC); free disk space and run the command again; the files "
      "written so far and the ledger stay consistent, and an interrupted run continues with --resume", "exit 5")
def test_disk_full_during_checkpoint(request, caplog, capsys, small_teacher, workspace, monkeypatch):
    import synthgen._io

    real_fdopen = os.fdopen
    checkpoint_writes = []

    def fdopen(fd, mode="r", *args, **kwargs):
        handle = real_fdopen(fd, mode, *args, **kwargs)
        if ".checkpoint.pt." in os.readlink(f"/proc/self/fd/{fd}"):
            checkpoint_writes.append(fd)
            if len(checkpoint_writes) == 2:
                return _DiskFullWriter(handle)
        return handle

    run = workspace / "run"
    args = transcribe_args(small_teacher, run, "--steps", "6", "--checkpoint-every", "2")
    with monkeypatch.context() as patch:
        patch.setattr(synthgen._io.os, "fdopen", fdopen)
        status, message = cli(args, caplog, capsys)
    assert status == 5, message
    assert_sees(request, message)

    # The checkpoint of iteration 2 survives; the half-written one of iteration 4 is gone.
    assert torch.load(run / "private" / "checkpoint.pt", weights_only=True)["step"] == 2
    assert [p.name for p in run.rglob("*") if p.name.endswith(".tmp")] == []
    assert not (run / "privacy_report.json").exists()
    assert charged_queries() == 4 * 8  # iterations 0-3 (batch 8) were charged before the failure
    assert cli(args + ["--resume"], caplog, capsys)[0] == 0
    report = json.loads((run / "privacy_report.json").read_text())
    assert report["queries"] == 6 * 8
    assert charged_queries() == 6 * 8


# ---------------------------------------------------------------- the ledger


def _hold_ledger(path: Path) -> subprocess.Popen:
    """Open the ledger in another process and keep it open; returns once the lock is held."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys, time; db = duckdb.connect(sys.argv[1]); print('held', flush=True); "
         "time.sleep(120)", str(path)], stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


LEDGER_LOCKED = ("the privacy ledger {path} is locked by another process (PID {pid}), most likely another synthgen "
                 "run; wait for it to finish and run again, or pass --ledger FILE to use a separate ledger (spends in "
                 "separate ledgers are not added up)")


@case("CLI", "the ledger file is locked by another process", LEDGER_LOCKED, "exit 5")
def test_ledger_locked(request, caplog, capsys, small_teacher, workspace):
    ledger = Path(os.environ["SYNTHGEN_LEDGER"])
    holder = _hold_ledger(ledger)
    try:
        fails_cli(request, caplog, capsys, workspace, transcribe_args(small_teacher, workspace / "run"), 5,
                  ledger=False, path=ledger, pid=holder.pid)
    finally:
        holder.kill()
        holder.wait()
    assert charged_queries() == 0


@case("CLI", "a second transcription on the same ledger while one is running", LEDGER_LOCKED, "exit 5")
def test_concurrent_transcriptions_one_ledger(request, caplog, capsys, small_teacher, mnist_small, workspace, tmp_path):
    ledger = Path(os.environ["SYNTHGEN_LEDGER"])
    first_config = small_config(small_teacher, tmp_path / "first", mnist_small, steps=24, eval_every=0)
    (tmp_path / "first.json").write_text(json.dumps(asdict(first_config)))
    first = subprocess.Popen([sys.executable, "-m", "synthgen", "transcribe", "--config", str(tmp_path / "first.json")],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in first.stderr:
        if "privacy: unit=" in line:  # logged while the first run holds the ledger open
            break
    try:
        fails_cli(request, caplog, capsys, workspace, transcribe_args(small_teacher, workspace / "second"), 5,
                  ledger=False, path=ledger, pid=first.pid)
    finally:
        first.stderr.read()
        assert first.wait(timeout=300) == 0
    report = json.loads((tmp_path / "first" / "privacy_report.json").read_text())
    assert report["queries"] == 24 * 16
    assert charged_queries() == 24 * 16


# ---------------------------------------------------------------- the audit


@pytest.fixture(scope="module")
def finished_run(small_teacher, mnist_small, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("finished")
    transcribe(small_config(small_teacher, folder / "run", mnist_small, ledger=str(folder / "ledger.duckdb")))
    return folder / "run"


def audit_args(run: Path, data: Path, *extra) -> list[str]:
    return ["audit", str(run), "--private-data", str(data), "--audit-size", "50", "--shadow-models", "2",
            "--shadow-epochs", "1", "--synthetic-samples", "50", "--bootstrap", "10", *extra]


@case("CLI", "`audit` of a run folder without a privacy report (unfinished)",
      "{run} contains no privacy_report.json: audit a finished run (one that 'synthgen transcribe' completed)",
      "exit 2")
def test_audit_unfinished_run(request, caplog, capsys, small_teacher, mnist_small, workspace):
    run = workspace / "run"
    assert cli(transcribe_args(small_teacher, run, "--stop-after", "2"), caplog, capsys)[0] == 0
    fails_cli(request, caplog, capsys, workspace, audit_args(run, mnist_small), 2, run=run)


@case("CLI", "`audit` of a run folder written by a newer synthgen (report format 2)",
      "{report} has format 'synthgen-privacy-report/2', but this synthgen reads synthgen-privacy-report/1; "
      "upgrade synthgen to audit this run", "exit 2")
def test_audit_newer_report_format(request, caplog, capsys, finished_run, mnist_small, workspace):
    import shutil

    run = workspace / "run"
    shutil.copytree(finished_run, run)
    report = run / "privacy_report.json"
    report.write_text(json.dumps({**json.loads(report.read_text()), "format": "synthgen-privacy-report/2"}))
    fails_cli(request, caplog, capsys, workspace, audit_args(run, mnist_small), 2, report=report)


@case("CLI", "`audit --private-data` that is not the teacher's training data",
      "--private-data {data} is not the data the run's teacher was trained on (fingerprints differ); pass the "
      "teacher's own training data, or the membership labels of the audit would be wrong", "exit 2")
def test_audit_wrong_private_data(request, caplog, capsys, finished_run, mnist_small, workspace):
    import shutil

    from synthgen.data import load_image_data

    run = workspace / "run"
    shutil.copytree(finished_run, run)
    train = load_image_data(mnist_small, "train")
    data = write_idx_split(workspace / "other", train.images[1:, 0], train.labels[1:])
    fails_cli(request, caplog, capsys, workspace, audit_args(run, data), 2, data=data)


@case("CLI", "`audit --audit-size` larger than the private data",
      "audit_size 5000 is larger than the private training data or the held-out split; pass a smaller --audit-size",
      "exit 2")
def test_audit_size_too_large(request, caplog, capsys, finished_run, mnist_small, workspace):
    import shutil

    run = workspace / "run"
    shutil.copytree(finished_run, run)
    fails_cli(request, caplog, capsys, workspace, audit_args(run, mnist_small) + ["--audit-size", "5000"], 2)


@case("CLI", "`audit --shadow-models 1`",
      "shadow_models must be >= 2 so that every example has shadows with and without it, got 1", "exit 2")
def test_audit_one_shadow_model(request, caplog, capsys, finished_run, mnist_small, workspace):
    import shutil

    run = workspace / "run"
    shutil.copytree(finished_run, run)
    fails_cli(request, caplog, capsys, workspace, audit_args(run, mnist_small) + ["--shadow-models", "1"], 2)


# ---------------------------------------------------------------- the catalogue itself


def render_catalogue() -> str:
    """Render docs/bad-input.md from CATALOGUE, including the Hub cases when their module imports."""
    try:
        import tests.test_bad_input_hub  # noqa: F401 (registers its cases)
    except pytest.skip.Exception:
        pass  # no Hub code in this checkout
    lines = [
        "# Bad input: what the user sees",
        "",
        "Each row is a test in `tests/test_bad_input.py` or `tests/test_bad_input_hub.py` that checks the",
        "exact message, the exit status or exception, that nothing was half-written and that no existing",
        "file changed or was lost. Rows marked as known gaps say where that is not yet so. `{name}` stands",
        "for the value given, `…` for text that a library writes. Generated by",
        "`scripts/render_bad_input.py`; do not edit by hand.",
        "",
        f"{len(CATALOGUE)} cases, {sum(1 for c in CATALOGUE if c.gap)} of them known gaps.",
        "",
        "| # | where | bad input | the user sees | result |",
        "|---|---|---|---|---|",
    ]
    for number, entry in enumerate(CATALOGUE, 1):
        sees = entry.sees.replace("|", "\\|")
        result = entry.outcome + (" (known gap)" if entry.gap else "")
        lines.append(f"| {number} | {entry.surface} | {entry.given} | `{sees}` | {result} |")
    lines += ["", "## Known gaps", ""]
    for number, entry in enumerate(CATALOGUE, 1):
        if entry.gap:
            lines.append(f"- {number}. {entry.given}: {entry.gap}.")
    if not any(entry.gap for entry in CATALOGUE):
        lines.append("None: every case gives the error it should.")
    return "\n".join(lines) + "\n"


def test_catalogue_doc_matches_cases():
    assert len(CATALOGUE) >= 30
    assert len({c.test for c in CATALOGUE}) == len(CATALOGUE)
    doc = ROOT / "docs" / "bad-input.md"
    assert doc.is_file(), "run scripts/render_bad_input.py"
    assert doc.read_text() == render_catalogue(), "docs/bad-input.md is out of date: run scripts/render_bad_input.py"
