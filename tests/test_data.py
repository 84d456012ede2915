"""Data loading from IDX, parquet, image folders and the Hub; the dataset fingerprint."""

import gzip
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from synthgen.data import DataError, ImageData, fingerprint_arrays, load_image_data, load_image_dataset, read_idx


def test_idx_raw_and_gzip_load_identically(mnist_small, tmp_path):
    for file in mnist_small.iterdir():
        (tmp_path / (file.name + ".gz")).write_bytes(gzip.compress(file.read_bytes()))
    raw = load_image_data(mnist_small, "train")
    zipped = load_image_data(tmp_path, "train")
    assert raw.images.shape == (600, 1, 28, 28)
    assert np.array_equal(raw.images, zipped.images)
    assert raw.fingerprint == zipped.fingerprint
    assert raw.class_names == [str(i) for i in range(10)]


def test_real_mnist_statistics(mnist_dir):
    test = load_image_data(mnist_dir, "test")
    assert len(test) == 10000
    assert test.images.mean() / 255 == pytest.approx(0.1325, abs=0.002)  # the test split's published mean
    assert np.bincount(test.labels).tolist()[:3] == [980, 1135, 1032]


def test_builtin_name_loads_local_copy(mnist_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    by_name = load_image_data("mnist", "test")
    assert by_name.fingerprint == load_image_data(mnist_dir, "test").fingerprint
    # A folder of that name in the current folder is what the user means.
    (tmp_path / "mnist").mkdir()
    with pytest.raises(DataError, match="holds no IDX files"):
        load_image_data("mnist", "test")


def test_fingerprint_ignores_order_but_not_content(mnist_small):
    data = load_image_data(mnist_small, "train")
    order = np.random.default_rng(0).permutation(len(data))
    shuffled = fingerprint_arrays(data.images[order], data.labels[order], data.class_names)
    assert shuffled == data.fingerprint
    changed = data.images.copy()
    changed[0, 0, 0, 0] ^= 1
    assert fingerprint_arrays(changed, data.labels, data.class_names) != data.fingerprint
    relabelled = data.labels.copy()
    relabelled[0] = (relabelled[0] + 1) % 10
    assert fingerprint_arrays(data.images, relabelled, data.class_names) != data.fingerprint


def test_dataset_has_image_and_classlabel(mnist_small):
    from datasets import ClassLabel, Image

    ds = load_image_dataset(mnist_small, "test")
    assert isinstance(ds.features["image"], Image)
    assert isinstance(ds.features["label"], ClassLabel)
    assert ds.features["label"].names == [str(i) for i in range(10)]
    assert len(ds) == 300
    assert ds[0]["image"].size == (28, 28)


def test_parquet_round_trip(mnist_small, tmp_path):
    data = load_image_data(mnist_small, "train")
    (tmp_path / "data").mkdir()
    data.to_dataset().to_parquet(str(tmp_path / "data" / "train-00000.parquet"))
    again = load_image_data(tmp_path, "train")
    assert np.array_equal(again.images, data.images)
    assert np.array_equal(again.labels, data.labels)
    assert again.fingerprint == data.fingerprint


def test_image_folder_loads_classes_from_folders(mnist_small, tmp_path):
    from PIL import Image

    data = load_image_data(mnist_small, "train").subset(40, seed=0)
    for index, (image, label) in enumerate(zip(data.images, data.labels)):
        folder = tmp_path / "train" / f"digit-{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0]).save(folder / f"{index}.png")
    loaded = load_image_data(tmp_path, "train")
    assert len(loaded) == 40
    assert loaded.class_names == sorted(f"digit-{l}" for l in set(data.labels.tolist()))
    assert loaded.shape == (1, 28, 28)


def test_missing_path_names_the_path(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_image_data(tmp_path / "nowhere", "train")
    with pytest.raises(DataError, match="no IDX files"):
        (tmp_path / "empty").mkdir()
        load_image_data(tmp_path / "empty", "train")


def test_hub_id_offline_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="ylecun/mnist"):
        load_image_data("ylecun/mnist", "train")


def test_truncated_idx_rejected(mnist_small, tmp_path):
    content = (mnist_small / "train-images-idx3-ubyte").read_bytes()
    (tmp_path / "train-images-idx3-ubyte").write_bytes(content[:-10])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "train-images-idx3-ubyte")


def test_labels_beyond_class_names_rejected():
    with pytest.raises(DataError, match="class names"):
        ImageData(np.zeros((2, 1, 4, 4), np.uint8), np.array([0, 5]), ["a", "b"])


# ---------------------------------------------------------------- fetching built-in datasets


def test_fetch_waits_for_other_process(tmp_path, monkeypatch):
    from synthgen.data import _fetch, locate_dataset

    # Another process holds the lock and writes the files. With PATH empty, a fetch of our own
    # would fail, so the call succeeds only by waiting for the lock and finding the files.
    mnist = locate_dataset("mnist", fetch=False)
    target = tmp_path / "cache" / "fashion-mnist"
    target.parent.mkdir()
    holder = textwrap.dedent(f"""
        import shutil, sys, time
        from pathlib import Path
        from filelock import FileLock
        with FileLock({str(target.parent / '.fashion-mnist.lock')!r}):
            print("locked", flush=True)
            time.sleep(1.0)
            target = Path({str(target)!r})
            target.mkdir()
            for file in Path({str(mnist)!r}).iterdir():
                if "idx" in file.name:
                    shutil.copy(file, target / file.name)
        """)
    process = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "locked"
        monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))
        assert _fetch("fashion-mnist", target) == target
    finally:
        process.wait(timeout=60)
    assert process.returncode == 0
    assert sorted(file.name for file in target.iterdir()) == sorted(
        file.name for file in mnist.iterdir() if "idx" in file.name)


def test_fetch_failure_names_package_and_fix(tmp_path, monkeypatch):
    from synthgen.data import _fetch

    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))
    target = tmp_path / "cache" / "fashion-mnist"
    with pytest.raises(DataError, match=r"apt-get install dataset-fashion-mnist.*\$SYNTHGEN_DATASETS/fashion-mnist"):
        _fetch("fashion-mnist", target)
    assert not target.exists()
    assert [path.name for path in target.parent.iterdir()] == [".fashion-mnist.lock"]  # no half-fetched folder


def test_plain_file_is_not_read_as_parquet(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not images")
    with pytest.raises(DataError, match="is a file but not a .parquet file"):
        load_image_data(notes)
