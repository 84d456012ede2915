"""Shared fixtures: real MNIST (a few hundred images), a tiny teacher trained on it, and an
isolated ledger, Hugging Face cache and offline Hub for every test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SMALL_TRAIN = 600
SMALL_TEST = 300


@pytest.fixture(autouse=True)
def _isolated_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SYNTHGEN_LEDGER", str(tmp_path / "ledger.duckdb"))
    monkeypatch.setenv("SYNTHGEN_CATALOG", str(tmp_path / "catalog.duckdb"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    from synthgen.data import locate_dataset

    return locate_dataset("mnist")


@pytest.fixture(scope="session")
def mnist_small(mnist_dir, tmp_path_factory):
    """A folder of real MNIST IDX files cut to SMALL_TRAIN / SMALL_TEST images."""
    from synthgen.data import load_idx

    folder = tmp_path_factory.mktemp("mnist-small")
    for split, count, prefix in (("train", SMALL_TRAIN, "train"), ("test", SMALL_TEST, "t10k")):
        data = load_idx(mnist_dir, split).subset(count, seed=1)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", data.images[:, 0])
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", data.labels.astype("uint8"))
    return folder


def write_idx(path: Path, array) -> None:
    import numpy as np

    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.tobytes())


@pytest.fixture(scope="session")
def small_teacher(mnist_small, tmp_path_factory) -> Path:
    """A teacher trained for two epochs on SMALL_TRAIN real MNIST images."""
    from synthgen.config import TeacherTrainConfig
    from synthgen.data import load_image_data
    from synthgen.teacher import train_teacher

    out = tmp_path_factory.mktemp("teacher") / "teacher"
    config = TeacherTrainConfig(data=str(mnist_small), out=str(out), epochs=2, batch_size=32, width=8, hidden=32)
    os.environ.setdefault("TQDM_DISABLE", "1")
    train_teacher(config, load_image_data(mnist_small, "train"), load_image_data(mnist_small, "test"))
    return out


def small_config(teacher: Path, out: Path, data: Path, **overrides):
    """A transcription config small enough for a unit test (a few seconds on 2 CPU cores)."""
    from synthgen.config import TranscribeConfig

    values = dict(
        teacher=str(teacher), out=str(out), eval_data=str(data), mechanism="gaussian", epsilon=10.0, delta=1e-5,
        steps=6, batch_size=16, replay_size=64, replay_batch=16, latent_dim=16, generator_width=8, student_width=8,
        student_hidden=32, checkpoint_every=2, eval_every=3, top_k=3, seed=0, noise_seed=1234, device="cpu",
    )
    values.update(overrides)
    return TranscribeConfig(**values)


@pytest.fixture(scope="module")
def run_dir(small_teacher, mnist_small, tmp_path_factory):
    """A finished gaussian (teacher-level) run, made once per test module; modules may override it."""
    from .release_runs import release_run

    return release_run("gaussian", small_teacher, mnist_small, tmp_path_factory)
