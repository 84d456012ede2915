"""The DPSD engine: generator, teacher and student trained in alternation.

One iteration:

1. the generator maps z ~ N(0, I) to a batch of synthetic images (rounded to 8 bits);
2. the student predicts on them; its top-k classes are the public prior;
3. the mechanism queries the teacher, adds noise, charges the ledger and returns DP labels;
4. the student learns from those labels and from earlier answers kept in a replay buffer;
5. the generator learns against the student alone (it never sees the teacher): it seeks
   images the student classifies confidently, in balanced classes, and where the student
   disagrees with the DP labels it was just given.

The run stops when the planned queries (iterations x batch size) are spent.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import secrets
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ._io import atomic_directory, atomic_write_bytes, atomic_write_json, sweep_stale_temporaries
from .config import TranscribeConfig, check_transcribe_options
from .data import ImageData, load_image_data
from .dp_training import augmented_copies
from .privacy.accounting import (
    PrivacyEvent, accountant_versions, calibrate_gaussian, calibrate_randomized_response, pld_epsilon,
    rdp_epsilon, validate_delta, validate_epsilon,
)
from .ensemble import privacy_unit
from .privacy.ledger import EXAMPLE_UNIT, TEACHER_UNIT, Ledger, LedgerKey
from .privacy.mechanism import LabelMechanism, MechanismConfig, NoisyAnswer
from . import distributed
from .replay import ReplayBuffer
from .teacher import LoadedTeacher, evaluate_accuracy, load_teacher

logger = logging.getLogger(__name__)

REPORT_FILE = "privacy_report.json"
PRIVATE_DIR = "private"  # never released: data paths, fingerprints, checkpoints with the noise secret
CHECKPOINT_FILE = "checkpoint.pt"
# Settings that must not change between an interrupted run and its resumption.
_FROZEN_SETTINGS = (
    "mechanism", "epsilon", "delta", "steps", "batch_size", "student_steps", "generator_steps", "student_lr",
    "generator_lr", "top_k", "clip_norm", "temperature", "replay_size", "replay_batch", "latent_dim",
    "generator_width", "student_width", "student_hidden", "student_norm", "onehot_weight", "entropy_weight",
    "activation_weight", "adversarial_weight", "seed", "noise_seed", "student_frontend", "student_init",
    "query_pool", "student_shift", "pseudo_label_weight", "pseudo_label_threshold", "procedural_fraction",
    "stroke_prior_weight", "silhouette_prior_weight",
)
# Values of settings added after the first release, for run files written without them.
_SETTING_DEFAULTS = {"student_frontend": "pixels", "student_init": "random", "query_pool": 1, "student_shift": 0,
                     "pseudo_label_weight": 0.0, "pseudo_label_threshold": 0.95, "procedural_fraction": 0.0,
                     "stroke_prior_weight": 0.0, "silhouette_prior_weight": 0.0}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TranscriptionError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TranscriptionError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device


MECHANISMS = ("gaussian", "noisy-label", "dp-teacher", "none")


class TranscriptionError(ValueError):
    """Raised for settings or inputs that cannot start a transcription."""


@dataclass
class TranscriptionResult:
    run_dir: Path
    report: dict
    completed: bool
    main_process: bool = True  # False on the other ranks of a distributed run, which write no report


# ---------------------------------------------------------------- validation and setup


def _check_out_path(out: str) -> None:
    """Raise TranscriptionError when --out, or the nearest existing folder above it, is a file."""
    path = Path(os.path.abspath(out))
    if path.exists() and not path.is_dir():
        raise TranscriptionError(f"--out {path} is a file, not a folder; choose another --out")
    for parent in path.parents:
        if not parent.exists():
            continue
        if not parent.is_dir():
            raise TranscriptionError(f"--out {path} is inside {parent}, which is a file, not a folder; choose "
                                     "another --out")
        return


def _check_settings(config: TranscribeConfig) -> None:
    try:
        check_transcribe_options(config)
    except ValueError as error:
        raise TranscriptionError(str(error)) from None
    _check_out_path(config.out)
    if config.mechanism not in MECHANISMS:
        raise TranscriptionError(f"mechanism must be one of {', '.join(MECHANISMS)}, got {config.mechanism!r}")
    if config.mechanism in ("gaussian", "noisy-label"):
        try:
            validate_epsilon(config.epsilon)
            validate_delta(config.delta)
            if config.budget_epsilon is not None:
                validate_epsilon(config.budget_epsilon, "budget_epsilon")
        except ValueError as error:
            raise TranscriptionError(str(error)) from None
    for name in ("steps", "batch_size", "student_steps", "checkpoint_every", "latent_dim", "generator_width",
                 "student_width", "student_hidden", "top_k"):
        value = getattr(config, name)
        # A scattering student may have no hidden layer (a linear head).
        least = 0 if name == "student_hidden" and config.student_frontend == "scatter" else 1
        if not isinstance(value, int) or value < least:
            raise TranscriptionError(f"{name} must be an integer >= {least}, got {value!r}")
    pool = config.query_pool
    if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1:
        raise TranscriptionError(f"query_pool must be an integer >= 1 (1: no selection), got {pool!r}")
    shift = config.student_shift
    if isinstance(shift, bool) or not isinstance(shift, int) or shift < 0:
        raise TranscriptionError(f"student_shift must be an integer >= 0 pixels (0: none), got {shift!r}")
    weight = config.pseudo_label_weight
    if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
        raise TranscriptionError(f"pseudo_label_weight must be a finite number >= 0 (0: off), got {weight!r}")
    for name in ("stroke_prior_weight", "silhouette_prior_weight"):
        prior = getattr(config, name)
        if isinstance(prior, bool) or not (isinstance(prior, (int, float)) and math.isfinite(prior) and prior >= 0):
            raise TranscriptionError(f"{name} must be a finite number >= 0 (0: off), got {prior!r}")
    if config.stroke_prior_weight and config.silhouette_prior_weight:
        raise TranscriptionError(
            f"stroke_prior_weight ({config.stroke_prior_weight}) and silhouette_prior_weight "
            f"({config.silhouette_prior_weight}) are both set; choose one image prior and set the other to 0")
    threshold = config.pseudo_label_threshold
    if not (isinstance(threshold, (int, float)) and 0 < threshold <= 1):
        raise TranscriptionError(f"pseudo_label_threshold must be in (0, 1], got {threshold!r}")
    fraction = config.procedural_fraction
    if not (isinstance(fraction, (int, float)) and 0 <= fraction < 1):
        raise TranscriptionError(f"procedural_fraction must be in [0, 1) (the generator keeps part of each batch), "
                                 f"got {fraction!r}")
    if fraction and not 1 <= round(fraction * config.batch_size) < config.batch_size:
        raise TranscriptionError(
            f"procedural_fraction {fraction} of batch_size {config.batch_size} gives "
            f"{round(fraction * config.batch_size)} stroke images; choose a fraction that leaves between 1 and "
            f"{config.batch_size - 1} of them, or 0 for none")
    for name in ("generator_steps", "replay_size", "replay_batch", "eval_every"):
        value = getattr(config, name)
        if not isinstance(value, int) or value < 0:
            raise TranscriptionError(f"{name} must be an integer >= 0, got {value!r}")
    if config.student_norm not in ("none", "group"):
        raise TranscriptionError(f"student_norm must be 'none' or 'group', got {config.student_norm!r}")
    if config.student_frontend not in ("pixels", "scatter"):
        raise TranscriptionError(f"student_frontend must be 'pixels' or 'scatter', got {config.student_frontend!r}")
    if config.student_init not in ("random", "teacher"):
        raise TranscriptionError(f"student_init must be 'random' or 'teacher', got {config.student_init!r}")
    if config.student_init == "teacher" and config.mechanism != "dp-teacher":
        # The teacher's weights are what the other mechanisms protect: a copy would release them.
        raise TranscriptionError(
            f"student_init 'teacher' copies the teacher's weights into the released student, which is private "
            f"only when the teacher itself is DP (--mechanism dp-teacher), not with --mechanism {config.mechanism}; "
            "use --student-init random"
        )
    for name in ("student_lr", "generator_lr", "clip_norm", "temperature"):
        value = getattr(config, name)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise TranscriptionError(f"{name} must be a finite number > 0, got {value!r}")
    if not config.teacher:
        raise TranscriptionError("no teacher given: pass --teacher PATH")


@dataclass
class _Setup:
    teacher: LoadedTeacher
    dataset_fingerprint: str
    num_examples: int
    eval_data: ImageData | None
    unit: str | None
    mechanism: MechanismConfig
    planned: PrivacyEvent | None
    teacher_dp: dict | None = None  # DP-SGD facts of a DP teacher (dp-teacher mode)


def _prepare(config: TranscribeConfig) -> _Setup:
    """Load and check everything a run needs, before anything is written."""
    _check_settings(config)
    private = None
    if config.private_data:
        private = load_image_data(config.private_data, "train")
    teacher = _load_teacher_or_ensemble(config, private)
    meta = teacher.meta
    fingerprint = meta.dataset_fingerprint
    num_examples = meta.num_examples
    if fingerprint is None or num_examples is None:
        raise TranscriptionError(
            f"teacher {config.teacher} does not record its private dataset; pass --private-data with the data it "
            "was trained on, so the ledger can key the spend and delta can be checked against 1/n"
        )
    if private is not None and private.fingerprint != fingerprint:
        raise TranscriptionError(
            f"--private-data {config.private_data} is not the dataset teacher {config.teacher} was trained on "
            "(fingerprints differ); pass the teacher's own training data"
        )
    # Spends are charged to the whole dataset when the teacher was trained on a subset of it.
    fingerprint = meta.ledger_fingerprint or fingerprint
    eval_data = None
    if config.eval_data:
        eval_data = load_image_data(config.eval_data, config.eval_split)
        if list(eval_data.shape) != list(meta.input_shape) or len(eval_data.class_names) != meta.num_classes:
            raise TranscriptionError(
                f"--eval-data {config.eval_data} has images {eval_data.shape} and {len(eval_data.class_names)} classes "
                f"but the teacher takes {tuple(meta.input_shape)} and predicts {meta.num_classes}; "
                "use the test split of the teacher's dataset"
            )
        if config.eval_limit:
            eval_data = eval_data.subset(config.eval_limit, seed=0)
    if config.top_k > meta.num_classes:
        raise TranscriptionError(f"top_k must be <= the number of classes ({meta.num_classes}), got {config.top_k}")
    smallest_side = min(meta.input_shape[1:])
    if config.student_shift >= smallest_side:
        # Reflected padding needs a border narrower than the image.
        raise TranscriptionError(f"student_shift must be < the image side ({smallest_side} pixels), "
                                 f"got {config.student_shift}")

    planned_queries = config.steps * config.batch_size
    mode = config.mechanism if config.mechanism in ("gaussian", "noisy-label") else "none"
    mechanism = MechanismConfig(mode=mode, top_k=config.top_k, clip_norm=config.clip_norm,
                                temperature=config.temperature)
    planned = None
    unit = None
    teacher_dp = None
    if config.mechanism == "dp-teacher":
        teacher_dp = _check_dp_teacher(config, teacher)
        unit = teacher_dp["unit"]
    elif config.mechanism != "none":
        try:
            validate_delta(config.delta, num_examples)
        except ValueError as error:
            raise TranscriptionError(str(error)) from None
        # One teacher: changing one example may change the teacher arbitrarily, so the only
        # sound unit is the whole teacher. Only an ensemble on >= 2 disjoint shards is example-level.
        unit = privacy_unit(teacher)
        if config.mechanism == "noisy-label" and unit == EXAMPLE_UNIT:
            mechanism.mode = "gnmax"  # the label-sensitive mode of an ensemble
        if mechanism.mode in ("gaussian", "gnmax"):
            mechanism.noise_multiplier = calibrate_gaussian(float(config.epsilon), float(config.delta), planned_queries)
            planned = PrivacyEvent("gaussian", mechanism.noise_multiplier, planned_queries)
        else:
            mechanism.eps0 = calibrate_randomized_response(float(config.epsilon), float(config.delta), planned_queries)
            planned = PrivacyEvent("randomized_response", mechanism.eps0, planned_queries)
        # Cross-check: RDP is a looser bound than PLD, so an RDP epsilon below the PLD epsilon
        # means one of the two computations is wrong, and no run should start on it.
        pld_value = pld_epsilon([planned], config.delta)
        rdp_value = rdp_epsilon([planned], config.delta)
        if rdp_value < pld_value * (1 - 1e-6):
            raise RuntimeError(f"accountant cross-check failed: RDP epsilon {rdp_value} < PLD epsilon {pld_value}")
        logger.info("calibrated for %d queries: epsilon %.4g (PLD), %.4g (RDP) at delta %g",
                    planned_queries, pld_value, rdp_value, config.delta)
    return _Setup(teacher, fingerprint, num_examples, eval_data, unit, mechanism, planned, teacher_dp)


def _load_teacher_or_ensemble(config: TranscribeConfig, private: ImageData | None):
    from .ensemble import is_ensemble, load_ensemble

    if is_ensemble(config.teacher):
        return load_ensemble(config.teacher, data=private)
    return load_teacher(config.teacher, factory=config.teacher_factory, meta=config.teacher_meta, data=private,
                        trust_pickle=config.trust_pickle)


def _check_dp_teacher(config: TranscribeConfig, teacher: LoadedTeacher) -> dict:
    """Return the DP-SGD facts of a DP teacher, after checking where they come from.

    A teacher trained by synthgen is checked against the ledger entry written before its
    training. Facts from --teacher-meta are the user's statement and are reported as such.
    """
    dp = teacher.meta.dp
    if not dp:
        raise TranscriptionError(
            f"mechanism 'dp-teacher' needs a teacher trained with DP-SGD, but {config.teacher} records no DP "
            "training; train one with 'synthgen train-teacher --dp' or use --mechanism gaussian or noisy-label"
        )
    dp = dict(dp)
    for name in ("epsilon", "delta", "unit"):
        if name not in dp:
            raise TranscriptionError(f"the teacher's DP record lacks {name!r}; it cannot back a guarantee")
    if config.teacher_meta or dp.get("source") != "synthgen":
        return _user_dp_statement(config, teacher, dp)
    from .privacy.accounting import PrivacyEvent

    recorded = [PrivacyEvent(**event) for event in dp.get("events", [])]
    with Ledger(config.ledger) as ledger:
        scope = teacher.meta.ledger_fingerprint or teacher.meta.dataset_fingerprint
        key = LedgerKey(scope, f"dp-sgd:{dp.get('ledger_run_id')}", "example")
        charged = ledger.events(key, run_id=dp.get("ledger_run_id"))
    if recorded and charged == recorded:
        dp["verification"] = "matches the spend recorded in the privacy ledger before training"
    else:
        dp["verification"] = "not found in this privacy ledger; the teacher's metadata is the only record"
        logger.warning("the DP training of %s is not in the ledger %s; reporting its metadata unverified",
                       config.teacher, config.ledger or "(default)")
    return dp


def _user_dp_statement(config: TranscribeConfig, teacher: LoadedTeacher, dp: dict) -> dict:
    """Check a DP record that the user supplied and recompute its epsilon from its privacy events.

    synthgen cannot check how such a teacher was trained, but it can check the arithmetic: the
    reported epsilon is the one its DP-SGD events imply under replace-one (PLD), never the stated
    number alone. A stated epsilon computed under add/remove-one, as Opacus reports it, comes out
    larger here.
    """
    if dp.get("unit") != "example":
        raise TranscriptionError(
            f"the teacher's DP record states unit {dp.get('unit')!r}; a DP-SGD teacher protects single examples, "
            "so set \"unit\": \"example\" in the record"
        )
    hint = ('list the DP-SGD training as privacy events, for example "events": [{"kind": "poisson_gaussian", '
            '"parameter": NOISE_MULTIPLIER, "count": STEPS, "sampling_rate": BATCH_SIZE / N}]')
    raw_events = dp.get("events")
    if not isinstance(raw_events, list) or not raw_events:
        raise TranscriptionError(
            f"the DP record of teacher {config.teacher} states epsilon {dp['epsilon']!r} without the privacy events "
            f"behind it, so synthgen cannot recompute it; {hint}"
        )
    try:
        events = [PrivacyEvent(**event) for event in raw_events]
        delta = validate_delta(dp["delta"], teacher.meta.num_examples)
    except (TypeError, ValueError) as error:
        raise TranscriptionError(f"the DP record of teacher {config.teacher} is invalid: {error}; {hint}") from None
    dp["stated_epsilon"] = dp["epsilon"]
    dp["epsilon"] = pld_epsilon(events, delta)
    dp["events"] = [event.to_dict() for event in events]
    dp["neighbouring_relation"] = "replace-one"
    dp["accountant"] = {"name": "pld", "library": "dp_accounting", "version": accountant_versions()["dp_accounting"]}
    dp["source"] = "user statement"
    dp["verification"] = ("not verified by synthgen: the user states that the teacher was trained with DP-SGD as "
                          "these events describe; synthgen recomputed epsilon from them")
    logger.warning("teacher %s: DP training stated by the user, not verified; epsilon recomputed from the stated "
                   "events: %.4g (stated %s) at delta %g, replace-one", config.teacher, dp["epsilon"],
                   dp["stated_epsilon"], delta)
    return dp


def _prepare_run_dir(config: TranscribeConfig) -> tuple[Path, str]:
    """Check the run folder; return it and the run id (new, or the interrupted run's)."""
    run_dir = Path(config.out)
    run_config = run_dir / PRIVATE_DIR / "run_config.json"
    if (run_dir / REPORT_FILE).exists():
        raise TranscriptionError(f"{run_dir} already contains a finished run; choose another --out")
    if config.resume:
        if not run_config.is_file():
            raise TranscriptionError(f"--resume given but {run_dir} contains no interrupted run; drop --resume to start one")
        saved = json.loads(run_config.read_text())
        changed = [name for name in _FROZEN_SETTINGS
                   if saved["config"].get(name, _SETTING_DEFAULTS.get(name)) != getattr(config, name)]
        if changed:
            raise TranscriptionError(
                f"cannot resume {run_dir}: {', '.join(changed)} differ from the interrupted run; use the same settings"
            )
        return run_dir, saved["run_id"]
    if run_dir.exists() and any(not _is_stale_temporary(entry) for entry in run_dir.iterdir()):
        if run_config.is_file():
            raise TranscriptionError(f"{run_dir} contains an interrupted run: pass --resume to continue it, or choose another --out")
        raise TranscriptionError(f"{run_dir} exists and is not empty; choose another --out")
    return run_dir, uuid.uuid4().hex


def _is_stale_temporary(entry: Path) -> bool:
    """Tell whether `entry` is a temporary that a killed start-up left, which the next start sweeps."""
    return entry.name.startswith(".") and entry.name.endswith(".tmp")


def _create_run_dir(run_dir: Path, run_id: str, config: TranscribeConfig) -> None:
    """Create the private folder with run_config.json in one rename.

    A kill at any moment leaves either no private folder (the folder is still fresh) or one whose
    run_config.json names the run id, so that --resume finds every charge made under it. No
    charge can precede this: the ledger is charged only by the training loop.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    sweep_stale_temporaries(run_dir)
    with atomic_directory(run_dir / PRIVATE_DIR) as private:
        atomic_write_json(private / "run_config.json", {"run_id": run_id, "config": asdict(config)})


# ---------------------------------------------------------------- the run


def _copy_of_teacher(teacher: LoadedTeacher, config: TranscribeConfig):
    """Return a trainable copy of a DP teacher that is a synthgen Classifier."""
    from .models import Classifier

    if not isinstance(teacher.module, Classifier):
        raise TranscriptionError(
            f"student_init 'teacher' needs a teacher saved by synthgen (a Classifier); {config.teacher} contains "
            f"{type(teacher.module).__name__}; use --student-init random"
        )
    student = Classifier.from_config(teacher.module.config)
    student.load_state_dict(teacher.module.state_dict())
    return student.train()


class _Run:
    def __init__(self, config: TranscribeConfig, setup: _Setup, run_dir: Path, run_id: str, ledger: Ledger | None):
        from .models import Classifier, Generator

        self.config = config
        self.setup = setup
        self.run_dir = run_dir
        self.run_id = run_id
        self.ledger = ledger
        meta = setup.teacher.meta
        channels, height, _ = meta.input_shape
        self.class_names = list(meta.class_names)
        torch.manual_seed(config.seed)
        self.generator = Generator(latent_dim=config.latent_dim, image_size=height, channels=channels,
                                   width=config.generator_width)
        if config.student_init == "teacher":
            self.student = _copy_of_teacher(setup.teacher, config)
        else:
            # The student's normalisation is a public constant, not a statistic of the private data.
            self.student = Classifier(image_size=height, channels=channels, num_classes=meta.num_classes,
                                      width=config.student_width, hidden=config.student_hidden,
                                      norm=config.student_norm, mean=(0.5,) * channels, std=(0.5,) * channels,
                                      class_names=self.class_names, frontend=config.student_frontend)
        self.generator_optimizer = torch.optim.Adam(self.generator.parameters(), lr=config.generator_lr, betas=(0.5, 0.999))
        # The image prior's critic is trained only on generator images and on shapes drawn from
        # random numbers, and it is never released. Its Adam settings were chosen without tuning.
        self.prior_weight = config.stroke_prior_weight or config.silhouette_prior_weight
        self.render_prior = render_strokes if config.stroke_prior_weight else render_silhouettes
        self.critic = ShapeCritic(channels, height) if self.prior_weight else None
        self.critic_optimizer = (torch.optim.Adam(self.critic.parameters(), lr=2e-4, betas=(0.5, 0.999))
                                 if self.critic is not None else None)
        self.student_optimizer = torch.optim.Adam(self.student.parameters(), lr=config.student_lr)
        self.device = resolve_device(config.device)
        # One process unless started by torchrun or accelerate; see synthgen.distributed.
        self.dist = distributed.connect(self.device)
        self.device = self.dist.device(self.device)
        self.private = setup.planned is not None  # the ledger is charged (on rank 0) for every query
        try:
            self.local_batch = self.dist.split(config.batch_size, "batch_size")
            self.local_replay_batch = self.dist.split(config.replay_batch, "replay_batch")
        except ValueError as error:
            raise TranscriptionError(str(error)) from None
        self.generator.to(self.device)
        self.student.to(self.device)
        if self.critic is not None:
            self.critic.to(self.device)
        self.buffer = ReplayBuffer(config.replay_size // self.dist.world_size, (channels, height, height),
                                   meta.num_classes, self.device)
        self.step = 0
        if config.noise_seed is not None:
            self.noise_secret = int(config.noise_seed)
        else:
            self.noise_secret = int.from_bytes(secrets.token_bytes(16), "little")
        if self.dist.enabled:
            if self.dist.is_main:
                distributed.prepare_in_turn(self.dist)  # lets the other ranks load their setup now
            self.run_id, self.noise_secret = self.dist.broadcast_object((run_id, self.noise_secret))
            # Same models on every rank (seeded above), different latents per rank from here on.
            torch.manual_seed(distributed.rank_seed(config.seed, self.dist.rank))
        self.key = LedgerKey(setup.dataset_fingerprint, setup.teacher.fingerprint, setup.unit or "none")
        self.bank = setup.teacher.bank().to(self.device)
        if config.mechanism in ("gaussian", "noisy-label"):
            self.mechanism = LabelMechanism(self.bank, setup.mechanism, self._charge,
                                            distributed.rank_noise_secret(self.noise_secret, self.dist.rank))
        else:
            self.mechanism = _DirectLabeller(self.bank, setup.mechanism)
        # Stroke images per process and iteration; at least one image per batch stays the generator's.
        self.local_strokes = min(round(config.procedural_fraction * self.local_batch), self.local_batch - 1)
        if self.local_strokes:
            logger.info("each iteration sends %d stroke images and %d generator images per process",
                        self.local_strokes, self.local_batch - self.local_strokes)
        self.queries = 0
        # Answers taken from the ledger after an interruption; the teacher saw those images in
        # the interrupted process, so forward passes here plus these equal the charged queries.
        self.replayed_examples = 0
        self.metrics_path = run_dir / "metrics.jsonl"
        self.last_accuracy: float | None = None

    # -------------------------------------------------------- privacy bookkeeping

    def _charge(self, step: int, event: PrivacyEvent, answer: NoisyAnswer) -> None:
        if not self.dist.enabled:
            self.ledger.charge(self.run_id, step, self.key, event, answer.to_bytes())
            self.queries += event.count
            return
        # Rank 0 charges the queries of all ranks as one spend and stores the joined answer.
        gathered = self.dist.gather_objects((event.to_dict(), answer.to_bytes()))
        outcome = None
        if self.dist.is_main:
            try:
                events = [PrivacyEvent(**entry) for entry, _ in gathered]
                if any((e.kind, e.parameter) != (event.kind, event.parameter) for e in events):
                    raise RuntimeError(f"ranks answered step {step} with different mechanisms: {events}")
                total = PrivacyEvent(event.kind, event.parameter, sum(e.count for e in events), event.sampling_rate)
                self.ledger.charge(self.run_id, step, self.key, total,
                                   distributed.join_answers([payload for _, payload in gathered]).to_bytes())
                outcome = total.count
            except BaseException as error:
                self.dist.broadcast_object(f"rank 0 failed to charge step {step}: {error!r}")
                raise
        # The collective after the charge: no rank returns (and uses its answer) before rank 0 has charged.
        outcome = self.dist.broadcast_object(outcome)
        if isinstance(outcome, str):
            raise RuntimeError(outcome)
        self.queries += outcome

    def spent_epsilon(self) -> float:
        if self.setup.teacher_dp is not None:
            return float(self.setup.teacher_dp["epsilon"])
        if self.setup.unit is None:
            return 0.0
        return pld_epsilon(self.ledger.events(self.key, self.run_id), self.config.delta)

    # -------------------------------------------------------- checkpoints

    def checkpoint_path(self) -> Path:
        return self.run_dir / PRIVATE_DIR / CHECKPOINT_FILE

    def _rank_state(self) -> dict:
        """The part of a checkpoint that differs between ranks."""
        return {
            "buffer": self.buffer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "teacher_forward_examples": self.bank.forward_examples,
        }

    def save_checkpoint(self) -> None:
        rank_state = self._rank_state()
        if self.dist.enabled:
            # Every rank's buffer and random state goes into rank 0's checkpoint, on the CPU so
            # that any rank can load it.
            rank_states = self.dist.gather_objects(_to_cpu(rank_state))
            if not self.dist.is_main:
                return
        state = {
            "step": self.step,
            "queries": self.queries,
            "generator": self.generator.state_dict(),
            "student": self.student.state_dict(),
            "generator_optimizer": self.generator_optimizer.state_dict(),
            "student_optimizer": self.student_optimizer.state_dict(),
            **({"critic": self.critic.state_dict(), "critic_optimizer": self.critic_optimizer.state_dict()}
               if self.critic is not None else {}),
            **rank_state,
            "noise_secret": str(self.noise_secret),
            "replayed_examples": self.replayed_examples,
            "last_accuracy": self.last_accuracy,
        }
        if self.dist.enabled:
            state["world_size"] = self.dist.world_size
            state["ranks"] = rank_states
        payload = io.BytesIO()
        torch.save(state, payload)
        atomic_write_bytes(self.checkpoint_path(), payload.getvalue())
        if self.ledger is not None:
            # Answers up to this step are now inside the checkpoint's models and buffer.
            self.ledger.prune_answers(self.run_id, self.step - 1)

    def load_checkpoint(self) -> bool:
        path = self.checkpoint_path()
        if self.dist.enabled:
            # Only rank 0 reads the file (other nodes may not see it) and sends it to every rank.
            state = None
            if self.dist.is_main and path.is_file():
                state = torch.load(path, map_location="cpu", weights_only=True)
            state = self.dist.broadcast_object(state)
            if state is None:
                return False
            if state.get("world_size", 1) != self.dist.world_size:
                raise TranscriptionError(
                    f"the checkpoint in {self.run_dir} was written by {state.get('world_size', 1)} process(es) but "
                    f"{self.dist.world_size} are running; resume with --nproc_per_node/--num_processes set to the "
                    "original count"
                )
            state.update(state.pop("ranks")[self.dist.rank])
        elif not path.is_file():
            return False
        else:
            state = torch.load(path, map_location=self.device, weights_only=True)
            if state.get("world_size", 1) != 1:
                raise TranscriptionError(
                    f"the checkpoint in {self.run_dir} was written by {state['world_size']} processes; resume it with "
                    "torchrun or accelerate launch on the same number of processes"
                )
        self.step = int(state["step"])
        self.queries = int(state["queries"])
        self.generator.load_state_dict(state["generator"])
        self.student.load_state_dict(state["student"])
        self.generator_optimizer.load_state_dict(state["generator_optimizer"])
        self.student_optimizer.load_state_dict(state["student_optimizer"])
        if self.critic is not None:
            self.critic.load_state_dict(state["critic"])
            self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        self.buffer.load_state_dict(state["buffer"])
        torch.set_rng_state(state["torch_rng"].cpu())
        if self.device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), self.device)
        self.noise_secret = int(state["noise_secret"])
        if isinstance(self.mechanism, LabelMechanism):
            self.mechanism._secret = distributed.rank_noise_secret(self.noise_secret, self.dist.rank)
        self.bank.forward_examples = int(state["teacher_forward_examples"])
        self.replayed_examples = int(state["replayed_examples"])
        self.last_accuracy = state["last_accuracy"]
        if self.dist.is_main:
            self._truncate_metrics(self.step)
        return True

    def _truncate_metrics(self, step: int) -> None:
        """Keep only complete metric lines up to `step`, dropping what an interrupted run wrote later."""
        if not self.metrics_path.is_file():
            return
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
        atomic_write_bytes(self.metrics_path, ("\n".join(kept) + "\n" if kept else "").encode())

    # -------------------------------------------------------- one iteration

    def _answer(self, images: torch.Tensor, student_probs: torch.Tensor) -> NoisyAnswer:
        # Counts are global: images.shape[0] per rank, the same on every rank.
        global_count = images.shape[0] * self.dist.world_size
        if self.private:
            stored = self._stored_answer()
            if stored is not None:
                # Charged before an interruption: re-using the stored answer is free, asking again is not.
                self.queries += global_count
                self.replayed_examples += global_count
                return NoisyAnswer.from_bytes(stored, self.device)
        answer = self.mechanism.annotate(images, student_probs, self.step)
        if not self.private:
            self.queries += global_count  # not private: counted, not charged
        return answer

    def _stored_answer(self) -> bytes | None:
        """Return this rank's part of the answer the ledger stored for the current step, if any."""
        if not self.dist.enabled:
            return self.ledger.stored_answer(self.run_id, self.step)
        parts = None
        if self.dist.is_main:
            stored = self.ledger.stored_answer(self.run_id, self.step)
            try:
                parts = None if stored is None else distributed.split_answer(stored, self.dist.world_size,
                                                                             self.local_batch)
            except ValueError as error:
                parts = str(error)
        parts = self.dist.broadcast_object(parts)
        if isinstance(parts, str):
            raise TranscriptionError(parts)
        return None if parts is None else parts[self.dist.rank]

    def iterate(self) -> dict:
        config = self.config
        self.generator.train()
        self.student.train()
        pool = config.query_pool
        strokes = self.local_strokes
        drawn = self.local_batch - strokes  # images from the generator
        z = self.generator.sample_latents(drawn * pool)
        # One generator forward serves the query, the candidates around it and the first generator update.
        generated = self.generator(z) if config.generator_steps else None
        with torch.no_grad():
            source = generated.detach() if generated is not None else self.generator(z)
            pixels = (source * 255).round().to(torch.uint8)  # (B * pool, C, H, W): the 8-bit images
            candidates = pixels.float() / 255
            candidate_probs = F.softmax(self.student(candidates), dim=1)
        if pool > 1:
            # Only the student and the generator decide which candidates are sent, so the choice is
            # post-processing. The teacher receives only the chosen images.
            chosen = select_queries(candidate_probs, drawn)
            z, pixels, images, student_probs = z[chosen], pixels[chosen], candidates[chosen], candidate_probs[chosen]
            generated = generated[chosen] if generated is not None else None
        else:
            images, student_probs = candidates, candidate_probs
        if strokes:
            # Appended after the generator's images, so the first `drawn` rows of the targets are the generator's.
            stroke_pixels = (render_strokes(strokes, tuple(pixels.shape[1:])) * 255).round().to(torch.uint8)
            stroke_images = stroke_pixels.float().to(self.device) / 255
            with torch.no_grad():
                stroke_probs = F.softmax(self.student(stroke_images), dim=1)
            pixels = torch.cat([pixels, stroke_pixels.to(self.device)])
            images = torch.cat([images, stroke_images])
            student_probs = torch.cat([student_probs, stroke_probs])
        answer = self._answer(images, student_probs)
        self.buffer.add(pixels, answer.targets)

        student_loss = 0.0
        for _ in range(config.student_steps):
            batch_images, batch_targets = images, answer.targets
            replayed = self.buffer.sample(self.local_replay_batch)
            if replayed is not None:
                batch_images = torch.cat([images, replayed[0]])
                batch_targets = torch.cat([answer.targets, replayed[1]])
            log_probs = F.log_softmax(self.student(self._shifted(batch_images)), dim=1)
            loss = -(batch_targets * log_probs).sum(dim=1).mean()
            if config.pseudo_label_weight:
                unlabelled = pseudo_label_loss(self.student, candidates, config.pseudo_label_threshold, self._shifted)
                loss = loss + config.pseudo_label_weight * unlabelled
            self.student_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.dist.average_gradients(self.student)
            self.student_optimizer.step()
            student_loss = loss.item()

        generator_loss = 0.0
        for repeat in range(config.generator_steps):
            if repeat:
                # With a query pool, the first update saw BatchNorm statistics of all candidates and
                # the repeats see those of the chosen latents only.
                generated = self.generator(z)
            generator_loss = self._generator_update(generated, answer.targets[:drawn])
        self.dist.broadcast_buffers(self.generator)
        student_loss, generator_loss = self.dist.mean([student_loss, generator_loss])
        return {"student_loss": student_loss, "generator_loss": generator_loss}

    def _shifted(self, images: torch.Tensor) -> torch.Tensor:
        if not self.config.student_shift:
            return images
        return augmented_copies(images, 1, None, max_shift=self.config.student_shift)

    def _generator_update(self, images: torch.Tensor, targets: torch.Tensor) -> float:
        """One generator step; `images` is the generator's output with its graph, (B, C, H, W) in [0, 1]."""
        if self.critic is not None:
            self._critic_update(images.detach())
        frozen = [*self.student.parameters(), *(self.critic.parameters() if self.critic is not None else ())]
        for parameter in frozen:
            parameter.requires_grad_(False)
        try:
            loss = self.generator_loss(images, targets)
            if self.critic is not None:
                # softplus(-logit) = -log sigmoid(logit): low for images the critic takes for prior shapes.
                loss = loss + self.prior_weight * F.softplus(-self.critic(images)).mean()
            self.generator_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.dist.average_gradients(self.generator)
            self.generator_optimizer.step()
        finally:
            for parameter in frozen:
                parameter.requires_grad_(True)
        return loss.item()

    def _critic_update(self, fakes: torch.Tensor) -> None:
        """Train the prior's critic one step: shapes drawn now are real, the generator's `fakes` are not."""
        shapes = self.render_prior(fakes.shape[0], tuple(fakes.shape[1:])).to(self.device)
        loss = F.softplus(-self.critic(shapes)).mean() + F.softplus(self.critic(fakes)).mean()
        self.critic_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # NOTE: averaging keeps the critics of several processes equal, but no multi-process test
        # covers the image priors yet.
        self.dist.average_gradients(self.critic)
        self.critic_optimizer.step()

    def generator_loss(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Compute the generator loss on the student alone; the teacher is not reachable from here.

        `targets` are the DP labels of the same latents, (B, classes).
        """
        config = self.config
        features = self.student.embed(images)
        logits = self.student.fc2(features)
        probs = F.softmax(logits, dim=1)
        # DAFL terms (Chen et al. 2019): confident predictions, balanced classes, strong features.
        onehot = F.cross_entropy(logits, logits.argmax(dim=1))
        mean_probs = probs.mean(dim=0)
        balance = (mean_probs * torch.log(mean_probs + 1e-8)).sum()  # negative entropy of the batch mean
        activation = -features.abs().mean()
        # Seek images where the updated student disagrees with the DP labels of the same
        # latents; capped so the generator cannot win by producing noise.
        disagreement = -(targets * F.log_softmax(logits, dim=1)).sum(dim=1)
        adversarial = -disagreement.clamp(max=math.log(logits.shape[1])).mean()
        return (config.onehot_weight * onehot + config.entropy_weight * balance
                + config.activation_weight * activation + config.adversarial_weight * adversarial)

    def evaluate(self) -> float | None:
        if self.setup.eval_data is None:
            return None
        accuracy = evaluate_accuracy(self.student, self.setup.eval_data)
        self.student.train()
        self.last_accuracy = accuracy
        return accuracy

    def log_metrics(self, record: dict) -> None:
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    return value


def pseudo_label_loss(student: torch.nn.Module, images: torch.Tensor, threshold: float, transform) -> torch.Tensor:
    """Return the student's cross-entropy on `transform(images)` against its own confident predictions on `images`.

    Predictions below `threshold` count as zero, and the mean is over all images. The labels come
    from the student, not from the teacher, so this term costs no privacy.
    """
    with torch.no_grad():
        confidence, labels = F.softmax(student(images), dim=1).max(dim=1)
        confident = (confidence >= threshold).float()
    losses = F.cross_entropy(student(transform(images)), labels, reduction="none")
    return (losses * confident).sum() / images.shape[0]


class ShapeCritic(nn.Module):
    """Discriminator of the stroke and silhouette priors: two 4x4 convolutions of stride 2, a linear layer.

    Its logit is > 0 for images it takes for the prior's shapes. It has no BatchNorm, so its output
    for one image does not depend on the others in the batch.
    """

    def __init__(self, channels: int, image_size: int, width: int = 32):
        super().__init__()
        side = image_size // 4  # two stride-2 convolutions; image sizes are multiples of 4
        self.layers = nn.Sequential(
            nn.Conv2d(channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Flatten(), nn.Linear(2 * width * side**2, 1),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images).squeeze(1)  # (B,) logits


def render_strokes(count: int, shape: tuple[int, int, int], points: int = 24) -> torch.Tensor:
    """Render `count` images (count, C, H, W) in [0, 1] of 1 to 3 random pen strokes, without any data.

    Each stroke is a quadratic Bezier curve whose control points lie in the central 70% of the
    image, drawn with a Gaussian pen 0.8 to 1.6 pixels wide (at 28 x 28) as the maximum over the
    strokes. The draws come from torch's default generator, which the checkpoint saves.
    """
    channels, height, width = shape
    scale = min(height, width) / 28
    controls = 0.15 + 0.7 * torch.rand(count, 3, 3, 2)  # (image, stroke, control point, yx) as fractions
    used = torch.arange(3) < torch.randint(1, 4, (count, 1))  # (image, stroke): 1 to 3 strokes
    pen = (0.8 + 0.8 * torch.rand(count, 1, 1)) * scale
    t = torch.linspace(0, 1, points).view(1, 1, points, 1)
    curve = ((1 - t) ** 2 * controls[:, :, None, 0] + 2 * t * (1 - t) * controls[:, :, None, 1]
             + t**2 * controls[:, :, None, 2])  # (image, stroke, point, yx)
    curve = curve * torch.tensor([height - 1, width - 1], dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(torch.arange(height, dtype=torch.float32),
                                      torch.arange(width, dtype=torch.float32), indexing="ij"), dim=-1).view(-1, 2)
    # Unused strokes are moved far outside the image, so they draw nothing.
    curve = torch.where(used[:, :, None, None], curve, torch.full_like(curve, -1e4)).flatten(1, 2)
    distance = torch.cdist(grid.expand(count, -1, -1), curve).min(dim=2).values  # (image, H * W)
    ink = torch.exp(-0.5 * (distance / pen.view(count, 1)) ** 2)
    return ink.view(count, 1, height, width).expand(count, channels, height, width).contiguous()


def _interpolate(knots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Return the piecewise-linear curve through `knots` (N, K), evenly spaced on [0, 1], at `positions` (N, L)."""
    count = knots.shape[1]
    place = positions.clamp(0, 1) * (count - 1)
    left = place.floor().long().clamp(max=count - 2)
    fraction = place - left
    return knots.gather(1, left) * (1 - fraction) + knots.gather(1, left + 1) * fraction


def render_silhouettes(count: int, shape: tuple[int, int, int], knots: int = 6) -> torch.Tensor:
    """Render `count` images (count, C, H, W) in [0, 1] of one random filled silhouette each, without any data.

    Seven in ten are upright, like tops, dresses, trousers and bags: a profile of half-widths from
    top to bottom, mirrored about a centre column. Three in ten of those have a gap between two
    legs in their lower part. The rest lie down, like shoes and boots: a profile of heights above
    a base line, tallest at one end. The profiles are random walks through `knots` points. The fill
    is a grey level with a smooth texture and, in a quarter of the images, stripes. The sigmoid
    that softens the edges has a scale of 0.6 pixels at 28 x 28. The draws come from torch's
    default generator, which the checkpoint saves.
    """
    # NOTE: the shapes are grey, copied to every channel, so on colour data the critic can tell
    # them from coloured images by colour alone. The prior was measured on grey images only.
    if knots < 2:
        raise ValueError(f"knots must be >= 2 (the profile is a line through them), got {knots}")
    channels, height, width = shape
    size = min(height, width) / 28  # lengths in pixels below are for 28 x 28 images
    ys = torch.arange(height, dtype=torch.float32).view(1, height, 1).expand(count, height, width)
    xs = torch.arange(width, dtype=torch.float32).view(1, 1, width).expand(count, height, width)
    edge = 0.6 * size

    def inside(distance: torch.Tensor) -> torch.Tensor:  # soft indicator of distance > 0, in pixels
        return torch.sigmoid(distance / edge)

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(count, 1, 1)

    # Upright shapes. Sizes are fractions of the image.
    top, bottom = uniform(0.02, 0.27) * (height - 1), uniform(0.75, 0.98) * (height - 1)
    walk = 0.12 + 0.3 * torch.rand(count, 1) + (0.08 * torch.randn(count, knots)).cumsum(1)
    half_widths = walk.clamp(0.05, 0.47) * width
    profile = _interpolate(half_widths, (ys[:, :, 0] - top[:, :, 0]) / (bottom - top)[:, :, 0]).unsqueeze(2)
    distance = (xs - ((width - 1) / 2 + 0.7 * size * torch.randn(count, 1, 1))).abs()
    # Shapes without legs get a negative gap, which cuts nothing.
    gap = torch.where(torch.rand(count, 1, 1) < 0.3, uniform(0.04, 0.14) * width, torch.full((count, 1, 1), -width))
    fork = top + uniform(0.3, 0.6) * (bottom - top)
    legs = 1 - inside(gap - distance) * inside(ys - fork)
    upright = inside(profile - distance) * inside(ys - top) * inside(bottom - ys) * legs

    # Lying shapes.
    left, right = uniform(0.02, 0.17) * (width - 1), uniform(0.83, 0.98) * (width - 1)
    base = uniform(0.6, 0.9) * (height - 1)
    walk = 0.12 + 0.15 * torch.rand(count, 1) + (0.05 * torch.randn(count, knots)).cumsum(1)
    heights = walk.clamp(0.08, 0.4) * height
    heights[:, 0] += 0.4 * height * torch.rand(count)  # a shaft at one end
    heights = torch.where(torch.rand(count, 1) < 0.5, heights.flip(1), heights)
    rise = _interpolate(heights, (xs[:, 0, :] - left[:, :, 0]) / (right - left)[:, :, 0]).unsqueeze(1)
    lying = inside(ys - (base - rise)) * inside(base - ys) * inside(xs - left) * inside(right - xs)

    mask = torch.where(torch.rand(count, 1, 1) < 0.7, upright, lying)
    texture = F.interpolate(torch.rand(count, 1, 4, 4), size=(height, width), mode="bilinear", align_corners=True)
    period = uniform(2.5, 6.5) * size
    stripes = 0.15 * torch.sin(2 * math.pi * ys / period + uniform(0.0, 2 * math.pi))
    stripes = torch.where(torch.rand(count, 1, 1) < 0.25, stripes, torch.zeros_like(stripes))
    fill = (uniform(0.35, 0.95) + 0.3 * (texture[:, 0] - 0.5) + stripes).clamp(0.05, 1)
    images = (mask * fill).clamp(0, 1)
    return images.unsqueeze(1).expand(count, channels, height, width).contiguous()


def select_queries(probs: torch.Tensor, count: int) -> torch.Tensor:
    """Return the indices of `count` rows of `probs` (N, classes) to send to the teacher.

    The candidates are grouped by the class the student predicts and, within a class, ordered by
    the margin between the student's two largest probabilities, smallest first. The classes are
    then taken in turn, so the chosen images are as balanced over predicted classes as the pool
    allows and, within that, the ones the student is least sure of.
    """
    top2 = probs.topk(2, dim=1).values
    margin = top2[:, 0] - top2[:, 1]  # in [0, 1]
    predicted = probs.argmax(dim=1)
    order = torch.argsort(margin, stable=True)
    order = order[torch.argsort(predicted[order], stable=True)]  # grouped by class, smallest margin first
    grouped = predicted[order]
    sizes = torch.bincount(grouped, minlength=probs.shape[1])
    starts = torch.cumsum(sizes, 0) - sizes
    rank = torch.arange(len(order), device=probs.device) - starts[grouped]  # position within its class
    # Round r of the turns takes the r-th candidate of every class; within a round, smaller margins first.
    key = rank.double() + margin[order].double() * 0.5
    return order[torch.argsort(key, stable=True)[:count]]


class _DirectLabeller:
    """Teacher answers without noise or per-query accounting.

    Used for a DP teacher, whose every output is already DP (post-processing), and for the
    non-private mode that measures the engine itself.
    """

    def __init__(self, bank, config: MechanismConfig):
        self.__bank = bank
        self.config = config

    @torch.no_grad()
    def annotate(self, images: torch.Tensor, student_probs: torch.Tensor, step: int) -> NoisyAnswer:
        probs = F.softmax(self.__bank(images)[0] / self.config.temperature, dim=1)
        k = min(self.config.top_k, probs.shape[1])
        classes = student_probs.topk(k, dim=1).indices
        selected = probs.gather(1, classes)
        weights = selected / selected.sum(dim=1, keepdim=True).clamp_min(1e-12)
        targets = torch.zeros_like(probs).scatter(1, classes, weights)
        return NoisyAnswer(targets, classes, selected)


# ---------------------------------------------------------------- entry point


def transcribe(config: TranscribeConfig) -> TranscriptionResult:
    """Run one transcription as configured; see the module docstring for the loop."""
    from tqdm.auto import tqdm

    _check_settings(config)  # again in _prepare; first here, because the thread count is used at once
    if config.threads:
        torch.set_num_threads(config.threads)
    if distributed.is_worker_process():
        return distributed.run_worker(config)  # ranks > 0 of torchrun or accelerate launch: no ledger, no files
    distributed.check_launch_settings(config)
    setup = _prepare(config)
    resolve_device(config.device)  # an unusable device is invalid input: reject it before anything is written
    run_dir, run_id = _prepare_run_dir(config)
    ledger = None
    try:
        if setup.planned is not None:
            ledger = Ledger(config.ledger)
            key = LedgerKey(setup.dataset_fingerprint, setup.teacher.fingerprint, setup.unit)
            already = ledger.charged_queries(run_id)
            remaining = PrivacyEvent(setup.planned.kind, setup.planned.parameter, setup.planned.count - already)
            total = ledger.check_budget(key, [remaining], config.delta, config.budget_epsilon)
            if config.budget_epsilon is not None and ledger.budget(key) is None:
                ledger.set_budget(key, config.budget_epsilon, config.delta)
            ledger.register_run(run_id, key, setup.planned, config.epsilon, config.delta, str(run_dir.resolve()))
            logger.info("privacy: unit=%s mechanism=%s planned queries=%d parameter=%.6g; after this run the %s "
                        "will have spent epsilon %.4g at delta %g (ledger %s)", setup.unit, config.mechanism,
                        setup.planned.count, setup.planned.parameter, key.scope.split(":")[0], total, config.delta,
                        ledger.path)
        elif config.mechanism == "dp-teacher":
            logger.info("privacy: the teacher is (%.4g, %g)-DP at the %s level (DP-SGD); transcription is "
                        "post-processing and adds no privacy cost", setup.teacher_dp["epsilon"],
                        setup.teacher_dp["delta"], setup.unit)
        else:
            logger.warning("mechanism 'none': the teacher is queried without noise; the result is NOT private")

        if config.resume:
            sweep_stale_temporaries(run_dir)
            sweep_stale_temporaries(run_dir / PRIVATE_DIR)
        else:
            _create_run_dir(run_dir, run_id, config)
        run = _Run(config, setup, run_dir, run_id, ledger)
        if config.resume:
            if run.load_checkpoint():
                logger.info("resuming %s from iteration %d", run_dir, run.step)
            else:
                logger.info("resuming %s from the start: no checkpoint was written before the interruption", run_dir)
                run._truncate_metrics(-1)
        return _train(run, tqdm)
    finally:
        if ledger is not None:
            ledger.close()


def _train(run: _Run, tqdm) -> TranscriptionResult:
    config = run.config
    started = time.time()
    main = run.dist.is_main  # only rank 0 evaluates and writes files
    progress = tqdm(total=config.steps, initial=run.step, desc="transcribe", unit="it", **({} if main else {"disable": True}))
    metrics: dict = {}
    while run.step < config.steps:
        if config.stop_after is not None and run.step >= config.stop_after:
            progress.close()
            logger.info("stopped after iteration %d as requested; continue with --resume", run.step)
            return TranscriptionResult(run.run_dir, {}, completed=False, main_process=main)
        metrics = run.iterate()
        run.step += 1
        record = {"step": run.step, "queries": run.queries, **metrics}
        evaluate_now = config.eval_every and run.step % config.eval_every == 0
        if main and (evaluate_now or run.step == config.steps):
            accuracy = run.evaluate()
            record["epsilon_spent"] = run.spent_epsilon()
            if accuracy is not None:
                record["student_accuracy"] = accuracy
            run.log_metrics(record)
        if run.step % config.checkpoint_every == 0 and run.step < config.steps:
            run.save_checkpoint()
        progress.update(1)
        postfix = {"loss": f"{metrics['student_loss']:.3f}"}
        if "epsilon_spent" in record:
            postfix["eps"] = f"{record['epsilon_spent']:.3g}"
        if run.last_accuracy is not None:
            postfix["acc"] = f"{run.last_accuracy:.1f}%"
        progress.set_postfix(postfix)
    progress.close()
    elapsed = time.time() - started
    # Rank 0's report counts the teacher passes of all ranks, to compare with the global queries.
    run.bank.forward_examples = run.dist.sum_int(run.bank.forward_examples)
    if not main:
        return TranscriptionResult(run.run_dir, {}, completed=True, main_process=False)
    report = _finish(run, elapsed)
    return TranscriptionResult(run.run_dir, report, completed=True)


def _scrub_noise_secret(path: Path) -> None:
    """Replace the noise secret in a checkpoint with a fresh random value.

    Called once every iteration is charged: the ledger then stores every answer after the
    checkpoint's step, so a run resumed from it replays them and draws no noise, and its final
    state and accounting equal those of an uninterrupted run. No file of the finished run
    then contains the secret, whatever moment a kill lands at.
    """
    if not path.is_file():
        return
    state = torch.load(path, map_location="cpu", weights_only=True)
    state["noise_secret"] = str(int.from_bytes(secrets.token_bytes(16), "little"))
    payload = io.BytesIO()
    torch.save(state, payload)
    atomic_write_bytes(path, payload.getvalue())


def _finish(run: _Run, elapsed: float) -> dict:
    from .artifacts import grid_png, sample_per_class
    from .report import build_report

    config = run.config
    _scrub_noise_secret(run.checkpoint_path())
    for name, model in (("generator", run.generator), ("student", run.student)):
        with atomic_directory(run.run_dir / name) as tmp:
            model.eval()
            model.save_pretrained(str(tmp))
    # At most 8 x 256 draws: enough for a trained generator, and quick when a short run has not
    # learned every class yet.
    rows, _ = sample_per_class(run.generator, run.student, len(run.class_names), per_class=10, seed=config.seed,
                               max_batches=8)
    atomic_write_bytes(run.run_dir / "samples.png", grid_png(rows, run.class_names, per_class=10))
    report = build_report(run, elapsed)
    atomic_write_json(run.run_dir / PRIVATE_DIR / "ledger_key.json", {
        "ledger": str(run.ledger.path) if run.ledger else None, "scope": run.key.scope,
        "dataset_fingerprint": run.key.dataset_fingerprint, "teacher_fingerprint": run.key.teacher_fingerprint,
        "run_id": run.run_id,
    })
    atomic_write_json(run.run_dir / REPORT_FILE, report)  # written last: marks the run complete
    # A kill just before this line leaves a checkpoint whose noise secret was scrubbed above.
    run.checkpoint_path().unlink(missing_ok=True)
    if run.ledger is not None:
        run.ledger.drop_answers(run.run_id)
    logger.info("run complete in %.0f s: %s", elapsed, run.run_dir)
    return report
