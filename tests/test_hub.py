"""Push and pull through the real huggingface_hub client against a local Hub-compatible server
on 127.0.0.1: byte-identical round trips, leak scan of everything pushed, rejected repositories
and failures that leave no cache entry, offline loading without requests, and datasets."""

import json
import re
import socket

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from synthgen.cards import parse_card, release_facts
from synthgen.cli import main
from synthgen.hub import (
    HubAuthenticationError, HubConnectionError, HubNotFoundError, IncompleteReleaseError, ReleaseError,
    ReleaseNotCachedError, UnsafeReleaseError, pull, push, stage_release,
)
from synthgen.hub_cli import RECOMPUTE_MISMATCH_EXIT
from synthgen.models import Classifier, Generator
from synthgen.pipeline import DPSDPipeline

from .conftest import SMALL_TRAIN
from .hub_server import LocalHub
from .release_runs import audited_run, release_run

TOKEN = "hf_test_token"


@pytest.fixture(scope="session")
def local_hub():
    with LocalHub(valid_tokens={TOKEN}) as hub:
        yield hub


@pytest.fixture(scope="session")
def agent_registry_file(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf-agents") / "agent_harnesses.json")


def point_client_at(monkeypatch, endpoint: str, offline: bool = False) -> None:
    """Configure the Hub clients as a fresh process started with these variables would be.

    huggingface_hub, diffusers and datasets read HF_ENDPOINT, HF_HUB_OFFLINE and
    HF_HUB_DISABLE_XET once, when first imported (here in an earlier test, under the suite's
    HF_HUB_OFFLINE=1), so their copies are set too. synthgen reads the variables on each call.
    """
    import datasets.config
    import diffusers.utils.hub_utils
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")  # plain Git LFS: the local server has no Xet storage
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(diffusers.utils.hub_utils, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", endpoint)
    monkeypatch.setattr(datasets.config, "HUB_DATASETS_URL", endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", offline)


@pytest.fixture
def hub(local_hub, monkeypatch, tmp_path, agent_registry_file):
    """The local Hub with the clients pointed at it, a valid token and a fresh cache."""
    import huggingface_hub.constants as constants

    point_client_at(monkeypatch, local_hub.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", agent_registry_file)
    return local_hub


@pytest.fixture
def cache_dir(tmp_path):
    return tmp_path / "hf-home" / "hub"  # $HF_HOME/hub, with HF_HOME from the suite's autouse fixture


@pytest.fixture(scope="module")
def run_dir(small_teacher, mnist_small, tmp_path_factory):
    return release_run("gaussian", small_teacher, mnist_small, tmp_path_factory)


_repo_counter = iter(range(10_000))


@pytest.fixture
def repo_id():
    return f"tester/release-{next(_repo_counter)}"


def cache_listing(cache_dir) -> list[str]:
    """Every file and folder under the cache, relative; empty when there is no cache folder."""
    if not cache_dir.exists():
        return []
    return sorted(path.relative_to(cache_dir).as_posix() for path in cache_dir.rglob("*"))


def local_pipeline(run_dir) -> DPSDPipeline:
    return DPSDPipeline(generator=Generator.from_pretrained(run_dir / "generator"),
                        student=Classifier.from_pretrained(run_dir / "student"))


def stored_files(local_hub, repo_id, revision="main") -> dict[str, bytes]:
    repo = local_hub.state.repos[("model", repo_id)]
    return {path: stored.content for path, stored in repo.resolve(revision).files.items()}


def upload(repo_id, path_in_repo, content: bytes, revision=None):
    from huggingface_hub import HfApi

    return HfApi().upload_file(path_or_fileobj=content, path_in_repo=path_in_repo, repo_id=repo_id, revision=revision)


# ---------------------------------------------------------------- round trip


def test_push_pull_by_revision_is_byte_identical(hub, run_dir, repo_id):
    pushed = push(run_dir, repo_id, revision="v1")
    release = pull(repo_id, revision="v1")
    assert release.commit == pushed.commit
    assert release.path.name == pushed.commit
    for part in ("generator", "student"):
        name = f"{part}/diffusion_pytorch_model.safetensors"
        assert (release.path / name).read_bytes() == (run_dir / name).read_bytes(), name
    assert (release.path / "privacy_report.json").read_bytes() == (run_dir / "privacy_report.json").read_bytes()
    expected = local_pipeline(run_dir)(num_images=24, generator=torch.Generator().manual_seed(5), output_type="pt")
    pulled = release.pipeline(num_images=24, generator=torch.Generator().manual_seed(5), output_type="pt")
    assert torch.equal(pulled.images, expected.images)
    assert torch.equal(pulled.labels, expected.labels)


def test_pull_by_commit_after_branch_moves(hub, run_dir, repo_id):
    first = push(run_dir, repo_id)
    upload(repo_id, "notes.txt", b"a later commit on main")
    second = pull(repo_id)
    old = pull(repo_id, revision=first.commit)
    assert second.commit != first.commit
    assert old.commit == first.commit
    assert "notes.txt" not in old.files
    assert (old.path / "README.md").read_bytes() == stored_files(hub, repo_id, first.commit)["README.md"]


def test_push_replaces_files_of_earlier_release(hub, run_dir, repo_id):
    push(run_dir, repo_id)
    upload(repo_id, "stale.txt", b"left over from an older release")
    push(run_dir, repo_id)
    assert sorted(stored_files(hub, repo_id)) == [
        ".gitattributes", "README.md", "generator/config.json", "generator/diffusion_pytorch_model.safetensors",
        "model_index.json", "privacy_report.json", "samples.png", "student/config.json",
        "student/diffusion_pytorch_model.safetensors",
    ]


@pytest.mark.parametrize("audited", [False, True])
def test_pushed_files_leak_nothing_private(hub, repo_id, small_teacher, mnist_small, tmp_path_factory, tmp_path,
                                           audited):
    from synthgen.data import load_image_data
    from synthgen.teacher import load_teacher

    from .release_scan import PrivateFacts, scan_release, teacher_tensors

    if audited:
        run_dir = audited_run(small_teacher, mnist_small, tmp_path_factory)
    else:
        run_dir = release_run("gaussian", small_teacher, mnist_small, tmp_path_factory)
    push(run_dir, repo_id)
    released = tmp_path / "released"
    for name, content in stored_files(hub, repo_id).items():
        (released / name).parent.mkdir(parents=True, exist_ok=True)
        (released / name).write_bytes(content)
    names = sorted(path.relative_to(released).as_posix() for path in released.rglob("*") if path.is_file())
    assert not [name for name in names if name.startswith("private/")]
    assert "metrics.jsonl" not in names
    assert not [name for name in names if name.endswith((".pt", ".pth", ".bin", ".pkl", ".ckpt"))]
    assert ("audit.json" in names) == audited

    data = load_image_data(mnist_small, "train")
    teacher = load_teacher(small_teacher)
    run_config = json.loads((run_dir / "private" / "run_config.json").read_text())
    ledger_key = json.loads((run_dir / "private" / "ledger_key.json").read_text())
    facts = PrivateFacts(
        strings={
            "private data path": str(mnist_small), "teacher path": str(small_teacher), "run folder": str(run_dir),
            "ledger path": str(ledger_key["ledger"]), "run id": run_config["run_id"],
            "dataset fingerprint": data.fingerprint.split(":")[1],
            "teacher fingerprint": teacher.fingerprint.split(":")[1],
            "dataset size key": "num_examples",
        },
        integers={"training-set size": len(data)},
        binary_integers={"training-set size": len(data)},
        tensors=teacher_tensors(teacher.module),
    )
    assert len(data) == SMALL_TRAIN
    assert scan_release([released / name for name in names], facts) == []


def test_push_releases_audit(hub, repo_id, small_teacher, mnist_small, tmp_path_factory):
    audited = audited_run(small_teacher, mnist_small, tmp_path_factory)
    pushed = push(audited, repo_id)
    files = stored_files(hub, repo_id)
    assert files["audit.json"] == (audited / "audit.json").read_bytes()
    assert b"## Empirical audit" in files["README.md"]
    assert "audit.json" in pushed.files
    assert "audit.json" in pull(repo_id).files


def test_card_on_hub_parses_back(hub, run_dir, repo_id):
    from huggingface_hub import ModelCard

    push(run_dir, repo_id)
    card = ModelCard.load(repo_id)  # hf_hub_download over HTTP
    report = json.loads((run_dir / "privacy_report.json").read_text())
    assert card.data.to_dict()["differential_privacy"] == release_facts(report)["differential_privacy"]
    assert card.data.eval_results[0].metric_value == report["evaluation"]["student_accuracy"]


def test_diffusers_from_pretrained_over_http(hub, run_dir, repo_id):
    pushed = push(run_dir, repo_id)
    generator = Generator.from_pretrained(repo_id, subfolder="generator", revision=pushed.commit,
                                          use_safetensors=True)
    expected = load_file(run_dir / "generator" / "diffusion_pytorch_model.safetensors")
    for key, tensor in generator.state_dict().items():
        assert torch.equal(tensor, expected[key]), key


# ---------------------------------------------------------------- recompute from the Hub


def test_recompute_from_hub_repo(hub, run_dir, repo_id, capsys):
    push(run_dir, repo_id, revision="v1")
    assert main(["privacy", "recompute", repo_id, "--revision", "v1"]) == 0
    output = json.loads(capsys.readouterr().out)
    assert output["passed"] is True
    assert output["source"] == f"{repo_id}@v1"


def test_recompute_detects_edited_card_on_hub(hub, run_dir, repo_id, capsys):
    push(run_dir, repo_id)
    card = stored_files(hub, repo_id)["README.md"].decode()
    epsilon = json.loads((run_dir / "privacy_report.json").read_text())["epsilon"]
    edited = card.replace(f"  epsilon: {epsilon!r}\n", "  epsilon: 1.0\n", 1)
    assert edited != card
    upload(repo_id, "README.md", edited.encode())
    assert main(["privacy", "recompute", repo_id]) == RECOMPUTE_MISMATCH_EXIT
    assert "epsilon" in json.loads(capsys.readouterr().out)["failed_checks"]
    assert parse_card(edited)["differential_privacy"]["epsilon"] == 1.0


def test_recompute_of_repo_without_card(hub, repo_id, caplog, monkeypatch):
    from huggingface_hub import HfApi

    HfApi().create_repo(repo_id)
    upload(repo_id, "notes.txt", b"not a release")
    assert main(["privacy", "recompute", repo_id]) == 2
    assert f"{repo_id} has no README.md, so it is not a synthgen release" in caplog.text
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["privacy", "recompute", repo_id, "--revision", "v2"]) == 2
    assert "HF_HUB_OFFLINE is set and the card of" in caplog.text


# ---------------------------------------------------------------- rejected repositories and failures


@pytest.mark.parametrize("pickle_path", ["generator/diffusion_pytorch_model.bin", "extra/weights.pkl"])
def test_pull_rejects_pickle_weights(hub, run_dir, repo_id, cache_dir, pickle_path):
    import io

    push(run_dir, repo_id, revision="v1")
    good = pull(repo_id, revision="v1")
    before = cache_listing(cache_dir)
    payload = io.BytesIO()
    torch.save(Generator.from_pretrained(run_dir / "generator").state_dict(), payload)
    upload(repo_id, pickle_path, payload.getvalue())
    with pytest.raises(UnsafeReleaseError, match=rf"carries pickle files \['{re.escape(pickle_path)}'\]"):
        pull(repo_id)
    assert cache_listing(cache_dir) == before
    assert (good.path / "generator" / "diffusion_pytorch_model.safetensors").is_file()


def test_pull_rejects_missing_file(hub, run_dir, repo_id, cache_dir):
    from huggingface_hub import HfApi

    push(run_dir, repo_id)
    HfApi().delete_file("student/diffusion_pytorch_model.safetensors", repo_id)
    with pytest.raises(IncompleteReleaseError, match=r"lacks \['student/diffusion_pytorch_model.safetensors'\]"):
        pull(repo_id)
    assert cache_listing(cache_dir) == []


def test_pull_failing_download_leaves_no_cache_entry(hub, run_dir, repo_id, cache_dir):
    push(run_dir, repo_id)
    hub.state.unavailable.add((repo_id, "student/diffusion_pytorch_model.safetensors"))
    try:
        with pytest.raises(IncompleteReleaseError, match="could not be downloaded"):
            pull(repo_id)
    finally:
        hub.state.unavailable.clear()
    assert cache_listing(cache_dir) == []  # the staging folder is gone too
    assert pull(repo_id).commit  # the same pull works once the file is served


def test_pull_unknown_revision(hub, run_dir, repo_id, cache_dir):
    push(run_dir, repo_id)
    with pytest.raises(HubNotFoundError, match="revision 'no-such-branch' not found"):
        pull(repo_id, revision="no-such-branch")
    assert cache_listing(cache_dir) == []


def test_pull_unknown_repository(hub, cache_dir):
    with pytest.raises(HubNotFoundError, match="repository tester/absent not found"):
        pull("tester/absent")
    assert cache_listing(cache_dir) == []


def test_pull_unreachable_endpoint(hub, monkeypatch, cache_dir):
    with socket.socket() as probe:  # a loopback port that nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    point_client_at(monkeypatch, f"http://127.0.0.1:{port}")
    with pytest.raises(HubConnectionError, match=rf"cannot connect to the Hub at http://127.0.0.1:{port}"):
        pull("tester/anything")
    assert cache_listing(cache_dir) == []


def test_rejected_token(hub, run_dir, repo_id, monkeypatch, cache_dir):
    push(run_dir, repo_id)
    monkeypatch.setenv("HF_TOKEN", "hf_revoked")
    with pytest.raises(HubAuthenticationError, match=r"rejected the token \(HTTP 401\)"):
        pull(repo_id)
    assert cache_listing(cache_dir) == []
    with pytest.raises(HubAuthenticationError, match="with write access"):
        push(run_dir, repo_id)
    with pytest.raises(HubAuthenticationError, match=r"requires a token and none was sent \(HTTP 401\)"):
        push(run_dir, repo_id, token=False)


def test_private_repository_needs_token(hub, run_dir, repo_id, monkeypatch, cache_dir):
    push(run_dir, repo_id, private=True)
    assert hub.state.repos[("model", repo_id)].private
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubNotFoundError, match="or it is private"):
        pull(repo_id, token=False)
    assert cache_listing(cache_dir) == []


@pytest.mark.parametrize("repo,revision,message", [
    ("no-namespace", None, "repository id must be NAMESPACE/NAME"),
    ("a/b/c", None, "repository id must be NAMESPACE/NAME"),
    ("tester/bad name", None, "invalid repository id"),
    ("tester/ok", "0" * 40, "--revision must name a branch"),
    ("tester/ok", "bad..rev", "--revision must name a branch"),
    ("tester/ok", "v1.lock", "--revision must name a branch"),
])
def test_push_rejects_invalid_names(hub, run_dir, repo, revision, message):
    before = hub.request_count()
    with pytest.raises(ReleaseError, match=message):
        push(run_dir, repo, revision=revision)
    assert hub.request_count() == before


def test_private_push_to_public_repository_rejected(hub, run_dir, repo_id):
    push(run_dir, repo_id)
    with pytest.raises(ReleaseError, match="already exists and is public"):
        push(run_dir, repo_id, private=True)


# ---------------------------------------------------------------- offline


def test_offline_pull_makes_no_requests(hub, run_dir, repo_id, monkeypatch):
    pushed = push(run_dir, repo_id, revision="v1")
    online = pull(repo_id, revision="v1")
    point_client_at(monkeypatch, hub.url, offline=True)
    before = hub.request_count()
    offline = pull(repo_id, revision="v1")
    by_commit = pull(repo_id, revision=pushed.commit)
    images = offline.pipeline(num_images=8, generator=torch.Generator().manual_seed(1), output_type="pt").images
    assert hub.request_count() == before
    assert offline.commit == by_commit.commit == online.commit == pushed.commit
    assert offline.path == online.path
    expected = online.pipeline(num_images=8, generator=torch.Generator().manual_seed(1), output_type="pt").images
    assert torch.equal(images, expected)
    with pytest.raises(ReleaseNotCachedError, match="revision 'main' .* is not in the cache"):
        pull(repo_id)
    assert hub.request_count() == before


# ---------------------------------------------------------------- staging checks


def test_stage_rejects_non_private_run(run_dir, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    report = json.loads((copy / "privacy_report.json").read_text())
    report["private"] = False
    (copy / "privacy_report.json").write_text(json.dumps(report))
    with pytest.raises(ReleaseError, match="is not private"):
        stage_release(copy, tmp_path / "staged")


@pytest.mark.parametrize("change,error,message", [
    (lambda run: (run / "privacy_report.json").unlink(), IncompleteReleaseError, "contains no finished run"),
    (lambda run: (run / "student" / "diffusion_pytorch_model.safetensors").unlink(), IncompleteReleaseError,
     "is missing"),
    (lambda run: (run / "generator" / "extra.pt").write_bytes(b"pickle"), UnsafeReleaseError, "pickle files"),
])
def test_stage_rejects_broken_run(run_dir, tmp_path, change, error, message):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    change(copy)
    with pytest.raises(error, match=message):
        stage_release(copy, tmp_path / "staged")


def report_change(field, value):
    def change(run):
        report = json.loads((run / "privacy_report.json").read_text())
        report[field] = value
        (run / "privacy_report.json").write_text(json.dumps(report))
    return change


@pytest.mark.parametrize("change,message", [
    # An epsilon below what the events cost, and a single teacher's run relabelled example-level.
    (report_change("epsilon", 1.0), r"does not agree with its own events \(epsilon: "),
    (report_change("unit", "example"), r"does not agree with its own events \(unit: "),
    (lambda run: (run / "privacy_report.json").write_text("{not json"), "privacy_report.json is not a readable JSON"),
    (lambda run: (run / "audit.json").write_text('{"format": "x"}'), "not those of 'synthgen audit'"),
])
def test_stage_rejects_report_that_does_not_recompute(run_dir, tmp_path, change, message):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    change(copy)
    with pytest.raises(ReleaseError, match=message):
        stage_release(copy, tmp_path / "staged")
    assert not (tmp_path / "staged").exists()


def test_push_of_altered_report_creates_no_repo(hub, run_dir, repo_id, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    report_change("epsilon", 1.0)(copy)
    with pytest.raises(ReleaseError, match="does not agree"):
        push(copy, repo_id)
    from huggingface_hub import HfApi

    assert not HfApi().repo_exists(repo_id)


@pytest.mark.parametrize("leak", ["num_examples", "path"])
def test_stage_rejects_private_facts_in_report(run_dir, tmp_path, leak):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    report = json.loads((copy / "privacy_report.json").read_text())
    if leak == "num_examples":
        report["public_facts"]["num_examples"] = SMALL_TRAIN
    else:
        run_config = json.loads((copy / "private" / "run_config.json").read_text())
        report["public_facts"]["note"] = f"trained on {run_config['config']['eval_data']}"
    (copy / "privacy_report.json").write_text(json.dumps(report))
    with pytest.raises(UnsafeReleaseError):
        stage_release(copy, tmp_path / "staged")


# ---------------------------------------------------------------- command line


def test_cli_push_and_pull(hub, run_dir, repo_id, tmp_path, capsys):
    assert main(["push", str(run_dir), repo_id, "--revision", "cli"]) == 0
    pushed = json.loads(capsys.readouterr().out)
    samples = tmp_path / "samples"
    assert main(["pull", repo_id, "--revision", "cli", "--samples", "3", "--samples-dir", str(samples)]) == 0
    pulled = json.loads(capsys.readouterr().out)
    assert pulled["commit"] == pushed["commit"]
    assert pulled["revision"] == "cli"
    assert len(list(samples.glob("*.png"))) == 3


def test_cli_pull_unknown_revision_exit_2(hub, run_dir, repo_id, caplog):
    push(run_dir, repo_id)
    assert main(["pull", repo_id, "--revision", "nope"]) == 2
    assert "revision 'nope' not found" in caplog.text


# ---------------------------------------------------------------- datasets through the same server


def test_datasets_push_and_load(hub, run_dir, tmp_path, monkeypatch):
    import datasets
    from datasets import ClassLabel, Dataset, Features, Image, load_dataset

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    output = local_pipeline(run_dir)(num_images=12, generator=torch.Generator().manual_seed(0), output_type="pil")
    features = Features({"image": Image(), "label": ClassLabel(names=output.class_names)})
    dataset = Dataset.from_dict({"image": output.images, "label": output.labels.tolist()}, features=features)
    dataset.push_to_hub("tester/synthetic", split="train")
    repo = hub.state.repos[("dataset", "tester/synthetic")]
    parquet = [path for path in repo.resolve("main").files if path.endswith(".parquet")]
    assert parquet and all(repo.resolve("main").files[path].lfs for path in parquet)
    loaded = load_dataset("tester/synthetic", split="train", cache_dir=str(tmp_path / "datasets-cache"))
    assert loaded["label"] == output.labels.tolist()
    assert np.array_equal(np.asarray(loaded[3]["image"]), np.asarray(output.images[3]))


@pytest.mark.parametrize("extra,message", [(["--device", "nonsense"], "device must be 'auto', 'cpu' or 'cuda[:N]'"),
                                           (["--samples", "-3"], "--samples must be an integer >= 0, got -3")])
def test_pull_options_checked_before_download(hub, repo_id, cache_dir, caplog, extra, message):
    before = hub.request_count()
    assert main(["pull", repo_id, *extra]) == 2
    assert message in caplog.text
    assert hub.request_count() == before


def test_recompute_names_corrupt_report(run_dir, tmp_path, caplog):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "privacy_report.json").write_text("{not json")
    assert main(["privacy", "recompute", str(copy)]) == 2
    assert f"{copy / 'privacy_report.json'} is not a readable JSON privacy report" in caplog.text
