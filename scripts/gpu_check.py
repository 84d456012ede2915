"""Check a CUDA machine with a CIFAR-size transcription: finite, improving, and how fast.

The teacher is a CIFAR-style ResNet-18 (3x3 stem, no max-pool, 11 M parameters) initialised at
random and saved as safetensors with its metadata, so nothing is downloaded. Each run goes
through `synthgen.transcribe` like `synthgen transcribe --teacher T.safetensors
--teacher-factory gpu_check:resnet18_cifar --teacher-meta META.json`, with the default
generator and small CNN student at 3x32x32. Two runs:

1. `none` (no noise), --steps iterations, teacher temperature 0.25: a random teacher's softmax
   is close to uniform, and the sharper temperature gives the student a function to learn, so
   the student loss must fall.
2. `gaussian` at teacher-level epsilon 10, delta 1e-5, --steps / 4 iterations (at least 2): the
   DP path with the ledger. Its labels are mostly noise (the noise std is far above the signal
   for a random teacher), so only finiteness and accounting are checked there.

Checks (exit status 1 when one fails):
- every logged student and generator loss is finite;
- run 1 only, with 20 steps or more: the mean student loss of the last quarter of the steps is
  below the mean of the first quarter;
- queries equal steps x batch size and the teacher forward passes.

Prints, per run, steps per second, queries per second and peak GPU memory, as JSON. Everything
is written to a temporary folder, deleted afterwards unless --work is given.

Usage:
    python scripts/gpu_check.py                          # CUDA, 200 + 50 steps of 256 images
    python scripts/gpu_check.py --device cpu --steps 3   # a smoke run on CPU (batch 16)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# Per-channel CIFAR-10 training-set mean and std (public constants, used by most CIFAR code).
CIFAR10_MEAN = [0.4914, 0.4822, 0.4465]
CIFAR10_STD = [0.2470, 0.2435, 0.2616]
# A stand-in for the size of the private training set: CIFAR-10 has 50,000 training images.
NUM_EXAMPLES = 50_000


class BasicBlock(nn.Module):
    def __init__(self, inputs: int, outputs: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.shortcut = nn.Sequential()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18Cifar(nn.Module):
    """ResNet-18 for 32x32 inputs (He et al. 2016, with the CIFAR stem: one 3x3 convolution)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        layers, inputs = [], 64
        for outputs, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(inputs, outputs, stride), BasicBlock(outputs, outputs, 1)]
            inputs = outputs
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.layers(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(features, 1).flatten(1))


def resnet18_cifar() -> nn.Module:
    """Build the teacher architecture; the `--teacher-factory` entry point."""
    return ResNet18Cifar(len(CIFAR10_CLASSES))


