"""Data-parallel transcription over several processes with torch.distributed.

Launch with ``torchrun --nproc_per_node N -m synthgen transcribe ...`` or with
``accelerate launch --multi_gpu --num_processes N -m synthgen transcribe ...``: both start one
process per rank and set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. The backend
is NCCL when the run's device is CUDA and gloo otherwise.

Protocol of one run (rank 0 is the main process):

- ``--batch-size`` and ``--replay-batch`` are global: each rank generates and sends
  batch_size / world_size synthetic images per step, so the planned queries, the noise
  calibration and the ledger are the same as for one process with the same settings.
- Every rank starts from the same seed for the models, then draws its latents from its own
  seed. The noise secret is drawn once on rank 0 and broadcast. Each rank derives its own
  noise seed from it, so no two ranks add the same noise.
- Every rank queries the teacher on its own batch through its own ``LabelMechanism``. The
  answers of all ranks are gathered on rank 0, which charges the ledger once per step with the
  global number of queries and stores the joined answer. A broadcast after the charge keeps
  every rank from using its answer before the ledger has it.
- Gradients of the student and the generator are averaged over the ranks (all-reduce), and the
  generator's BatchNorm buffers are copied from rank 0 after every step, so all ranks keep the
  same models.
- Only rank 0 opens the ledger, writes checkpoints, metrics, the report and the artifacts.
  Checkpoints carry each rank's replay buffer and random state, so ``--resume`` continues on
  the same number of processes.
"""

from __future__ import annotations

import atexit
import datetime
import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Environment variables that torchrun and accelerate launch set for every process.
_RANK = "RANK"
_WORLD_SIZE = "WORLD_SIZE"
_LOCAL_RANK = "LOCAL_RANK"


def launched_world_size() -> int:
    """Return WORLD_SIZE as set by the launcher, 1 when the process was started on its own."""
    value = os.environ.get(_WORLD_SIZE, "1")
    try:
        size = int(value)
    except ValueError:
        raise ValueError(f"environment variable WORLD_SIZE must be an integer, got {value!r}") from None
    if size < 1:
        raise ValueError(f"environment variable WORLD_SIZE must be >= 1, got {size}")
    return size


def launched_rank() -> int:
    return int(os.environ.get(_RANK, "0")) if launched_world_size() > 1 else 0


def is_worker_process() -> bool:
    """Return True in a process of a distributed launch other than rank 0."""
    return launched_rank() != 0


def check_launch_settings(config) -> None:
    """Reject settings that cannot be split over the launched processes, before anything is written."""
    world_size = launched_world_size()
    for name in ("batch_size", "replay_batch"):
        value = getattr(config, name)
        if isinstance(value, int) and value % world_size:
            raise ValueError(
                f"{name} ({value}) must be divisible by the number of processes ({world_size}), because it is the "
                f"global count per step split evenly over the processes; use a multiple of {world_size}"
            )


