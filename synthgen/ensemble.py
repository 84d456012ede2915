"""Teacher ensembles on disjoint shards: the example-level path that never touches the data again.

The private training set is split into K disjoint shards by a plan that depends only on the
example positions, K and a seed, never on the examples' contents. Replacing the example at one
position therefore changes the data of exactly one shard, hence of one teacher, and everything
aggregated over the K teachers has a sensitivity bounded by one teacher's contribution. This
is the partition of PATE (Papernot et al. 2017, 2018).

The K teachers are one stacked model. Their parameters are stacked along a leading axis
(``torch.func.stack_module_state``), and a ``vmap`` over ``functional_call`` runs them together.
In training each teacher gets a batch from its own shard; in queries all get the same images. The ensemble is saved as one folder:

- ``config.json``: the member architecture (a ``Classifier`` config);
- ``ensemble.safetensors``: the stacked weights, leading dimension K;
- ``shard_plan.json``: the plan (K, seed, dataset fingerprint and size, salt), private;
- ``synthgen_ensemble.json``: teacher metadata and the plan's fingerprint.

An ensemble of K teachers that the user trained elsewhere can be assembled into the same
format; synthgen cannot check that their training sets were disjoint, so the plan then records
the disjointness as the user's statement.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ._io import atomic_directory, atomic_write_json, check_output_folder
from .config import THREADS_FIX, check_int_option
from .ensemble_cli import EnsembleTrainConfig
from .data import ImageData
from .teacher import TeacherError, TeacherMeta, fingerprint_state

logger = logging.getLogger(__name__)

ENSEMBLE_META_FILE = "synthgen_ensemble.json"
PLAN_FILE = "shard_plan.json"
WEIGHTS_FILE = "ensemble.safetensors"
PLAN_SCHEME = "synthgen-shard-plan/1"
SYNTHGEN_PARTITION = "synthgen partition"
USER_STATEMENT = "user statement"
MIN_TEACHERS = 2

# Public input normalisation of every member: a statistic of the private data would be one more
# output to account for, and a constant costs nothing.
_PUBLIC_MEAN = 0.5
_PUBLIC_STD = 0.5

# Upper bound on the floats of one stacked activation tensor (16 MiB); queries and training
# split the teachers into chunks below it. On 2 shared CPU cores, chunks whose activations
# outgrow the cache ran slower per teacher than a loop over separate modules (measured with
# scripts/benchmark_ensemble.py), so the bound is small.
_CHUNK_FLOATS = 4 * 1024 * 1024


class EnsembleError(TeacherError):
    """Raised for an ensemble that cannot be trained, assembled or loaded as requested."""


# ---------------------------------------------------------------- shard plan


@dataclass(frozen=True)
class ShardPlan:
    """A partition of example positions 0..n-1 into K disjoint shards.

    The assignment is a uniformly random permutation of the positions, drawn from `seed`,
    dealt round-robin, so shard sizes differ by at most one. It is a function of (n, K, seed)
    only. The fingerprint hashes the plan with a random salt kept in the private plan file, so
    that releasing it reveals neither n nor the dataset fingerprint.
    """

    num_examples: int
    num_shards: int
    seed: int
    dataset_fingerprint: str
    salt: str
    disjointness: str = SYNTHGEN_PARTITION  # or USER_STATEMENT for an assembled ensemble
    scheme: str = PLAN_SCHEME

    @classmethod
    def create(cls, num_examples: int, num_shards: int, seed: int, dataset_fingerprint: str) -> "ShardPlan":
        check_num_teachers(num_shards, num_examples)
        return cls(num_examples, num_shards, seed, dataset_fingerprint, secrets.token_hex(16))

    def assignment(self) -> np.ndarray:
        """Return the shard of every example position, shape (n,), values 0..K-1."""
        order = np.random.default_rng(self.seed).permutation(self.num_examples)
        shards = np.empty(self.num_examples, dtype=np.int64)
        shards[order] = np.arange(self.num_examples) % self.num_shards
        return shards

    def shard_indices(self) -> list[np.ndarray]:
        shards = self.assignment()
        return [np.flatnonzero(shards == k) for k in range(self.num_shards)]

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode())
        if self.disjointness == SYNTHGEN_PARTITION:
            digest.update(self.assignment().astype("<i8").tobytes())
        return "sha256:" + digest.hexdigest()

    def to_dict(self) -> dict:
        return {**asdict(self), "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, data: dict) -> "ShardPlan":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        plan = cls(**known)
        if "fingerprint" in data and data["fingerprint"] != plan.fingerprint:
            raise EnsembleError("the shard plan does not match its recorded fingerprint; the ensemble folder was altered")
        return plan


def check_num_teachers(num_teachers, num_examples: int | None = None) -> int:
    """Raise EnsembleError unless 2 <= K (<= n when n is known)."""
    if isinstance(num_teachers, bool) or not isinstance(num_teachers, int) or num_teachers < MIN_TEACHERS:
        raise EnsembleError(
            f"an example-level ensemble needs --num-teachers K >= {MIN_TEACHERS} disjoint shards, got {num_teachers!r}; "
            "one teacher trained on all the data can only give a teacher-level guarantee"
        )
    if num_examples is not None and num_teachers > num_examples:
        raise EnsembleError(
            f"--num-teachers {num_teachers} is larger than the training set ({num_examples} examples): every shard "
            f"needs at least one example; pass --num-teachers <= {num_examples}"
        )
    return num_teachers


# ---------------------------------------------------------------- the stacked model


def _member_config(image_shape, num_classes: int, class_names: list[str], width: int, hidden: int) -> dict:
    channels, height, _ = image_shape
    return {"image_size": height, "channels": channels, "num_classes": num_classes, "width": width, "hidden": hidden,
            "norm": "none", "mean": [_PUBLIC_MEAN] * channels, "std": [_PUBLIC_STD] * channels,
            "class_names": list(class_names)}


def _build_member(config: dict) -> nn.Module:
    from .models import Classifier

    values = dict(config)
    values["mean"] = tuple(values["mean"])
    values["std"] = tuple(values["std"])
    return Classifier(**values)


class StackedEnsemble(nn.Module):
    """K classifiers of one architecture whose parameters and buffers are stacked along a leading axis.

    Calls take pixel images (B, C, H, W) in [0, 1], shared by all teachers, and return logits
    (K, B, classes). `per_teacher` takes a different batch per teacher, (K, b, C, H, W).
    """

    def __init__(self, member_config: dict, stacked: dict[str, torch.Tensor],
                 stacked_buffers: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.member_config = dict(member_config)
        base = _build_member(self.member_config)
        shapes = {name: tuple(p.shape) for name, p in base.named_parameters()}
        buffer_shapes = {name: tuple(b.shape) for name, b in base.named_buffers()}
        self.names = list(shapes)
        self.buffer_names = list(buffer_shapes)
        if stacked_buffers is None:
            # Members built from one config share its normalisation buffers.
            count = int(next(iter(stacked.values())).shape[0]) if stacked else 0
            stacked_buffers = {name: b.unsqueeze(0).expand(count, *b.shape).clone() for name, b in base.named_buffers()}
        for tensors, expected, kind in ((stacked, shapes, "weights"), (stacked_buffers, buffer_shapes, "buffers")):
            mismatched = sorted(set(tensors) ^ set(expected))
            if mismatched:
                raise EnsembleError(f"stacked {kind} do not match the member architecture: {', '.join(mismatched)}")
        sizes = {int(t.shape[0]) for t in list(stacked.values()) + list(stacked_buffers.values())}
        if len(sizes) != 1:
            raise EnsembleError(f"stacked weights disagree on the number of teachers: {sorted(sizes)}")
        self.num_teachers = sizes.pop()
        for name, tensor in list(stacked.items()) + list(stacked_buffers.items()):
            expected = shapes.get(name, buffer_shapes.get(name))
            if tuple(tensor.shape[1:]) != expected:
                raise EnsembleError(f"stacked tensor {name} has shape {tuple(tensor.shape)}, expected (K, *{expected})")
        self.weights = nn.ParameterList([nn.Parameter(stacked[name].detach().clone().float()) for name in self.names])
        for index, name in enumerate(self.buffer_names):
            self.register_buffer(f"stacked_buffer_{index}", stacked_buffers[name].detach().clone().float())
        # The base module only describes the architecture; its tensors live on the meta device.
        self._base = [base.to("meta")]

    @classmethod
    def initialise(cls, member_config: dict, num_teachers: int, seed: int) -> "StackedEnsemble":
        from torch.func import stack_module_state

        torch.manual_seed(seed)
        members = [_build_member(member_config) for _ in range(num_teachers)]
        params, buffers = stack_module_state(members)
        return cls(member_config, params, buffers)

    @classmethod
    def from_members(cls, member_config: dict, members: list[nn.Module]) -> "StackedEnsemble":
        from torch.func import stack_module_state

        params, buffers = stack_module_state(members)
        return cls(member_config, {k: v.detach() for k, v in params.items()}, buffers)

    def _stacked_buffers(self) -> list[torch.Tensor]:
        return [getattr(self, f"stacked_buffer_{i}") for i in range(len(self.buffer_names))]

    def stacked_state(self) -> dict[str, torch.Tensor]:
        """Return the stacked parameters and buffers (buffers prefixed with 'buffer:') for saving."""
        state = {name: weight for name, weight in zip(self.names, self.weights)}
        state.update({f"buffer:{name}": buffer for name, buffer in zip(self.buffer_names, self._stacked_buffers())})
        return state

    @classmethod
    def from_stacked_state(cls, member_config: dict, state: dict[str, torch.Tensor]) -> "StackedEnsemble":
        params = {k: v for k, v in state.items() if not k.startswith("buffer:")}
        buffers = {k.removeprefix("buffer:"): v for k, v in state.items() if k.startswith("buffer:")}
        return cls(member_config, params, buffers)

    def member(self, index: int) -> nn.Module:
        """Return teacher `index` as a separate module (tests and the Python-loop baseline)."""
        module = _build_member(self.member_config)
        module.load_state_dict({name: weight[index].detach().clone() for name, weight in zip(self.names, self.weights)},
                               strict=True)
        for name, buffer in zip(self.buffer_names, self._stacked_buffers()):
            owner, _, attribute = name.rpartition(".")
            getattr(module.get_submodule(owner) if owner else module, attribute).copy_(buffer[index])
        return module.eval()

    def _functional(self, params: dict, buffers: dict, images: torch.Tensor) -> torch.Tensor:
        from torch.func import functional_call

        return functional_call(self._base[0], (params, buffers), (images,))

    def _slices(self, start: int, stop: int) -> tuple[dict, dict]:
        params = {name: weight[start:stop] for name, weight in zip(self.names, self.weights)}
        buffers = {name: buffer[start:stop] for name, buffer in zip(self.buffer_names, self._stacked_buffers())}
        return params, buffers

    def chunk_size(self, batch: int) -> int:
        """Return how many teachers one vmap call runs on `batch` images within the activation bound."""
        per_teacher = batch * self.member_config["width"] * self.member_config["image_size"] ** 2
        return max(1, min(self.num_teachers, _CHUNK_FLOATS // max(per_teacher, 1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from torch.func import vmap

        outputs = []
        chunk = self.chunk_size(images.shape[0])
        for start in range(0, self.num_teachers, chunk):
            params, buffers = self._slices(start, start + chunk)
            outputs.append(vmap(self._functional, in_dims=(0, 0, None))(params, buffers, images))
        return torch.cat(outputs)  # (K, B, classes)

    def per_teacher(self, images: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Run teachers start..stop-1 each on its own batch: images (k, b, C, H, W) -> logits (k, b, classes)."""
        from torch.func import vmap

        stop = self.num_teachers if stop is None else stop
        params, buffers = self._slices(start, stop)
        return vmap(self._functional, in_dims=(0, 0, 0))(params, buffers, images)


