"""Kill transcriptions and dataset builds with SIGKILL at random moments and check what is left.

The script first runs one uninterrupted transcription and one uninterrupted dataset build from
its result (the references). It then runs the same command in a fresh folder, kills it with
SIGKILL, checks the state on disk and continues it with ``--resume``. It repeats this, with new
folders once a run finishes, until the requested number of kills has landed on a live process.

After every kill of a transcription it checks that:

- the ledger opens, and the epsilon and queries it has charged never decreased;
- every artifact under its final name is complete and valid, or absent: the privacy report,
  the generator and student folders, samples.png, metrics.jsonl, the run settings, the
  checkpoint (only temporary files, which the next start sweeps, may be partial);
- the checkpoint never covers more queries than the ledger has charged.

After every kill of a dataset build it checks that every parquet shard under its final name
holds exactly the rows of the reference's shard, and that the manifest and the card are valid
and appear only as the build promises (the card only once every shard is complete).

A run resumed to the end must equal its reference: for a transcription the accounting (epsilon,
RDP epsilon, queries, events, ledger total), the weights, the sample grid and the metrics, with
no temporary file and no checkpoint that contains the noise secret; for a build every shard and the
label counts. A kill counts as survived when all of these checks held.

Usage:
    python scripts/crash_test.py [--target transcribe|build|all] [--kills 20] [--seed 0]
        [--work-dir DIR] [--teacher TEACHER --data DATA] [--summary FILE] [--no-record]

Without --teacher and --data it trains a tiny teacher on 600 real MNIST images. --kills counts
per target. Result records go to benchmarks/results/crash.json unless --no-record is given.
The exit status is 0 when every kill was survived and every check held.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import record, write_records  # noqa: E402

logger = logging.getLogger("crash_test")

REPORT_FILE = "privacy_report.json"
READY_MARK = "privacy: unit="  # logged once the ledger is open, just before the run folder is written
# Fields of the privacy report that a resumed run must reproduce exactly.
ACCOUNTING_FIELDS = ("epsilon", "rdp_epsilon", "delta", "events", "queries", "planned_queries", "steps",
                     "ledger_total_epsilon", "mechanism", "unit")
# Share of kills aimed at any moment of the process's life, start-up and loading included. The
# others land after the ledger is open, where charges, checkpoints and renames happen.
ANY_MOMENT_SHARE = 0.25


def transcription_settings(teacher: str, data: str, steps: int) -> dict:
    """Return a transcription small enough to restart many times on 2 CPU cores."""
    return {
        "teacher": teacher, "eval_data": data, "eval_limit": 100, "mechanism": "gaussian", "epsilon": 10.0,
        "delta": 1e-5, "steps": steps, "batch_size": 16, "replay_size": 64, "replay_batch": 16, "latent_dim": 16,
        "generator_width": 8, "student_width": 8, "student_hidden": 32, "checkpoint_every": 5, "eval_every": 8,
        "top_k": 3, "seed": 0, "noise_seed": 1234, "device": "cpu", "threads": 1,
    }


# ---------------------------------------------------------------- running one process


@dataclass
class Outcome:
    killed: bool
    exit_status: int | None
    ready_seen: bool  # whether the process logged its ready mark before it ended
    seconds: float
    stderr_tail: str


def run_once(command: list[str], ready_marks: tuple[str, ...], kill_after: tuple[str, float] | None) -> Outcome:
    """Start one ``synthgen`` process and kill it as `kill_after` requests.

    `kill_after` is None (let it finish), ("start", seconds) or ("ready", seconds): the delay
    counts from the process start or from the first log line that contains a ready mark.
    """
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "synthgen", *command], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, bufsize=1)
    ready = threading.Event()
    ready_seen = threading.Event()
    lines: list[str] = []

    def read_stderr() -> None:
        for line in process.stderr:
            lines.append(line)
            if any(mark in line for mark in ready_marks):
                ready_seen.set()
                ready.set()
        ready.set()  # the process ended without getting that far

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    killed = False
    if kill_after is not None:
        origin, delay = kill_after
        if origin == "ready":
            ready.wait(timeout=300)
            deadline = time.monotonic() + delay
        else:
            deadline = started + delay
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(min(0.005, max(deadline - time.monotonic(), 0)))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            killed = True
    process.wait(timeout=600)
    reader.join(timeout=10)
    return Outcome(killed, process.returncode, ready_seen.is_set(), time.monotonic() - started, "".join(lines[-15:]))


def measure_reference(command: list[str], ready_marks: tuple[str, ...]) -> tuple[float, float]:
    """Run a reference command to the end; return seconds until its ready mark and in total."""
    started = time.monotonic()
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "synthgen", *command], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, bufsize=1)
    ready_at = None
    lines = []
    for line in process.stderr:
        lines.append(line)
        if ready_at is None and any(mark in line for mark in ready_marks):
            ready_at = time.monotonic() - started
    process.wait()
    total = time.monotonic() - started
    if process.returncode != 0:
        raise SystemExit(f"the reference {command[0]} failed (exit {process.returncode}):\n{''.join(lines[-20:])}")
    return (ready_at if ready_at is not None else total / 2), total


# ---------------------------------------------------------------- checks of the state on disk


def is_temporary(name: str) -> bool:
    """Names that synthgen's atomic writes use before the final rename."""
    return name.startswith(".") and (name.endswith(".tmp") or ".old-" in name)


