"""The synthetic dataset builder on a real tiny transcription run: loading, labels, determinism
across shard sizes and processes, resumption after SIGKILL, the card, the Hub, and bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from synthgen.build import MANIFEST_FILE, BuildError, build_dataset
from synthgen.cli import main
from synthgen.sampling import BLOCK_SIZE, SamplingError, block_seed

from .dataset_builds import (
    ROOT, SCRIPT, build, decode_images, free_port, point_client_at, read_rows, spread_label_release, with_report_changes,
    without_report,
)

ROWS = 600  # three blocks of latents, the last one partial
TOKEN = "hf_test_token"


@pytest.fixture(scope="module")
def reference(run_dir, tmp_path_factory):
    """The dataset of ROWS rows, seed 0, in shards of 256 rows, built in this process."""
    out = tmp_path_factory.mktemp("reference") / "dataset"
    build(run_dir, out, num_samples=ROWS, shard_size=256)
    return out


@pytest.fixture(scope="module")
def student(run_dir):
    from synthgen.models import Classifier

    return Classifier.from_pretrained(run_dir / "student").double().eval()


def subprocess_env(tmp_path) -> dict:
    env = dict(os.environ, TQDM_DISABLE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"),
               SYNTHGEN_CATALOG=str(tmp_path / "catalog.duckdb"), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return env


def same_rows(left, right) -> None:
    assert left.num_rows == right.num_rows
    for name in ("sample_index", "label", "confidence", "probabilities", "seed", "generator", "generator_commit"):
        assert left.column(name).to_pylist() == right.column(name).to_pylist(), name
    assert left.column("image").to_pylist() == right.column("image").to_pylist()


# ---------------------------------------------------------------- what a build contains


def test_build_loads_with_datasets_parquet(reference, run_dir, tmp_path):
    from datasets import ClassLabel, Image, load_dataset

    files = sorted(str(path) for path in (reference / "data").glob("*.parquet"))
    dataset = load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "datasets"))
    assert len(dataset) == ROWS
    assert isinstance(dataset.features["image"], Image)
    assert isinstance(dataset.features["label"], ClassLabel)
    report = json.loads((run_dir / "privacy_report.json").read_text())
    assert dataset.features["label"].names == report["public_facts"]["class_names"]
    assert set(dataset.column_names) == {"image", "label", "generator", "generator_commit", "seed", "sample_index",
                                         "confidence", "probabilities"}
    assert dataset.features["probabilities"].length == len(dataset.features["label"].names)
    picture = dataset[0]["image"]
    assert picture.mode == "L"
    assert picture.size == (28, 28)


def test_build_writes_shards_of_shard_size(reference):
    files = sorted((reference / "data").glob("*.parquet"))
    assert [path.name for path in files] == [f"train-0000{k}-of-00003.parquet" for k in range(3)]
    assert [pq.read_metadata(path).num_rows for path in files] == [256, 256, 88]
    manifest = json.loads((reference / MANIFEST_FILE).read_text())
    assert manifest["complete"] is True
    assert manifest["rows"] == ROWS
    assert sum(manifest["label_counts"]) == ROWS


def test_labels_equal_student_predictions(reference, student):
    rows = read_rows(reference)
    images = decode_images(rows)
    assert images.shape == (ROWS, 1, 28, 28)
    with torch.no_grad():
        probabilities = torch.softmax(student(torch.from_numpy(images).double() / 255).float(), dim=1)
    confidence, predicted = probabilities.max(dim=1)
    assert rows.column("label").to_pylist() == predicted.tolist()
    np.testing.assert_allclose(rows.column("confidence").to_numpy(), confidence.numpy(), rtol=1e-6)
    stored = np.asarray(rows.column("probabilities").to_pylist(), dtype=np.float32)  # (ROWS, classes)
    np.testing.assert_allclose(stored, probabilities.numpy(), rtol=1e-6, atol=1e-12)
    np.testing.assert_array_equal(stored.max(axis=1), rows.column("confidence").to_numpy())
    np.testing.assert_allclose(stored.sum(axis=1), 1.0, rtol=1e-5)


def test_images_come_from_per_block_latents(reference, run_dir):
    from synthgen.models import Generator

    generator = Generator.from_pretrained(run_dir / "generator").eval()
    latents = torch.randn(BLOCK_SIZE, generator.config.latent_dim,
                          generator=torch.Generator().manual_seed(block_seed(0, 1)))
    with torch.no_grad():
        expected = (generator(latents).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    rows = read_rows(reference)
    images = decode_images(rows.slice(BLOCK_SIZE, BLOCK_SIZE))
    assert rows.column("sample_index").to_pylist() == list(range(ROWS))
    np.testing.assert_array_equal(images, expected)


def test_card_has_hub_yaml_and_privacy_section(reference, run_dir):
    from huggingface_hub import DatasetCard

    card = DatasetCard((reference / "README.md").read_text())
    metadata = card.data.to_dict()
    report = json.loads((run_dir / "privacy_report.json").read_text())
    assert metadata["task_categories"] == ["image-classification"]
    assert metadata["size_categories"] == ["n<1K"]
    assert metadata["annotations_creators"] == ["machine-generated"]
    assert metadata["source_datasets"] == ["original"]
    assert metadata["configs"][0]["data_files"][0]["path"] == "data/train-*.parquet"
    privacy = metadata["differential_privacy"]
    assert privacy["unit"] == report["unit"]
    assert privacy["epsilon"] == report["epsilon"]
    assert privacy["delta"] == report["delta"]
    section = card.text.split("## Privacy Considerations", 1)[1].split("\n## ", 1)[0]
    assert f"{report['epsilon']:.4g}" in section
    assert f"{report['delta']:g}" in section
    assert "teacher level" in section
    assert (run_dir / "privacy_report.json").resolve().as_uri() in section
    assert "Sampling added no privacy cost" in section


# ---------------------------------------------------------------- determinism


def test_shard_size_does_not_change_rows(reference, run_dir, tmp_path):
    build(run_dir, tmp_path / "shards", num_samples=ROWS, shard_size=97)
    same_rows(read_rows(tmp_path / "shards"), read_rows(reference))


def build_twice_and_compare(run_dir, first, second, **settings):
    """Build ROWS rows into `first` with 1 thread and shards of 256, and into `second` with 2 threads
    and shards of 97; check that the rows are equal and return them."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        build(run_dir, first, num_samples=ROWS, shard_size=256, **settings)
        torch.set_num_threads(2)
        build(run_dir, second, num_samples=ROWS, shard_size=97, **settings)
    finally:
        torch.set_num_threads(threads)
    rows = read_rows(first)
    same_rows(rows, read_rows(second))
    return rows


