"""Try changes to the linear ScatterNet DP-SGD recipe on public data: Fashion-MNIST for MNIST.

Each variant trains the linear layer of a scattering teacher (wavelet scattering with J=2 and
L=8, parameter-free GroupNorm in groups of 3 channels, then one linear layer) with DP-SGD on
the first 50,000 rows of Fashion-MNIST's training split, and scores the EMA weights on the last
10,000 rows. Fashion-MNIST is public with respect to MNIST, so picking MNIST's recipe by these
numbers spends no MNIST budget. Every variant changes one thing in the base recipe of its
epsilon (below), and its noise multiplier is calibrated with synthgen's PLD accountant under
replace-one, so every row of one epsilon spends the same (epsilon, delta).

The trainer is written out here rather than run through `synthgen train-teacher --dp`, because
several variants are not settings of the product. For one linear layer the per-example gradient
of the cross-entropy is (p - y) x^T, so the clipped sum needs no per-sample hooks. Everything
else follows the product. Batches are Poisson samples at rate 1 / ceil(n / batch), and each
example's gradient is clipped to norm 0.1. The sum gets Gaussian noise of standard deviation
sigma * 0.1 and is divided by the expected batch size. The optimizer is SGD with momentum 0.9,
and the scored weights are an EMA with the warm-up min(0.99, (1 + t) / (10 + t)) at step t.

Variants:
- base: batch 4096, learning rate 4, 20 epochs at epsilon 1; batch 4096, learning rate 16,
  40 epochs at epsilon 10 (the recipes of the MNIST scattering teachers).
- augmult-K: the gradient of each example is the mean over K views, drawn without repetition
  from the image and 8 copies shifted by up to 2 pixels with reflected borders (augmentation
  multiplicity, De et al. 2022). The copies' features are computed once.
- data-norm-M: the features are also standardised per scattering channel with private means and
  variances: each example's 162 channel statistics are clipped to norm 20, summed, and released
  with Gaussian noise of multiplier M. That release is composed with the DP-SGD steps.
- avgpool-2: 2x2 average pooling of the 7x7 feature maps (stride 1), fewer inputs to the layer.
- cosine: the learning rate decays along a half cosine to 0.
- ema-flat: EMA decay 0.99 from the first step, without the warm-up.
- adam: Adam (learning rate 0.01) in place of SGD with momentum.
- shift-tta: the base model, scored by the mean of its probabilities over the image and its 8
  shifted copies (free post-processing).

Usage: python scripts/benchmark_scatter_proxy.py [--variants base,cosine] [--epsilons 1,10] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import ROOT, record, write_records  # noqa: E402

sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")
logger = logging.getLogger("benchmark")

DELTA = 1e-5
TRAIN_ROWS = 50_000  # rows 50,000 to 59,999 of the training split are scored
CLIP = 0.1
MOMENTUM = 0.9
EMA_DECAY = 0.99
SHIFTED_COPIES = 8
STATS_CLIP = 20.0  # bound on the norm of one example's 162 channel statistics
BASE = {1.0: dict(batch=4096, lr=4.0, epochs=20), 10.0: dict(batch=4096, lr=16.0, epochs=40)}
VARIANTS = {
    "base": {},
    "augmult-2": {"views": 2},
    "augmult-4": {"views": 4},
    "data-norm-20": {"data_norm": 20.0},
    "data-norm-100": {"data_norm": 100.0},
    "avgpool-2": {"avgpool": True},
    "cosine": {"cosine": True},
    "ema-flat": {"ema_flat": True},
    "adam": {"adam": True},
    "shift-tta": {"tta": True},
}
CHANNELS, SIDE = 81, 7  # scattering channels per grey image, and the side of their maps for 28x28 images


def features(dataset: str, copy: int, cache: Path):
    """Return the GroupNorm'd scattering features (N, 3969) float16 of the training split and its labels.

    Copy 0 is the images as they are; copy c >= 1 shifts each image by up to 2 pixels, with
    shifts drawn from a generator seeded with 1000 + c.
    """
    import torch
    import torch.nn.functional as F

    from synthgen.data import load_idx, locate_dataset
    from synthgen.dp_training import augmented_copies, scatter_features
    from synthgen.models import SCATTER_GROUP_SIZE, Classifier

    path = cache / f"{dataset}-train-{copy}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)  # the cache contains two tensors
    data = load_idx(locate_dataset(dataset), "train")
    images = torch.from_numpy(data.images)
    if copy:
        images = augmented_copies(images, 1, torch.Generator().manual_seed(1000 + copy))
    model = Classifier(frontend="scatter", hidden=0, norm="group")
    scattered = scatter_features(model, images.numpy())
    normed = F.group_norm(scattered, CHANNELS // SCATTER_GROUP_SIZE).flatten(1).half()
    result = (normed, torch.from_numpy(data.labels).long())
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(result, tmp)
    os.replace(tmp, path)
    return result


def calibrate(epsilon: float, sample_rate: float, steps: int, stats_multiplier: float | None) -> float:
    """Return the DP-SGD noise multiplier that, composed with the statistics release if any, gives epsilon."""
    from synthgen.privacy.accounting import (
        GAUSSIAN, POISSON_GAUSSIAN, PrivacyEvent, _bisect, calibrate_dp_sgd, pld_epsilon,
    )

    if stats_multiplier is None:
        return calibrate_dp_sgd(epsilon, DELTA, sample_rate, steps)
    # The statistics' replace-one sensitivity is 2 * STATS_CLIP, and a GAUSSIAN event's parameter
    # is the noise's standard deviation over that sensitivity.
    release = PrivacyEvent(GAUSSIAN, stats_multiplier / 2, 1)

    def epsilon_of(sigma: float) -> float:
        return pld_epsilon([release, PrivacyEvent(POISSON_GAUSSIAN, sigma, steps, sample_rate)], DELTA)

    return _bisect(epsilon_of, 1.0, 100.0, epsilon, increasing=False)


def channel_standardizer(train, multiplier: float, generator):
    """Return a function that standardises features per channel with noisy channel statistics of `train`."""
    import torch

    total = torch.zeros(2 * CHANNELS)
    for start in range(0, len(train), 5000):
        maps = train[start:start + 5000].float().view(-1, CHANNELS, SIDE * SIDE)
        stats = torch.cat([maps.mean(-1), (maps * maps).mean(-1)], 1)  # (rows, 162)
        stats *= (STATS_CLIP / stats.norm(dim=1, keepdim=True)).clamp(max=1)
        total += stats.sum(0)
    total += multiplier * STATS_CLIP * torch.randn(2 * CHANNELS, generator=generator)
    mean, square = total[:CHANNELS] / len(train), total[CHANNELS:] / len(train)
    scale = (square - mean**2).clamp_min(1e-3).sqrt()  # a floor, because the noisy variance can be negative

    def standardize(rows):
        maps = rows.float().view(-1, CHANNELS, SIDE * SIDE)
        return ((maps - mean[:, None]) / scale[:, None]).flatten(1).half()

    return standardize


def avgpool(rows):
    import torch.nn.functional as F

    maps = rows.float().view(-1, CHANNELS, SIDE, SIDE)
    return F.avg_pool2d(maps, 2, stride=1).flatten(1).half()


def in_chunks(function, rows, size: int = 10_000):
    import torch

    return torch.cat([function(rows[start:start + size]) for start in range(0, len(rows), size)])


def clipped_sums(weight, bias, inputs, labels):
    """Return the sums over examples of the clipped cross-entropy gradients of a linear layer, for weight and bias.

    `inputs` is (B, K, d): K views of each example. An example's gradient is the mean over its
    views of r_k [x_k, 1]^T, with r_k = softmax(W x_k + b) - y, and is scaled to norm at most CLIP.
    """
    import torch
    import torch.nn.functional as F

    per_example = inputs.shape[1]
    targets = F.one_hot(labels, weight.shape[0]).to(inputs.dtype)[:, None]
    residual = (inputs @ weight.T + bias).softmax(-1) - targets  # (B, K, classes)
    # Its squared Frobenius norm is sum_kl (r_k . r_l)(x_k . x_l + 1) / K^2.
    gram = (residual @ residual.transpose(1, 2)) * (inputs @ inputs.transpose(1, 2) + 1)
    norms = gram.sum((1, 2)).clamp_min(0).sqrt() / per_example
    factors = (CLIP / (norms + 1e-12)).clamp(max=1.0) / per_example
    clipped = residual * factors[:, None, None]
    return torch.einsum("bkc,bkd->cd", clipped, inputs), clipped.sum((0, 1))


def train_and_score(views, labels, epsilon: float, seed: int, variant: dict) -> tuple[float, float, int]:
    """Train with DP-SGD on rows [0, TRAIN_ROWS) and return (validation accuracy, sigma, steps).

    `views` is (copies, N, d) float16: copy 0 contains the images as they are.
    """
    import torch

    settings = BASE[epsilon]
    generator = torch.Generator().manual_seed(seed)
    count = TRAIN_ROWS
    steps_per_epoch = -(-count // settings["batch"])
    sample_rate = 1 / steps_per_epoch
    steps = settings["epochs"] * steps_per_epoch
    sigma = calibrate(epsilon, sample_rate, steps, variant.get("data_norm"))
    if variant.get("data_norm"):
        standardize = channel_standardizer(views[0, :count], variant["data_norm"], generator)
        views = torch.stack([in_chunks(standardize, copy) for copy in views])
    if variant.get("avgpool"):
        views = torch.stack([in_chunks(avgpool, copy) for copy in views])
    train, train_labels = views[:, :count], labels[:count]
    dimension = views.shape[2]
    classes = int(labels.max()) + 1
    weight, bias = torch.zeros(classes, dimension), torch.zeros(classes)
    state = [torch.zeros_like(weight), torch.zeros_like(bias)]
    second = [torch.zeros_like(weight), torch.zeros_like(bias)]
    averaged = [weight.clone(), bias.clone()]
    per_example = variant.get("views", 1)
    for step in range(steps):
        chosen = torch.nonzero(torch.rand(count, generator=generator) < sample_rate).squeeze(1)
        if per_example > 1:
            # K distinct views per example: the first K of a random order of the copies.
            order = torch.rand(len(chosen), len(views), generator=generator).argsort(dim=1)[:, :per_example]
            inputs = train[order, chosen[:, None]].float()  # (B, K, d)
        else:
            inputs = train[0, chosen].float()[:, None]  # (B, 1, d)
        sums = clipped_sums(weight, bias, inputs, train_labels[chosen])
        noise_std = sigma * CLIP
        grads = [(total + noise_std * torch.randn(total.shape, generator=generator)) / settings["batch"]
                 for total in sums]
        lr = settings["lr"]
        if variant.get("cosine"):
            lr *= 0.5 * (1 + math.cos(math.pi * step / steps))
        for index, (parameter, grad) in enumerate(zip((weight, bias), grads)):
            if variant.get("adam"):
                state[index].mul_(0.9).add_(grad, alpha=0.1)
                second[index].mul_(0.999).addcmul_(grad, grad, value=0.001)
                update = (state[index] / (1 - 0.9 ** (step + 1))) / (
                    (second[index] / (1 - 0.999 ** (step + 1))).sqrt() + 1e-8)
                parameter -= 0.01 * update
            else:
                state[index].mul_(MOMENTUM).add_(grad)
                parameter -= lr * state[index]
        decay = EMA_DECAY if variant.get("ema_flat") else min(EMA_DECAY, (2 + step) / (11 + step))
        for average, parameter in zip(averaged, (weight, bias)):
            average.mul_(decay).add_(parameter, alpha=1 - decay)
    held_out = views[:, count:].float()
    copies = held_out if variant.get("tta") else held_out[:1]
    probabilities = sum((copy @ averaged[0].T + averaged[1]).softmax(1) for copy in copies)
    accuracy = (probabilities.argmax(1) == labels[count:]).float().mean().item() * 100
    return accuracy, sigma, steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--epsilons", default="1,10", help="comma-separated, from 1 and 10")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--cache", default="runs/benchmark-scatter-proxy/features",
                        help="folder for the scattering features of the training split and its shifted copies")
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    epsilons = [float(value) for value in args.epsilons.split(",")]
    if any(value not in BASE for value in epsilons):
        parser.error(f"--epsilons {args.epsilons}: each must be 1 or 10, the epsilons with a base recipe")
    seeds = [int(value) for value in args.seeds.split(",")]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    cache = Path(args.cache)
    needs_copies = any(VARIANTS[name].get("views") or VARIANTS[name].get("tta") for name in names)
    first, labels = features("fashion-mnist", 0, cache)
    copies = [features("fashion-mnist", copy, cache)[0] for copy in range(1, SHIFTED_COPIES + 1)] if needs_copies else []
    all_views = torch.stack([first, *copies])
    del first, copies
    records = []
    try:
        for epsilon in epsilons:
            for name in names:
                variant = VARIANTS[name]
                views = all_views if variant.get("views") or variant.get("tta") else all_views[:1]
                started = time.time()
                scores = [train_and_score(views, labels, epsilon, seed, variant) for seed in seeds]
                accuracies = [score[0] for score in scores]
                _, sigma, steps = scores[0]
                records.append(record(
                    "scatter_proxy", "validation_accuracy", round(float(np.mean(accuracies)), 2),
                    dataset="fashion-mnist", unit="example", mechanism="dp-sgd", method="dp-sgd-scatternet-linear",
                    epsilon=epsilon, delta=DELTA, seeds=len(seeds), seed_values=seeds, variant=name,
                    spread=round(float(np.std(accuracies)), 2) if len(seeds) > 1 else None,
                    noise_multiplier=round(sigma, 4), steps=steps, **BASE[epsilon],
                    note="replace-one, PLD accountant; trained on rows 0-49,999 of Fashion-MNIST's training split and "
                         "scored on rows 50,000-59,999 (public data with respect to MNIST); mean and standard "
                         "deviation over seeds"))
                logger.info("epsilon %g, %s: %.2f +- %.2f%% over seeds %s (sigma %.4g, %d steps, %.0f s)", epsilon,
                            name, np.mean(accuracies), np.std(accuracies), seeds, sigma, steps, time.time() - started)
    finally:
        if records:
            path = write_records("scatter_proxy", records, replace_keys=("metric", "variant", "epsilon", "dataset"))
            logger.info("wrote %d records to %s", len(records), path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
