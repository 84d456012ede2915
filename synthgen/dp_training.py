"""DP-SGD teacher training with Opacus that survives an interruption without a second charge.

The whole planned spend is charged to the ledger once, before the first noisy step, under a run
id that is stored in ``OUT/private/dp_training.json`` before the charge. Training then writes a
checkpoint to ``OUT/private/dp_checkpoint.pt`` (atomically) before the first step, every
``checkpoint_every`` steps and at the end of every epoch. The checkpoint contains the model, the
optimizer, the weight average (EMA), Opacus's accountant history, the steps done and the states
of the noise and Poisson-sampling generators. With ``resume`` the training continues from it and
the ledger is not charged again, so the ledger holds one spend for the whole training. Steps
after the last checkpoint are recomputed with the restored generators, which draw the same
batches and the same noise, so the result equals that of an uninterrupted training.

The generator states are secrets, because anyone who knows them can subtract the noise. Before
the teacher is saved, the checkpoint is rewritten without them; saving the teacher replaces the
whole output folder, private/ included.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import shutil
import uuid
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ._io import atomic_directory, atomic_write_bytes, atomic_write_json, check_output_folder
from .config import TeacherTrainConfig, check_teacher_train_options
from .data import ImageData
from .teacher import (META_FILE, LoadedTeacher, TeacherError, TeacherMeta, evaluate_accuracy, fingerprint_state,
                      make_optimizer, save_teacher, validate_head)

logger = logging.getLogger(__name__)

PRIVATE_DIR = "private"
RUN_FILE = "dp_training.json"
CHECKPOINT_FILE = "dp_checkpoint.pt"
# Settings that fix the spend and the result, so a resumed training must use the same values.
FROZEN_SETTINGS = ("epochs", "batch_size", "lr", "width", "hidden", "seed", "epsilon", "delta", "max_grad_norm",
                   "ema_decay", "noise_seed", "frontend", "optimizer", "augment_multiplicity", "weight_standardization",
                   "head")
# Values of settings added after the first release, for run files written without them.
_SETTING_DEFAULTS = {"frontend": "pixels", "optimizer": "adam", "augment_multiplicity": 1,
                     "weight_standardization": False, "head": "dense"}
# Largest shift, in pixels, of an augmented copy along each axis.
AUGMENT_SHIFT = 2
# Operational settings left out of the teacher's recorded training settings.
_OPERATIONAL_SETTINGS = ("out", "ledger", "resume", "stop_after", "checkpoint_every", "overwrite")


@dataclass(frozen=True)
class _Plan:
    sample_rate: float
    steps_per_epoch: int
    steps: int
    noise_multiplier: float


def make_dp_compatible(module: nn.Module) -> nn.Module:
    """Return `module` ready for DP-SGD: layers Opacus cannot train are replaced, or TeacherError is raised.

    BatchNorm mixes examples of a batch, so per-example gradients do not exist for it; Opacus's
    ModuleValidator.fix replaces it by GroupNorm (and LSTM, GRU and attention by their DP
    versions). Layers that no fixer handles are rejected with Opacus's reasons.
    """
    from opacus.validators import ModuleValidator

    module.train()
    problems = ModuleValidator.validate(module, strict=False)
    if not problems:
        return module
    fixed = ModuleValidator.fix(module)
    fixed.train()
    remaining = ModuleValidator.validate(fixed, strict=False)
    if remaining:
        reasons = "; ".join(str(problem) for problem in remaining)
        raise TeacherError(
            f"the model has layers that DP-SGD cannot train and Opacus cannot replace: {reasons}. Replace them "
            "(BatchNorm by GroupNorm, for example) before DP training"
        )
    replaced = sorted({type(sub).__name__ for sub in module.modules()} - {type(sub).__name__ for sub in fixed.modules()})
    logger.warning("replaced layers that DP-SGD cannot train (%s) with Opacus's ModuleValidator.fix: %s",
                   ", ".join(replaced), "; ".join(str(problem) for problem in problems))
    return fixed


class _ScatterHead(nn.Module):
    """The trainable part of a scattering Classifier, applied to precomputed scattering outputs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        # Registered here so that Opacus hooks them; they are the model's own layers.
        self.norm = model.features
        self.fc1 = model.fc1
        self.fc2 = model.fc2
        self._embed_features = model.embed_features

    def forward(self, scattered: torch.Tensor) -> torch.Tensor:
        return self.fc2(self._embed_features(self.norm(scattered).flatten(1)))