def test_bfloat16_build_is_deterministic_and_close(reference, run_dir, tmp_path):
    # bfloat16 is another definition of the dataset: the same rows in any shard size and thread
    # count, and images within a few 8-bit levels of the float32 ones.
    first = build_twice_and_compare(run_dir, tmp_path / "bf16-a", tmp_path / "bf16-b", precision="bfloat16")
    manifest = json.loads((tmp_path / "bf16-a" / MANIFEST_FILE).read_text())
    assert manifest["settings"]["precision"] == "bfloat16"
    assert "bfloat16" in manifest["sampler"]
    exact, fast = decode_images(read_rows(reference)), decode_images(first)
    difference = np.abs(exact.astype(int) - fast.astype(int))
    assert difference.mean() < 1.0
    assert difference.max() <= 16
    agreement = np.mean(np.array(read_rows(reference).column("label")) == np.array(first.column("label")))
    assert agreement >= 0.95


def test_resume_rejects_other_precision(run_dir, tmp_path):
    build(run_dir, tmp_path / "ds", num_samples=300, shard_size=256)
    with pytest.raises(BuildError, match="precision"):
        build(run_dir, tmp_path / "ds", num_samples=300, shard_size=256, precision="bfloat16", resume=True)


def assert_student_labels(student, images, rows) -> None:
    """Check that each row's label is the student's prediction on its decoded 8-bit image."""
    with torch.no_grad():
        predicted = student(torch.from_numpy(images).double() / 255).argmax(dim=1)
    assert rows.column("label").to_pylist() == predicted.tolist()


def test_hflip_build_mirrors_and_relabels(reference, run_dir, student, tmp_path):
    # A mirror is exact on 8-bit images, so every row is the reference row or its mirror image.
    rows = build_twice_and_compare(run_dir, tmp_path / "flip-a", tmp_path / "flip-b", augment="hflip")
    plain, flipped = decode_images(read_rows(reference)), decode_images(rows)
    mirrored = np.array([np.array_equal(a, b[..., ::-1]) and not np.array_equal(a, b)
                         for a, b in zip(flipped, plain)])
    unchanged = np.array([np.array_equal(a, b) for a, b in zip(flipped, plain)])
    assert (mirrored | unchanged).all()
    assert 0.4 < mirrored.mean() < 0.6  # probability 1/2 over 600 rows
    assert_student_labels(student, flipped, rows)
    manifest = json.loads((tmp_path / "flip-a" / MANIFEST_FILE).read_text())
    assert manifest["settings"]["augment"] == "hflip"
    assert "horizontal mirror" in manifest["sampler"]
    card = (tmp_path / "flip-a" / "README.md").read_text()
    assert "--augment hflip" in card
    assert "transforming them with seeded" in card


def test_affine_shift_within_stated_range():
    from synthgen.sampling import AFFINE_SHIFT, augment_images

    # A 2x2 dot at the centre of 28x28 images: rotation, scale and shear keep the centre fixed,
    # so the dot's centre of mass moves by the shift alone, up to AFFINE_SHIFT of the side.
    images = torch.zeros(512, 1, 28, 28)
    images[:, :, 13:15, 13:15] = 1
    moved = augment_images(images, ("affine",), torch.Generator().manual_seed(0))
    assert moved.dtype == images.dtype
    grid = torch.arange(28, dtype=torch.float64)
    mass = moved.sum(dim=(1, 2, 3))
    column = (moved.sum(dim=(1, 2)) * grid).sum(dim=1) / mass - 13.5
    row = (moved.sum(dim=(1, 3)) * grid).sum(dim=1) / mass - 13.5
    limit = AFFINE_SHIFT * 28
    assert column.abs().max() <= limit + 0.1
    assert row.abs().max() <= limit + 0.1
    # A uniform shift over [-2, 2] pixels has a standard deviation of 1.15 pixels.
    assert column.std() > limit / 3
    assert row.std() > limit / 3
    assert (column > 1).any()
    assert (column < -1).any()
    # A scale in [0.9, 1.1] changes the dot's area (its mass) by at most 21%. The bounds allow 10% more for resampling.
    assert mass.min() > 4 * 0.9**2 * 0.9
    assert mass.max() < 4 * 1.1**2 * 1.1
    again = augment_images(images, ("affine",), torch.Generator().manual_seed(0))
    assert torch.equal(moved, again)


