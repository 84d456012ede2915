"""Model cards of real runs (Gaussian, noisy-label, DP-SGD teacher): YAML round trip, plain-language
sections, and `synthgen privacy recompute` on good and edited cards."""

import copy
import json
import re

import pytest
import yaml

from synthgen.cards import parse_card, release_facts, render_card
from synthgen.cli import main
from synthgen.hub_cli import RECOMPUTE_MISMATCH_EXIT
from synthgen.recompute import recompute_card
from synthgen.transcribe import REPORT_FILE

from .release_runs import MECHANISMS, audited_run, release_run


@pytest.fixture(scope="module")
def reports(small_teacher, mnist_small, tmp_path_factory):
    """Privacy reports of one small real run per mechanism."""
    return {mechanism: json.loads((release_run(mechanism, small_teacher, mnist_small, tmp_path_factory)
                                   / REPORT_FILE).read_text())
            for mechanism in MECHANISMS}


@pytest.fixture(scope="module")
def audit(small_teacher, mnist_small, tmp_path_factory):
    """The audit.json of a small real `synthgen audit` of the Gaussian run."""
    return json.loads((audited_run(small_teacher, mnist_small, tmp_path_factory) / "audit.json").read_text())


def split_card(text: str) -> tuple[dict, str]:
    match = re.match(r"^---\n(.*?)\n---\n(.*)$", text, re.DOTALL)
    assert match, "the card must start with a YAML block"
    return yaml.safe_load(match.group(1)), match.group(2)


def write_card(path, metadata: dict, body: str) -> None:
    path.write_text(f"---\n{yaml.safe_dump(metadata, sort_keys=False)}---\n{body}", encoding="utf-8")


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_card_yaml_equals_report_facts(reports, mechanism):
    report = reports[mechanism]
    metadata = parse_card(render_card(report, repo_id="tester/release"))
    facts = release_facts(report)
    for key in ("differential_privacy", "evaluation", "public_facts"):
        assert metadata[key] == facts[key], key
    privacy = metadata["differential_privacy"]
    for key in ("unit", "epsilon", "delta", "accountant", "events", "mechanism", "queries", "steps"):
        assert privacy[key] == report[key], key
    assert metadata["library_name"] == "diffusers"
    assert metadata["license"] == "apache-2.0"
    assert f"{report['unit']}-level-dp" in metadata["tags"]
    result = metadata["model-index"][0]["results"][0]
    assert result["metrics"][0]["value"] == report["evaluation"]["student_accuracy"]
    assert "private" in result["dataset"]["name"]
    assert "not covered by the DP guarantee" in result["metrics"][0]["name"]


def test_card_round_trip_keeps_exact_floats(reports):
    report = reports["gaussian"]
    privacy = parse_card(render_card(report))["differential_privacy"]
    assert privacy["epsilon"] == report["epsilon"]
    assert privacy["mechanism"]["noise_multiplier"] == report["mechanism"]["noise_multiplier"]
    assert privacy["delta"] == 1e-5


@pytest.mark.parametrize("mechanism", ["gaussian", "noisy-label"])
def test_teacher_level_card_says_not_example_level(reports, mechanism):
    _, body = split_card(render_card(reports[mechanism]))
    assert "at the teacher level" in body
    assert "**not an example-level guarantee**" in body
    assert "**Teacher-level, not example-level.**" in body
    assert "at the example level" not in body
    assert "reveal the approximate size" not in body


def test_example_level_card_states_unit_and_size_leak(reports):
    report = reports["dp-teacher"]
    _, body = split_card(render_card(report))
    assert "at the example level" in body
    assert "not an example-level guarantee" not in body
    assert "differ in one example" in body
    assert "reveal the approximate size" in body
    assert f"{report['teacher_dp']['add_remove_epsilon']['pld']:.4g} (PLD)" in body
    assert "matches the spend recorded in the privacy ledger" in body


def test_card_body_states_numbers_and_command(reports):
    report = reports["noisy-label"]
    _, body = split_card(render_card(report, repo_id="tester/release", revision="v2"))
    assert f"({report['epsilon']:.4g}, 1e-05)-differential privacy" in body
    assert "synthgen privacy recompute tester/release --revision v2" in body
    assert f"| eps0 | {report['mechanism']['eps0']:.4g} |" in body
    assert f"{report['per_query_label_dp']['epsilon']:.4g}-label-DP" in body
    assert f"| randomized_response | {report['events'][0]['parameter']} | {report['queries']} |" in body
    assert "The noise seed was fixed by the user" in body  # the test runs fix --noise-seed


def test_sections_without_content_are_left_out(reports):
    report = copy.deepcopy(reports["gaussian"])
    full_metadata, full_body = split_card(render_card(report))
    assert "## Utility" in full_body
    assert "## Empirical audit" not in full_body
    assert "audit" not in full_metadata
    report["evaluation"]["student_accuracy"] = None
    metadata, body = split_card(render_card(report))
    assert "## Utility" not in body
    assert "model-index" not in metadata
    assert "accuracy below" not in body


