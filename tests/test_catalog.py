"""The DuckDB catalog: runs, ledger spends, releases and datasets recorded by real builds, its
provenance and budget views, parquet read in place, the SQL command and the Python API."""

import json
import shutil

import duckdb
import pandas
import pytest

from synthgen.catalog import Catalog, CatalogError, default_catalog_path
from synthgen.cli import main
from synthgen.privacy.ledger import Ledger, LedgerKey

from .dataset_builds import build, read_rows


@pytest.fixture(scope="module")
def built(run_dir, tmp_path_factory):
    """Two datasets of the run, recorded in a fresh catalog by the builder itself."""
    folder = tmp_path_factory.mktemp("catalog")
    catalog = folder / "catalog.duckdb"
    first = build(run_dir, folder / "first", catalog=str(catalog), num_samples=300, shard_size=128)
    second = build(run_dir, folder / "second", catalog=str(catalog), num_samples=100, shard_size=100, seed=7)
    return catalog, first, second


@pytest.fixture
def catalog_file(built, tmp_path):
    """A copy of the module's catalog, so that a test can change it."""
    copy = tmp_path / "catalog.duckdb"
    shutil.copyfile(built[0], copy)
    return copy


def test_provenance_view_names_generator_and_epsilon(built, run_dir):
    catalog, first, second = built
    report = json.loads((run_dir / "privacy_report.json").read_text())
    key = json.loads((run_dir / "private" / "ledger_key.json").read_text())
    with Catalog(catalog) as opened:
        rows = opened.sql("SELECT * FROM dataset_provenance ORDER BY rows DESC")
    assert rows["location"].tolist() == [str(first.out), str(second.out)]
    assert rows["rows"].tolist() == [300, 100]
    assert rows["seed"].tolist() == [0, 7]
    assert set(rows["generator"]) == {str(run_dir.resolve())}
    assert set(rows["unit"]) == {report["unit"]}
    assert rows["epsilon"].tolist() == [report["epsilon"]] * 2
    assert rows["delta"].tolist() == [report["delta"]] * 2
    assert set(rows["privacy_scope"]) == {key["scope"]}
    assert set(rows["private_data_fingerprint"]) == {key["dataset_fingerprint"]}


def test_budget_view_matches_the_ledger(built, run_dir):
    catalog = built[0]
    report = json.loads((run_dir / "privacy_report.json").read_text())
    key = json.loads((run_dir / "private" / "ledger_key.json").read_text())
    with Ledger(key["ledger"]) as ledger:
        spent = ledger.spent_epsilon(LedgerKey(key["dataset_fingerprint"], key["teacher_fingerprint"], report["unit"]),
                                     report["delta"])
    with Catalog(catalog) as opened:
        budget = opened.sql("SELECT * FROM budget_spent WHERE scope = ?", [key["scope"]])
    assert len(budget) == 1
    assert budget["spent_epsilon"].iloc[0] == pytest.approx(spent, rel=1e-9)
    assert budget["spent_epsilon"].iloc[0] == pytest.approx(report["ledger_total_epsilon"], rel=1e-9)
    assert budget["delta"].iloc[0] == report["delta"]
    assert budget["queries"].iloc[0] == report["queries"]
    assert budget["synthetic_datasets"].iloc[0] == 2
    assert budget["protects"].iloc[0].startswith("teacher")


def test_synthetic_rows_read_parquet_in_place(built, catalog_file):
    _, first, second = built
    with Catalog(catalog_file) as opened:
        counts = opened.sql("SELECT dataset_id, count(*) AS n FROM synthetic_rows GROUP BY ALL ORDER BY n DESC")
        per_class = opened.sql("SELECT label, rows FROM class_counts WHERE dataset_id = ?", [str(first.out)])
        definition = opened.sql("SELECT sql FROM duckdb_views() WHERE view_name = 'synthetic_rows'")["sql"].iloc[0]
    assert counts["n"].tolist() == [300, 100]
    labels = pandas.Series(read_rows(first.out).column("label").to_pylist()).value_counts().sort_index()
    assert per_class["label"].tolist() == labels.index.tolist()
    assert per_class["rows"].tolist() == labels.tolist()
    assert "read_parquet" in definition

    # The rows live only in the shards: with one shard moved away, the view cannot be read.
    shard = sorted((second.out / "data").glob("*.parquet"))[0]
    moved = shard.with_name("moved.bin")
    shard.rename(moved)
    try:
        with duckdb.connect(str(catalog_file)) as raw, pytest.raises(duckdb.IOException):
            raw.execute("SELECT count(*) FROM synthetic_rows").fetchall()
        with Catalog(catalog_file) as opened:  # opening refreshes the view without the missing dataset
            assert opened.sql("SELECT count(*) AS n FROM synthetic_rows")["n"].iloc[0] == 300
    finally:
        moved.rename(shard)


def test_sync_ledger_is_idempotent(run_dir, catalog_file):
    key = json.loads((run_dir / "private" / "ledger_key.json").read_text())
    with Catalog(catalog_file) as opened:
        before = opened.summary()
        counts = opened.sync_ledger(key["ledger"])
        assert opened.summary() == before
    assert counts["spends"] == before["ledger_spends"]
    assert counts["scopes"] == before["ledger_scopes"]


