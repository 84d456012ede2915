"""Empirical privacy audit of a finished run: membership inference and nearest-neighbour distances.

The audit measures how much a released student reveals about the teacher's training set. The
teacher itself is the contrast that shows what the attacks can find.

1. Loss threshold: a lower loss on an example suggests that the model was trained on it.
2. LiRA (Carlini et al. 2022, online variant with one variance pooled over all examples):
   shadow classifiers train on random halves of an audit pool of members and held-out
   examples. A target model's logit-scaled confidence on an example is then compared with
   Gaussians fitted to the shadows that did and did not train on it.
3. Distance to synthetic samples: a training example that lies closer to the generator's
   samples than held-out examples do suggests that the generator memorised it.
4. Nearest-neighbour distances from synthetic samples to private training images and to
   held-out images.

Every attack reports AUC and TPR at fixed FPRs with bootstrap confidence intervals. Next to
them stands the largest TPR that (epsilon, delta)-DP allows at that FPR, which is
TPR <= e^epsilon * FPR + delta and TPR <= 1 - e^-epsilon * (1 - delta - FPR) (Kairouz, Oh and
Viswanath 2015).

The audit evaluates on private data. Its numbers are not covered by the DP guarantee.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from ._io import atomic_write_json

logger = logging.getLogger(__name__)

AUDIT_FILE = "audit.json"
AUDIT_FORMAT = "synthgen-audit/1"
READABLE_REPORT_FORMATS = ("synthgen-privacy-report/1",)
FALSE_POSITIVE_RATES = (0.001, 0.01)


class AuditError(ValueError):
    """Raised for a run folder, data or settings the audit cannot use."""


@dataclass
class AuditConfig:
    run_dir: str
    private_data: str
    heldout_data: str | None = None  # default: the test split of private_data
    heldout_split: str = "test"
    teacher: str | None = None  # default: the teacher recorded in the run's private settings
    teacher_factory: str | None = None
    trust_pickle: bool = False
    audit_size: int = 1000  # members, and as many held-out examples
    shadow_models: int = 8
    shadow_epochs: int = 10
    shadow_width: int | None = None  # default: the teacher's width when it is a synthgen classifier, else 16
    shadow_hidden: int | None = None
    synthetic_samples: int = 1000
    bootstrap: int = 500
    seed: int = 0
    threads: int | None = None

    def validate(self) -> None:
        for name in ("audit_size", "shadow_models", "shadow_epochs", "synthetic_samples", "bootstrap"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise AuditError(f"{name} must be an integer >= 1, got {value!r}")
        if self.shadow_models < 2:
            raise AuditError(f"shadow_models must be >= 2 so that every example has shadows with and without it, "
                             f"got {self.shadow_models}")
        if self.audit_size < 10:
            raise AuditError(f"audit_size must be >= 10, got {self.audit_size}")


# ---------------------------------------------------------------- metrics


def roc_auc(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> float:
    """Return the AUC: the probability that a member scores above a non-member (ties count half)."""
    scores = np.concatenate([member_scores, nonmember_scores])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    # Average ranks over ties (Mann-Whitney U).
    sorted_scores = scores[order]
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    for group in np.split(np.arange(len(scores)), boundaries):
        if len(group) > 1:
            ranks[order[group]] = ranks[order[group]].mean()
    members = len(member_scores)
    u = ranks[:members].sum() - members * (members + 1) / 2
    return float(u / (members * len(nonmember_scores)))


def tpr_at_fpr(member_scores: np.ndarray, nonmember_scores: np.ndarray, fpr: float) -> float:
    """Return the TPR of the strictest threshold whose FPR on the non-members is at most `fpr`.

    With n non-members and an FPR below 1/n, the threshold lies above every non-member score.
    So small FPRs are coarse, and the bootstrap interval shows how coarse.
    """
    # Non-members that may score above the threshold; the epsilon guards 0.01 * 1000 = 9.999...
    allowed = math.floor(fpr * len(nonmember_scores) + 1e-9)
    ordered = np.sort(nonmember_scores)[::-1]
    threshold = ordered[allowed] if allowed < len(ordered) else -np.inf
    return float((member_scores > threshold).mean())


def dp_tpr_bound(epsilon: float | None, delta: float | None, fpr: float) -> float | None:
    """Return the largest TPR at `fpr` that any test can reach against an (epsilon, delta)-DP release."""
    if epsilon is None or delta is None:
        return None
    bound = min(math.exp(epsilon) * fpr + delta, 1 - math.exp(-epsilon) * (1 - delta - fpr))
    return float(min(max(bound, fpr), 1.0))


def attack_metrics(member_scores: np.ndarray, nonmember_scores: np.ndarray, bootstrap: int, seed: int,
                   epsilon: float | None, delta: float | None) -> dict:
    """Return AUC and TPR at FALSE_POSITIVE_RATES with 95% bootstrap intervals and the DP bound."""
    rng = np.random.default_rng(seed)
    point = {"auc": roc_auc(member_scores, nonmember_scores)}
    for fpr in FALSE_POSITIVE_RATES:
        point[f"tpr_at_{fpr:g}_fpr"] = tpr_at_fpr(member_scores, nonmember_scores, fpr)
    samples: dict[str, list[float]] = {name: [] for name in point}
    for _ in range(bootstrap):
        members = member_scores[rng.integers(0, len(member_scores), len(member_scores))]
        nonmembers = nonmember_scores[rng.integers(0, len(nonmember_scores), len(nonmember_scores))]
        samples["auc"].append(roc_auc(members, nonmembers))
        for fpr in FALSE_POSITIVE_RATES:
            samples[f"tpr_at_{fpr:g}_fpr"].append(tpr_at_fpr(members, nonmembers, fpr))
    result = {}
    for name, value in point.items():
        low, high = np.percentile(samples[name], [2.5, 97.5])
        result[name] = {"value": value, "ci95": [float(low), float(high)]}
    result["dp_tpr_bound"] = {f"at_{fpr:g}_fpr": dp_tpr_bound(epsilon, delta, fpr) for fpr in FALSE_POSITIVE_RATES}
    return result


# ---------------------------------------------------------------- model outputs


@torch.no_grad()
def _logits(model, images: np.ndarray, batch_size: int = 1000) -> torch.Tensor:
    """Return a model's logits (N, classes) on uint8 images (N, C, H, W)."""
    model.eval()
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(images[start : start + batch_size]).float() / 255
        outputs.append(model(batch).float())
    return torch.cat(outputs)