class StackedTeacherBank(nn.Module):
    """The query interface of an ensemble: counts every example sent through a forward pass.

    Returns logits (K, B, classes) for pixel images (B, C, H, W) in [0, 1], like TeacherBank.
    """

    def __init__(self, ensemble: StackedEnsemble):
        super().__init__()
        self.ensemble = ensemble
        self.num_teachers = ensemble.num_teachers
        self.forward_examples = 0
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.forward_examples += images.shape[0]
        return self.ensemble(images)


@dataclass
class EnsembleTeacher:
    """A loaded ensemble, with the fields transcription reads from a LoadedTeacher."""

    ensemble: StackedEnsemble
    meta: TeacherMeta
    fingerprint: str
    plan: ShardPlan
    member_fingerprints: list[str] = field(default_factory=list)

    @property
    def num_teachers(self) -> int:
        return self.ensemble.num_teachers

    def bank(self) -> StackedTeacherBank:
        return StackedTeacherBank(self.ensemble)

    def privacy_facts(self) -> dict:
        """Return the public facts of the ensemble for the privacy report (no data size or data fingerprint)."""
        facts = {
            "num_teachers": self.num_teachers,
            "shard_plan_fingerprint": self.plan.fingerprint,
            "shard_plan_scheme": self.plan.scheme,
            "disjointness": self.plan.disjointness,
        }
        if self.plan.disjointness == SYNTHGEN_PARTITION:
            facts["partition"] = ("synthgen split the private training set into disjoint shards by a random "
                                  "permutation of example positions (independent of the examples' contents) and "
                                  "trained each teacher on its own shard only")
        else:
            facts["partition"] = ("not verified by synthgen: the user states that the teachers were trained on "
                                  "disjoint parts of the private data")
        return facts