def ledger_state(ledger_path: Path, delta: float) -> tuple[float, int]:
    """Return the epsilon (PLD, at `delta`) and the queries charged in the whole ledger."""
    from synthgen.privacy.accounting import PrivacyEvent, pld_epsilon
    from synthgen.privacy.ledger import Ledger

    if not ledger_path.exists():
        return 0.0, 0
    with Ledger(ledger_path) as ledger:
        rows = ledger.summary()
    events = [PrivacyEvent(row["kind"], float(row["parameter"]), int(row["queries"])) for row in rows]
    return pld_epsilon(events, delta), sum(int(row["queries"]) for row in rows)


def check_model_folder(folder: Path, reference: Path) -> list[str]:
    from safetensors.torch import load_file

    problems = []
    names = sorted(p.name for p in folder.iterdir())
    expected = sorted(p.name for p in reference.iterdir())
    if names != expected:
        problems.append(f"{folder.name}/ contains {names}, expected {expected}")
        return problems
    try:
        json.loads((folder / "config.json").read_text())
        for weights in folder.glob("*.safetensors"):
            state = load_file(str(weights))
            reference_state = load_file(str(reference / weights.name))
            if {k: tuple(v.shape) for k, v in state.items()} != {k: tuple(v.shape) for k, v in reference_state.items()}:
                problems.append(f"{weights} does not have the reference's tensors")
    except Exception as error:  # any failure to parse means a partial or corrupt file
        problems.append(f"{folder.name}/ is not a loadable model: {type(error).__name__}: {error}")
    return problems


def check_artifacts(run_dir: Path, reference_dir: Path) -> list[str]:
    """Return problems with files under their final names; temporaries are not checked."""
    import torch
    from PIL import Image

    problems = []
    if not run_dir.exists():
        return problems
    report = run_dir / REPORT_FILE
    if report.exists():
        try:
            content = json.loads(report.read_text())
            if "epsilon" not in content or "events" not in content:
                problems.append(f"{report} lacks epsilon or events")
        except ValueError as error:
            problems.append(f"{report} is not valid JSON: {error}")
        for required in ("generator", "student", "samples.png", "metrics.jsonl"):
            if not (run_dir / required).exists():
                problems.append(f"the report exists but {required} does not (the report must be written last)")
    for part in ("generator", "student"):
        if (run_dir / part).exists():
            problems += check_model_folder(run_dir / part, reference_dir / part)
    samples = run_dir / "samples.png"
    if samples.exists():
        try:
            with Image.open(samples) as image:
                image.verify()
            with Image.open(samples) as image:
                image.load()
        except Exception as error:  # Pillow raises several types for truncated images
            problems.append(f"{samples} is not a complete PNG: {error}")
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        steps = []
        for number, line in enumerate(metrics.read_text().splitlines(), 1):
            try:
                steps.append(json.loads(line)["step"])
            except (ValueError, KeyError) as error:
                problems.append(f"{metrics} line {number} is not a complete record: {error}")
        if steps != sorted(set(steps)):
            problems.append(f"{metrics} steps are not strictly increasing: {steps}")
    private = run_dir / "private"
    for name in ("run_config.json", "ledger_key.json"):
        if (private / name).exists():
            try:
                json.loads((private / name).read_text())
            except ValueError as error:
                problems.append(f"{private / name} is not valid JSON: {error}")
    checkpoint = private / "checkpoint.pt"
    if checkpoint.exists():
        try:
            torch.load(checkpoint, map_location="cpu", weights_only=True)["step"]
        except Exception as error:  # torch raises several types for truncated archives
            problems.append(f"{checkpoint} does not load: {type(error).__name__}: {error}")
    return problems