def test_affine_map_within_stated_ranges():
    from synthgen.sampling import (AFFINE_ROTATION_DEGREES, AFFINE_SCALE, AFFINE_SHEAR, affine_forward,
                                   invert_2x2)

    # Uniform numbers at both ends and inside; the map F = s R(angle) Shear(h) is factored back:
    # det F = s^2, F's first column / s is the rotation's, and R^T F / s is the shear matrix.
    corners = torch.tensor([[sign_a, sign_s, sign_h, 0, 0, 0] for sign_a in (-1, 1) for sign_s in (-1, 1)
                            for sign_h in (-1, 1)], dtype=torch.float64)
    uniform = torch.cat([corners, torch.rand(256, 6, generator=torch.Generator().manual_seed(0),
                                             dtype=torch.float64) * 2 - 1])
    forward, _ = affine_forward(uniform)
    scale = torch.linalg.det(forward).sqrt()
    angle = torch.rad2deg(torch.atan2(forward[:, 1, 0], forward[:, 0, 0]))
    cos, sin = forward[:, 0, 0] / scale, forward[:, 1, 0] / scale
    shear = (cos * forward[:, 0, 1] + sin * forward[:, 1, 1]) / scale
    assert torch.allclose(angle, uniform[:, 0] * AFFINE_ROTATION_DEGREES)
    assert torch.allclose(scale, 1 + uniform[:, 1] * AFFINE_SCALE)
    assert torch.allclose(shear, uniform[:, 2] * AFFINE_SHEAR)
    assert angle.abs().max() == pytest.approx(AFFINE_ROTATION_DEGREES)
    assert shear.abs().max() == pytest.approx(AFFINE_SHEAR)
    assert scale.min() == pytest.approx(1 - AFFINE_SCALE)
    assert scale.max() == pytest.approx(1 + AFFINE_SCALE)
    identity = torch.eye(2, dtype=torch.float64).expand(len(uniform), 2, 2)
    assert torch.allclose(invert_2x2(forward) @ forward, identity)


def test_affine_build_is_deterministic(reference, run_dir, student, tmp_path):
    # Bilinear resampling sums in an order that may depend on the thread count, so the rows of
    # both builds must match bit for bit and the labels must be the student's on the written images.
    rows = build_twice_and_compare(run_dir, tmp_path / "affine-a", tmp_path / "affine-b", augment="affine+hflip")
    images = decode_images(rows)
    changed = np.array([not np.array_equal(a, b) for a, b in zip(images, decode_images(read_rows(reference)))])
    assert changed.mean() > 0.9
    assert_student_labels(student, images, rows)
    manifest = json.loads((tmp_path / "affine-a" / MANIFEST_FILE).read_text())
    assert manifest["settings"]["augment"] == "affine+hflip"
    assert "affine transform" in manifest["sampler"]
    assert "horizontal mirror" in manifest["sampler"]


