"""Datasets: built datasets from the catalog, a class histogram, a page of images and a read-only SQL box."""

from __future__ import annotations

import math
from pathlib import Path

import streamlit as st
from app_common import page_errors, run_page

from synthgen.app_support import DatasetSQL, read_catalog, read_dataset_manifest

PAGE_SIZE = 24
EXAMPLE_QUERY = ("SELECT c.class_name, count(*) AS rows, avg(d.confidence) AS mean_confidence\n"
                 "FROM dataset d JOIN classes c USING (label)\nGROUP BY ALL ORDER BY rows DESC")


@st.cache_resource(max_entries=4, show_spinner=False)
def open_dataset(folder: str, completed: str) -> DatasetSQL:
    """Open one confined connection per dataset and build; `completed` changes when the folder is rebuilt."""
    return DatasetSQL(folder)


def choose_folder() -> str | None:
    with page_errors("Reading the catalog"):
        snapshot = read_catalog()
    local = snapshot.datasets[snapshot.datasets["path"].notna()] if not snapshot.datasets.empty else snapshot.datasets
    if not local.empty:
        st.dataframe(local[["name", "path", "rows", "split", "unit", "epsilon", "delta", "mechanism", "generator",
                            "completed"]], hide_index=True,
                     column_config={"epsilon": st.column_config.NumberColumn("epsilon", format="%.4g")})
    else:
        st.info(f"The catalog {snapshot.path} records no local dataset. Build one with 'synthgen build-dataset', or "
                "open a dataset folder below.")
    options = list(local["path"]) if not local.empty else []
    picked = st.selectbox("Dataset", options, index=0 if options else None,
                          format_func=lambda path: f"{Path(path).name} ({path})")
    typed = st.text_input("Or open a dataset folder", placeholder="datasets/mnist-eps10")
    return typed.strip() or picked


def show_images(dataset: DatasetSQL, rows: int) -> None:
    pages = max(1, math.ceil(rows / PAGE_SIZE))
    page = st.number_input(f"Page (of {pages})", min_value=1, max_value=pages, value=1, step=1)
    with page_errors("Reading images"):
        items = dataset.image_page((int(page) - 1) * PAGE_SIZE, PAGE_SIZE)
    columns = st.columns(8)
    for number, item in enumerate(items):
        columns[number % 8].image(item["png"], width=84,
                                  caption=f"#{item['sample_index']} {item['class_name']} ({item['confidence']:.2f})")


def show_sql(dataset: DatasetSQL) -> None:
    st.subheader("SQL")
    st.caption("One read-only SELECT over the views dataset (image, label, generator, generator_commit, seed, "
               "sample_index, confidence, probabilities) and classes (label, class_name). Statements that write, "
               "attach, install or set anything are rejected, and no file outside this dataset's shards can be read.")
    with st.form("sql"):
        query = st.text_area("Query", value=EXAMPLE_QUERY, height=110)
        submitted = st.form_submit_button("Run")
    if submitted:
        with page_errors("The query"):
            frame, truncated = dataset.run(query)
        st.dataframe(frame, hide_index=True)
        if truncated:
            st.caption(f"Only the first {len(frame)} rows are shown.")


def body() -> None:
    st.title("Datasets")
    folder = choose_folder()
    if not folder:
        return
    with page_errors(f"Opening dataset {folder}"):
        manifest = read_dataset_manifest(folder)
        dataset = open_dataset(str(Path(folder).expanduser().resolve()), str(manifest.get("completed")))
    privacy = manifest.get("privacy") or {}
    st.markdown(f"**{manifest.get('name')}**: {manifest.get('rows')} rows, classes "
                f"{', '.join(manifest['class_names'])}; from {manifest['settings'].get('generator')}, "
                f"{privacy.get('unit')}-level ({privacy.get('epsilon'):.4g}, {privacy.get('delta'):g})-DP. Sampling "
                "cost no further privacy.")

    st.subheader("Class histogram")
    with page_errors("Counting rows per class"):
        histogram = dataset.class_histogram()
        rows = dataset.row_count()
    st.bar_chart(histogram, x="class_name", y="rows", x_label="class (student label)", y_label="rows")

    st.subheader("Images")
    show_images(dataset, rows)
    show_sql(dataset)


run_page(body)