def is_ensemble(path: str | os.PathLike) -> bool:
    return (Path(path) / ENSEMBLE_META_FILE).is_file()


def privacy_unit(teacher) -> str:
    """Return the privacy unit a teacher supports: 'example' or 'teacher'.

    Only an ensemble whose plan has >= 2 disjoint shards, one per teacher, is example-level:
    replacing one example then changes one teacher. Anything else, in particular one teacher
    trained on all the data, can change arbitrarily with one example and is teacher-level.
    """
    from .privacy.ledger import EXAMPLE_UNIT, TEACHER_UNIT

    if not isinstance(teacher, EnsembleTeacher):
        return TEACHER_UNIT
    plan = teacher.plan
    if plan.num_shards >= MIN_TEACHERS and plan.num_shards == teacher.num_teachers and plan.num_examples >= plan.num_shards:
        return EXAMPLE_UNIT
    return TEACHER_UNIT


# ---------------------------------------------------------------- training


def _balanced_batches(indices: list[np.ndarray], batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """Return (steps, K, batch) example positions for one epoch, each teacher drawing from its own shard."""
    smallest = min(len(shard) for shard in indices)
    batch = min(batch_size, smallest)
    steps = max(smallest // batch, 1)
    per_teacher = [rng.permutation(shard)[: steps * batch].reshape(steps, batch) for shard in indices]
    return np.stack(per_teacher, axis=1)


def train_ensemble(config: EnsembleTrainConfig, train: ImageData, test: ImageData | None = None) -> EnsembleTeacher:
    """Train K teachers, each on its own shard, as one stacked model, and save the ensemble."""
    from tqdm.auto import tqdm

    check_num_teachers(config.num_teachers, len(train))
    check_output_folder(config.out, (ENSEMBLE_META_FILE,), "teacher ensemble", config.overwrite)
    for name in ("epochs", "batch_size", "width", "hidden"):
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            raise EnsembleError(f"{name} must be an integer >= 1, got {value!r}")
    if not (config.lr > 0 and math.isfinite(config.lr)):
        raise EnsembleError(f"lr must be a finite number > 0, got {config.lr!r}")
    if config.threads is not None:
        check_int_option("--threads", config.threads, 1, THREADS_FIX)
        torch.set_num_threads(config.threads)

    plan = ShardPlan.create(len(train), config.num_teachers, config.seed, train.fingerprint)
    shards = plan.shard_indices()
    member_config = _member_config(train.shape, len(train.class_names), train.class_names, config.width, config.hidden)
    ensemble = StackedEnsemble.initialise(member_config, config.num_teachers, config.seed)
    ensemble.train()
    optimizer = torch.optim.Adam(ensemble.parameters(), lr=config.lr)
    images = torch.from_numpy(train.images)
    labels = torch.from_numpy(train.labels)
    rng = np.random.default_rng(config.seed)
    smallest = min(len(s) for s in shards)
    steps_per_epoch = max(smallest // min(config.batch_size, smallest), 1)
    logger.info("training %d teachers on disjoint shards of %d-%d private examples for %d epochs (stacked)",
                config.num_teachers, smallest, max(len(s) for s in shards), config.epochs)
    progress = tqdm(total=config.epochs * steps_per_epoch, desc="teachers", unit="step")
    batch = min(config.batch_size, smallest)
    chunk = ensemble.chunk_size(batch * 4)  # the backward pass keeps several activations per layer
    for epoch in range(config.epochs):
        for positions in _balanced_batches(shards, config.batch_size, rng):  # (K, batch)
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for start in range(0, config.num_teachers, chunk):
                part = torch.from_numpy(positions[start:start + chunk])
                logits = ensemble.per_teacher(images[part].float() / 255, start, start + len(part))
                # Sum over teachers of each one's mean loss: teacher k's gradient is its own loss's gradient.
                loss = F.cross_entropy(logits.flatten(0, 1), labels[part].flatten(), reduction="none")
                loss = loss.view(len(part), -1).mean(dim=1).sum()
                loss.backward()
                total += loss.item()
            optimizer.step()  # Adam is elementwise, so this equals K separate Adam optimisers
            progress.update(1)
            progress.set_postfix(epoch=epoch + 1, loss=f"{total / config.num_teachers:.3f}")
    progress.close()
    ensemble.eval()

    accuracy = None
    if test is not None:
        accuracy = ensemble_accuracy(ensemble, test)
        logger.info("teachers on the real test split: mean accuracy %.2f%%, plurality vote %.2f%% (evaluation on "
                    "private data)", accuracy["mean_teacher"], accuracy["vote"])
    meta = TeacherMeta(
        input_shape=list(train.shape), class_names=list(train.class_names), mean=[0.0] * train.shape[0],
        std=[1.0] * train.shape[0], format="synthgen-ensemble", dataset_fingerprint=train.fingerprint,
        ledger_fingerprint=train.ledger_fingerprint, num_examples=len(train), test_accuracy=None if accuracy is None else accuracy["vote"],
        training={**{k: v for k, v in asdict(config).items() if k not in ("out", "data", "overwrite")},
                  "test_accuracy": accuracy},
    )
    teacher = EnsembleTeacher(ensemble, meta, fingerprint_state(ensemble.stacked_state()), plan)
    save_ensemble(teacher, config.out)
    return teacher


def ensemble_accuracy(ensemble: StackedEnsemble, data: ImageData, batch_size: int = 500) -> dict:
    """Return the mean teacher accuracy and the plurality-vote accuracy in percent on `data`."""
    correct = torch.zeros(ensemble.num_teachers)
    vote_correct = 0
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            images = torch.from_numpy(data.images[start:start + batch_size]).float() / 255
            labels = torch.from_numpy(data.labels[start:start + batch_size])
            predictions = ensemble(images).argmax(dim=2)  # (K, B)
            correct += (predictions == labels).sum(dim=1).float()
            votes = F.one_hot(predictions, ensemble.member_config["num_classes"]).sum(dim=0)  # (B, classes)
            vote_correct += int((votes.argmax(dim=1) == labels).sum())
    per_teacher = 100.0 * correct / max(len(data), 1)
    return {"mean_teacher": float(per_teacher.mean()), "min_teacher": float(per_teacher.min()),
            "vote": 100.0 * vote_correct / max(len(data), 1)}


# ---------------------------------------------------------------- save and load


def save_ensemble(teacher: EnsembleTeacher, out: str | os.PathLike) -> Path:
    """Save an ensemble as one folder, atomically."""
    from safetensors.torch import save_file

    out = Path(out)
    with atomic_directory(out) as tmp:
        atomic_write_json(tmp / "config.json", teacher.ensemble.member_config)
        save_file({name: w.detach().contiguous() for name, w in teacher.ensemble.stacked_state().items()},
                  str(tmp / WEIGHTS_FILE))
        atomic_write_json(tmp / PLAN_FILE, teacher.plan.to_dict())
        atomic_write_json(tmp / ENSEMBLE_META_FILE, {
            "num_teachers": teacher.num_teachers,
            "shard_plan_fingerprint": teacher.plan.fingerprint,
            "member_fingerprints": teacher.member_fingerprints,
            "teacher_meta": teacher.meta.to_dict(),
        })
    logger.info("ensemble of %d teachers saved to %s (shard plan %s)", teacher.num_teachers, out, teacher.plan.fingerprint)
    return out


def load_ensemble(path: str | os.PathLike, data: ImageData | None = None) -> EnsembleTeacher:
    """Load an ensemble folder and check its plan; with `data`, check that it is the plan's dataset."""
    from safetensors.torch import load_file

    path = Path(path)
    if not is_ensemble(path):
        raise EnsembleError(f"{path} is not a teacher ensemble (no {ENSEMBLE_META_FILE}); train one with "
                            "'synthgen train-teachers --num-teachers K'")
    record = json.loads((path / ENSEMBLE_META_FILE).read_text())
    plan = ShardPlan.from_dict(json.loads((path / PLAN_FILE).read_text()))
    meta = TeacherMeta.from_dict(record["teacher_meta"])
    if plan.dataset_fingerprint != meta.dataset_fingerprint or plan.num_examples != meta.num_examples:
        raise EnsembleError(f"the shard plan of {path} is for another dataset than its teachers' metadata")
    if record.get("shard_plan_fingerprint") != plan.fingerprint:
        raise EnsembleError(f"{path}: the metadata names another shard plan than {PLAN_FILE}; the folder was altered")
    member_config = json.loads((path / "config.json").read_text())
    ensemble = StackedEnsemble.from_stacked_state(member_config, load_file(str(path / WEIGHTS_FILE))).eval()
    teacher = EnsembleTeacher(ensemble, meta, fingerprint_state(ensemble.stacked_state()), plan,
                              record.get("member_fingerprints", []))
    check_num_teachers(teacher.num_teachers)
    if teacher.num_teachers != plan.num_shards:
        raise EnsembleError(f"{path} contains {teacher.num_teachers} teachers but its shard plan has {plan.num_shards} shards; "
                            "the folder was altered: train or assemble the ensemble again")
    if data is not None and data.fingerprint != plan.dataset_fingerprint:
        raise EnsembleError(f"the private data is not the dataset the ensemble {path} was trained on (fingerprints "
                            "differ); pass the ensemble's own training data")
    return teacher


def assemble_ensemble(member_paths: list[str], data: ImageData, out: str | os.PathLike,
                      overwrite: bool = False) -> EnsembleTeacher:
    """Build an ensemble from K synthgen teachers the user trained on disjoint parts of `data`.

    synthgen cannot see how the members were trained, so the ensemble's plan records their
    disjointness as the user's statement, and the privacy report says so. Members must be
    synthgen teacher folders of one architecture, so that they can be stacked.
    """
    from .models import Classifier
    from .teacher import check_teacher_fits, load_teacher

    check_num_teachers(len(member_paths), len(data))
    check_output_folder(out, (ENSEMBLE_META_FILE,), "teacher ensemble", overwrite)
    loaded = [load_teacher(path) for path in member_paths]
    first = loaded[0]
    for path, teacher in zip(member_paths, loaded):
        if list(teacher.meta.input_shape) != list(first.meta.input_shape):
            raise EnsembleError(f"ensemble members disagree on the input shape: {member_paths[0]} takes "
                                f"{tuple(first.meta.input_shape)} but {path} takes {tuple(teacher.meta.input_shape)}")
        if list(teacher.meta.class_names) != list(first.meta.class_names):
            raise EnsembleError(f"ensemble members disagree on the classes: {member_paths[0]} predicts "
                                f"{first.meta.class_names} but {path} predicts {teacher.meta.class_names}")
        architecture = {k: v for k, v in teacher.module.config.items() if k not in ("mean", "std") and not k.startswith("_")}
        reference = {k: v for k, v in first.module.config.items() if k not in ("mean", "std") and not k.startswith("_")}
        if not isinstance(teacher.module, Classifier) or architecture != reference:
            raise EnsembleError(f"ensemble member {path} has another architecture than {member_paths[0]}; members "
                                "must be synthgen teachers with the same width, hidden size and normalisation")
        if any(m != 0.0 for m in teacher.meta.mean) or any(s != 1.0 for s in teacher.meta.std):
            raise EnsembleError(f"ensemble member {path} expects normalisation outside the model; retrain it with "
                                "'synthgen train-teacher'")
        check_teacher_fits(teacher, data)
    if len({t.fingerprint for t in loaded}) != len(loaded):
        raise EnsembleError("the same teacher appears twice among the ensemble members; give K distinct teachers")

    plan = ShardPlan(len(data), len(loaded), 0, data.fingerprint, secrets.token_hex(16), disjointness=USER_STATEMENT)
    channels = first.meta.input_shape[0]
    meta = TeacherMeta(input_shape=list(first.meta.input_shape), class_names=list(first.meta.class_names),
                       mean=[0.0] * channels, std=[1.0] * channels, format="synthgen-ensemble",
                       dataset_fingerprint=data.fingerprint, ledger_fingerprint=data.ledger_fingerprint,
                       num_examples=len(data), training={"source": USER_STATEMENT})
    member_config = {k: first.module.config[k] for k in ("image_size", "channels", "num_classes", "width", "hidden",
                                                          "norm", "mean", "std", "class_names")}
    member_config["mean"], member_config["std"] = list(member_config["mean"]), list(member_config["std"])
    stacked = StackedEnsemble.from_members(member_config, [t.module for t in loaded]).eval()
    teacher = EnsembleTeacher(stacked, meta, fingerprint_state(stacked.stacked_state()), plan,
                              [t.fingerprint for t in loaded])
    save_ensemble(teacher, out)
    return load_ensemble(out)
