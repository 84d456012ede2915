"""The DP labelling mechanism: the only code in synthgen that calls a teacher.

Each call takes a batch of synthetic images and the student's prediction on them (a public
prior, since the student is itself a function of earlier DP answers), queries the teachers
once per image, adds calibrated noise, charges the ledger and only then returns the answer.

Modes:

- ``gaussian`` (data-sensitive): on the student's top-k classes, each teacher's probability
  vector is scaled to L2 norm C; the mean over the K teachers gets N(0, (m * 2C / K)^2) noise
  per coordinate. 2C / K is the L2 sensitivity of the mean under replace-one: swapping one
  teacher (teacher-level unit, K = 1) or one example, which changes one shard's teacher
  (example-level unit), moves one vector of norm C to another of norm C.
- ``noisy-label`` (label-sensitive), K = 1: randomized response with the student's prediction
  as prior (RRWithPrior, Ghazi et al. 2021, Algorithm 2), eps0-DP per call.
- ``gnmax`` (label-sensitive), K >= 2: each teacher votes for its most likely class among the
  student's top-k; the vote histogram gets N(0, (m * sqrt(2))^2) noise per class and the noisy
  argmax is released (GNMax, Papernot et al. 2018). sqrt(2) is the L2 sensitivity of the
  histogram under replace-one: one example changes one teacher, which moves one vote from one
  class to another. Releasing only the argmax is post-processing of the noisy histogram.
- ``none``: no noise and no accounting. For measuring the engine itself; never private.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch.nn import functional as F

from .accounting import GAUSSIAN, RANDOMIZED_RESPONSE, PrivacyEvent

MODES = ("gaussian", "noisy-label", "gnmax", "none")


class TeacherEnsemble(Protocol):
    """K teachers answering together: pixel images (B, C, H, W) -> probabilities (K, B, classes)."""

    num_teachers: int

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


@dataclass
class NoisyAnswer:
    """One batch of DP labels."""

    targets: torch.Tensor  # (B, classes) soft target distributions, zero outside the answered classes
    classes: torch.Tensor  # (B, k) class indices the answer covers (the student's top-k)
    values: torch.Tensor  # (B, k) the released noisy vector (gaussian) or one-hot label (noisy-label)

    def to_bytes(self) -> bytes:
        from safetensors.torch import save

        return save({"targets": self.targets.cpu().contiguous(), "classes": self.classes.cpu().contiguous(),
                     "values": self.values.cpu().contiguous()})

    @classmethod
    def from_bytes(cls, payload: bytes, device: torch.device | str = "cpu") -> "NoisyAnswer":
        from safetensors.torch import load

        tensors = {name: tensor.to(device) for name, tensor in load(payload).items()}
        return cls(tensors["targets"], tensors["classes"], tensors["values"])


@dataclass
class MechanismConfig:
    mode: str = "gaussian"
    top_k: int = 3
    clip_norm: float = 1.0
    temperature: float = 1.0
    noise_multiplier: float = 0.0  # gaussian and gnmax: noise std / L2 sensitivity
    eps0: float = 0.0  # noisy-label: pure-DP parameter of one call
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mechanism must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if not (self.clip_norm > 0 and math.isfinite(self.clip_norm)):
            raise ValueError(f"clip_norm must be a positive number, got {self.clip_norm}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a positive number, got {self.temperature}")


def step_seed(secret: int, step: int) -> int:
    """Derive the noise seed of one step from the run's secret, so a replayed step draws the same noise."""
    digest = hashlib.sha256(f"{secret}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class LabelMechanism:
    """Holds the teachers; `annotate` is the only way to get anything out of them."""

    def __init__(
        self,
        teachers: TeacherEnsemble,
        config: MechanismConfig,
        charge: Callable[[int, PrivacyEvent, NoisyAnswer], None],
        noise_secret: int,
    ):
        if config.mode == "noisy-label" and teachers.num_teachers != 1:
            raise ValueError("the noisy-label mode with randomized response needs exactly one teacher")
        if config.mode == "gnmax" and teachers.num_teachers < 2:
            raise ValueError(f"the gnmax mode needs an ensemble of >= 2 teachers, got {teachers.num_teachers}")
        if config.mode in ("gaussian", "gnmax") and config.noise_multiplier <= 0:
            raise ValueError(f"{config.mode} mode needs a calibrated noise_multiplier > 0, got {config.noise_multiplier}")
        if config.mode == "noisy-label" and config.eps0 <= 0:
            raise ValueError(f"noisy-label mode needs a calibrated eps0 > 0, got {config.eps0}")
        self.__teachers = teachers  # name-mangled: no other object is meant to reach the teachers
        self.config = config
        self._charge = charge
        self._secret = noise_secret
        self.num_teachers = teachers.num_teachers
        self.queries_answered = 0

    @property
    def sensitivity(self) -> float:
        """L2 sensitivity of one answer under replace-one: 2C / K (gaussian), sqrt(2) votes (gnmax)."""
        if self.config.mode == "gnmax":
            return math.sqrt(2.0)
        return 2.0 * self.config.clip_norm / self.num_teachers

    @property
    def noise_std(self) -> float:
        return self.config.noise_multiplier * self.sensitivity

    def event(self, count: int) -> PrivacyEvent | None:
        if self.config.mode in ("gaussian", "gnmax"):
            return PrivacyEvent(GAUSSIAN, self.config.noise_multiplier, count)
        if self.config.mode == "noisy-label":
            return PrivacyEvent(RANDOMIZED_RESPONSE, self.config.eps0, count)
        return None

    @torch.no_grad()
    def annotate(self, images: torch.Tensor, student_probs: torch.Tensor, step: int) -> NoisyAnswer:
        """Answer one batch: images (B, C, H, W) in [0, 1], student probabilities (B, classes)."""
        if images.shape[0] != student_probs.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {student_probs.shape[0]} student predictions")
        rng = torch.Generator().manual_seed(step_seed(self._secret, step))
        probs = self._teacher_probabilities(images)  # (K, B, classes)
        if self.config.mode == "noisy-label":
            answer = self._randomized_response(probs[0], student_probs, rng)
        elif self.config.mode == "gnmax":
            answer = self._gnmax(probs, student_probs, rng)
        else:
            answer = self._gaussian(probs, student_probs, rng)
        event = self.event(images.shape[0])
        # Charge before returning: the caller cannot see the answer unless the ledger has it.
        self._charge(step, event, answer)
        self.queries_answered += images.shape[0]
        return answer

    def _teacher_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.__teachers(images)  # (K, B, classes)
        return F.softmax(logits.float() / self.config.temperature, dim=-1)

    def _gaussian(self, probs: torch.Tensor, student_probs: torch.Tensor, rng: torch.Generator) -> NoisyAnswer:
        k = min(self.config.top_k, student_probs.shape[1])
        classes = student_probs.topk(k, dim=1).indices  # (B, k), from the student: costs nothing
        index = classes.unsqueeze(0).expand(probs.shape[0], -1, -1)
        selected = probs.gather(2, index)  # (K, B, k)
        # Scale every teacher's vector to norm C exactly (not only clip): the sensitivity bound
        # 2C / K then holds with equality for the worst pair, and the student always gets a signal.
        norms = selected.norm(dim=2, keepdim=True).clamp_min(1e-12)
        scaled = selected / norms * self.config.clip_norm
        mean = scaled.mean(dim=0)  # (B, k)
        if self.config.mode == "gaussian":
            noisy = mean + torch.randn(mean.shape, generator=rng).to(mean.device) * self.noise_std
        else:
            noisy = mean
        return NoisyAnswer(self._to_targets(noisy, classes, student_probs.shape[1]), classes, noisy)

    def _noisy_votes(self, probs: torch.Tensor, student_probs: torch.Tensor,
                     rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the student's top-k classes (B, k) and the noisy vote histogram over them (B, k)."""
        k = min(self.config.top_k, student_probs.shape[1])
        classes = student_probs.topk(k, dim=1).indices  # from the student: costs nothing
        index = classes.unsqueeze(0).expand(probs.shape[0], -1, -1)
        votes = probs.gather(2, index).argmax(dim=2)  # (K, B): each teacher's vote, a position in the top-k
        histogram = F.one_hot(votes, k).sum(dim=0).float()
        noisy = histogram + torch.randn(histogram.shape, generator=rng).to(histogram.device) * self.noise_std
        return classes, noisy

    def _gnmax(self, probs: torch.Tensor, student_probs: torch.Tensor, rng: torch.Generator) -> NoisyAnswer:
        classes, noisy = self._noisy_votes(probs, student_probs, rng)
        winner = noisy.argmax(dim=1)  # (B,)
        label = classes.gather(1, winner[:, None]).squeeze(1)
        values = F.one_hot(winner, classes.shape[1]).float()
        return NoisyAnswer(F.one_hot(label, student_probs.shape[1]).float(), classes, values)

    @torch.no_grad()
    def noisy_histogram(self, images: torch.Tensor, student_probs: torch.Tensor, step: int) -> torch.Tensor:
        """Answer one batch with the noisy vote histogram itself (gnmax mode), charged like `annotate`.

        The histogram is the quantity the accountant covers; `annotate` releases only its argmax.
        """
        if self.config.mode != "gnmax":
            raise ValueError("noisy_histogram is defined for the gnmax mode only")
        rng = torch.Generator().manual_seed(step_seed(self._secret, step))
        classes, noisy = self._noisy_votes(self._teacher_probabilities(images), student_probs, rng)
        answer = NoisyAnswer(torch.zeros_like(student_probs), classes, noisy)
        self._charge(step, self.event(images.shape[0]), answer)
        self.queries_answered += images.shape[0]
        return noisy

    @staticmethod
    def _to_targets(noisy: torch.Tensor, classes: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Post-process noisy vectors into distributions: clip at zero and normalise."""
        positive = noisy.clamp_min(0)
        total = positive.sum(dim=1, keepdim=True)
        uniform = torch.full_like(positive, 1.0 / positive.shape[1])
        weights = torch.where(total > 0, positive / total.clamp_min(1e-12), uniform)
        targets = torch.zeros(noisy.shape[0], num_classes, device=noisy.device)
        return targets.scatter(1, classes, weights)

    def _randomized_response(self, probs: torch.Tensor, student_probs: torch.Tensor, rng: torch.Generator) -> NoisyAnswer:
        eps0 = self.config.eps0
        num_classes = student_probs.shape[1]
        max_k = min(self.config.top_k, num_classes)
        order = student_probs.argsort(dim=1, descending=True)[:, :max_k]  # (B, max_k)
        # RRWithPrior: choose k per sample from the prior alone, maximising the chance of a
        # truthful answer, e^eps0 / (e^eps0 + k - 1) * (prior mass of the top k).
        mass = student_probs.gather(1, order).cumsum(dim=1)  # (B, max_k)
        device = student_probs.device
        ks = torch.arange(1, max_k + 1, dtype=torch.float64, device=device)
        log_keep = eps0 - torch.log(torch.exp(torch.tensor(eps0, dtype=torch.float64)) + ks - 1)
        score = mass.double().log() + log_keep
        k = score.argmax(dim=1) + 1  # (B,)
        label = probs.argmax(dim=1)  # (B,) the teacher's answer, private
        in_set = (order == label[:, None]) & (torch.arange(max_k, device=device)[None, :] < k[:, None])
        member = in_set.any(dim=1)
        keep_prob = math.exp(eps0) / (math.exp(eps0) + k.double() - 1)
        keep = torch.rand(len(label), generator=rng, dtype=torch.float64).to(device) < keep_prob
        # Otherwise draw uniformly from Y_k without the true label (if it is there) ...
        position_of_label = torch.where(member, in_set.double().argmax(dim=1), torch.full_like(k, -1))
        slots = torch.where(member, k - 1, k)  # how many labels the fallback draws from
        draw = (torch.rand(len(label), generator=rng, dtype=torch.float64).to(device) * slots.double()).long()
        draw = torch.minimum(draw, slots - 1).clamp_min(0)
        # ... skipping the true label's slot when it is in Y_k.
        draw = torch.where(member & (draw >= position_of_label), draw + 1, draw).clamp_max(max_k - 1)
        fallback = order.gather(1, draw[:, None]).squeeze(1)
        output = torch.where(member & keep, label, fallback)
        # With k = 1 both branches return the student's top class, independent of the teacher.
        output = torch.where(k == 1, order[:, 0], output)
        targets = F.one_hot(output, num_classes).float()
        values = (order == output[:, None]).float()
        return NoisyAnswer(targets, order, values)
