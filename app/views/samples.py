"""Samples: a live per-class grid from the selected generator, with the student's confidence under each image."""

from __future__ import annotations

import streamlit as st
from app_common import load_generator, page_errors, require_generator, run_page

from synthgen.app_support import grid_png, sample_grid, samples_parquet, samples_zip


def body() -> None:
    st.title("Samples")
    choice = require_generator()
    with page_errors(f"Loading {choice.label}"):
        source = load_generator(choice)
    report = source.report
    st.caption(f"{choice.label}: {report['unit']}-level ({report['epsilon']:.4g}, {report['delta']:g})-DP. Sampling "
               "the generator and labelling with the student is post-processing of the DP release: it costs no "
               "privacy.")

    names = source.class_names
    controls = st.columns([1, 2, 3])
    seed = controls[0].number_input("Seed", min_value=0, max_value=2**31 - 1, value=0, step=1)
    per_class = controls[1].slider("Images per class", min_value=1, max_value=10, value=8)
    chosen = controls[2].multiselect("Classes", names, default=names)
    if not chosen:
        st.info("Choose at least one class.")
        return

    with page_errors("Sampling"), st.spinner("Sampling..."):
        grid = sample_grid(source.pipeline, int(seed), int(per_class), [names.index(name) for name in chosen])
        png = grid_png(grid)
    if grid.missing:
        st.warning(f"After {grid.drawn} generated images the student had not labelled enough of them as some "
                   f"classes; missing images per class: {grid.missing}. The generator rarely produces these classes.")
    st.image(png, caption=f"seed {grid.seed}: one row per class, the student's confidence under each image")
    st.dataframe(grid.summary(), hide_index=True)

    stem = f"synthgen-samples-seed{grid.seed}"
    downloads = st.columns(3)
    downloads[0].download_button("Grid (PNG)", png, file_name=f"{stem}.png", mime="image/png")
    with page_errors("Packing the samples"):
        downloads[1].download_button("Labelled samples (zip)", samples_zip(grid), file_name=f"{stem}.zip",
                                     mime="application/zip")
        downloads[2].download_button("Labelled samples (parquet)", samples_parquet(grid), file_name=f"{stem}.parquet",
                                     mime="application/vnd.apache.parquet")


run_page(body)
