"""Kill transcriptions with SIGKILL at random moments and check that nothing is lost or leaked.

The script first runs one uninterrupted transcription (the reference). It then runs the same
transcription in a fresh run folder and ledger, kills it with SIGKILL, checks the state on disk
and continues it with ``--resume``. It repeats this, with new folders once a run finishes, until
the requested number of kills has landed on a live process. After every kill it checks that:

- the ledger opens, and the epsilon and queries it has charged never decreased;
- every artifact under its final name is complete and valid, or absent: the privacy report,
  the generator and student folders, samples.png, metrics.jsonl, the run settings, the
  checkpoint (only temporary files, which the next start sweeps, may be partial);
- the checkpoint never covers more queries than the ledger has charged.

When a killed run has been resumed to the end, its accounting (epsilon, RDP epsilon, queries,
events, ledger total), its final weights, its sample grid and its metrics must equal the
reference; a finished run must keep no temporary file and no checkpoint (it contains the noise
secret). A kill counts as survived when all of these checks held.

Usage:
    python scripts/crash_test.py [--kills 20] [--seed 0] [--work-dir DIR]
        [--teacher TEACHER --data DATA] [--summary FILE] [--no-record]

Without --teacher and --data it trains a tiny teacher on 600 real MNIST images. The result
record goes to benchmarks/results/crash.json unless --no-record is given. The exit status is
0 when every kill was survived and every check held.

Only transcription is covered: synthgen has no dataset builder yet.
"""

from __future__ import annotations

import argparse
import json
import logging
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
    seconds_to_ready: float | None
    seconds: float
    stderr_tail: str


def run_once(config_path: Path, resume: bool, kill_after: tuple[str, float] | None) -> Outcome:
    """Start one ``synthgen transcribe`` process and kill it as `kill_after` requests.

    `kill_after` is None (let it finish), ("start", seconds) or ("ready", seconds): the delay
    counts from the process start or from the moment it logs that the ledger is open.
    """
    command = [sys.executable, "-m", "synthgen", "transcribe", "--config", str(config_path)]
    if resume:
        command.append("--resume")
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, bufsize=1)
    ready = threading.Event()
    lines: list[str] = []

    def read_stderr() -> None:
        for line in process.stderr:
            lines.append(line)
            if READY_MARK in line or "resuming" in line:
                ready.set()
        ready.set()  # the process ended without getting that far

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    seconds_to_ready = None
    killed = False
    if kill_after is not None:
        origin, delay = kill_after
        if origin == "ready":
            ready.wait(timeout=300)
            seconds_to_ready = time.monotonic() - started
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
    return Outcome(killed, process.returncode, seconds_to_ready, time.monotonic() - started, "".join(lines[-15:]))


def measure_reference(config_path: Path) -> tuple[float, float]:
    """Run the reference to the end; return seconds until the ledger is open and in total."""
    command = [sys.executable, "-m", "synthgen", "transcribe", "--config", str(config_path)]
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, bufsize=1)
    ready_at = None
    lines = []
    for line in process.stderr:
        lines.append(line)
        if ready_at is None and READY_MARK in line:
            ready_at = time.monotonic() - started
    process.wait()
    total = time.monotonic() - started
    if process.returncode != 0:
        raise SystemExit(f"the reference transcription failed (exit {process.returncode}):\n{''.join(lines[-20:])}")
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
    if (run_dir / "private" / "checkpoint.pt").exists():
        problems.append("the finished run still has private/checkpoint.pt, which contains the noise secret")
    left = temporaries(run_dir)
    if left:
        problems.append(f"the finished run still has temporary files: {left}")
    return problems


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


# ---------------------------------------------------------------- the kill loop


@dataclass
class Victim:
    """One run folder and ledger, killed and resumed until it finishes."""

    index: int
    folder: Path
    config_path: Path
    ledger_path: Path
    delta: float
    spent: float = 0.0
    charged: int = 0
    kills: list[dict] = field(default_factory=list)


def new_victim(index: int, work: Path, settings: dict) -> Victim:
    folder = work / f"victim-{index:02d}"
    config = {**settings, "out": str(folder / "run"), "ledger": str(folder / "ledger.duckdb")}
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return Victim(index, folder / "run", folder / "config.json", folder / "ledger.duckdb", settings["delta"])


def inspect_after_stop(victim: Victim, reference_dir: Path, planned: int) -> list[str]:
    """Check a victim's ledger and files after its process ended (killed or not)."""
    problems = []
    try:
        spent, charged = ledger_state(victim.ledger_path, victim.delta)
    except Exception as error:  # DuckDB raises its own types for a damaged file
        return [f"the ledger {victim.ledger_path} cannot be read: {type(error).__name__}: {error}"]
    if spent < victim.spent - 1e-12 or charged < victim.charged:
        problems.append(f"the ledger went down: epsilon {victim.spent:.6g} -> {spent:.6g}, "
                        f"queries {victim.charged} -> {charged}")
    if charged > planned:
        problems.append(f"the ledger charged {charged} queries, more than the {planned} planned")
    victim.spent, victim.charged = max(spent, victim.spent), max(charged, victim.charged)
    problems += check_artifacts(victim.folder, reference_dir)
    covered = checkpoint_queries(victim.folder)
    if covered is not None and covered > charged:
        problems.append(f"the checkpoint covers {covered} queries but the ledger charged only {charged}")
    return problems


def phase_of(victim: Victim, planned: int) -> str:
    """Name the part of the run a kill interrupted, judged from what it left behind."""
    if (victim.folder / REPORT_FILE).exists():
        return "after the report"
    if victim.charged == 0:
        return "before the first charge"
    if victim.charged < planned:
        return "training"
    return "saving results"