def write_random_teacher(folder: Path, seed: int) -> tuple[Path, Path]:
    """Save a randomly initialised teacher and its metadata; return both paths."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    teacher = resnet18_cifar()
    weights = folder / "resnet18-random.safetensors"
    save_file({name: tensor.contiguous() for name, tensor in teacher.state_dict().items()}, str(weights))
    meta = folder / "resnet18-random.json"
    meta.write_text(json.dumps({
        "input_shape": [3, 32, 32], "class_names": CIFAR10_CLASSES, "mean": CIFAR10_MEAN, "std": CIFAR10_STD,
        # No private data exists: the fingerprint only keys this check's throw-away ledger.
        "dataset_fingerprint": f"gpu-check-random-resnet18-seed{seed}", "num_examples": NUM_EXAMPLES,
    }))
    return weights, meta


def read_losses(metrics: Path) -> tuple[list[float], list[float]]:
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [r["student_loss"] for r in records], [r["generator_loss"] for r in records]


MIN_STEPS_FOR_IMPROVEMENT = 20


def check(report: dict, steps: int, batch_size: int, student_losses: list[float], generator_losses: list[float],
          expect_improvement: bool) -> list[str]:
    """Return the failed checks, as messages."""
    failures = []
    if len(student_losses) != steps:
        failures.append(f"expected {steps} logged steps, found {len(student_losses)}")
    bad = [value for value in student_losses + generator_losses if not math.isfinite(value)]
    if bad:
        failures.append(f"{len(bad)} losses are not finite: {bad[:5]}")
    if expect_improvement and len(student_losses) >= MIN_STEPS_FOR_IMPROVEMENT:
        quarter = len(student_losses) // 4
        first = sum(student_losses[:quarter]) / quarter
        last = sum(student_losses[-quarter:]) / quarter
        if not last < first:
            failures.append(f"the student loss did not improve: mean {first:.4f} over the first {quarter} steps, "
                            f"{last:.4f} over the last {quarter}")
    if report["queries"] != steps * batch_size:
        failures.append(f"queries {report['queries']} != steps x batch size {steps * batch_size}")
    if report["teacher_forward_examples"] != report["queries"]:
        failures.append(f"teacher forward passes {report['teacher_forward_examples']} != queries {report['queries']}")
    return failures


def run_case(args, work: Path, weights: Path, meta: Path, mechanism: str, steps: int) -> dict:
    """Run one transcription and return its figures and failed checks."""
    from synthgen.config import TranscribeConfig
    from synthgen.transcribe import transcribe

    private = mechanism != "none"
    config = TranscribeConfig(
        teacher=str(weights), teacher_factory="gpu_check:resnet18_cifar", teacher_meta=str(meta),
        out=str(work / f"run-{mechanism}"), ledger=str(work / "ledger.duckdb"), mechanism=mechanism,
        epsilon=10.0, delta=1e-5, steps=steps, batch_size=args.batch_size, replay_batch=args.batch_size,
        temperature=1.0 if private else 0.25, eval_every=1, checkpoint_every=steps, seed=args.seed,
        device=args.device,
    )
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    report = transcribe(config).report
    student_losses, generator_losses = read_losses(work / f"run-{mechanism}" / "metrics.jsonl")
    figures = {
        "mechanism": mechanism,
        "unit": report["unit"],
        "epsilon": report.get("epsilon"),
        "delta": report.get("delta"),
        "steps": report["steps"],
        "batch_size": args.batch_size,
        "loop_seconds": report["wall_seconds"],
        "steps_per_second": round(report["steps"] / max(report["wall_seconds"], 1e-9), 3),
        "queries_per_second": round(report["queries"] / max(report["wall_seconds"], 1e-9), 1),
        "peak_memory_mib": (round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
                            if device.type == "cuda" else None),
        "student_loss_first": student_losses[0],
        "student_loss_last": student_losses[-1],
    }
    failures = check(report, steps, args.batch_size, student_losses, generator_losses,
                     expect_improvement=not private)
    figures["checks"] = failures or "passed"
    if not private and steps < MIN_STEPS_FOR_IMPROVEMENT:
        figures["improvement"] = f"not checked: fewer than {MIN_STEPS_FOR_IMPROVEMENT} steps"
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="'cuda', 'cuda:N' or 'cpu' (default cuda)")
    parser.add_argument("--steps", type=int, default=200, help="transcription iterations (default 200)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="synthetic images per iteration (default 256 on CUDA, 16 on CPU)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random teacher and of the run (default 0)")
    parser.add_argument("--work", help="folder for the teacher, ledger and run (default: a temporary folder, deleted)")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error(f"--steps must be >= 2 to compare early and late losses, got {args.steps}")
    if args.batch_size is None:
        args.batch_size = 16 if args.device == "cpu" else 256
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu_check: device {args.device!r} requested but CUDA is not available; pass --device cpu for a "
              "smoke run", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TQDM_DISABLE", "1")

    # The engine imports the teacher factory by name: make this module importable as gpu_check.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if __name__ in sys.modules:
        sys.modules.setdefault("gpu_check", sys.modules[__name__])
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        work = Path(args.work) if args.work else Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        weights, meta = write_random_teacher(work, args.seed)
        runs = [run_case(args, work, weights, meta, "none", args.steps),
                run_case(args, work, weights, meta, "gaussian", max(2, args.steps // 4))]
    device = torch.device(args.device)
    summary = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "teacher": "ResNet-18 (CIFAR stem), random initialisation",
        "runs": runs,
    }
    print(json.dumps(summary, indent=2))
    failures = [failure for run in runs if run["checks"] != "passed" for failure in run["checks"]]
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
