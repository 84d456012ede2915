"""Security rules: no remote code or unsafe deserialisation, no token in logs or files, loopback only.

The static checks read every Python file of the product (synthgen/, app/, scripts/), so a new
module is covered as soon as it exists. Each checker is also run on planted code, so that a
checker that cannot fire does not pass silently.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from .conftest import small_config

ROOT = Path(__file__).resolve().parent.parent
PRODUCT_FOLDERS = ("synthgen", "app", "scripts")
TOKEN = "hf_synthgenSecurityCheck7f3a9c"  # a made-up token; only its appearance matters


def product_files(suffixes: tuple[str, ...] = (".py",)) -> list[Path]:
    files = []
    for folder in PRODUCT_FOLDERS:
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in suffixes and "__pycache__" not in p.parts]
    return sorted(files)


def _call_name(node: ast.Call) -> str:
    function = node.func
    parts = []
    while isinstance(function, ast.Attribute):
        parts.append(function.attr)
        function = function.value
    if isinstance(function, ast.Name):
        parts.append(function.id)
    else:  # a call on an expression, e.g. Model(config).eval(): not the builtin
        parts.append("<expression>")
    return ".".join(reversed(parts))


def unsafe_loading(source: str, filename: str = "<source>") -> list[str]:
    """Return the places in `source` that enable remote code or deserialise by running code.

    torch.load must pass weights_only=True, except inside a function that mentions
    trust_pickle: that is the user's explicit opt-in for a checkpoint they trust.
    """
    tree = ast.parse(source, filename)
    findings = []
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]

    def opted_in(node: ast.AST) -> bool:
        return any(f.lineno <= node.lineno <= f.end_lineno and "trust_pickle" in ast.unparse(f) for f in functions)

    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _call_name(node)
        where = f"{filename}:{node.lineno}"
        keywords = {k.arg: k.value for k in node.keywords if k.arg}
        remote = keywords.get("trust_remote_code")
        if remote is not None and not (isinstance(remote, ast.Constant) and remote.value is False):
            findings.append(f"{where}: trust_remote_code is not False")
        for argument in ("custom_pipeline", "custom_revision"):
            if argument in keywords:
                findings.append(f"{where}: {argument} loads code from a repository")
        allow = keywords.get("allow_pickle")
        if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
            findings.append(f"{where}: allow_pickle is not False")
        safetensors = keywords.get("use_safetensors")
        if isinstance(safetensors, ast.Constant) and safetensors.value is False:
            findings.append(f"{where}: use_safetensors=False")
        if name in ("pickle.load", "pickle.loads", "dill.load", "dill.loads", "cloudpickle.load", "marshal.loads"):
            findings.append(f"{where}: {name} runs code from the data")
        if name in ("eval", "exec"):
            findings.append(f"{where}: {name}()")
        if name == "torch.load":
            weights_only = keywords.get("weights_only")
            safe = isinstance(weights_only, ast.Constant) and weights_only.value is True
            if not safe and not opted_in(node):
                findings.append(f"{where}: torch.load without weights_only=True")
    return findings


def test_product_enables_no_remote_code():
    findings = []
    for path in product_files():
        findings += unsafe_loading(path.read_text(), str(path.relative_to(ROOT)))
    assert findings == []


def test_unsafe_loading_check_finds_planted_code():
    planted = {
        "DiffusionPipeline.from_pretrained(path, trust_remote_code=True)": "trust_remote_code",
        "AutoModel.from_pretrained(path, trust_remote_code=flag)": "trust_remote_code",
        "DiffusionPipeline.from_pretrained(path, custom_pipeline='x/y')": "custom_pipeline",
        "numpy.load(path, allow_pickle=True)": "allow_pickle",
        "Model.from_pretrained(path, use_safetensors=False)": "use_safetensors",
        "pickle.loads(blob)": "pickle.loads",
        "eval(text)": "eval",
        "torch.load(path)": "weights_only",
        "torch.load(path, weights_only=False)": "weights_only",
    }
    for source, expected in planted.items():
        findings = unsafe_loading(source)
        assert len(findings) == 1, source
        assert expected in findings[0], source
    assert unsafe_loading("torch.load(path, weights_only=True)") == []
    assert unsafe_loading("model = Classifier(config).eval()") == []
    opted = "def load(path, trust_pickle):\n    if trust_pickle:\n        return torch.load(path, weights_only=False)\n"
    assert unsafe_loading(opted) == []


# ---------------------------------------------------------------- tokens


def _run_cli(args: list[str], env: dict, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "synthgen", "-v", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def _files_containing(folder: Path, text: str) -> list[str]:
    needle = text.encode()
    return sorted(str(p) for p in folder.rglob("*") if p.is_file() and needle in p.read_bytes())


def test_token_never_logged_or_written(small_teacher, mnist_small, tmp_path):
    env = {**os.environ, "HF_TOKEN": TOKEN, "HUGGING_FACE_HUB_TOKEN": TOKEN, "TQDM_DISABLE": "1"}
    config = small_config(small_teacher, tmp_path / "run", mnist_small)
    (tmp_path / "run.json").write_text(json.dumps(asdict(config)))
    outputs = []
    for args in (["transcribe", "--config", str(tmp_path / "run.json")],
                 ["audit", str(tmp_path / "run"), "--private-data", str(mnist_small), "--audit-size", "50",
                  "--shadow-models", "2", "--shadow-epochs", "1", "--synthetic-samples", "50", "--bootstrap", "10"],
                 ["ledger", "show"]):
        result = _run_cli(args, env)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs.append(result.stdout + result.stderr)
    assert "INFO synthgen" in outputs[0], "the logs were not captured"
    assert not any(TOKEN in output for output in outputs)
    assert _files_containing(tmp_path, TOKEN) == []
    ledger = Path(os.environ["SYNTHGEN_LEDGER"])
    assert ledger.is_file()
    assert TOKEN.encode() not in ledger.read_bytes()


def test_token_never_logged_by_hub_push(small_teacher, mnist_small, tmp_path, monkeypatch, caplog):
    pytest.importorskip("synthgen.hub", reason="the Hub release code is not in this checkout")
    test_hub = pytest.importorskip("tests.test_hub")
    from .hub_server import LocalHub

    from synthgen.cli import main
    from synthgen.transcribe import transcribe

    transcribe(small_config(small_teacher, tmp_path / "run", mnist_small))
    with LocalHub(valid_tokens={TOKEN}) as server:
        assert server.url.startswith("http://127.0.0.1:")
        test_hub.point_client_at(monkeypatch, server.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        caplog.set_level("DEBUG")
        assert main(["-v", "push", str(tmp_path / "run"), "tester/security"]) == 0
        stored = [stored_file.content for repo in server.state.repos.values() for commit in repo.commits.values()
                  for stored_file in commit.files.values()]
        stored += list(server.state.lfs_objects.values())
    assert len(stored) > 3, "the push stored no files"
    assert TOKEN not in caplog.text
    assert not any(TOKEN.encode() in content for content in stored)
    assert _files_containing(tmp_path, TOKEN) == []


# ---------------------------------------------------------------- servers bind to loopback


ANY_ADDRESS = re.compile(r"""["'](0\.0\.0\.0|::|\[::\])["']|--server\.address[ =]+(0\.0\.0\.0|::)""")


def wildcard_binds(text: str) -> list[str]:
    """Return lines that bind or advertise the wildcard address."""
    return [line.strip() for line in text.splitlines() if ANY_ADDRESS.search(line)]


def test_servers_bind_loopback_by_default():
    files = product_files((".py", ".sh", ".toml", ".yaml", ".yml", ".cfg")) + sorted((ROOT / "tests").glob("*.py"))
    files += [p for p in (ROOT / ".streamlit").glob("*.toml")] if (ROOT / ".streamlit").is_dir() else []
    findings = {str(p.relative_to(ROOT)): wildcard_binds(p.read_text()) for p in files if p.name != "test_security.py"}
    assert {name: lines for name, lines in findings.items() if lines} == {}
    # A streamlit app must be started on loopback: either every launch names the address, or
    # the project's streamlit config sets it.
    config = ROOT / ".streamlit" / "config.toml"
    configured = config.is_file() and re.search(r'address\s*=\s*"(127\.0\.0\.1|localhost)"', config.read_text())
    for path in files:
        for line in path.read_text().splitlines():
            if "streamlit run" in line and not configured and path.name != "test_security.py":
                assert re.search(r"--server\.address[ =]+(127\.0\.0\.1|localhost)", line), f"{path}: {line.strip()}"


def test_wildcard_bind_check_finds_planted_lines():
    assert wildcard_binds('server = HTTPServer(("0.0.0.0", 8000), Handler)')
    assert wildcard_binds("streamlit run app/main.py --server.address 0.0.0.0")
    assert wildcard_binds('socket.bind(("::", port))')
    assert not wildcard_binds('server = HTTPServer(("127.0.0.1", 0), Handler)')
