"""The synthgen app: browse generators, sample live, read privacy cards, explore datasets and runs.

Start it with `synthgen app` (binds 127.0.0.1) or `streamlit run app/synthgen_app.py`. It reads
the catalog named by SYNTHGEN_CATALOG (default ~/.local/share/synthgen/catalog.duckdb) and the
Hub named by HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE.
"""

from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

APP_DIR = Path(__file__).resolve().parent
if str(APP_DIR) not in sys.path:  # the pages import app_common from this folder
    sys.path.insert(0, str(APP_DIR))

from app_common import OPENED, PENDING, SELECTED, catalog  # noqa: E402

from synthgen.app_support import AppDataError, GeneratorChoice, catalog_choices, generators_table  # noqa: E402

st.set_page_config(page_title="synthgen", layout="wide")

PAGES = [
    st.Page(APP_DIR / "views" / "generators.py", title="Generators", url_path="generators", default=True),
    st.Page(APP_DIR / "views" / "samples.py", title="Samples", url_path="samples"),
    st.Page(APP_DIR / "views" / "privacy_card.py", title="Privacy card", url_path="privacy-card"),
    st.Page(APP_DIR / "views" / "datasets.py", title="Datasets", url_path="datasets"),
    st.Page(APP_DIR / "views" / "runs.py", title="Runs", url_path="runs"),
]


def generator_sidebar() -> None:
    """Offer the catalog's runs and releases plus what this session opened; the choice is shared by all pages."""
    try:
        snapshot = catalog()
    except AppDataError as error:
        st.sidebar.error(str(error))
        snapshot = None
    choices = [choice.key for choice in catalog_choices(snapshot)] if snapshot else []
    for key in st.session_state.get(OPENED, []):
        if key not in choices:
            choices.insert(0, key)
    pending = st.session_state.pop(PENDING, None)
    if pending in choices:
        st.session_state[SELECTED] = pending
    if st.session_state.get(SELECTED) not in choices:
        st.session_state.pop(SELECTED, None)
    if not choices:
        st.sidebar.caption("No generator yet: pull one or open a folder on the Generators page.")
        return
    st.sidebar.selectbox("Generator", choices, key=SELECTED,
                         format_func=lambda key: GeneratorChoice.from_key(key).label)
    if snapshot is not None:
        show_guarantee(snapshot, GeneratorChoice.from_key(st.session_state[SELECTED]))


def show_guarantee(snapshot, choice: GeneratorChoice) -> None:
    """State the selected generator's guarantee from the catalog (a generator opened in this session has no row)."""
    table = generators_table(snapshot)
    kind = "release" if choice.is_hub else "run"
    rows = table[(table["kind"] == kind) & (table["location"] == choice.location)]
    if choice.is_hub:
        rows = rows[rows["commit"] == choice.revision]
    if rows.empty:
        return
    row = rows.iloc[0]
    st.sidebar.caption(f"{row['unit']}-level ({row['epsilon']:.4g}, {row['delta']:g})-DP, mechanism {row['mechanism']}")


navigation = st.navigation(PAGES)
generator_sidebar()
navigation.run()