def blend_partners(base: torch.Tensor, mixed: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return, for each image of `mixed`, its best partner j in `base`, the weight w of the blend
    (1 - w) * base[i] + w * base[j] and the largest pixel error of that fit."""
    flat, target = base.flatten(1).double(), mixed.flatten(1).double()
    direction = flat[None, :, :] - flat[:, None, :]  # (i, j, pixels): base[j] - base[i]
    change = (target - flat)[:, None, :]
    weight = (change * direction).sum(-1) / (direction * direction).sum(-1).clamp_min(1e-12)
    error = (change - weight[..., None] * direction).abs().amax(-1)
    error.diagonal().fill_(float("inf"))
    partner = error.argmin(dim=1)
    rows = torch.arange(len(base))
    return partner.numpy(), weight[rows, partner].numpy(), error[rows, partner].numpy()


def test_mixup_blends_pairs_of_block():
    from synthgen.sampling import MIXUP_PROBABILITY, augment_images

    images = torch.rand(256, 1, 8, 8)
    flipped = augment_images(images, ("hflip",), torch.Generator().manual_seed(0))
    mixed = augment_images(images, ("hflip", "mixup"), torch.Generator().manual_seed(0))
    assert mixed.dtype == images.dtype
    unchanged = (mixed == flipped).flatten(1).all(dim=1).numpy()
    # The mirror of each image is drawn as without mixup, and a blend mixes two mirrored images.
    assert abs(unchanged.mean() - (1 - MIXUP_PROBABILITY)) < 0.1
    partner, weight, error = blend_partners(flipped, mixed)
    blended = ~unchanged
    assert error[blended].max() < 1e-5
    assert weight[blended].min() > 0
    assert weight[blended].max() < 1
    assert 0.35 < weight[blended].mean() < 0.65  # uniform weights on [0, 1)
    assert len(set(partner[blended].tolist())) == blended.sum()  # a permutation: no image is the partner twice
    again = augment_images(images, ("hflip", "mixup"), torch.Generator().manual_seed(0))
    assert torch.equal(mixed, again)


def test_mixup_build_relabels_blends(run_dir, student, tmp_path):
    # Blends are computed in float64, so the rows must match bit for bit across thread counts and
    # shard sizes, and each label must be the student's on the blended image.
    flipped = decode_images(build_twice_and_compare(run_dir, tmp_path / "flip-a", tmp_path / "flip-b",
                                                    augment="hflip"))
    rows = build_twice_and_compare(run_dir, tmp_path / "mix-a", tmp_path / "mix-b", augment="hflip+mixup")
    images = decode_images(rows)
    unchanged = np.array([np.array_equal(a, b) for a, b in zip(images, flipped)])
    assert 0.4 < unchanged.mean() < 0.6
    assert_student_labels(student, images, rows)
    # The soft targets are the student's probabilities on the blend, not a blend of two rows' probabilities.
    with torch.no_grad():
        probabilities = torch.softmax(student(torch.from_numpy(images).double() / 255).float(), dim=1)
    stored = np.asarray(rows.column("probabilities").to_pylist(), dtype=np.float32)  # (ROWS, classes)
    np.testing.assert_allclose(stored, probabilities.numpy(), rtol=1e-6, atol=1e-12)
    manifest = json.loads((tmp_path / "mix-a" / MANIFEST_FILE).read_text())
    assert manifest["settings"]["augment"] == "hflip+mixup"
    assert "a blend" in manifest["sampler"]
    card = (tmp_path / "mix-a" / "README.md").read_text()
    assert "--augment hflip+mixup" in card


def test_per_class_plan_uses_augmented_labels(spread_release, tmp_path):
    # The plan and the shards must both label the transformed image; otherwise the shards'
    # labels would differ from the plan and the build would stop.
    build(spread_release, tmp_path / "plain", per_class=2, shard_size=8)
    build(spread_release, tmp_path / "affine", per_class=2, shard_size=8, augment="affine")
    rows = read_rows(tmp_path / "affine")
    assert np.bincount(rows.column("label").to_numpy(), minlength=10).tolist() == [2] * 10
    assert rows.column("image").to_pylist() != read_rows(tmp_path / "plain").column("image").to_pylist()


def test_resume_rejects_other_augment(run_dir, tmp_path):
    build(run_dir, tmp_path / "ds", num_samples=300, shard_size=256)
    with pytest.raises(BuildError, match="augment"):
        build(run_dir, tmp_path / "ds", num_samples=300, shard_size=256, augment="affine", resume=True)


def test_fewer_rows_are_a_prefix(reference, run_dir, tmp_path):
    build(run_dir, tmp_path / "prefix", num_samples=300, shard_size=300)
    same_rows(read_rows(tmp_path / "prefix"), read_rows(reference).slice(0, 300))


def test_other_seed_gives_other_images(reference, run_dir, tmp_path):
    build(run_dir, tmp_path / "seed1", num_samples=20, seed=1)
    other = read_rows(tmp_path / "seed1")
    assert other.column("image").to_pylist() != read_rows(reference).slice(0, 20).column("image").to_pylist()
    assert set(other.column("seed").to_pylist()) == {1}


def torchrun_build(generator, out, tmp_path, *extra) -> subprocess.CompletedProcess:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    return subprocess.run(
        [*torchrun, str(SCRIPT), str(generator), "--num-samples", str(ROWS), "--shard-size", "128", "--out", str(out),
         "--device", "cpu", "--no-catalog", *extra],
        env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=300)


def test_torchrun_two_processes_equal_one(reference, run_dir, tmp_path):
    out = tmp_path / "torchrun"
    completed = torchrun_build(run_dir, out, tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "process 0 of 2: 3 shards to write" in completed.stderr
    assert "process 1 of 2: 2 shards to write" in completed.stderr
    same_rows(read_rows(out), read_rows(reference))
    assert json.loads((out / MANIFEST_FILE).read_text())["complete"] is True


def test_torchrun_augmented_release_build(run_dir, tmp_path):
    # A user builds from what was released: a copy of the run without its private folder. Each
    # process draws the transforms of its blocks from the block's seeded generator, so mirrors and
    # blends must match those of one process that writes shards of another size.
    release = with_report_changes(run_dir, tmp_path / "release")
    assert (run_dir / "private").is_dir()
    assert not (release / "private").exists()
    build(release, tmp_path / "single", num_samples=ROWS, shard_size=256, augment="hflip+mixup")
    completed = torchrun_build(release, tmp_path / "pair", tmp_path, "--augment", "hflip+mixup")
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "process 1 of 2: 2 shards to write" in completed.stderr
    same_rows(read_rows(tmp_path / "pair"), read_rows(tmp_path / "single"))
    manifest = json.loads((tmp_path / "pair" / MANIFEST_FILE).read_text())
    assert manifest["complete"] is True
    assert manifest["settings"]["augment"] == "hflip+mixup"


def accelerate_launch(mode: str, out, run_dir, tmp_path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", mode, "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
               str(SCRIPT), str(run_dir), "--num-samples", str(ROWS), "--shard-size", "200", "--out", str(out),
               "--no-catalog"]
    return subprocess.run(command, env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=300)


def test_accelerate_two_processes_equal_one(reference, run_dir, tmp_path):
    # accelerate 1.16 starts CPU processes only through torchrun ('--multi_gpu', which needs no GPU)
    # or mpirun; '--device auto' picks the CPU on a machine without CUDA.
    out = tmp_path / "accelerate"
    completed = accelerate_launch("--multi_gpu", out, run_dir, tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "process 0 of 2: 2 shards to write" in completed.stderr
    assert "process 1 of 2: 1 shards to write" in completed.stderr
    same_rows(read_rows(out), read_rows(reference))
    assert json.loads((out / MANIFEST_FILE).read_text())["complete"] is True


@pytest.mark.slow
def test_accelerate_cpu_flag_starts_one_process(reference, run_dir, tmp_path):
    out = tmp_path / "accelerate-cpu"
    completed = accelerate_launch("--cpu", out, run_dir, tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "process 0 of 1: 3 shards to write" in completed.stderr
    assert "started this build as one process" in completed.stderr
    same_rows(read_rows(out), read_rows(reference))


def test_single_process_cpu_launch_is_named(run_dir, tmp_path, monkeypatch, caplog):
    # The variables 'accelerate launch --cpu --num_processes 2' gives its single process
    # (accelerate.utils.launch.prepare_simple_launcher_cmd_env, accelerate 1.16).
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        monkeypatch.delenv(name, raising=False)
    result = build(run_dir, tmp_path / "out", num_samples=10)
    assert result.rows == 10
    assert "started this build as one process" in caplog.text
    assert "--multi_gpu" in caplog.text


def test_killed_build_resumes_to_same_rows(reference, run_dir, tmp_path):
    out = tmp_path / "killed"
    log = tmp_path / "killed.log"
    with open(log, "w") as handle:
        process = subprocess.Popen(
            [sys.executable, str(SCRIPT), str(run_dir), "--num-samples", str(ROWS), "--shard-size", "8", "--out",
             str(out), "--device", "cpu", "--threads", "1", "--no-catalog"],
            env=subprocess_env(tmp_path), stdout=subprocess.DEVNULL, stderr=handle)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "data").glob("*.parquet"))) < 3 and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, log.read_text()[-3000:]

    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["complete"] is False
    assert not (out / "README.md").exists()
    finished = sorted((out / "data").glob("*.parquet"))
    assert 3 <= len(finished) < manifest["shards"]
    for path in finished:
        assert pq.read_metadata(path).num_rows == 8, path.name

    with pytest.raises(BuildError, match="--resume"):
        build(run_dir, out, num_samples=ROWS, shard_size=8)
    result = build(run_dir, out, num_samples=ROWS, shard_size=8, resume=True)
    assert result.shards_written == manifest["shards"] - len(finished)
    assert not list((out / "data").glob(".*"))
    same_rows(read_rows(out), read_rows(reference))
    assert json.loads((out / MANIFEST_FILE).read_text())["complete"] is True


def test_resume_of_complete_build_writes_nothing(reference, run_dir, tmp_path):
    out = tmp_path / "complete"
    build(run_dir, out, num_samples=100, shard_size=50)
    before = {path.name: path.stat().st_mtime_ns for path in (out / "data").iterdir()}
    result = build(run_dir, out, num_samples=100, shard_size=50, resume=True)
    assert result.shards_written == 0
    assert {path.name: path.stat().st_mtime_ns for path in (out / "data").iterdir()} == before


# ---------------------------------------------------------------- rows per class


@pytest.fixture(scope="module")
def spread_release(run_dir, tmp_path_factory):
    return spread_label_release(run_dir, tmp_path_factory.mktemp("spread") / "release")


def test_per_class_takes_first_samples_of_each_class(spread_release, tmp_path):
    from synthgen.generator_source import load_generator
    from synthgen.sampling import draw_block, prepare_pipeline

    per_class = 3
    build(spread_release, tmp_path / "a", per_class=per_class, shard_size=4)
    build(spread_release, tmp_path / "b", per_class=per_class, shard_size=30)
    rows = read_rows(tmp_path / "a")
    same_rows(rows, read_rows(tmp_path / "b"))

    labels = np.asarray(rows.column("label").to_pylist())
    assert np.bincount(labels, minlength=10).tolist() == [per_class] * 10
    # Brute force: the first `per_class` sample indices of every class, scanning the stream.
    pipeline = prepare_pipeline(load_generator(str(spread_release)).pipeline, torch.device("cpu"))
    expected, block = [], 0
    counts = np.zeros(10, dtype=int)
    while counts.min() < per_class:
        block_labels = draw_block(pipeline, 0, block)[1]
        for offset, label in enumerate(block_labels):
            if counts[label] < per_class:
                counts[label] += 1
                expected.append(block * BLOCK_SIZE + offset)
        block += 1
    assert rows.column("sample_index").to_pylist() == sorted(expected)


def test_chunked_block_equals_pipeline(spread_release):
    from synthgen.generator_source import load_generator
    from synthgen.sampling import draw_block, prepare_pipeline

    pipeline = prepare_pipeline(load_generator(str(spread_release)).pipeline, torch.device("cpu"))
    for block in (7,):  # one block: each costs two generator passes
        pixels, labels, confidences, probabilities = draw_block(pipeline, 3, block)
        rng = torch.Generator().manual_seed(block_seed(3, block))
        whole = pipeline(num_images=BLOCK_SIZE, generator=rng, output_type="pt", batch_size=BLOCK_SIZE)
        np.testing.assert_array_equal(pixels, (whole.images * 255).round().to(torch.uint8).numpy())
        np.testing.assert_array_equal(labels, whole.labels.numpy())
        np.testing.assert_array_equal(confidences, whole.confidences.numpy())
        np.testing.assert_array_equal(probabilities.argmax(axis=1), labels)
    assert len(set(labels.tolist())) > 1, "the release must give varied labels to test them"


def test_per_class_missing_class_is_rejected(run_dir, tmp_path):
    out = tmp_path / "per-class"
    with pytest.raises(SamplingError, match="still missing"):
        build(run_dir, out, per_class=1)
    assert not out.exists()


# ---------------------------------------------------------------- the Hub


@pytest.fixture(scope="module")
def local_hub():
    from .hub_server import LocalHub

    with LocalHub(valid_tokens={TOKEN}) as hub:
        yield hub


@pytest.fixture
def hub(local_hub, monkeypatch, tmp_path):
    point_client_at(monkeypatch, local_hub.url, TOKEN, tmp_path / "hf-home" / "hub", tmp_path / "agents.json")
    return local_hub


def test_hub_generator_to_hub_dataset_round_trip(hub, run_dir, reference, tmp_path):
    from datasets import ClassLabel, load_dataset

    from synthgen.catalog import Catalog
    from synthgen.hub import push

    pushed = push(run_dir, "tester/generator", revision="v1")
    catalog = tmp_path / "catalog.duckdb"
    result = build("tester/generator", tmp_path / "local", catalog=str(catalog), revision="v1", num_samples=ROWS,
                   shard_size=256, push_to_hub="tester/synthetic")
    assert result.repo_id == "tester/synthetic"

    dataset = load_dataset("tester/synthetic", split="train", cache_dir=str(tmp_path / "datasets"))
    assert len(dataset) == ROWS
    assert isinstance(dataset.features["label"], ClassLabel)
    assert set(dataset["generator"]) == {"tester/generator"}
    assert set(dataset["generator_commit"]) == {pushed.commit}
    local = read_rows(reference)
    assert dataset["sample_index"] == local.column("sample_index").to_pylist()
    assert dataset["label"] == local.column("label").to_pylist()
    assert np.asarray(dataset[5]["image"]).tolist() == decode_images(local.slice(5, 1))[0, 0].tolist()

    repo = hub.state.repos[("dataset", "tester/synthetic")]
    files = sorted(repo.resolve("main").files)
    assert files == sorted([".gitattributes", "README.md", MANIFEST_FILE, "data/train-00000-of-00003.parquet",
                            "data/train-00001-of-00003.parquet", "data/train-00002-of-00003.parquet"])
    card = repo.resolve("main").files["README.md"].content.decode()
    assert f"{hub.url}/tester/generator/blob/{pushed.commit}/README.md" in card
    with Catalog(catalog) as opened:
        row = opened.sql("SELECT * FROM dataset_provenance").iloc[0]
        assert row["repo_id"] == "tester/synthetic"
        assert row["generator"] == "tester/generator"
        assert opened.sql("SELECT commit FROM releases")["commit"].tolist() == [pushed.commit]


def test_pull_of_cached_commit_downloads_nothing(hub, run_dir, tmp_path):
    from synthgen.hub import pull, push

    pushed = push(run_dir, "tester/generator-cached", revision="v1")
    first = pull("tester/generator-cached", revision="v1")
    downloads = [path for _, path in hub.state.requests if "/resolve/" in path]
    assert downloads, "the first pull downloads the files"

    before = len(hub.state.requests)
    again = pull("tester/generator-cached", revision="v1")
    by_commit = pull("tester/generator-cached", revision=pushed.commit)
    later = hub.state.requests[before:]
    assert [path for _, path in later if "/resolve/" in path] == []
    assert len(later) == 2  # one revision lookup per pull
    assert again.path == by_commit.path == first.path
    assert again.commit == pushed.commit
    assert again.files == first.files

    # A build from the cached commit downloads nothing either.
    before = len(hub.state.requests)
    build("tester/generator-cached", tmp_path / "a", revision="v1", num_samples=20)
    assert [path for _, path in hub.state.requests[before:] if "/resolve/" in path] == []


def test_pull_repairs_incomplete_cached_commit(hub, run_dir):
    from synthgen.hub import pull, push

    push(run_dir, "tester/generator-damaged")
    first = pull("tester/generator-damaged")
    (first.path / "student" / "config.json").unlink()
    before = len(hub.state.requests)
    repaired = pull("tester/generator-damaged")
    assert any("/resolve/" in path for _, path in hub.state.requests[before:])
    assert (repaired.path / "student" / "config.json").is_file()
    assert repaired.commit == first.commit


def test_missing_revision_is_rejected(hub, run_dir, tmp_path, caplog):
    from synthgen.hub import push

    push(run_dir, "tester/generator-2")
    out = tmp_path / "out"
    code = main(["build-dataset", "tester/generator-2", "--revision", "no-such-branch", "--num-samples", "10",
                 "--out", str(out), "--no-catalog"])
    assert code == 2
    assert "no-such-branch" in caplog.text
    assert not out.exists()


def test_catalog_add_release_records_commit(hub, run_dir, tmp_path):
    from synthgen.catalog import Catalog
    from synthgen.hub import push

    pushed = push(run_dir, "tester/generator-3", revision="v2")
    catalog = tmp_path / "catalog.duckdb"
    assert main(["catalog", "--db", str(catalog), "add-release", "tester/generator-3", "--revision", "v2"]) == 0
    report = json.loads((run_dir / "privacy_report.json").read_text())
    with Catalog(catalog) as opened:
        releases = opened.sql("SELECT repo_id, commit, revision, epsilon FROM releases")
    assert releases.to_dict("records") == [{"repo_id": "tester/generator-3", "commit": pushed.commit,
                                            "revision": "v2", "epsilon": report["epsilon"]}]


def test_push_of_local_generator_is_rejected(hub, run_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(BuildError, match="published on the Hub"):
        build(run_dir, out, num_samples=10, push_to_hub="tester/from-local")
    assert not out.exists()
    assert ("dataset", "tester/from-local") not in hub.state.repos


# ---------------------------------------------------------------- bad input


def run_cli(args, caplog) -> tuple[int, str]:
    caplog.clear()
    code = main(["build-dataset", *args, "--no-catalog", "--device", "cpu"])
    return code, caplog.text


def test_non_empty_output_needs_overwrite(run_dir, tmp_path, caplog):
    out = tmp_path / "out"
    build(run_dir, out, num_samples=10)
    (out / "notes.txt").write_text("keep me")
    code, message = run_cli([str(run_dir), "--num-samples", "20", "--out", str(out)], caplog)
    assert code == 2
    assert "not empty" in message
    assert "--overwrite" in message
    assert json.loads((out / MANIFEST_FILE).read_text())["rows"] == 10

    code, _ = run_cli([str(run_dir), "--num-samples", "20", "--out", str(out), "--overwrite"], caplog)
    assert code == 0
    assert (out / "notes.txt").read_text() == "keep me"
    assert json.loads((out / MANIFEST_FILE).read_text())["rows"] == 20


def file_contents(folder) -> dict:
    """Return the bytes of each file under `folder`, by path relative to it."""
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def test_overwrite_rejects_foreign_folder(run_dir, tmp_path, caplog):
    import pyarrow as pa

    # A Hugging Face dataset folder: its shard names follow the same pattern as synthgen's.
    out = tmp_path / "hf-dataset"
    (out / "data").mkdir(parents=True)
    (out / "README.md").write_text("---\nlicense: mit\n---\n# my dataset\n")
    table = pa.table({"text": ["a", "b"]})
    pq.write_table(table, out / "data" / "x.parquet")
    pq.write_table(table, out / "data" / "train-00000-of-00001.parquet")
    (out / "data" / "train-notes.txt").write_text("keep me")
    before = file_contents(out)

    code, message = run_cli([str(run_dir), "--num-samples", "10", "--out", str(out), "--overwrite"], caplog)
    assert code == 2
    assert str(out) in message
    assert MANIFEST_FILE in message
    assert "Choose an empty or new folder" in message
    assert "remove the files" in message
    assert file_contents(out) == before
    assert sorted(path.name for path in out.iterdir()) == ["README.md", "data"]

    code, message = run_cli([str(run_dir), "--num-samples", "10", "--out", str(out)], caplog)
    assert code == 2
    assert "Choose an empty or new folder" in message
    assert "--overwrite" not in message  # because --overwrite would be rejected too
    assert file_contents(out) == before


def test_overwrite_keeps_user_files(run_dir, tmp_path, caplog):
    out = tmp_path / "out"
    build(run_dir, out, num_samples=20, shard_size=10)
    (out / "notes.txt").write_text("keep me")
    (out / "data" / "mine.parquet").write_bytes(b"user bytes")
    (out / "data" / "train-notes.txt").write_text("keep me too")
    old_shards = sorted(path.name for path in (out / "data").glob("train-*.parquet"))
    assert old_shards == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]

    code, _ = run_cli([str(run_dir), "--num-samples", "30", "--shard-size", "10", "--out", str(out), "--overwrite"],
                      caplog)
    assert code == 0
    assert (out / "notes.txt").read_text() == "keep me"
    assert (out / "data" / "mine.parquet").read_bytes() == b"user bytes"
    assert (out / "data" / "train-notes.txt").read_text() == "keep me too"
    assert sorted(path.name for path in (out / "data").iterdir()) == [
        "mine.parquet", "train-00000-of-00003.parquet", "train-00001-of-00003.parquet",
        "train-00002-of-00003.parquet", "train-notes.txt"]
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["rows"] == 30
    assert manifest["complete"] is True
    assert (out / "README.md").is_file()
    assert not (out / ".synthgen-build").exists()


@pytest.mark.parametrize("existing", [False, True])
def test_resume_without_build_is_rejected(run_dir, tmp_path, caplog, existing):
    out = tmp_path / "new"
    if existing:
        out.mkdir()
    code, message = run_cli([str(run_dir), "--num-samples", "10", "--out", str(out), "--resume"], caplog)
    assert code == 2
    assert str(out) in message
    assert "drop --resume" in message
    assert out.exists() == existing
    if existing:
        assert list(out.iterdir()) == []


def test_resume_without_out_is_rejected(run_dir):
    with pytest.raises(BuildError, match="--resume continues the build in the --out folder"):
        build(run_dir, None, num_samples=10, push_to_hub="tester/resumed", resume=True)


@pytest.mark.parametrize("args, expected", [
    (["--num-samples", "0"], "--num-samples must be an integer >= 1"),
    (["--num-samples", "-5"], "--num-samples must be an integer >= 1"),
    (["--per-class", "0"], "--per-class must be an integer >= 1"),
    (["--num-samples", "10", "--shard-size", "0"], "--shard-size must be an integer >= 1"),
    (["--num-samples", "10", "--shard-size", "-1"], "--shard-size must be an integer >= 1"),
    (["--num-samples", "10", "--seed", "-1"], "--seed must be an integer >= 0"),
    (["--num-samples", "10", "--precision", "float16"], "--precision must be one of float32, bfloat16, got 'float16'"),
    (["--num-samples", "10", "--augment", "rotate"], "--augment must be 'none' or names from affine, hflip, mixup"),
    (["--num-samples", "10", "--augment", "affine+affine"], "(each once)"),
    (["--num-samples", "10", "--split", "../escape"], "--split must be a plain name"),
    (["--num-samples", "10", "--split", "a/b"], "--split must be a plain name"),
    (["--num-samples", "10", "--push-to-hub", "tester/../escape"], "dataset repository NAMESPACE/NAME"),
    (["--num-samples", "10", "--push-to-hub", "tester/..escape"], "invalid dataset repository id"),
    (["--num-samples", "10", "--revision", "v1"], "--revision applies to Hub repositories only"),
])
def test_bad_sizes_and_names_are_rejected(run_dir, tmp_path, caplog, args, expected):
    out = tmp_path / "out"
    code, message = run_cli([str(run_dir), *args, "--out", str(out)], caplog)
    assert code == 2
    assert expected in message
    assert not out.exists()
    assert not list(tmp_path.rglob("*escape*"))


def test_generator_without_report_is_rejected(run_dir, tmp_path, caplog):
    generator = without_report(run_dir, tmp_path / "no-report")
    out = tmp_path / "out"
    code, message = run_cli([str(generator), "--num-samples", "10", "--out", str(out)], caplog)
    assert code == 2
    assert "privacy_report.json" in message
    assert not out.exists()


def test_non_private_generator_is_rejected(run_dir, tmp_path, caplog):
    generator = with_report_changes(run_dir, tmp_path / "not-private", private=False, unit=None)
    out = tmp_path / "out"
    code, message = run_cli([str(generator), "--num-samples", "10", "--out", str(out)], caplog)
    assert code == 2
    assert "not differentially private" in message
    assert not out.exists()


def test_missing_generator_is_rejected(tmp_path, caplog):
    out = tmp_path / "out"
    code, message = run_cli([str(tmp_path / "nowhere"), "--num-samples", "10", "--out", str(out)], caplog)
    assert code == 2
    assert "not found" in message
    assert not out.exists()


def test_offline_missing_revision_is_rejected(tmp_path, caplog):
    out = tmp_path / "out"
    code, message = run_cli(["tester/not-cached", "--revision", "v9", "--num-samples", "10", "--out", str(out)], caplog)
    assert code == 2
    assert "not in the cache" in message
    assert not out.exists()


def test_resume_with_other_settings_is_rejected(run_dir, tmp_path):
    out = tmp_path / "out"
    build(run_dir, out, num_samples=20, shard_size=10)
    with pytest.raises(BuildError, match="seed: 0 then, 3 now"):
        build(run_dir, out, num_samples=20, shard_size=10, seed=3, resume=True)
    assert json.loads((out / MANIFEST_FILE).read_text())["settings"]["seed"] == 0


def test_resume_of_older_layout_is_rejected(run_dir, tmp_path):
    out = tmp_path / "out"
    build(run_dir, out, num_samples=20, shard_size=10)
    manifest_path = out / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    # A build started by a synthgen that wrote no probabilities column.
    manifest["settings"]["format"] = "synthgen-dataset/1"
    manifest["complete"] = False
    manifest_path.write_text(json.dumps(manifest))
    before = sorted(path.name for path in (out / "data").iterdir())
    with pytest.raises(BuildError, match="started in the layout 'synthgen-dataset/1'.*--overwrite"):
        build(run_dir, out, num_samples=20, shard_size=10, resume=True)
    assert sorted(path.name for path in (out / "data").iterdir()) == before


def test_missing_size_is_rejected_by_parser(run_dir, tmp_path):
    with pytest.raises(SystemExit) as raised:
        main(["build-dataset", str(run_dir), "--out", str(tmp_path / "out")])
    assert raised.value.code == 2


def test_build_dataset_api_rejects_both_sizes(run_dir, tmp_path):
    from synthgen.build import BuildConfig

    with pytest.raises(BuildError, match="exactly one of"):
        build_dataset(BuildConfig(generator=str(run_dir), out=str(tmp_path / "x"), num_samples=5, per_class=5))
    assert not (tmp_path / "x").exists()