def rank_seed(seed: int, rank: int) -> int:
    """Seed of one rank's latent draws: rank 0 keeps `seed`, so it draws what a single process draws."""
    if rank == 0:
        return seed
    digest = hashlib.sha256(f"latents:{seed}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def rank_noise_secret(secret: int, rank: int) -> int:
    """Noise secret of one rank, derived from the run's secret.

    Ranks answer different images in the same step: with a shared noise draw the difference of
    two answers would be noise-free, so every rank needs its own stream. Rank 0 keeps the run's
    secret, which makes a one-process run a special case.
    """
    if rank == 0:
        return secret
    digest = hashlib.sha256(f"noise:{secret}:{rank}".encode()).digest()
    return int.from_bytes(digest[:16], "little")


@dataclass
class ProcessGroup:
    """This process's place in the run, with the collectives the engine needs.

    With one process (``world_size == 1``) every collective returns its input unchanged.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """Return the device of this rank: CUDA devices are assigned by local rank."""
        if self.enabled and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def split(self, count: int, name: str) -> int:
        """Return this rank's share of a global per-step count; it must divide evenly."""
        if count % self.world_size:
            raise ValueError(
                f"{name} ({count}) must be divisible by the number of processes ({self.world_size}), because it is "
                f"the global count per step split evenly over the processes; use a multiple of {self.world_size}"
            )
        return count // self.world_size

    # ------------------------------------------------------------ collectives

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def broadcast_object(self, value: Any) -> Any:
        """Return rank 0's `value` on every rank (pickled; for small objects and state dicts on the CPU)."""
        if not self.enabled:
            return value
        holder = [value if self.is_main else None]
        torch.distributed.broadcast_object_list(holder, src=0)
        return holder[0]

    def gather_objects(self, value: Any) -> list | None:
        """Return the values of all ranks, in rank order, on rank 0 and None elsewhere."""
        if not self.enabled:
            return [value]
        gathered = [None] * self.world_size if self.is_main else None
        torch.distributed.gather_object(value, gathered, dst=0)
        return gathered

    def sum_int(self, value: int) -> int:
        if not self.enabled:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self._collective_device())
        torch.distributed.all_reduce(tensor)
        return int(round(tensor.item()))

    def mean(self, values: list[float]) -> list[float]:
        if not self.enabled:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self._collective_device())
        torch.distributed.all_reduce(tensor)
        return (tensor / self.world_size).tolist()

    def average_gradients(self, module: torch.nn.Module) -> None:
        """Replace the gradients of `module` by their mean over the ranks (one flat all-reduce).

        Parameters without a gradient take part with zeros, so that every rank sends the same
        layout whatever its graph reached.
        """
        if not self.enabled:
            return
        parameters = [p for p in module.parameters() if p.requires_grad]
        if not parameters:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for parameter in parameters:
            size = parameter.numel()
            parameter.grad = flat[offset:offset + size].view_as(parameter).clone()
            offset += size

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm running statistics) to every rank, as DDP does."""
        if not self.enabled:
            return
        for buffer in module.buffers():
            torch.distributed.broadcast(buffer, src=0)

    def _collective_device(self) -> torch.device:
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


_GROUP: ProcessGroup | None = None


def connect(device: torch.device) -> ProcessGroup:
    """Join the launched process group (once per process) and return this process's place in it.

    Without a distributed launch this returns a one-process group and starts nothing.
    """
    global _GROUP
    if _GROUP is not None:
        return _GROUP
    world_size = launched_world_size()
    if world_size == 1:
        _GROUP = ProcessGroup()
        return _GROUP
    for name in (_RANK, _LOCAL_RANK, "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise ValueError(f"WORLD_SIZE is {world_size} but {name} is not set; start the processes with torchrun or "
                             "'accelerate launch --multi_gpu', which set it")
    rank, local_rank = int(os.environ[_RANK]), int(os.environ[_LOCAL_RANK])
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend, rank=rank, world_size=world_size)
        atexit.register(_disconnect)
    _GROUP = ProcessGroup(rank=rank, world_size=world_size, local_rank=local_rank, backend=backend)
    logger.info("joined process group: rank %d of %d (local rank %d), backend %s", rank, world_size, local_rank,
                backend)
    return _GROUP


def _disconnect() -> None:
    if not torch.distributed.is_initialized():
        return
    # Ranks that tear gloo down while a peer still sends have aborted with "terminate called
    # without an active exception" (torch 2.13, rarely, under load), so wait for the others first.
    # The timeout keeps a rank from hanging at exit when a peer has died.
    if torch.distributed.get_backend() == "gloo":  # monitored_barrier exists for gloo only
        try:
            torch.distributed.monitored_barrier(timeout=datetime.timedelta(seconds=60))
        except RuntimeError as error:
            logger.warning("ranks did not meet before leaving the process group: %s", error)
    torch.distributed.destroy_process_group()


def join_answers(payloads: list[bytes]):
    """Join the serialised answers of all ranks, in rank order, into one answer for the ledger."""
    from .privacy.mechanism import NoisyAnswer

    answers = [NoisyAnswer.from_bytes(payload) for payload in payloads]
    return NoisyAnswer(torch.cat([a.targets for a in answers]), torch.cat([a.classes for a in answers]),
                       torch.cat([a.values for a in answers]))


def split_answer(payload: bytes, world_size: int, local_batch: int) -> list[bytes]:
    """Split a stored joined answer back into the per-rank answers it was made of."""
    from .privacy.mechanism import NoisyAnswer

    answer = NoisyAnswer.from_bytes(payload)
    if answer.targets.shape[0] != world_size * local_batch:
        raise ValueError(
            f"the stored answer covers {answer.targets.shape[0]} images but {world_size} processes x {local_batch} "
            f"images were expected; resume the run with the number of processes it was started with"
        )
    parts = []
    for rank in range(world_size):
        rows = slice(rank * local_batch, (rank + 1) * local_batch)
        parts.append(NoisyAnswer(answer.targets[rows], answer.classes[rows], answer.values[rows]).to_bytes())
    return parts


def prepare_in_turn(group: ProcessGroup, prepare=None):
    """Run `prepare` on one rank at a time, in rank order, and return its result.

    Rank 0 has already prepared when it calls this (with `prepare=None`). The turns keep two
    processes from opening the DuckDB ledger file at once, which DuckDB rejects with a lock error.
    """
    result = None
    for turn in range(group.world_size):
        if turn == group.rank and prepare is not None:
            result = prepare()
        group.barrier()
    return result


def run_worker(config):
    """Run a rank other than 0: same models and steps, but no ledger and no files written.

    Prepares after rank 0 has checked the settings and opened the ledger, then follows rank 0
    step by step.
    """
    from tqdm.auto import tqdm

    from . import transcribe as engine

    group = connect(engine.resolve_device(config.device))
    setup = prepare_in_turn(group, lambda: engine._prepare(config))
    run = engine._Run(config, setup, engine.Path(config.out), run_id="", ledger=None)
    if config.resume:
        run.load_checkpoint()
    return engine._train(run, tqdm)