def checkpoint_queries(run_dir: Path) -> int | None:
    import torch

    path = run_dir / "private" / "checkpoint.pt"
    if not path.is_file():
        return None
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["queries"])
    except Exception:  # reported by check_artifacts
        return None


def temporaries(run_dir: Path) -> list[str]:
    if not run_dir.exists():
        return []
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if is_temporary(p.name))


def compare_with_reference(run_dir: Path, reference_dir: Path) -> list[str]:
    """Return the differences between a finished resumed run and the uninterrupted one."""
    from safetensors.torch import load_file

    problems = []
    report = json.loads((run_dir / REPORT_FILE).read_text())
    expected = json.loads((reference_dir / REPORT_FILE).read_text())
    for name in ACCOUNTING_FIELDS:
        if report.get(name) != expected.get(name):
            problems.append(f"report {name} is {report.get(name)!r}, the uninterrupted run has {expected.get(name)!r}")
    if report["teacher_forward_examples"] + report["replayed_examples"] != report["queries"]:
        problems.append("teacher forward passes plus replayed answers do not equal the queries")
    if report["evaluation"]["student_accuracy"] != expected["evaluation"]["student_accuracy"]:
        problems.append("student accuracy differs from the uninterrupted run")
    for part in ("generator", "student"):
        for weights in (reference_dir / part).glob("*.safetensors"):
            state, reference_state = load_file(str(run_dir / part / weights.name)), load_file(str(weights))
            differing = [name for name in reference_state if not reference_state[name].equal(state[name])]
            if differing:
                problems.append(f"{part} weights differ from the uninterrupted run: {', '.join(differing)}")
    if (run_dir / "samples.png").read_bytes() != (reference_dir / "samples.png").read_bytes():
        problems.append("samples.png differs from the uninterrupted run")
    problems += compare_metrics(run_dir / "metrics.jsonl", reference_dir / "metrics.jsonl")
    problems += check_no_secret_left(run_dir)
    left = temporaries(run_dir)
    if left:
        problems.append(f"the finished run still has temporary files: {left}")
    return problems


def check_no_secret_left(run_dir: Path) -> list[str]:
    """Check that a finished run keeps no checkpoint with its noise secret.

    A kill between writing the report and deleting the checkpoint may leave the checkpoint, but
    synthgen replaces its secret before the report is written. The runs here fix the secret with
    noise_seed, so the check compares against that.
    """
    import torch

    checkpoint = run_dir / "private" / "checkpoint.pt"
    if not checkpoint.exists():
        return []
    secret = json.loads((run_dir / "private" / "run_config.json").read_text())["config"]["noise_seed"]
    stored_secret = torch.load(checkpoint, map_location="cpu", weights_only=True)["noise_secret"]
    if secret is None or stored_secret == str(secret):
        return ["the finished run still has private/checkpoint.pt with the noise secret"]
    return []


def compare_metrics(path: Path, reference: Path) -> list[str]:
    # epsilon_spent is read from the ledger, which may already contain answers that the killed
    # process charged after its last checkpoint. So after a resume it may be higher, never lower.
    records = [json.loads(line) for line in path.read_text().splitlines()]
    expected = [json.loads(line) for line in reference.read_text().splitlines()]
    if [r["step"] for r in records] != [r["step"] for r in expected]:
        return [f"metrics.jsonl has steps {[r['step'] for r in records]}, expected {[r['step'] for r in expected]}"]
    problems = []
    for got, want in zip(records, expected):
        for key in want:
            if key == "epsilon_spent":
                if got.get(key, -1) < want[key]:
                    problems.append(f"metrics step {want['step']}: epsilon_spent {got.get(key)} < {want[key]}")
            elif got.get(key) != want[key]:
                problems.append(f"metrics step {want['step']}: {key} is {got.get(key)}, expected {want[key]}")
    return problems