def next_start(victim: Victim) -> str:
    """Return how to continue a victim: 'done', 'resume', 'fresh' or 'stuck'."""
    run = victim.folder
    if (run / REPORT_FILE).exists():
        return "done"
    if (run / "private" / "run_config.json").exists():
        return "resume"
    if not run.exists() or not any(run.iterdir()):
        return "fresh"
    return "stuck"


def crash_loop(args, work: Path, settings: dict, reference_dir: Path, timing: tuple[float, float]) -> dict:
    rng = random.Random(args.seed)
    ready_seconds, total_seconds = timing
    planned = settings["steps"] * settings["batch_size"]
    kills: list[dict] = []
    failures: list[str] = []
    victims = 0
    victim = new_victim(victims, work, settings)
    finishing = False
    while True:
        state = next_start(victim)
        if state == "stuck":
            listing = sorted(str(p.relative_to(victim.folder)) for p in victim.folder.rglob("*"))
            message = (f"victim {victim.index}: the run folder can neither be resumed nor restarted after a kill; "
                       f"it contains {listing}")
            failures.append(message)
            for kill in victim.kills:
                kill["problems"].append(message)
            shutil.rmtree(victim.folder)
            state = "fresh"
        if state == "done":
            problems = compare_with_reference(victim.folder, reference_dir)
            for kill in victim.kills:
                kill["problems"] += problems
            if problems and not victim.kills:
                failures += [f"victim {victim.index}: {p}" for p in problems]
            logger.info("victim %d finished after %d kills: %s", victim.index, len(victim.kills),
                        "same as the uninterrupted run" if not problems else "; ".join(problems))
            if finishing:
                break
            victims += 1
            victim = new_victim(victims, work, settings)
            continue
        if len(kills) >= args.kills:
            finishing = True  # let the last victim run to the end, then compare it
            kill_after = None
        elif rng.random() < ANY_MOMENT_SHARE:
            kill_after = ("start", rng.uniform(0, total_seconds))
        else:
            kill_after = ("ready", rng.uniform(0, 1.1 * (total_seconds - ready_seconds)))
        outcome = run_once(victim.config_path, resume=state == "resume", kill_after=kill_after)
        problems = inspect_after_stop(victim, reference_dir, planned)
        if outcome.killed:
            kill = {"kill": len(kills) + 1, "victim": victim.index, "resumed": state == "resume",
                    "aimed_from": kill_after[0], "delay_seconds": round(kill_after[1], 3),
                    "seconds_alive": round(outcome.seconds, 3), "charged_queries": victim.charged,
                    "phase": phase_of(victim, planned), "problems": problems}
            kills.append(kill)
            victim.kills.append(kill)
            logger.info("kill %d/%d: victim %d after %.2f s, %d queries charged%s", len(kills), args.kills,
                        victim.index, outcome.seconds, victim.charged,
                        "" if not problems else ": " + "; ".join(problems))
        else:
            if outcome.exit_status != 0:
                failures.append(f"victim {victim.index}: the {state} start exited with {outcome.exit_status}:\n"
                                f"{outcome.stderr_tail}")
                for kill in victim.kills:
                    kill["problems"].append(f"the {state} start after this kill failed")
                if finishing or len(failures) > 5:
                    break
            failures += [f"victim {victim.index}: {p}" for p in problems]
    survived = sum(1 for kill in kills if not kill["problems"])
    phases: dict[str, int] = {}
    for kill in kills:
        phases[kill["phase"]] = phases.get(kill["phase"], 0) + 1
    return {"target": "transcribe", "attempts": len(kills), "kills_survived": survived, "victims": victims + 1,
            "kills_by_phase": phases,
            "reference_seconds": round(total_seconds, 2), "failures": failures, "kills": kills}


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
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs to land on a live process (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments (default 0)")
    parser.add_argument("--steps", type=int, default=48,
                        help="iterations of each transcription (default 48, about as long as saving the results)")
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

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="synthgen-crash-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        teacher, data = prepare_inputs(args, work)
        settings = transcription_settings(teacher, data, args.steps)
        reference = work / "reference"
        reference.mkdir()
        config_path = reference / "config.json"
        config_path.write_text(json.dumps({**settings, "out": str(reference / "run"),
                                           "ledger": str(reference / "ledger.duckdb")}, indent=2))
        logger.info("running the uninterrupted reference transcription")
        timing = measure_reference(config_path)
        logger.info("reference: ledger open after %.1f s, finished after %.1f s", *timing)
        summary = crash_loop(args, work, settings, reference / "run", timing)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    summary["settings"] = {k: v for k, v in settings.items() if k not in ("teacher", "eval_data")}
    text = json.dumps(summary, indent=2)
    if args.summary:
        Path(args.summary).write_text(text + "\n")
    if not args.no_record:
        path = write_records("crash", [record(
            "crash", "kills_survived", summary["kills_survived"], attempts=summary["attempts"], target="transcribe",
            unit="teacher", mechanism="gaussian", epsilon=settings["epsilon"], delta=settings["delta"],
            failures=len(summary["failures"]), steps=settings["steps"], kills_by_phase=summary["kills_by_phase"],
        )], replace_keys=("metric", "target", "unit", "mechanism", "epsilon", "method", "dataset"))
        logger.info("wrote %s", path)
    logger.info("kills survived: %d of %d; other failures: %d", summary["kills_survived"], summary["attempts"],
                len(summary["failures"]))
    for failure in summary["failures"]:
        logger.error("%s", failure)
    print(json.dumps({k: summary[k] for k in ("target", "attempts", "kills_survived", "victims", "kills_by_phase")}))
    return 0 if summary["kills_survived"] == summary["attempts"] and not summary["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