def test_audited_card_shows_audit(reports, audit):
    from synthgen.audit import summarise

    metadata, body = split_card(render_card(reports["gaussian"], audit=audit))
    summary = summarise(audit)
    assert metadata["audit"]["results"] == summary
    assert "not covered by the DP guarantee" in metadata["audit"]["note"]
    assert "## Empirical audit" in body
    student = summary["lira/student"]
    assert (f"| lira, student | {student['auc']:.4g} | {student['tpr_at_0.001_fpr']:.4g} | "
            f"{student['tpr_at_0.01_fpr']:.4g} | {student['dp_tpr_bound_at_0.01_fpr']:.4g} |") in body
    assert "| lira, teacher |" in body
    assert "none (not private)" in body  # the teacher of a teacher-level run has no guarantee
    assert "`audit.json`: the empirical privacy audit" in body
    assert recompute_card(metadata).passed


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_card_has_no_placeholder_text(reports, mechanism):
    _, body = split_card(render_card(reports[mechanism], repo_id="tester/release"))
    for placeholder in ("TODO", "TBD", "N/A", "None", "null", "{{", "{%", "lorem", "[More Information"):
        assert placeholder not in body, placeholder
    assert not re.search(r"\n\n\n", body)


def test_render_rejects_non_private_report(reports):
    report = copy.deepcopy(reports["gaussian"])
    report["private"] = False
    report["unit"] = None
    with pytest.raises(ValueError, match="not private"):
        render_card(report)


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_recompute_matches_card(reports, mechanism):
    result = recompute_card(parse_card(render_card(reports[mechanism])))
    assert result.passed, [check for check in result.checks if not check.passed]
    assert result.pld_epsilon == pytest.approx(reports[mechanism]["epsilon"], rel=1e-9)
    if mechanism == "dp-teacher":
        assert result.rdp_epsilon is None
        assert result.add_remove_epsilons["rdp"] >= result.add_remove_epsilons["pld"]
    else:
        assert result.rdp_epsilon >= result.pld_epsilon


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_recompute_command_exit_0(reports, mechanism, tmp_path, capsys):
    (tmp_path / "README.md").write_text(render_card(reports[mechanism]), encoding="utf-8")
    assert main(["privacy", "recompute", str(tmp_path / "README.md")]) == 0
    output = json.loads(capsys.readouterr().out)
    assert output["passed"] is True
    assert output["card_epsilon"] == reports[mechanism]["epsilon"]


def test_recompute_run_folder_renders_its_card(reports, tmp_path, capsys):
    (tmp_path / REPORT_FILE).write_text(json.dumps(reports["gaussian"]))
    assert main(["privacy", "recompute", str(tmp_path)]) == 0
    assert "rendered from" in json.loads(capsys.readouterr().out)["source"]


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_recompute_detects_edited_epsilon(reports, mechanism, tmp_path, capsys, caplog):
    metadata, body = split_card(render_card(reports[mechanism]))
    metadata["differential_privacy"]["epsilon"] = round(metadata["differential_privacy"]["epsilon"] * 0.5, 3)
    write_card(tmp_path / "README.md", metadata, body)
    assert main(["privacy", "recompute", str(tmp_path / "README.md")]) == RECOMPUTE_MISMATCH_EXIT
    output = json.loads(capsys.readouterr().out)
    assert "epsilon" in output["failed_checks"]
    assert "the card disagrees with the recomputation" in caplog.text


@pytest.mark.parametrize("edit,failed", [
    (lambda dp: dp["events"][0].update(count=dp["events"][0]["count"] // 2), "epsilon"),
    (lambda dp: dp["mechanism"].update(noise_multiplier=dp["mechanism"]["noise_multiplier"] * 2), "noise_multiplier"),
    (lambda dp: dp["mechanism"].update(noise_std=dp["mechanism"]["noise_std"] * 2), "noise_scale"),
    (lambda dp: dp.update(queries=dp["queries"] // 2), "queries"),
    (lambda dp: dp.update(rdp_epsilon=dp["epsilon"] * 0.9), "rdp_epsilon"),
])
def test_recompute_detects_edited_gaussian_facts(reports, edit, failed):
    metadata = parse_card(render_card(reports["gaussian"]))
    edit(metadata["differential_privacy"])
    result = recompute_card(metadata)
    assert not result.passed
    assert failed in [check.name for check in result.checks if not check.passed]


def test_recompute_detects_edited_dp_sgd_facts(reports):
    metadata = parse_card(render_card(reports["dp-teacher"]))
    metadata["differential_privacy"]["teacher_dp"]["noise_multiplier"] *= 1.5
    result = recompute_card(metadata)
    assert [check.name for check in result.checks if not check.passed] == ["dp_sgd_parameters"]


@pytest.mark.parametrize("metadata,message", [
    ({"license": "mit"}, "no 'differential_privacy' block"),
    ({"differential_privacy": {"private": False}}, "not private"),
    ({"differential_privacy": {"private": True, "epsilon": "high", "delta": 1e-5}}, "epsilon must be a finite number"),
    ({"differential_privacy": {"private": True, "epsilon": 1.0, "delta": 2.0}}, r"delta must be in \(0, 1\)"),
    ({"differential_privacy": {"private": True, "epsilon": 1.0, "delta": 1e-5, "events": []}}, "non-empty list"),
    ({"differential_privacy": {"private": True, "epsilon": 1.0, "delta": 1e-5,
                               "events": [{"kind": "laplace", "parameter": 1.0, "count": 3}]}}, "unknown privacy event"),
])
def test_recompute_rejects_unusable_metadata(metadata, message):
    with pytest.raises(ValueError, match=message):
        recompute_card(metadata)


def test_recompute_command_invalid_card_exit_2(tmp_path, caplog):
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n# A card without privacy facts\n")
    assert main(["privacy", "recompute", str(tmp_path / "README.md")]) == 2
    assert "no 'differential_privacy' block" in caplog.text
    assert main(["privacy", "recompute", str(tmp_path / "missing" / "README.md")]) == 2
    assert "neither an existing path nor a Hub repository id" in caplog.text