# ---------------------------------------------------------------- checks of a dataset build


def read_shard(path: Path):
    import pyarrow.parquet as pq

    return pq.read_table(path)


def check_build_folder(out: Path, reference: Path) -> list[str]:
    """Return problems with a build folder's files under their final names."""
    problems = []
    if not out.exists():
        return problems
    manifest_path = out / "synthgen_dataset.json"
    manifest = None
    if manifest_path.exists():
        try:
            manifest = json.loads(manifest_path.read_text())
        except ValueError as error:
            problems.append(f"{manifest_path} is not valid JSON: {error}")
    for shard in sorted((out / "data").glob("*.parquet")) if (out / "data").is_dir() else []:
        expected = reference / "data" / shard.name
        if not expected.is_file():
            problems.append(f"{shard} is not a shard of the reference build")
            continue
        try:
            if not read_shard(shard).equals(read_shard(expected)):
                problems.append(f"{shard} differs from the reference's shard")
        except Exception as error:  # pyarrow raises several types for a damaged file
            problems.append(f"{shard} is not a complete parquet file: {type(error).__name__}: {error}")
    complete = bool(manifest and manifest.get("complete"))
    if (out / "README.md").exists() or complete:
        missing = sorted(p.name for p in (reference / "data").glob("*.parquet") if not (out / "data" / p.name).exists())
        if missing:
            problems.append(f"the card or a complete manifest exists, but shards {missing} do not")
    if complete and not (out / "README.md").exists():
        problems.append("the manifest says complete but README.md is missing")
    return problems


def compare_build(out: Path, reference: Path) -> list[str]:
    problems = check_build_folder(out, reference)
    manifest = json.loads((out / "synthgen_dataset.json").read_text())
    expected = json.loads((reference / "synthgen_dataset.json").read_text())
    for key in ("rows", "shards", "settings", "label_counts", "files", "complete"):
        if manifest.get(key) != expected.get(key):
            problems.append(f"manifest {key} is {manifest.get(key)!r}, the uninterrupted build has {expected.get(key)!r}")
    shards = sorted(p.name for p in (out / "data").glob("*.parquet"))
    if shards != sorted(p.name for p in (reference / "data").glob("*.parquet")):
        problems.append(f"the finished build has shards {shards}")
    left = temporaries(out)
    if left:
        problems.append(f"the finished build still has temporary files: {left}")
    return problems


# ---------------------------------------------------------------- the targets


@dataclass
class Victim:
    """One folder (and, for a transcription, one ledger), killed and resumed until it finishes."""

    index: int
    folder: Path
    spent: float = 0.0
    charged: int = 0
    kills: list[dict] = field(default_factory=list)