def test_release_record_is_queryable(catalog_file, run_dir):
    report = json.loads((run_dir / "privacy_report.json").read_text())
    with Catalog(catalog_file) as opened:
        opened.record_release("tester/generator", "a" * 40, report, revision="main")
        releases = opened.sql("SELECT repo_id, commit, epsilon, unit FROM releases")
    assert releases.to_dict("records") == [{"repo_id": "tester/generator", "commit": "a" * 40,
                                            "epsilon": report["epsilon"], "unit": report["unit"]}]


def test_python_api_returns_dataframes(built):
    with Catalog(built[0]) as opened:
        assert isinstance(opened.datasets(), pandas.DataFrame)
        assert isinstance(opened.budget(), pandas.DataFrame)
        assert isinstance(opened.sql("SELECT 1 AS one"), pandas.DataFrame)


def test_cli_sql_prints_json(built, capsys):
    code = main(["catalog", "--db", str(built[0]), "sql",
                 "SELECT rows, seed FROM dataset_provenance ORDER BY rows", "--format", "json"])
    assert code == 0
    assert json.loads(capsys.readouterr().out) == [{"rows": 100, "seed": 7}, {"rows": 300, "seed": 0}]


def test_cli_show_lists_views(built, capsys):
    assert main(["catalog", "--db", str(built[0])]) == 0
    output = capsys.readouterr().out
    assert "dataset_provenance:" in output
    assert "budget_spent:" in output


def test_cli_bad_sql_exit_2(built, caplog):
    assert main(["catalog", "--db", str(built[0]), "sql", "SELECT * FROM no_such_table"]) == 2
    assert "query failed" in caplog.text
    assert "no_such_table" in caplog.text


def test_cli_add_dataset_and_run(built, run_dir, tmp_path, capsys):
    catalog = tmp_path / "new.duckdb"
    assert main(["catalog", "--db", str(catalog), "add-dataset", str(built[1].out)]) == 0
    key = json.loads((run_dir / "private" / "ledger_key.json").read_text())
    assert main(["catalog", "--db", str(catalog), "add-run", str(run_dir), "--ledger", key["ledger"]]) == 0
    with Catalog(catalog) as opened:
        assert opened.sql("SELECT count(*) AS n FROM synthetic_rows")["n"].iloc[0] == 300
        assert opened.sql("SELECT privacy_scope FROM dataset_provenance")["privacy_scope"].tolist() == [key["scope"]]


def test_add_dataset_rejects_unfinished_build(tmp_path):
    folder = tmp_path / "unfinished"
    folder.mkdir()
    (folder / "synthgen_dataset.json").write_text(json.dumps({"complete": False}))
    with Catalog(tmp_path / "catalog.duckdb") as opened, pytest.raises(CatalogError, match="not complete"):
        opened.record_dataset_folder(folder)


def test_sync_missing_ledger_is_an_error(tmp_path):
    with Catalog(tmp_path / "catalog.duckdb") as opened, pytest.raises(CatalogError, match="not found"):
        opened.sync_ledger(tmp_path / "missing.duckdb")


def test_default_path_follows_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("SYNTHGEN_CATALOG", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert default_catalog_path() == tmp_path / "data" / "synthgen" / "catalog.duckdb"
    monkeypatch.setenv("SYNTHGEN_CATALOG", str(tmp_path / "mine.duckdb"))
    assert default_catalog_path() == tmp_path / "mine.duckdb"


def test_cli_sql_cannot_change_catalog(built, caplog):
    before = main(["catalog", "--db", str(built[0]), "sql", "SELECT COUNT(*) AS n FROM datasets", "--format", "csv"])
    assert before == 0
    assert main(["catalog", "--db", str(built[0]), "sql", "DELETE FROM datasets"]) == 2
    assert "only reads the catalog" in caplog.text
    with Catalog(built[0]) as opened:
        assert opened.sql("SELECT COUNT(*) AS n FROM datasets")["n"].iloc[0] == 2


@pytest.mark.parametrize("command", [[], ["sql", "SELECT 1"]])
def test_cli_missing_catalog_exit_2(tmp_path, caplog, command):
    missing = tmp_path / "typo" / "catalog.duckdb"
    assert main(["catalog", "--db", str(missing), *command]) == 2
    assert f"no catalog at --db {missing}" in caplog.text
    assert not missing.parent.exists()


def test_cli_wrong_paths_named(tmp_path, caplog):
    not_catalog = tmp_path / "notes.txt"
    not_catalog.write_text("notes")
    assert main(["catalog", "--db", str(not_catalog), "add-dataset", str(tmp_path)]) == 2
    assert "not a valid DuckDB database file" in caplog.text
    assert "Another process" not in caplog.text
    catalog = tmp_path / "catalog.duckdb"
    assert main(["catalog", "--db", str(catalog), "add-dataset", str(tmp_path / "missing")]) == 2
    assert f"dataset folder {tmp_path / 'missing'} not found" in caplog.text
    assert main(["catalog", "--db", str(catalog), "add-run", str(tmp_path / "no-run")]) == 2
    assert f"run folder {tmp_path / 'no-run'} not found" in caplog.text
