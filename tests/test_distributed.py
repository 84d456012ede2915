"""Data-parallel transcription: two real gloo processes on loopback against one process.

The processes are started the way torchrun starts them (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), with the rendezvous store hosted by the test on 127.0.0.1, as
torchrun's agent hosts it, so nothing listens beyond loopback.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
import torch

from synthgen.distributed import rank_noise_secret, rank_seed
from synthgen.privacy.mechanism import step_seed
from synthgen.transcribe import REPORT_FILE, transcribe

from .conftest import small_config

REPO = Path(__file__).resolve().parent.parent
WORLD_SIZE = 2
STEPS = 6
BATCH = 16  # global per step: 8 per process


def launch(tmp_path: Path, name: str, arguments: list[str]) -> list[dict]:
    """Run one `synthgen` command on WORLD_SIZE processes; return each rank's forward count."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    # The store takes over the listening socket, so it closes it when it is deleted.
    store = torch.distributed.TCPStore("127.0.0.1", port, is_master=True, master_listen_fd=listener.detach(),
                                       wait_for_workers=False)
    count_files = [tmp_path / f"{name}-rank{rank}.json" for rank in range(WORLD_SIZE)]
    processes = []
    for rank in range(WORLD_SIZE):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(WORLD_SIZE), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   TORCHELASTIC_USE_AGENT_STORE="True", GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
        command = [sys.executable, "-m", "tests.forward_counter", str(count_files[rank]), *arguments]
        processes.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [process.communicate(timeout=240)[0] for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
        del store
    for rank, process in enumerate(processes):
        assert process.returncode == 0, f"rank {rank} exited with {process.returncode}:\n{outputs[rank][-3000:]}"
    return [json.loads(path.read_text()) for path in count_files]


def ledger_rows(path: Path) -> list[tuple]:
    with duckdb.connect(str(path), read_only=True) as db:
        return db.execute("SELECT run_id, step, kind, parameter, queries FROM spends ORDER BY step").fetchall()


@pytest.mark.parametrize("mechanism", ["gaussian"])
def test_two_processes_charge_like_one(small_teacher, mnist_small, tmp_path, mechanism):
    # One process, same global batch and steps: the reference spend.
    single_ledger = tmp_path / "single.duckdb"
    single = transcribe(small_config(small_teacher, tmp_path / "single", mnist_small, mechanism=mechanism,
                                     steps=STEPS, batch_size=BATCH, ledger=str(single_ledger), eval_limit=100))
    assert single.completed

    # Two processes, interrupted after iteration 3 (checkpoint at 2, answer of step 2 stored) and resumed.
    config = small_config(small_teacher, tmp_path / "dist", mnist_small, mechanism=mechanism, steps=STEPS,
                          batch_size=BATCH, ledger=str(tmp_path / "dist.duckdb"), eval_limit=100, threads=1)
    config_file = tmp_path / "dist.json"
    config_file.write_text(json.dumps(dataclasses.asdict(config)))
    first = launch(tmp_path, "first", ["transcribe", "--config", str(config_file), "--stop-after", "3"])
    second = launch(tmp_path, "second", ["transcribe", "--config", str(config_file), "--resume"])

    report = json.loads((tmp_path / "dist" / REPORT_FILE).read_text())
    rows = ledger_rows(tmp_path / "dist.duckdb")
    reference_rows = ledger_rows(single_ledger)
    charged = sum(row[4] for row in rows)
    forwards = sum(count["teacher_forward_examples"] for count in first + second)

    assert charged == sum(row[4] for row in reference_rows) == STEPS * BATCH
    assert report["queries"] == charged
    assert report["epsilon"] == single.report["epsilon"]
    assert report["events"] == single.report["events"]
    # One ledger entry per step, each for the queries of both processes.
    assert [row[1] for row in rows] == list(range(STEPS))
    assert {row[4] for row in rows} == {BATCH}
    assert len({row[0] for row in rows}) == 1
    # Every charged query went through a teacher exactly once, summed over ranks and launches;
    # step 2 was answered before the interruption and replayed from the ledger afterwards.
    assert forwards == charged
    assert report["replayed_examples"] == BATCH
    assert report["teacher_forward_examples"] + report["replayed_examples"] == charged
    # Only rank 0 wrote files.
    assert (tmp_path / "dist" / "student" / "config.json").is_file()
    assert not (tmp_path / "dist" / "private" / "checkpoint.pt").exists()


def test_ranks_get_distinct_streams():
    secret = 123456789
    assert rank_noise_secret(secret, 0) == secret  # one process is the special case of rank 0
    noise_seeds = {step_seed(rank_noise_secret(secret, rank), step) for rank in range(4) for step in range(50)}
    assert len(noise_seeds) == 4 * 50
    assert rank_seed(7, 0) == 7
    assert len({rank_seed(7, rank) for rank in range(8)}) == 8


def test_indivisible_batch_rejected_before_writing(small_teacher, mnist_small, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    config = small_config(small_teacher, tmp_path / "run", mnist_small, batch_size=15)
    with pytest.raises(ValueError, match="batch_size \\(15\\) must be divisible by the number of processes \\(2\\)"):
        transcribe(config)
    assert not (tmp_path / "run").exists()