class TranscribeTarget:
    """``synthgen transcribe`` of a tiny teacher."""

    name = "transcribe"
    ready_marks = (READY_MARK, "resuming")

    def __init__(self, work: Path, settings: dict, reference: Path):
        self.work = work
        self.settings = settings
        self.reference = reference  # the finished reference run folder
        self.planned = settings["steps"] * settings["batch_size"]

    def new_victim(self, index: int) -> Victim:
        folder = self.work / f"transcribe-{index:02d}"
        folder.mkdir(parents=True)
        config = {**self.settings, "out": str(folder / "run"), "ledger": str(folder / "ledger.duckdb")}
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        return Victim(index, folder)

    def next_start(self, victim: Victim) -> str:
        """Return how to continue a victim: 'done', 'resume', 'fresh' or 'stuck'."""
        run = victim.folder / "run"
        if (run / REPORT_FILE).exists():
            return "done"
        if (run / "private" / "run_config.json").exists():
            return "resume"
        if not run.exists() or all(is_temporary(entry.name) for entry in run.iterdir()):
            return "fresh"  # temporaries of a killed start-up do not make the folder used
        return "stuck"

    def command(self, victim: Victim, start: str) -> list[str]:
        command = ["transcribe", "--config", str(victim.folder / "config.json")]
        return command + ["--resume"] if start == "resume" else command

    def inspect(self, victim: Victim) -> list[str]:
        """Check the ledger and the files after the process ended (killed or not)."""
        problems = []
        try:
            spent, charged = ledger_state(victim.folder / "ledger.duckdb", self.settings["delta"])
        except Exception as error:  # DuckDB raises its own types for a damaged file
            return [f"the ledger {victim.folder / 'ledger.duckdb'} cannot be read: {type(error).__name__}: {error}"]
        if spent < victim.spent - 1e-12 or charged < victim.charged:
            problems.append(f"the ledger went down: epsilon {victim.spent:.6g} -> {spent:.6g}, "
                            f"queries {victim.charged} -> {charged}")
        if charged > self.planned:
            problems.append(f"the ledger charged {charged} queries, more than the {self.planned} planned")
        victim.spent, victim.charged = max(spent, victim.spent), max(charged, victim.charged)
        problems += check_artifacts(victim.folder / "run", self.reference)
        covered = checkpoint_queries(victim.folder / "run")
        if covered is not None and covered > charged:
            problems.append(f"the checkpoint covers {covered} queries but the ledger charged only {charged}")
        return problems

    def compare(self, victim: Victim) -> list[str]:
        return compare_with_reference(victim.folder / "run", self.reference)

    def phase(self, victim: Victim) -> str:
        """Name the part of the run a kill interrupted, judged from what it left behind."""
        run = victim.folder / "run"
        if (run / REPORT_FILE).exists():
            return "after the report"
        if (run / "generator").exists() or (run / "student").exists():
            return "saving results"
        if victim.charged == 0:
            return "before the first charge"
        return "training"  # including the replay of charged answers after a resume


class BuildTarget:
    """``synthgen build-dataset`` from the reference run's generator."""

    name = "build"
    ready_marks = ("shards to write",)

    def __init__(self, work: Path, generator: Path, rows: int, shard_size: int, reference: Path):
        self.work = work
        self.generator = generator
        self.rows = rows
        self.shard_size = shard_size
        self.reference = reference  # the finished reference build folder

    def arguments(self, out: Path) -> list[str]:
        return ["build-dataset", str(self.generator), "--num-samples", str(self.rows), "--shard-size",
                str(self.shard_size), "--seed", "0", "--out", str(out), "--no-catalog", "--device", "cpu",
                "--threads", "1"]

    def new_victim(self, index: int) -> Victim:
        folder = self.work / f"build-{index:02d}"
        folder.mkdir(parents=True)
        return Victim(index, folder)

    def next_start(self, victim: Victim) -> str:
        """Return 'done', 'resume', 'fresh' or 'overwrite' (a folder without a manifest yet)."""
        out = victim.folder / "dataset"
        manifest = out / "synthgen_dataset.json"
        if manifest.is_file():
            return "done" if json.loads(manifest.read_text()).get("complete") else "resume"
        if not out.exists() or not any(out.iterdir()):
            return "fresh"
        # The build writes its manifest before anything else, so this state means a bug. The
        # build rejects --overwrite on a folder without a manifest, and the kill counts as failed.
        return "overwrite"

    def command(self, victim: Victim, start: str) -> list[str]:
        command = self.arguments(victim.folder / "dataset")
        return command + [f"--{start}"] if start in ("resume", "overwrite") else command

    def inspect(self, victim: Victim) -> list[str]:
        return check_build_folder(victim.folder / "dataset", self.reference)

    def compare(self, victim: Victim) -> list[str]:
        return compare_build(victim.folder / "dataset", self.reference)

    def phase(self, victim: Victim) -> str:
        out = victim.folder / "dataset"
        shards = len(list((out / "data").glob("*.parquet"))) if (out / "data").is_dir() else 0
        if (out / "README.md").exists():
            return "after the card"
        if not (out / "synthgen_dataset.json").exists():
            return "before the manifest"
        return "writing shards" if shards < math.ceil(self.rows / self.shard_size) else "finishing"


# ---------------------------------------------------------------- the kill loop


