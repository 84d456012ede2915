"""Bad-input cases of the Hub commands (push, pull, privacy recompute), against the local test Hub.

The cases join the catalogue of tests/test_bad_input.py and docs/bad-input.md. The workspace
check there covers the local files; for pull, the Hugging Face cache must also stay as it was.
"""

from __future__ import annotations

import io
import socket

import pytest

pytest.importorskip("synthgen.hub", reason="the Hub release code is not in this checkout")

import torch  # noqa: E402

from .test_bad_input import Unchanged, assert_sees, case, cli, snapshot  # noqa: E402
from .test_hub import (  # noqa: E402,F401 (fixtures used by name)
    agent_registry_file, cache_dir, hub, local_hub, point_client_at, repo_id, run_dir, upload,
)


@pytest.fixture
def pushed(hub, run_dir, repo_id):
    """A release pushed to the local Hub; returns its repository id."""
    from synthgen.hub import push

    push(run_dir, repo_id)
    return repo_id


def fails_hub_cli(request, caplog, capsys, workspace, cache_dir, args, status, **values) -> None:
    """Run a Hub CLI case; check status, message, the workspace and the Hugging Face cache."""
    unchanged = Unchanged(workspace)
    cache_before = snapshot(cache_dir) if cache_dir.exists() else {}
    got_status, message = cli(args, caplog, capsys)
    assert got_status == status, message
    assert_sees(request, message, **values)
    unchanged.check()
    assert (snapshot(cache_dir) if cache_dir.exists() else {}) == cache_before, "the Hub cache changed"


@pytest.fixture
def workspace(tmp_path):
    folder = tmp_path / "workspace"
    folder.mkdir()
    return folder


@case("CLI", "`pull` with a token the Hub rejects (HF_TOKEN invalid)",
      "pulling {repo} at revision 'main' failed: {endpoint} rejected the token (HTTP 401); set HF_TOKEN to a "
      "valid token", "exit 2")
def test_pull_invalid_token(request, caplog, capsys, hub, pushed, workspace, cache_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_revoked")
    fails_hub_cli(request, caplog, capsys, workspace, cache_dir, ["pull", pushed], 2, repo=pushed, endpoint=hub.url)


@case("CLI", "`pull --revision` naming a branch that does not exist",
      "revision 'no-such-branch' not found in {repo} on {endpoint}; pass an existing branch, tag or commit hash with "
      "--revision", "exit 2")
def test_pull_unknown_revision(request, caplog, capsys, hub, pushed, workspace, cache_dir):
    args = ["pull", pushed, "--revision", "no-such-branch"]
    fails_hub_cli(request, caplog, capsys, workspace, cache_dir, args, 2, repo=pushed, endpoint=hub.url)


@case("CLI", "`pull` while the Hub endpoint does not answer", "pulling tester/anything at revision 'main' failed: cannot connect to the Hub at {endpoint} ([Errno 111] "
      "Connection refused); check HF_ENDPOINT and the network, or set HF_HUB_OFFLINE=1 to load a revision pulled "
      "before", "exit 2")
def test_pull_hub_unreachable(request, caplog, capsys, hub, workspace, cache_dir, monkeypatch):
    with socket.socket() as probe:  # a loopback port that nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    point_client_at(monkeypatch, endpoint)
    fails_hub_cli(request, caplog, capsys, workspace, cache_dir, ["pull", "tester/anything"], 2, endpoint=endpoint)


@case("CLI", "`pull` of a repository that carries pickle weights (`generator/diffusion_pytorch_model.bin`)",
      "{repo} at commit … carries pickle files ['generator/diffusion_pytorch_model.bin']; synthgen loads safetensors "
      "weights only and rejects repositories that carry pickle files", "exit 2")
def test_pull_repository_with_pickle_weights(request, caplog, capsys, pushed, workspace, cache_dir):
    payload = io.BytesIO()
    torch.save({"weight": torch.zeros(2)}, payload)
    upload(pushed, "generator/diffusion_pytorch_model.bin", payload.getvalue())
    fails_hub_cli(request, caplog, capsys, workspace, cache_dir, ["pull", pushed], 2, repo=pushed)


@case("CLI", "`pull ../escape`: a repository id that would leave the cache folder",
      "invalid repository id '../escape': Repo id must use alphanumeric chars, '-', '_' or '.'. The name cannot "
      "start or end with '-' or '.' and the maximum length is 96: '../escape'.", "exit 2")
def test_pull_path_traversal_repo_id(request, caplog, capsys, hub, workspace, cache_dir):
    fails_hub_cli(request, caplog, capsys, workspace, cache_dir, ["pull", "../escape"], 2)


@case("CLI", "`push` to `tester/../../escape`", "repository id must be NAMESPACE/NAME, got 'tester/../../escape'",
      "exit 2")
def test_push_path_traversal_repo_id(request, caplog, capsys, hub, run_dir, workspace, cache_dir):
    before = hub.request_count()
    fails_hub_cli(request, caplog, capsys, workspace, cache_dir, ["push", str(run_dir), "tester/../../escape"], 2)
    assert hub.request_count() == before


@case("CLI", "`privacy recompute` of a hand-written card with `delta: 1e-5`",
      "differential_privacy.delta is the text '1e-5', not a number: YAML 1.1 reads an exponent number without a dot "
      "as text; write it as 1.0e-05", "exit 2")
def test_recompute_card_delta_without_dot(request, caplog, capsys, workspace, cache_dir):
    card = workspace / "README.md"
    card.write_text("---\ndifferential_privacy:\n  private: true\n  epsilon: 1.0\n  delta: 1e-5\n  events:\n"
                    "  - kind: gaussian\n    parameter: 5.0\n    count: 1\n---\n# card\n")
    fails_hub_cli(request, caplog, capsys, workspace, cache_dir, ["privacy", "recompute", str(card)], 2)
