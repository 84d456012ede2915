"""Helpers shared by the dataset builder, catalog and evaluation tests."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "build_dataset.py"


def build(generator, out, catalog=None, **settings):
    """Build a dataset in this process; the catalog is left alone unless `catalog` names a file."""
    from synthgen.build import BuildConfig, build_dataset

    config = BuildConfig(generator=str(generator), out=str(out) if out else None, catalog=catalog,
                         record=catalog is not None, device="cpu", **settings)
    return build_dataset(config)


def read_rows(folder: Path) -> pa.Table:
    """Return every row of a built dataset, in sample-index order."""
    files = sorted((Path(folder) / "data").glob("*.parquet"))
    table = pa.concat_tables([pq.read_table(path) for path in files])
    return table.sort_by("sample_index")


def decode_images(table: pa.Table) -> np.ndarray:
    """Decode the PNG column into uint8 (N, C, H, W)."""
    import io

    from PIL import Image

    images = []
    for cell in table.column("image").to_pylist():
        picture = Image.open(io.BytesIO(cell["bytes"]))
        array = np.asarray(picture)
        images.append(array[None] if array.ndim == 2 else np.transpose(array, (2, 0, 1)))
    return np.stack(images)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spread_label_release(run_dir: Path, folder: Path) -> Path:
    """Make a pipeline folder whose student labels generated images with every class.

    The tiny test runs give every sample the same label, which cannot exercise --per-class.
    This folder keeps the run's privacy report and generator architecture. The generator's
    BatchNorm variances are shrunk so that its images vary. The student's last layer is set to
    centred, standardised random projections of its hidden features, so that its argmax spreads
    over the classes. Both are real synthgen models saved in diffusers format.
    """
    import torch

    from synthgen.models import Classifier, Generator
    from synthgen.pipeline import DPSDPipeline

    if (folder / "model_index.json").is_file():
        return folder
    torch.manual_seed(0)
    generator = Generator.from_pretrained(run_dir / "generator").eval()
    for module in generator.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_var.fill_(1e-2)
    config = {key: value for key, value in Classifier.from_pretrained(run_dir / "student").config.items()
              if not key.startswith("_")}
    student = Classifier(**config).eval()
    with torch.no_grad():
        images = generator(torch.randn(2048, generator.config.latent_dim)).clamp(0, 1)
        hidden = student.embed(images)  # (N, hidden)
        centred = hidden - hidden.mean(0)
        weight = torch.randn(config["num_classes"], hidden.shape[1])
        scale = (centred @ weight.T).std(0)  # (classes,)
        weight = weight / scale[:, None]
        student.fc2.weight.copy_(weight)
        student.fc2.bias.copy_(-(weight @ hidden.mean(0)))
    folder.mkdir(parents=True, exist_ok=True)
    DPSDPipeline(generator=generator, student=student).save_pretrained(folder)
    shutil.copyfile(run_dir / "privacy_report.json", folder / "privacy_report.json")
    return folder


def without_report(run_dir: Path, folder: Path) -> Path:
    """Copy a run folder without its privacy report."""
    shutil.copytree(run_dir, folder, ignore=shutil.ignore_patterns("privacy_report.json", "private"))
    return folder


def with_report_changes(run_dir: Path, folder: Path, **changes) -> Path:
    """Copy a run folder with some keys of its privacy report changed."""
    shutil.copytree(run_dir, folder, ignore=shutil.ignore_patterns("private"))
    report = json.loads((folder / "privacy_report.json").read_text())
    report.update(changes)
    (folder / "privacy_report.json").write_text(json.dumps(report))
    return folder


def point_client_at(monkeypatch, endpoint: str, token: str, cache: Path, agent_file: Path) -> None:
    """Point huggingface_hub, diffusers and datasets at a local Hub, as a fresh process with these variables.

    The libraries read HF_ENDPOINT and HF_HUB_OFFLINE once, at import, so their copies are set too.
    """
    import datasets.config
    import diffusers.utils.hub_utils
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(agent_file))  # not the home folder
    monkeypatch.setattr(diffusers.utils.hub_utils, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", endpoint)
    monkeypatch.setattr(datasets.config, "HUB_DATASETS_URL", endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