def crash_loop(target, kills_wanted: int, rng: random.Random, timing: tuple[float, float]) -> dict:
    """Kill `target`'s command until `kills_wanted` kills landed; return the summary of one target."""
    ready_seconds, total_seconds = timing
    kills: list[dict] = []
    failures: list[str] = []
    victims = 0
    victim = target.new_victim(victims)
    finishing = False
    while True:
        start = target.next_start(victim)
        if start == "stuck":
            listing = sorted(str(p.relative_to(victim.folder)) for p in victim.folder.rglob("*"))
            message = (f"{target.name} {victim.index}: the folder can neither be resumed nor restarted after a "
                       f"kill; it contains {listing}")
            failures.append(message)
            for kill in victim.kills:
                kill["problems"].append(message)
            victims += 1
            victim = target.new_victim(victims)
            continue
        if start == "done":
            problems = target.compare(victim)
            for kill in victim.kills:
                kill["problems"] += problems
            if problems and not victim.kills:
                failures += [f"{target.name} {victim.index}: {p}" for p in problems]
            logger.info("%s %d finished after %d kills: %s", target.name, victim.index, len(victim.kills),
                        "same as the uninterrupted run" if not problems else "; ".join(problems))
            if finishing or len(kills) >= kills_wanted:
                break
            victims += 1
            victim = target.new_victim(victims)
            continue
        if len(kills) >= kills_wanted:
            finishing = True  # let the last victim run to the end, then compare it
            kill_after = None
        elif rng.random() < ANY_MOMENT_SHARE:
            kill_after = ("start", rng.uniform(0, total_seconds))
        else:
            kill_after = ("ready", rng.uniform(0, 1.1 * (total_seconds - ready_seconds)))
        outcome = run_once(target.command(victim, start), target.ready_marks, kill_after)
        problems = target.inspect(victim)
        if outcome.killed:
            kill = {"kill": len(kills) + 1, "victim": victim.index, "start": start, "aimed_from": kill_after[0],
                    "delay_seconds": round(kill_after[1], 3), "seconds_alive": round(outcome.seconds, 3),
                    "phase": target.phase(victim) if outcome.ready_seen else "start-up", "problems": problems}
            if isinstance(target, TranscribeTarget):
                kill["charged_queries"] = victim.charged
            kills.append(kill)
            victim.kills.append(kill)
            logger.info("%s kill %d/%d: victim %d after %.2f s (%s)%s", target.name, len(kills), kills_wanted,
                        victim.index, outcome.seconds, kill["phase"], "" if not problems else ": " + "; ".join(problems))
        else:
            if outcome.exit_status != 0:
                failures.append(f"{target.name} {victim.index}: the {start} start exited with {outcome.exit_status}:"
                                f"\n{outcome.stderr_tail}")
                for kill in victim.kills:
                    kill["problems"].append(f"the {start} start after this kill failed")
                if finishing or len(failures) > 5:
                    break
            failures += [f"{target.name} {victim.index}: {p}" for p in problems]
    survived = sum(1 for kill in kills if not kill["problems"])
    phases: dict[str, int] = {}
    for kill in kills:
        phases[kill["phase"]] = phases.get(kill["phase"], 0) + 1
    return {"target": target.name, "attempts": len(kills), "kills_survived": survived, "victims": victims + 1,
            "kills_by_phase": phases, "reference_seconds": round(total_seconds, 2), "failures": failures,
            "kills": kills}


# ---------------------------------------------------------------- set-up


