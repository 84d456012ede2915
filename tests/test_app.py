"""The synthgen app, page by page, with Streamlit's AppTest on a real tiny catalog, generator and dataset.

Also the confined SQL box (DatasetSQL), the sample downloads and the `synthgen app` command line.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import zipfile
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
from streamlit.testing.v1 import AppTest

from synthgen.app_support import (
    DatasetSQL, GeneratorChoice, QueryFailedError, QueryRejectedError, load_choice, read_catalog, sample_grid,
    samples_parquet, samples_zip,
)
from synthgen.cli import build_parser, main

from .app_data import app_data
from .dataset_builds import free_port, point_client_at
from .hub_server import LocalHub

ROOT = Path(__file__).resolve().parent.parent
ENTRY = ROOT / "app" / "synthgen_app.py"
TOKEN = "hf_app_test_token"
TIMEOUT = 120  # seconds per AppTest run: the first one imports torch and diffusers and loads a generator


@pytest.fixture(scope="module")
def data(small_teacher, mnist_small, tmp_path_factory):
    return app_data(small_teacher, mnist_small, tmp_path_factory)


@pytest.fixture
def catalog(data, monkeypatch):
    monkeypatch.setenv("SYNTHGEN_CATALOG", str(data.catalog))
    return data.catalog


@pytest.fixture(autouse=True)
def _fresh_app_caches():
    """Each test starts without the generators and datasets an earlier test's app loaded (Streamlit caches
    them per process)."""
    import streamlit as st

    st.cache_resource.clear()


@pytest.fixture(scope="module")
def local_hub():
    with LocalHub(valid_tokens={TOKEN}) as hub:
        yield hub


@pytest.fixture
def hub(local_hub, monkeypatch, tmp_path):
    point_client_at(monkeypatch, local_hub.url, TOKEN, tmp_path / "hf-home" / "hub", tmp_path / "agents.json")
    return local_hub


def start(page: str | None = None, **session) -> AppTest:
    app = AppTest.from_file(str(ENTRY), default_timeout=TIMEOUT)
    for key, value in session.items():
        app.session_state[key] = value
    app.run()
    if page is not None:
        app.switch_page(f"views/{page}.py")
        app.run()
    return app


def assert_clean(app: AppTest) -> None:
    """No uncaught exception (a traceback in the page) and no error message."""
    assert not app.exception, [element.value for element in app.exception]
    assert not app.error, [element.value for element in app.error]


def open_folder(app: AppTest, folder: Path) -> AppTest:
    app.text_input[2].set_value(str(folder))
    app.button[1].click()  # the "Open" button of the local-folder form
    return app.run()


def pull(app: AppTest, repo_id: str, revision: str = "") -> AppTest:
    app.text_input[0].set_value(repo_id)
    app.text_input[1].set_value(revision)
    app.button[0].click()  # the "Pull" button
    return app.run()


# ---------------------------------------------------------------- Generators


def test_generators_page_lists_runs(data, catalog):
    app = start()
    assert_clean(app)
    table = app.dataframe[0].value
    reports = {str(path): json.loads((path / "privacy_report.json").read_text())
               for path in (data.run_dir, data.audited_dir, data.spread_dir)}
    assert set(table["location"]) == set(reports)
    for row in table.to_dict("records"):
        report = reports[row["location"]]
        assert row["epsilon"] == report["epsilon"]
        assert row["unit"] == report["unit"]
        assert row["student_accuracy"] == report["evaluation"]["student_accuracy"]
        assert row["commit"].startswith("sha256:")
    assert app.sidebar.selectbox[0].value == GeneratorChoice("run", str(data.spread_dir)).key


def test_generators_page_without_catalog(tmp_path, monkeypatch):
    monkeypatch.setenv("SYNTHGEN_CATALOG", str(tmp_path / "none.duckdb"))
    app = start()
    assert_clean(app)
    assert "has no runs or releases yet" in app.info[0].value
    assert not (tmp_path / "none.duckdb").exists()  # browsing never creates a catalog
    samples = start("samples")
    assert "No generator selected" in samples.info[0].value


def test_pull_hub_release(data, catalog, hub, monkeypatch, tmp_path):
    from synthgen.hub import push

    # A copy of the catalog, so that recording the release leaves the shared one as it was.
    own = tmp_path / "catalog.duckdb"
    shutil.copyfile(catalog, own)
    monkeypatch.setenv("SYNTHGEN_CATALOG", str(own))
    pushed = push(data.run_dir, "tests/app-release")

    app = pull(start(), "tests/app-release")
    assert_clean(app)
    assert f"Pulled tests/app-release at commit {pushed.commit[:12]}" in app.success[0].value
    assert app.sidebar.selectbox[0].value == GeneratorChoice("hub", "tests/app-release").key
    releases = read_catalog(own).releases
    assert list(releases["commit"]) == [pushed.commit]
    table = app.dataframe[0].value
    release_row = table[table["kind"] == "release"].iloc[0]
    assert release_row["commit"] == pushed.commit
    report = json.loads((data.run_dir / "privacy_report.json").read_text())
    assert release_row["student_accuracy"] == report["evaluation"]["student_accuracy"]

    app.switch_page("views/privacy_card.py")
    app.run()
    assert_clean(app)
    assert "The card agrees with the recomputation" in app.success[0].value


def test_pull_unknown_repo_shows_error(catalog, hub):
    app = pull(start(), "tests/no-such-release")
    assert not app.exception
    assert "tests/no-such-release not found" in app.error[0].value


def test_pull_invalid_repo_id_shows_error(catalog, hub):
    app = pull(start(), "not-a-repo-id")
    assert not app.exception
    assert "NAMESPACE/NAME" in app.error[0].value


def test_pull_offline_hub_shows_error(catalog, monkeypatch, tmp_path):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    point_client_at(monkeypatch, endpoint, TOKEN, tmp_path / "hub-cache", tmp_path / "agents.json")
    app = pull(start(), "tests/app-release")
    assert not app.exception
    assert "cannot connect to the Hub" in app.error[0].value


def test_pull_uncached_release_offline_shows_error(catalog):
    app = pull(start(), "tests/app-release")  # HF_HUB_OFFLINE=1 and an empty cache
    assert not app.exception
    assert "not in the cache" in app.error[0].value


def test_open_missing_folder_shows_error(catalog, tmp_path):
    app = open_folder(start(), tmp_path / "gone")
    assert not app.exception
    assert "not found" in app.error[0].value


# ---------------------------------------------------------------- Samples


def test_samples_page_grid(data, catalog, caplog):
    caplog.set_level(logging.INFO, logger="synthgen.app")
    app = start("samples")
    assert_clean(app)
    summary = app.dataframe[0].value
    assert list(summary["class"]) == data.class_names
    assert (summary["images"] == 8).all()  # the default number per class
    assert ((summary["mean confidence"] > 0) & (summary["mean confidence"] <= 1)).all()
    assert len(app.get("image")) == 1
    assert len(app.get("download_button")) == 3

    app.slider[0].set_value(3).run()
    assert_clean(app)
    assert (app.dataframe[0].value["images"] == 3).all()
    app.multiselect[0].set_value(data.class_names[2:4]).run()
    assert list(app.dataframe[0].value["class"]) == data.class_names[2:4]
    loads = [record for record in caplog.records if record.getMessage().startswith("loading generator")]
    assert len(loads) == 1  # the widget changes reused the cached pipeline


def test_sample_downloads_hold_the_grid(data):
    source = load_choice(GeneratorChoice("run", str(data.spread_dir)))
    grid = sample_grid(source.pipeline, seed=5, per_class=2, classes=[0, 1, 2])
    again = sample_grid(source.pipeline, seed=5, per_class=2, classes=[0, 1, 2])
    assert all((a == b).all() for a, b in zip(grid.images, again.images))  # a seed gives the same grid

    with zipfile.ZipFile(io.BytesIO(samples_zip(grid))) as archive:
        lines = archive.read("labels.csv").decode().splitlines()
        assert len(lines) == 1 + 6
        assert len([name for name in archive.namelist() if name.endswith(".png")]) == 6
    table = pq.read_table(io.BytesIO(samples_parquet(grid)))
    assert table.column("label").to_pylist() == [0, 0, 1, 1, 2, 2]
    assert table.column("class_name").to_pylist() == [data.class_names[c] for c in (0, 0, 1, 1, 2, 2)]
    assert table.column("image").to_pylist()[0]["bytes"].startswith(b"\x89PNG")


# ---------------------------------------------------------------- Privacy card


def test_privacy_card_page_run(data, catalog):
    choice = GeneratorChoice("run", str(data.audited_dir))
    app = start("privacy_card", generator_pending=choice.key)
    assert_clean(app)
    report = json.loads((data.audited_dir / "privacy_report.json").read_text())
    assert f"epsilon {report['epsilon']:.6g}" in app.success[0].value
    assert app.metric[0].value == f"{report['epsilon']:.4g}"
    facts = app.dataframe[0].value.set_index("fact")["value"]
    assert facts["unit"] == report["unit"]
    assert float(facts["epsilon"]) == pytest.approx(report["epsilon"], rel=1e-5)
    audit = app.dataframe[2].value
    assert "AUC" in audit.columns
    assert len(audit) >= 2  # attacks on the student and the teacher, and the nearest-neighbour test


def test_privacy_card_page_edited_card(data, catalog, tmp_path):
    from synthgen.hub import stage_release

    release = tmp_path / "release"
    stage_release(data.run_dir, release)
    card = (release / "README.md").read_text()
    report = json.loads((data.run_dir / "privacy_report.json").read_text())
    stated = f"epsilon: {report['epsilon']}"
    assert stated in card
    (release / "README.md").write_text(card.replace(stated, "epsilon: 0.5", 1))

    app = open_folder(start(), release)
    assert_clean(app)
    app.switch_page("views/privacy_card.py")
    app.run()
    assert not app.exception
    message = app.error[0].value
    assert "The card disagrees with the recomputation" in message
    assert f"{0.5 - report['epsilon']:+.6g}" in message
    assert "- epsilon:" in message


def test_privacy_card_page_card_without_events(data, catalog, tmp_path):
    import yaml

    from synthgen.hub import stage_release

    release = tmp_path / "release"
    stage_release(data.run_dir, release)
    _, front, body = (release / "README.md").read_text().split("---\n", 2)
    metadata = yaml.safe_load(front)
    del metadata["differential_privacy"]["events"]
    (release / "README.md").write_text(f"---\n{yaml.safe_dump(metadata, sort_keys=False)}---\n{body}")

    app = open_folder(start(), release)
    app.switch_page("views/privacy_card.py")
    app.run()
    assert not app.exception
    message = app.error[0].value
    assert message.startswith("Recomputing epsilon from the card failed")
    assert "events must be a non-empty list" in message


# ---------------------------------------------------------------- Datasets


def test_datasets_page(data, catalog):
    app = start("datasets")
    assert_clean(app)
    manifest = json.loads((data.dataset / "synthgen_dataset.json").read_text())
    assert f"{manifest['rows']} rows" in app.markdown[0].value
    images = app.get("image")
    assert len(images) == 24  # one page of images
    assert app.get("vega_lite_chart")  # the class histogram

    app.button[0].click().run()  # run the example query
    assert_clean(app)
    result = app.dataframe[-1].value
    counts = dict(zip(result["class_name"], result["rows"]))
    expected = {name: count for name, count in zip(manifest["class_names"], manifest["label_counts"]) if count}
    assert counts == expected

    app.text_area[0].set_value(f"COPY (SELECT 1) TO '{data.dataset}/written.csv'")
    app.button[0].click().run()
    assert not app.exception
    assert "COPY statements are rejected" in app.error[0].value
    assert not (data.dataset / "written.csv").exists()


def test_datasets_page_missing_folder(catalog, tmp_path):
    app = start("datasets")
    app.text_input[0].set_value(str(tmp_path / "deleted-dataset")).run()
    assert not app.exception
    assert "dataset folder" in app.error[0].value
    assert "not found" in app.error[0].value


# ---------------------------------------------------------------- Runs


def test_runs_page(data, catalog):
    app = start("runs")
    assert_clean(app)
    charts = app.get("vega_lite_chart")
    assert len(charts) == 3  # accuracy and loss against epsilon, and the privacy-utility plot
    points = app.dataframe[0].value
    assert set(points["location"]) == {str(data.run_dir), str(data.audited_dir), str(data.spread_dir)}


# ---------------------------------------------------------------- the SQL box


@pytest.fixture(scope="module")
def dataset_sql(data):
    with DatasetSQL(data.dataset) as sql:
        yield sql


@pytest.mark.parametrize("query, kind", [
    ("COPY (SELECT 1) TO '{inside}/copied.csv'", "COPY"),
    ("ATTACH '{outside}/other.duckdb' AS other", "ATTACH"),
    ("INSTALL httpfs", "LOAD"),
    ("LOAD httpfs", "LOAD"),
    ("CREATE TABLE kept AS SELECT * FROM dataset", "CREATE"),
    ("CREATE VIEW outside AS SELECT * FROM read_csv('{outside}/secret.csv')", "CREATE"),
    ("INSERT INTO classes VALUES (99, 'x')", "INSERT"),
    ("UPDATE classes SET class_name = 'x'", "UPDATE"),
    ("DELETE FROM classes", "DELETE"),
    ("PRAGMA enable_profiling", "PRAGMA"),
    ("SET enable_external_access = true", "SET"),
    ("RESET lock_configuration", "SET"),
    ("EXPORT DATABASE '{outside}/export'", "EXPORT"),
])
def test_sql_rejects_statement(dataset_sql, data, tmp_path, query, kind):
    with pytest.raises(QueryRejectedError, match=f"{kind} statements are rejected"):
        dataset_sql.run(query.format(inside=data.dataset, outside=tmp_path))
    assert not (data.dataset / "copied.csv").exists()
    assert not list(tmp_path.iterdir())


def test_sql_rejects_several_statements(dataset_sql):
    with pytest.raises(QueryRejectedError, match="2 statements"):
        dataset_sql.run("SELECT 1; COPY (SELECT 1) TO 'x.csv'")


@pytest.mark.parametrize("path", ["{outside}/secret.csv", "{inside}/../secret.csv", "../secret.csv",
                                  "{inside}/README.md", "/etc/hostname"])
def test_sql_cannot_read_outside_shards(dataset_sql, data, tmp_path, path):
    (tmp_path / "secret.csv").write_text("a,b\n1,2\n")
    (data.dataset.parent / "secret.csv").write_text("a,b\n1,2\n")
    target = path.format(inside=data.dataset, outside=tmp_path)
    for query in (f"SELECT * FROM read_csv('{target}')", f"SELECT * FROM read_text('{target}')",
                  f"SELECT * FROM glob('{target}')"):
        with pytest.raises(QueryFailedError, match="rejected by DuckDB"):
            dataset_sql.run(query)


def test_sql_cannot_read_other_parquet(dataset_sql, tmp_path):
    other = tmp_path / "other.parquet"
    duckdb.sql(f"COPY (SELECT 42 AS answer) TO '{other}' (FORMAT parquet)")
    with pytest.raises(QueryFailedError, match="rejected by DuckDB"):
        dataset_sql.run(f"SELECT * FROM read_parquet('{other}')")


def test_sql_confinement_without_statement_check(dataset_sql, tmp_path):
    """DuckDB itself rejects files outside the shards, even for a statement the first check would stop."""
    with pytest.raises(duckdb.PermissionException):
        dataset_sql.connection.execute(f"COPY (SELECT 1) TO '{tmp_path}/copied.csv'")
    with pytest.raises(duckdb.InvalidInputException, match="locked"):
        dataset_sql.connection.execute("SET enable_external_access = true")
    assert not (tmp_path / "copied.csv").exists()


def test_sql_long_query_times_out(data):
    with DatasetSQL(data.dataset, timeout=0.5) as sql:
        with pytest.raises(QueryFailedError, match="ran longer than 0.5 s"):
            sql.run("SELECT count(*) FROM range(1000000000000) a, range(1000) b")
        frame, _ = sql.run("SELECT count(*) AS n FROM dataset")  # the connection still works
        assert frame["n"].iloc[0] == 300


def test_sql_reads_dataset(dataset_sql, data):
    frame, truncated = dataset_sql.run("SELECT * FROM dataset ORDER BY sample_index")
    manifest = json.loads((data.dataset / "synthgen_dataset.json").read_text())
    assert len(frame) == manifest["rows"]
    assert not truncated
    assert frame["image"].iloc[0].startswith("<PNG, ")
    shard = f"{data.dataset}/{manifest['files'][0]}"
    count, _ = dataset_sql.run(f"SELECT count(*) AS n FROM read_parquet('{shard}')")
    assert count["n"].iloc[0] == 150
    limited, truncated = dataset_sql.run("SELECT sample_index FROM dataset", max_rows=10)
    assert len(limited) == 10
    assert truncated


# ---------------------------------------------------------------- the command line


def test_app_command_defaults_to_loopback():
    from synthgen.app_cli import APP_ENTRY, streamlit_command

    args = build_parser().parse_args(["app"])
    assert args.host == "127.0.0.1"
    assert args.port == 8501
    command = streamlit_command(args.host, args.port, APP_ENTRY)
    flags = dict(zip(command[5::2], command[6::2]))
    assert flags["--server.address"] == "127.0.0.1"
    assert flags["--server.headless"] == "true"
    assert flags["--browser.gatherUsageStats"] == "false"
    assert APP_ENTRY.is_file()


@pytest.mark.parametrize("argv", [["app", "--port", "0"], ["app", "--port", "70000"], ["app", "--host", "my host"]])
def test_app_command_rejects_bad_input(argv):
    assert main(argv) == 2