def _losses(logits: torch.Tensor, labels: np.ndarray) -> np.ndarray:
    return F.cross_entropy(logits, torch.from_numpy(labels), reduction="none").numpy()


def _scaled_confidence(logits: torch.Tensor, labels: np.ndarray) -> np.ndarray:
    """Return log(p_y / (1 - p_y)) computed stably from logits, the statistic LiRA models as Gaussian."""
    labels_t = torch.from_numpy(labels)
    true = logits.gather(1, labels_t[:, None]).squeeze(1)
    others = logits.scatter(1, labels_t[:, None], float("-inf")).logsumexp(dim=1)
    return (true - others).numpy()


# ---------------------------------------------------------------- shadow models for LiRA


def _train_shadow(build, images: np.ndarray, labels: np.ndarray, epochs: int, seed: int) -> torch.nn.Module:
    """Train one shadow classifier on (images, labels) with Adam, as a teacher is trained."""
    torch.manual_seed(seed)
    model = build()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    inputs = torch.from_numpy(images).float() / 255
    targets = torch.from_numpy(labels)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(targets), generator=generator).split(64):
            loss = F.cross_entropy(model(inputs[batch]), targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


def lira_scores(targets: dict[str, torch.nn.Module], pool_images: np.ndarray, pool_labels: np.ndarray,
                build_shadow, shadow_models: int, shadow_epochs: int, seed: int, progress=None) -> dict[str, np.ndarray]:
    """Return LiRA scores of every pool example under each target model (higher: more likely a member).

    Each example is "in" for exactly half of the shadows, chosen at random per example, so every
    shadow trains on about half of the pool. The score is the log-likelihood ratio of the
    target's scaled confidence under Gaussians fitted to the "in" and "out" shadows. Their
    variances are pooled over all examples, because a handful of shadows per example cannot
    estimate one variance each.
    """
    rng = np.random.default_rng(seed)
    count = len(pool_labels)
    inside = rng.uniform(size=(shadow_models, count)).argsort(axis=0) < shadow_models // 2  # (shadows, pool)
    confidences = np.zeros((shadow_models, count))
    for index in range(shadow_models):
        chosen = np.flatnonzero(inside[index])
        shadow = _train_shadow(build_shadow, pool_images[chosen], pool_labels[chosen], shadow_epochs, seed + index)
        confidences[index] = _scaled_confidence(_logits(shadow, pool_images), pool_labels)
        if progress is not None:
            progress.update(1)
    in_mean = (confidences * inside).sum(axis=0) / inside.sum(axis=0)
    out_mean = (confidences * ~inside).sum(axis=0) / (~inside).sum(axis=0)
    in_std = max(float(np.std(confidences[inside] - np.broadcast_to(in_mean, confidences.shape)[inside])), 1e-6)
    out_std = max(float(np.std(confidences[~inside] - np.broadcast_to(out_mean, confidences.shape)[~inside])), 1e-6)
    scores = {}
    for name, model in targets.items():
        observed = _scaled_confidence(_logits(model, pool_images), pool_labels)
        log_in = -0.5 * ((observed - in_mean) / in_std) ** 2 - math.log(in_std)
        log_out = -0.5 * ((observed - out_mean) / out_std) ** 2 - math.log(out_std)
        scores[name] = log_in - log_out
    return scores


# ---------------------------------------------------------------- distances to synthetic samples


@torch.no_grad()
def synthetic_images(generator, count: int, seed: int) -> np.ndarray:
    """Draw `count` images from the generator as uint8 (N, C, H, W), rounded as the engine queries them."""
    rng = torch.Generator().manual_seed(seed)
    generator.eval()
    batches = []
    for start in range(0, count, 500):
        z = generator.sample_latents(min(500, count - start), rng)
        batches.append((generator(z).clamp(0, 1) * 255).round().to(torch.uint8).numpy())
    return np.concatenate(batches)


def nearest_distances(queries: np.ndarray, references: np.ndarray) -> np.ndarray:
    """Return each query image's L2 distance (pixels in [0, 1]) to its nearest reference image."""
    q = torch.from_numpy(queries.reshape(len(queries), -1)).float() / 255
    r = torch.from_numpy(references.reshape(len(references), -1)).float() / 255
    distances = [torch.cdist(q[start : start + 500], r).min(dim=1).values for start in range(0, len(q), 500)]
    return torch.cat(distances).numpy()


def _distance_summary(values: np.ndarray) -> dict:
    return {"mean": float(values.mean()), "median": float(np.median(values)), "p5": float(np.percentile(values, 5))}


def _bootstrap_fraction(flags: np.ndarray, bootstrap: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    samples = [flags[rng.integers(0, len(flags), len(flags))].mean() for _ in range(bootstrap)]
    low, high = np.percentile(samples, [2.5, 97.5])
    return {"value": float(flags.mean()), "ci95": [float(low), float(high)]}


# ---------------------------------------------------------------- the audit of a run folder


def _read_report(run_dir: Path) -> dict:
    report_path = run_dir / "privacy_report.json"
    if not report_path.is_file():
        raise AuditError(f"{run_dir} contains no privacy_report.json: audit a finished run (one that "
                         "'synthgen transcribe' completed)")
    report = json.loads(report_path.read_text())
    version = report.get("format")
    if version not in READABLE_REPORT_FORMATS:
        raise AuditError(f"{report_path} has format {version!r}, but this synthgen reads "
                         f"{', '.join(READABLE_REPORT_FORMATS)}; upgrade synthgen to audit this run")
    for part in ("student", "generator"):
        if not (run_dir / part / "config.json").is_file():
            raise AuditError(f"{run_dir / part} is missing; the run folder is incomplete")
    return report


def _load_run_teacher(config: AuditConfig, run_dir: Path, private):
    """Load the teacher named on the command line or in the run's private settings."""
    from .teacher import load_teacher

    settings = {}
    run_config = run_dir / "private" / "run_config.json"
    if run_config.is_file():
        settings = json.loads(run_config.read_text()).get("config", {})
    path = config.teacher or settings.get("teacher")
    if not path:
        raise AuditError(f"{run_dir} does not record its teacher; pass --teacher PATH")
    if not Path(path).exists():
        raise AuditError(f"teacher {path} (recorded in {run_config}) not found; pass --teacher PATH")
    factory = config.teacher_factory or settings.get("teacher_factory")
    return load_teacher(path, factory=factory, meta=settings.get("teacher_meta"), data=private,
                        trust_pickle=config.trust_pickle or bool(settings.get("trust_pickle")))


def _shadow_builder(config: AuditConfig, teacher, shape: tuple[int, int, int], num_classes: int):
    from .models import Classifier

    own = dict(getattr(teacher.module, "config", {}) or {})
    width = config.shadow_width or own.get("width", 16)
    hidden = config.shadow_hidden or own.get("hidden", 64)
    channels, height, _ = shape

    def build():
        return Classifier(image_size=height, channels=channels, num_classes=num_classes, width=width, hidden=hidden,
                          mean=(0.5,) * channels, std=(0.5,) * channels)

    return build, {"architecture": "synthgen Classifier", "width": width, "hidden": hidden}


def _sample(data, count: int, seed: int):
    index = np.sort(np.random.default_rng(seed).choice(len(data), size=count, replace=False))
    return data.images[index], data.labels[index]


def run_audit(config: AuditConfig) -> dict:
    """Audit the run in ``config.run_dir``, write RUN_DIR/audit.json and return its content."""
    from tqdm.auto import tqdm

    from .data import load_image_data
    from .models import Classifier, Generator

    from .config import THREADS_FIX, check_int_option

    config.validate()
    if config.threads is not None:
        try:
            check_int_option("--threads", config.threads, 1, THREADS_FIX)
        except ValueError as error:
            raise AuditError(str(error)) from None
        torch.set_num_threads(config.threads)
    run_dir = Path(config.run_dir)
    report = _read_report(run_dir)
    private = load_image_data(config.private_data, "train")
    teacher = _load_run_teacher(config, run_dir, private)
    private = _teacher_training_examples(private, teacher.meta)
    if teacher.meta.dataset_fingerprint and teacher.meta.dataset_fingerprint != private.fingerprint:
        raise AuditError(f"--private-data {config.private_data} is not the data the run's teacher was trained on "
                         "(fingerprints differ); pass the teacher's own training data, or the membership labels "
                         "of the audit would be wrong")
    heldout = load_image_data(config.heldout_data or config.private_data, config.heldout_split)
    if heldout.shape != private.shape or heldout.class_names != private.class_names:
        raise AuditError(f"held-out split {config.heldout_split!r} has images {heldout.shape} and "
                         f"{len(heldout.class_names)} classes, but the private data has {private.shape} and "
                         f"{len(private.class_names)}; pass --heldout-data with the same kind of images")
    size = config.audit_size
    if size > len(private) or size > len(heldout):
        raise AuditError(f"audit_size {size} is larger than the private training data or the held-out split; "
                         "pass a smaller --audit-size")
    logger.info("auditing %s: %d members and %d held-out examples, %d shadow models", run_dir, size, size,
                config.shadow_models)

    member_images, member_labels = _sample(private, size, config.seed)
    heldout_images, heldout_labels = _sample(heldout, size, config.seed + 1)
    student = Classifier.from_pretrained(str(run_dir / "student"))
    generator = Generator.from_pretrained(str(run_dir / "generator"))
    teacher_model = teacher.bank()
    # Control: a model that never saw data. Whatever AUC the attacks reach against it comes
    # from differences between the member and held-out samples (the training and test splits
    # of a dataset need not follow one distribution), not from leakage.
    torch.manual_seed(config.seed)
    untrained = Classifier.from_config(student.config)
    targets = {"student": student, "teacher": lambda x: teacher_model(x)[0], "untrained_control": untrained}

    epsilon, delta = report.get("epsilon"), report.get("delta")
    teacher_dp = report.get("teacher_dp") or None
    bounds = {"student": (epsilon, delta) if report.get("private") else (None, None),
              "teacher": (teacher_dp["epsilon"], teacher_dp["delta"]) if teacher_dp else (None, None),
              "untrained_control": (None, None)}
    result: dict = {"format": AUDIT_FORMAT, "attacks": {}}

    # 1. loss threshold
    for name, model in targets.items():
        member = -_losses(_logits(_CallableModule(model), member_images), member_labels)
        nonmember = -_losses(_logits(_CallableModule(model), heldout_images), heldout_labels)
        result["attacks"].setdefault("loss_threshold", {})[name] = attack_metrics(
            member, nonmember, config.bootstrap, config.seed, *bounds[name])

    # 2. LiRA with shadow models on random halves of the audit pool
    build_shadow, shadow_facts = _shadow_builder(config, teacher, private.shape, len(private.class_names))
    pool_images = np.concatenate([member_images, heldout_images])
    pool_labels = np.concatenate([member_labels, heldout_labels])
    progress = tqdm(total=config.shadow_models, desc="shadow models", unit="model")
    scores = lira_scores({name: _CallableModule(model) for name, model in targets.items()}, pool_images, pool_labels,
                         build_shadow, config.shadow_models, config.shadow_epochs, config.seed, progress)
    progress.close()
    for name, score in scores.items():
        result["attacks"].setdefault("lira", {})[name] = attack_metrics(
            score[:size], score[size:], config.bootstrap, config.seed, *bounds[name])

    # 3. distance from each audited example to the generator's samples
    synthetic = synthetic_images(generator, config.synthetic_samples, config.seed)
    to_synthetic_member = nearest_distances(member_images, synthetic)
    to_synthetic_heldout = nearest_distances(heldout_images, synthetic)
    result["attacks"]["synthetic_distance"] = {"generator": attack_metrics(
        -to_synthetic_member, -to_synthetic_heldout, config.bootstrap, config.seed, *bounds["student"])}

    # 4. nearest-neighbour distances from synthetic samples to training and held-out images
    to_train = nearest_distances(synthetic, member_images)
    to_heldout = nearest_distances(synthetic, heldout_images)
    result["nearest_neighbour"] = {
        "to_private_training_images": _distance_summary(to_train),
        "to_heldout_images": _distance_summary(to_heldout),
        "closer_to_training_fraction": _bootstrap_fraction(to_train < to_heldout, config.bootstrap, config.seed),
        "note": "L2 distance in pixel space ([0, 1] per pixel) from each synthetic sample to the nearest of "
                "audit_size training images and of as many held-out images; a fraction near 0.5 means the samples "
                "are no closer to the training images than to unseen ones",
    }
    result.update({
        "privacy": {"unit": report.get("unit"), "epsilon": epsilon, "delta": delta,
                    "teacher": ({"unit": teacher_dp.get("unit"), "epsilon": teacher_dp["epsilon"],
                                 "delta": teacher_dp["delta"]} if teacher_dp else "not private")},
        "settings": {key: value for key, value in asdict(config).items()
                     if key not in ("run_dir", "private_data", "heldout_data", "teacher", "teacher_factory",
                                    "trust_pickle", "threads")} | {"shadow": shadow_facts},
        "false_positive_rates": list(FALSE_POSITIVE_RATES),
        "note": "membership-inference audit on private data: evaluation only, not covered by the DP guarantee. "
                "Members are audit_size random training examples of the teacher, non-members as many held-out "
                "examples. Shadow models are trained directly on the data, as the teacher is; they do not repeat "
                "the transcription. untrained_control is a randomly initialised student that never saw data: its "
                "AUC is the level that differences between the member and held-out samples alone produce. "
                "dp_tpr_bound is the largest TPR that (epsilon, delta)-DP allows at that FPR.",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    })
    atomic_write_json(run_dir / AUDIT_FILE, result)
    logger.info("audit written to %s", run_dir / AUDIT_FILE)
    return result


class _CallableModule(torch.nn.Module):
    """Wrap a callable (images -> logits) so that eval() and no_grad helpers accept it."""

    def __init__(self, function):
        super().__init__()
        self.function = function

    def forward(self, images):
        return self.function(images)


def _teacher_training_examples(private, meta):
    """Return the examples of `private` that the teacher was trained on.

    A teacher trained with --limit records the whole dataset it drew from and its limit and seed,
    so the same subset can be drawn again from the whole dataset. Any other data is returned as
    it is, for the fingerprint check that follows.
    """
    training = meta.training or {}
    limit = training.get("limit")
    if (meta.dataset_fingerprint in (None, private.fingerprint) or not limit
            or meta.ledger_fingerprint != private.fingerprint):
        return private
    return private.subset(int(limit), seed=int(training.get("seed", 0)))


def summarise(result: dict) -> dict:
    """Return the headline numbers of an audit: AUC and TPR at 0.1% FPR per attack and target.

    Raises:
        ValueError: `result` is not the content of an audit.json that `synthgen audit` wrote.
    """
    summary = {}
    try:
        for attack, targets in result["attacks"].items():
            for target, metrics in targets.items():
                summary[f"{attack}/{target}"] = {
                    "auc": round(metrics["auc"]["value"], 4),
                    "tpr_at_0.001_fpr": round(metrics["tpr_at_0.001_fpr"]["value"], 4),
                    "tpr_at_0.01_fpr": round(metrics["tpr_at_0.01_fpr"]["value"], 4),
                    "dp_tpr_bound_at_0.01_fpr": metrics["dp_tpr_bound"]["at_0.01_fpr"],
                }
        summary["nearest_neighbour/closer_to_training_fraction"] = round(
            result["nearest_neighbour"]["closer_to_training_fraction"]["value"], 4)
    except (KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"the audit results are not those of 'synthgen audit' (missing or malformed "
                         f"{error}); run 'synthgen audit' on the run again, or delete its audit.json") from None
    return summary