def prepare_inputs(args, work: Path) -> tuple[str, str]:
    """Return the teacher and the data to transcribe, training a tiny teacher if none was given."""
    if args.teacher and args.data:
        return str(Path(args.teacher).resolve()), str(Path(args.data).resolve())
    if args.teacher or args.data:
        raise SystemExit("give both --teacher and --data, or neither")
    import numpy as np

    from synthgen.config import TeacherTrainConfig
    from synthgen.data import load_idx, load_image_data, locate_dataset
    from synthgen.teacher import train_teacher

    data = work / "mnist-small"
    data.mkdir()
    source = locate_dataset("mnist")
    for split, count, prefix in (("train", 600, "train"), ("test", 300, "t10k")):
        subset = load_idx(source, split).subset(count, seed=1)
        for kind, array in (("images-idx3", subset.images[:, 0]), ("labels-idx1", subset.labels.astype(np.uint8))):
            array = np.ascontiguousarray(array)
            header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
            (data / f"{prefix}-{kind}-ubyte").write_bytes(header + array.tobytes())
    teacher = work / "teacher"
    config = TeacherTrainConfig(data=str(data), out=str(teacher), epochs=2, batch_size=32, width=8, hidden=32)
    train_teacher(config, load_image_data(data, "train"), load_image_data(data, "test"))
    return str(teacher), str(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", choices=("transcribe", "build", "all"), default="all",
                        help="what to kill (default: all, one after the other)")
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs to land on a live process, per target "
                                                              "(default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments (default 0)")
    parser.add_argument("--steps", type=int, default=48,
                        help="iterations of each transcription (default 48, about as long as saving the results)")
    parser.add_argument("--rows", type=int, default=2000, help="rows of each dataset build (default 2000)")
    parser.add_argument("--shard-size", type=int, default=200, help="rows per parquet shard (default 200)")
    parser.add_argument("--work-dir", help="folder for runs and ledgers (default: a temporary folder, removed)")
    parser.add_argument("--teacher", help="teacher to transcribe (default: train a tiny one on real MNIST)")
    parser.add_argument("--data", help="data folder with the teacher's test split for evaluation")
    parser.add_argument("--summary", help="also write the summary JSON to this file")
    parser.add_argument("--no-record", action="store_true", help="do not write benchmarks/results/crash.json")
    args = parser.parse_args(argv)
    if args.kills < 1:
        parser.error(f"--kills must be >= 1, got {args.kills}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TQDM_DISABLE", "1")
    rng = random.Random(args.seed)

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="synthgen-crash-"))
    work.mkdir(parents=True, exist_ok=True)
    summaries = []
    try:
        teacher, data = prepare_inputs(args, work)
        settings = transcription_settings(teacher, data, args.steps)
        reference = work / "reference"
        reference.mkdir()
        config = {**settings, "out": str(reference / "run"), "ledger": str(reference / "ledger.duckdb")}
        (reference / "config.json").write_text(json.dumps(config, indent=2))
        logger.info("running the uninterrupted reference transcription")
        transcribe = TranscribeTarget(work, settings, reference / "run")
        timing = measure_reference(["transcribe", "--config", str(reference / "config.json")], transcribe.ready_marks)
        logger.info("reference transcription: ledger open after %.1f s, finished after %.1f s", *timing)
        if args.target in ("transcribe", "all"):
            summaries.append(crash_loop(transcribe, args.kills, rng, timing))
        if args.target in ("build", "all"):
            build = BuildTarget(work, reference / "run", args.rows, args.shard_size, reference / "dataset")
            logger.info("running the uninterrupted reference build")
            timing = measure_reference(build.arguments(reference / "dataset"), build.ready_marks)
            logger.info("reference build: writing shards after %.1f s, finished after %.1f s", *timing)
            summaries.append(crash_loop(build, args.kills, rng, timing))
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    summary = {"targets": summaries, "settings": {k: v for k, v in settings.items() if k not in ("teacher", "eval_data")}
               | {"rows": args.rows, "shard_size": args.shard_size}}
    if args.summary:
        Path(args.summary).write_text(json.dumps(summary, indent=2) + "\n")
    if not args.no_record:
        records = [record(
            "crash", "kills_survived", result["kills_survived"], attempts=result["attempts"], target=result["target"],
            unit="teacher", mechanism="gaussian", epsilon=settings["epsilon"], delta=settings["delta"],
            failures=len(result["failures"]), kills_by_phase=result["kills_by_phase"],
            **({"steps": settings["steps"]} if result["target"] == "transcribe" else
               {"rows": args.rows, "shard_size": args.shard_size}),
        ) for result in summaries]
        path = write_records("crash", records,
                             replace_keys=("metric", "target", "unit", "mechanism", "epsilon", "method", "dataset"))
        logger.info("wrote %s", path)
    passed = True
    for result in summaries:
        logger.info("%s: kills survived %d of %d; other failures: %d", result["target"], result["kills_survived"],
                    result["attempts"], len(result["failures"]))
        for failure in result["failures"]:
            logger.error("%s", failure)
        passed = passed and result["kills_survived"] == result["attempts"] and not result["failures"]
        print(json.dumps({k: result[k] for k in ("target", "attempts", "kills_survived", "victims", "kills_by_phase")}))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
