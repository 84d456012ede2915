"""Generators: the catalog's runs and releases, and pulling a Hub release or opening a local folder."""

from __future__ import annotations

import streamlit as st
from app_common import NOTICE, load_generator, page_errors, run_page, select_after_rerun

from synthgen.app_support import ACCURACY_NOTE, GeneratorChoice, generators_table, read_catalog


def record_release(source) -> str | None:
    """Record a pulled release in the catalog, as 'synthgen catalog add-release' does; return a warning on failure."""
    from synthgen.catalog import Catalog, CatalogError

    try:
        with Catalog() as catalog:
            catalog.record_release(source.location, source.commit, source.report, revision=source.revision,
                                   card_url=source.card_url)
    except CatalogError as error:
        return f"The release is loaded but was not recorded in the catalog: {error}"
    return None


def body() -> None:
    st.title("Generators")
    notice = st.session_state.pop(NOTICE, None)
    if notice:
        st.success(notice)

    with page_errors("Reading the catalog"):
        snapshot = read_catalog()
        table = generators_table(snapshot)
    if table.empty:
        st.info(f"The catalog {snapshot.path} has no runs or releases yet. Record a run with 'synthgen catalog "
                "add-run RUN_DIR', or pull a release below.")
    else:
        st.dataframe(table, hide_index=True, column_config={
            "epsilon": st.column_config.NumberColumn("epsilon", format="%.4g"),
            "delta": st.column_config.NumberColumn("delta", format="%.0e"),
            "student_accuracy": st.column_config.NumberColumn("student accuracy (%)", format="%.2f"),
        })
        st.caption(f"Catalog: {snapshot.path}. {ACCURACY_NOTE}")

    left, right = st.columns(2)
    with left, st.form("pull"):
        st.subheader("Pull a Hub release")
        repo_id = st.text_input("Repository id", placeholder="NAMESPACE/NAME")
        revision = st.text_input("Revision", placeholder="main", help="branch, tag or commit hash (default main)")
        pull = st.form_submit_button("Pull")
    with right, st.form("open-folder"):
        st.subheader("Open a local folder")
        folder = st.text_input("Run or release folder", placeholder="runs/run1")
        open_folder = st.form_submit_button("Open")

    if pull:
        choice = GeneratorChoice("hub", repo_id.strip(), revision.strip() or None)
        with page_errors(f"Pulling {choice.location or 'the repository'}"):
            if not choice.location:
                raise ValueError("enter a repository id NAMESPACE/NAME")
            source = load_generator(choice, fresh=True)
        warning = record_release(source)
        if warning:
            st.warning(warning)
        # The pages keep showing this pull until the next Pull of the same repository and revision.
        report = source.report
        select_after_rerun(choice, f"Pulled {choice.location} at commit {source.commit[:12]}: {report['unit']}-level "
                                   f"({report['epsilon']:.4g}, {report['delta']:g})-DP.")
    if open_folder:
        with page_errors(f"Opening {folder or 'the folder'}"):
            if not folder.strip():
                raise ValueError("enter the path of a run or release folder")
            from pathlib import Path

            choice = GeneratorChoice("folder", str(Path(folder.strip()).expanduser().resolve()))
            source = load_generator(choice)
        report = source.report
        select_after_rerun(choice, f"Opened {choice.location}: {report['unit']}-level ({report['epsilon']:.4g}, "
                                   f"{report['delta']:g})-DP.")


run_page(body)