def augmented_copies(images: torch.Tensor, copies: int, generator: torch.Generator | None,
                     max_shift: int = AUGMENT_SHIFT) -> torch.Tensor:
    """Return `copies` randomly shifted versions of each image, grouped by example: (N * copies, C, H, W).

    Each copy is the image translated by up to `max_shift` pixels along each axis, with the
    border reflected in. Rows n * copies .. (n + 1) * copies - 1 come from image n. The shifts are
    drawn on the CPU from `generator` (torch's default generator when None), so they do not
    depend on the device of `images`.
    """
    count, _, height, width = images.shape
    repeated = images.repeat_interleave(copies, dim=0)
    padded = F.pad(repeated, (max_shift,) * 4, mode="reflect")
    shifts = torch.randint(0, 2 * max_shift + 1, (2, count * copies), generator=generator).to(images.device)
    rows = shifts[0, :, None] + torch.arange(height, device=images.device)  # (N * copies, H)
    cols = shifts[1, :, None] + torch.arange(width, device=images.device)  # (N * copies, W)
    index = torch.arange(count * copies, device=images.device)[:, None, None]
    # Advanced indexing around the channel slice puts the channels last: (N * copies, H, W, C).
    return padded[index, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def average_over_copies(module: nn.Module, copies: int) -> None:
    """Replace every per-sample gradient of `module`'s parameters by its mean over each example's copies.

    The rows of one example are adjacent (see `augmented_copies`), so (N * copies, ...) becomes
    (N, ...). Clipping then bounds each example's averaged gradient, as DP-SGD requires: the
    copies are functions of that one example, so the sensitivity is unchanged.
    """
    for parameter in module.parameters():
        grad_sample = getattr(parameter, "grad_sample", None)
        if grad_sample is None:
            continue
        if isinstance(grad_sample, list):
            # Opacus keeps a list when backward ran more than once since the last zero_grad. Those
            # rows come from different batches and must not be averaged together.
            raise RuntimeError("per-sample gradients from several backward passes; call zero_grad before each "
                               "backward when averaging over augmented copies")
        parameter.grad_sample = grad_sample.view(-1, copies, *grad_sample.shape[1:]).mean(1)


def scatter_features(model: nn.Module, images, chunk: int = 1000) -> torch.Tensor:
    """Return the scattering transform of uint8 `images` (N, C, H, W) as (N, 81 C, H/4, W/4) float32."""
    from tqdm.auto import tqdm

    parts = []
    with torch.no_grad():
        for start in tqdm(range(0, len(images), chunk), desc="scattering", unit="chunk"):
            pixels = torch.from_numpy(images[start:start + chunk]).float() / 255
            pixels = (pixels - model._mean) / model._std
            parts.append(model.scattering(pixels.contiguous()).flatten(1, 2))
    return torch.cat(parts)


@functools.lru_cache(maxsize=16)
def _calibrate(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """Calibrate the noise multiplier; cached because the PLD search takes tens of seconds on a CPU."""
    from .privacy.accounting import calibrate_dp_sgd

    return calibrate_dp_sgd(epsilon, delta, sample_rate, steps)


def _plan(config: TeacherTrainConfig, num_examples: int, noise_multiplier: float | None = None) -> _Plan:
    """Plan the steps; `noise_multiplier` is the one an interrupted training calibrated, if any."""
    # Opacus samples each example with probability 1 / len(loader), where the loader batches the
    # data without dropping the last partial batch.
    steps_per_epoch = -(-num_examples // config.batch_size)
    sample_rate = 1 / steps_per_epoch
    steps = config.epochs * steps_per_epoch
    if noise_multiplier is None:
        noise_multiplier = _calibrate(float(config.epsilon), float(config.delta), sample_rate, steps)
    return _Plan(sample_rate, steps_per_epoch, steps, noise_multiplier)


def _settings(config: TeacherTrainConfig, train: ImageData) -> dict:
    from .privacy.ledger import default_ledger_path

    values = {name: getattr(config, name) for name in FROZEN_SETTINGS}
    values["dataset_fingerprint"] = train.fingerprint
    # A resumed training must find its spend in the same ledger, or it would be charged twice.
    values["ledger"] = str((Path(config.ledger) if config.ledger else default_ledger_path()).resolve())
    return values


def _restore_interrupted_swap(out: Path) -> None:
    """Undo a kill between the two renames that replace `out` when the teacher is saved."""
    for entry in out.parent.glob(f".{out.name}.old-*"):
        if not out.exists():
            os.replace(entry, out)
        else:
            shutil.rmtree(entry, ignore_errors=True)


def _start(config: TeacherTrainConfig, settings: dict) -> tuple[str, float | None]:
    """Check the output folder; return the run id and noise multiplier of the interrupted training, or a new id."""
    out = Path(config.out)
    run_file = out / PRIVATE_DIR / RUN_FILE
    if config.resume:
        if not run_file.is_file():
            raise ValueError(f"--resume given but {out} contains no interrupted DP training; drop --resume to start one")
        saved = json.loads(run_file.read_text())
        changed = [name for name in settings
                   if saved["settings"].get(name, _SETTING_DEFAULTS.get(name)) != settings[name]]
        if changed:
            raise ValueError(
                f"cannot resume the DP training in {out}: {', '.join(changed)} differ from the interrupted training; "
                "use the same settings"
            )
        return saved["run_id"], float(saved["noise_multiplier"])
    if run_file.is_file():
        raise ValueError(f"{out} contains an interrupted DP training: pass --resume to continue it, or choose another --out")
    check_output_folder(out, (META_FILE,), "teacher", config.overwrite)
    return uuid.uuid4().hex, None


def _create_private_dir(out: Path, run_id: str, settings: dict, plan: _Plan) -> None:
    """Write the run file in one rename, before the ledger is charged under its run id."""
    out.mkdir(parents=True, exist_ok=True)
    with atomic_directory(out / PRIVATE_DIR) as private:
        atomic_write_json(private / RUN_FILE, {"run_id": run_id, "settings": settings,
                                               "noise_multiplier": plan.noise_multiplier})


def _charge_once(config: TeacherTrainConfig, train: ImageData, run_id: str, plan: _Plan, settings: dict) -> None:
    """Charge the whole training's spend unless the ledger already has it under `run_id`.

    The ledger stays open, and so locked against other processes, from the budget check to the
    charge. A fresh training writes its run file in between: a budget failure leaves nothing,
    and no charge exists without a run file that names it.
    """
    from .privacy.accounting import POISSON_GAUSSIAN, PrivacyEvent
    from .privacy.ledger import EXAMPLE_UNIT, Ledger, LedgerKey

    event = PrivacyEvent(POISSON_GAUSSIAN, plan.noise_multiplier, plan.steps, plan.sample_rate)
    with Ledger(config.ledger) as ledger:
        key = LedgerKey(train.ledger_fingerprint, f"dp-sgd:{run_id}", EXAMPLE_UNIT)
        if ledger.charged_queries(run_id):
            logger.info("the ledger %s already contains the spend of this DP training (run %s); nothing is charged "
                        "again", ledger.path, run_id)
            return
        if train.ledger_fingerprint != train.fingerprint:
            logger.info("the training data is a subset of dataset %s, so the spend is charged to that dataset's "
                        "budget", train.ledger_fingerprint)
        total = ledger.check_budget(key, [event], config.delta, None)
        if not config.resume:
            _create_private_dir(Path(config.out), run_id, settings, plan)
        ledger.register_run(run_id, key, event, config.epsilon, config.delta, str(Path(config.out).resolve()))
        ledger.charge(run_id, 0, key, event, b"")
    logger.info("DP-SGD: sigma=%.4g, q=%.4g, %d steps, C=%g; epsilon %.4g at delta %g (replace-one, PLD) charged to "
                "the ledger %s, whose total for the dataset is now %.4g", plan.noise_multiplier, plan.sample_rate,
                plan.steps, config.max_grad_norm, config.epsilon, config.delta, ledger.path, total)


def _seeded_generator(seed: int | None) -> torch.Generator:
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") >> 1
    return torch.Generator().manual_seed(seed)


class _Training:
    """The state of one DP-SGD training that a checkpoint saves and restores."""

    def __init__(self, config: TeacherTrainConfig, train: ImageData, plan: _Plan):
        from opacus import PrivacyEngine

        from .models import Classifier

        self.config = config
        self.plan = plan
        self.path = Path(config.out) / PRIVATE_DIR / CHECKPOINT_FILE
        torch.manual_seed(config.seed)
        channels, height, _ = train.shape
        scatter = config.frontend == "scatter"
        # Normalisation constants must not come from the private data under DP: use the midpoint
        # (the scattering front end needs none, its GroupNorm rescales every image).
        centre, scale = (0.0, 1.0) if scatter else (0.5, 0.5)
        model = Classifier(image_size=height, channels=channels, num_classes=len(train.class_names),
                           width=config.width, hidden=config.hidden, norm="group", mean=(centre,) * channels,
                           std=(scale,) * channels, class_names=list(train.class_names), frontend=config.frontend,
                           weight_standardization=config.weight_standardization, head=config.head)
        self.model = make_dp_compatible(model)
        if scatter:
            # The scattering transform has no parameters, so DP-SGD trains only the head, on features
            # computed once. The per-example gradients, and so the guarantee, equal the whole model's.
            self.trained = _ScatterHead(self.model)
            inputs = scatter_features(self.model, train.images)
        else:
            self.trained = self.model
            inputs = torch.from_numpy(train.images)
        # Both generators are secret. Amplification by Poisson subsampling assumes that the
        # examples in each batch are unknown, and noise protects only while its values are unknown.
        noise_seed = config.noise_seed
        self.sampling_generator = _seeded_generator(noise_seed)
        self.noise_generator = _seeded_generator(None if noise_seed is None else noise_seed + 1)
        dataset = torch.utils.data.TensorDataset(inputs, torch.from_numpy(train.labels))
        loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, shuffle=True,
                                             generator=self.sampling_generator)
        self.engine = PrivacyEngine(accountant="prv")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.private_model, self.optimizer, self.loader = self.engine.make_private(
                module=self.trained, optimizer=make_optimizer(config, self.trained.parameters()),
                data_loader=loader, noise_multiplier=plan.noise_multiplier, max_grad_norm=config.max_grad_norm,
                poisson_sampling=True, noise_generator=self.noise_generator,
            )
        # Only the Poisson sampler may draw from the sampling generator. A DataLoader also draws
        # a worker seed from its own generator at the start of every epoch, which would shift the
        # batches of a training resumed mid-epoch. Without a generator it draws from the global
        # one, which nothing else in this training uses.
        self.loader.generator = None
        if abs(self.loader.sample_rate - plan.sample_rate) > 1e-12:
            raise RuntimeError(f"Opacus samples at rate {self.loader.sample_rate}, the plan at {plan.sample_rate}")
        self.ema = {name: value.detach().clone() for name, value in self.model.state_dict().items()}
        self.ema_steps = 0
        self.steps_done = 0  # logical (Poisson) batches drawn, empty ones included
        # The shifts of augmented copies need not be secret: every copy is clipped together with its
        # example, whatever the shifts are.
        self.augment_generator = torch.Generator().manual_seed(config.seed)

    def save(self, final: bool = False) -> None:
        """Write the checkpoint atomically; a final one leaves out the generator states (secrets)."""
        state = {
            "steps_done": self.steps_done,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema,
            "ema_steps": self.ema_steps,
            "accountant": self.engine.accountant.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "sampling_rng": None if final else self.sampling_generator.get_state(),
            "noise_rng": None if final else self.noise_generator.get_state(),
            "augment_rng": self.augment_generator.get_state(),
        }
        payload = io.BytesIO()
        torch.save(state, payload)
        atomic_write_bytes(self.path, payload.getvalue())

    def load(self) -> bool:
        if not self.path.is_file():
            return False
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        self.steps_done = int(state["steps_done"])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.ema = state["ema"]
        self.ema_steps = int(state["ema_steps"])
        self.engine.accountant.load_state_dict(state["accountant"])
        torch.set_rng_state(state["torch_rng"])
        if "augment_rng" in state:  # absent from checkpoints written before augmentation existed
            self.augment_generator.set_state(state["augment_rng"])
        if self.steps_done < self.plan.steps:
            self.sampling_generator.set_state(state["sampling_rng"])
            self.noise_generator.set_state(state["noise_rng"])
        return True

    def update_ema(self) -> None:
        if not self.config.ema_decay:
            return
        # Warm-up as in TensorFlow's ExponentialMovingAverage with num_updates, so that a short
        # run is not dominated by the initial weights.
        self.ema_steps += 1
        decay = min(self.config.ema_decay, (1 + self.ema_steps) / (10 + self.ema_steps))
        with torch.no_grad():
            for name, value in self.model.state_dict().items():
                self.ema[name].mul_(decay).add_(value, alpha=1 - decay)

    def run(self, progress) -> bool:
        """Train until every planned step is done (True) or until `stop_after` steps (False)."""
        from opacus.utils.batch_memory_manager import BatchMemoryManager

        config, plan = self.config, self.plan
        sampler = self.loader.batch_sampler
        while self.steps_done < plan.steps:
            if self._should_stop():
                return False
            epoch, offset = divmod(self.steps_done, plan.steps_per_epoch)
            sampler.steps = plan.steps_per_epoch - offset  # the rest of this epoch after a resume
            self.private_model.train()
            with BatchMemoryManager(data_loader=self.loader, max_physical_batch_size=config.physical_batch_size,
                                    optimizer=self.optimizer) as memory_safe_loader:
                for images, labels in memory_safe_loader:
                    if len(labels):
                        inputs = images if self.trained is not self.model else images.float() / 255
                        copies = config.augment_multiplicity
                        if copies > 1:
                            inputs = augmented_copies(inputs, copies, self.augment_generator)
                            labels = labels.repeat_interleave(copies)
                        loss = F.cross_entropy(self.private_model(inputs), labels)
                        self.optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        if copies > 1:
                            average_over_copies(self.trained, copies)
                        self.optimizer.step()
                        if self.optimizer._is_last_step_skipped:
                            continue  # a physical part of a logical batch: the step comes with the last part
                        self.update_ema()
                        progress.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
                    self.steps_done += 1
                    progress.update(1)
                    if self._should_stop():
                        return False
                    if config.checkpoint_every and self.steps_done % config.checkpoint_every == 0:
                        self.save()
            sampler.steps = plan.steps_per_epoch
            if self.steps_done < plan.steps:
                self.save()  # end of an epoch
        return True

    def _should_stop(self) -> bool:
        stop_after = self.config.stop_after
        if stop_after is None or self.steps_done < stop_after:
            return False
        logger.info("stopped after DP-SGD step %d as requested; continue with --resume", self.steps_done)
        return True


def _check_settings(config: TeacherTrainConfig, train: ImageData) -> None:
    from .privacy.accounting import validate_delta, validate_epsilon

    validate_epsilon(config.epsilon)
    validate_delta(config.delta, len(train))
    if not (config.max_grad_norm > 0):
        raise ValueError(f"max_grad_norm must be > 0, got {config.max_grad_norm}")
    for name in ("epochs", "batch_size", "physical_batch_size"):
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not isinstance(config.checkpoint_every, int) or config.checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be an integer >= 0, got {config.checkpoint_every!r}")
    if config.frontend not in ("pixels", "scatter"):
        raise ValueError(f"frontend must be 'pixels' or 'scatter', got {config.frontend!r}")
    if config.optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {config.optimizer!r}")
    if not isinstance(config.augment_multiplicity, int) or config.augment_multiplicity < 1:
        raise ValueError(f"augment_multiplicity must be an integer >= 1 (1: no augmentation), "
                         f"got {config.augment_multiplicity!r}")
    if config.frontend == "scatter" and (config.augment_multiplicity > 1 or config.weight_standardization):
        raise ValueError("augment_multiplicity > 1 and weight_standardization apply to the pixels front end only: the "
                         "scattering features are computed once and have no convolution to standardise. Leave them "
                         "at 1 and off, or use --frontend pixels; got "
                         f"augment_multiplicity={config.augment_multiplicity}, "
                         f"weight_standardization={config.weight_standardization}")
    if config.hidden < (1 if config.frontend == "pixels" else 0):
        raise ValueError(f"hidden must be >= 1 with frontend {config.frontend!r} (0 is allowed only with 'scatter'), "
                         f"got {config.hidden}")
    validate_head(config)


def train_teacher_dp(config: TeacherTrainConfig, train: ImageData, test: ImageData | None = None) -> LoadedTeacher | None:
    """Train a teacher with DP-SGD (Opacus): Poisson sampling, per-example clipping, Gaussian noise.

    The noise multiplier is calibrated before training so that all planned steps are
    (epsilon, delta)-DP under replace-one by dp_accounting's PLD accountant, and the spend is
    written to the ledger, keyed by the dataset fingerprint, before the first step. Returns None
    when `stop_after` stopped the training; `resume` continues it (see the module docstring).
    """
    from tqdm.auto import tqdm

    from .privacy.accounting import POISSON_GAUSSIAN, PrivacyEvent

    check_teacher_train_options(config)
    _check_settings(config, train)
    out = Path(config.out)
    settings = _settings(config, train)
    _restore_interrupted_swap(out)
    run_id, noise_multiplier = _start(config, settings)
    plan = _plan(config, len(train), noise_multiplier)
    _charge_once(config, train, run_id, plan, settings)

    training = _Training(config, train, plan)
    if config.resume and training.load():
        logger.info("resuming the DP training in %s at step %d of %d", out, training.steps_done, plan.steps)
    else:
        training.save()  # pins the generator states, so that a restart draws the same batches and noise
    # Opacus's hooks warn on every step that the input needs no gradient, which is expected here.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    progress = tqdm(total=plan.steps, initial=training.steps_done, desc="dp-sgd teacher", unit="step")
    finished = training.run(progress)
    progress.close()
    if not finished:
        return None
    training.save(final=True)
    event = PrivacyEvent(POISSON_GAUSSIAN, plan.noise_multiplier, plan.steps, plan.sample_rate)
    return _finish(config, train, test, training, event, run_id)


def _finish(config: TeacherTrainConfig, train: ImageData, test: ImageData | None, training: _Training, event,
            run_id: str) -> LoadedTeacher:
    from .privacy.accounting import accountant_versions, add_remove_epsilons, pld_epsilon

    model = training.model
    plan = training.plan
    channels = train.shape[0]
    if config.ema_decay:
        model.load_state_dict(training.ema)
    model.eval()
    opacus_epsilon = training.engine.get_epsilon(config.delta)
    accuracy = evaluate_accuracy(model, test) if test is not None else None
    if accuracy is not None:
        logger.info("DP teacher accuracy on the real test split: %.2f%% (evaluation on private data)", accuracy)
    dp_facts = {
        "source": "synthgen",
        "unit": "example",
        "neighbouring_relation": "replace-one",
        "epsilon": pld_epsilon([event], config.delta),
        "delta": config.delta,
        "accountant": {"name": "pld", "library": "dp_accounting", "version": accountant_versions()["dp_accounting"]},
        "add_remove_epsilon": add_remove_epsilons([event], config.delta),
        "opacus_prv_add_remove_epsilon": opacus_epsilon,
        "mechanism": "dp-sgd",
        "noise_multiplier": plan.noise_multiplier,
        "sampling_rate": plan.sample_rate,
        "steps": plan.steps,
        "epochs": config.epochs,
        "expected_batch_size": config.batch_size,
        "max_grad_norm": config.max_grad_norm,
        "optimizer": config.optimizer,
        "frontend": config.frontend,
        "augment_multiplicity": config.augment_multiplicity,
        "weight_standardization": config.weight_standardization,
        "head": config.head,
        "learning_rate": config.lr,
        "ema_decay": config.ema_decay,
        "events": [event.to_dict()],
        "ledger_run_id": run_id,
        "hyperparameter_note": "hyperparameters were set without looking at the private data's accuracy; any "
                               "tuning on it by the user is not accounted",
    }
    meta = TeacherMeta(
        input_shape=list(train.shape), class_names=list(train.class_names), mean=[0.0] * channels, std=[1.0] * channels,
        format="synthgen", dataset_fingerprint=train.fingerprint, ledger_fingerprint=train.ledger_fingerprint,
        num_examples=len(train), test_accuracy=accuracy,
        training={k: v for k, v in asdict(config).items() if k not in _OPERATIONAL_SETTINGS}, dp=dp_facts,
    )
    save_teacher(model, meta, config.out)  # replaces the whole folder, the private checkpoint included
    return LoadedTeacher(model, meta, fingerprint_state(model.state_dict()))
