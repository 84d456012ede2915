"""Streamlit helpers shared by the app's pages: the generator selection, cached loading and error display.

The data access itself is in synthgen.app_support, which has no Streamlit dependency.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import streamlit as st

from synthgen.app_support import CatalogSnapshot, GeneratorChoice, load_choice, local_stamp, read_catalog

logger = logging.getLogger("synthgen.app")

SELECTED = "generator"  # session key of the sidebar's generator selectbox (a GeneratorChoice.key)
PENDING = "generator_pending"  # a choice to select on the next run, set by the Generators page
OPENED = "generators_opened"  # keys of Hub releases and folders opened in this session
NOTICE = "generators_notice"  # a success message shown once after a rerun


class PageStopped(Exception):
    """Raised inside `page_errors` to end a page after its error is shown."""


@contextlib.contextmanager
def page_errors(action: str) -> Iterator[None]:
    """Show an error raised in the block as a message in the page, never as a traceback.

    Errors that synthgen raises for bad input or missing data (ValueError and its subclasses,
    FileNotFoundError, OSError) are shown with their message, which names the fix. Any other
    error is shown with its type and message and logged with its traceback on the server.
    """
    try:
        yield
    except PageStopped:
        raise
    except (ValueError, OSError) as error:
        logger.warning("%s failed: %s", action, error)
        st.error(f"{action} failed: {error}")
        raise PageStopped from None
    except Exception as error:  # noqa: BLE001 (the page must show a message, not a traceback)
        logger.exception("%s failed", action)
        st.error(f"{action} failed with an unexpected {type(error).__name__}: {error}. The server log has the "
                 "details")
        raise PageStopped from None


def run_page(body) -> None:
    """Run a page body; an error shown by `page_errors` ends the page there."""
    try:
        body()
    except PageStopped:
        pass


def catalog() -> CatalogSnapshot:
    """Read the catalog on every run: it is small, and builds may add to it at any time."""
    return read_catalog()


@st.cache_resource(max_entries=4, show_spinner=False)
def _load_cached(key: str, stamp: str):
    logger.info("loading generator %s", key)
    return load_choice(GeneratorChoice.from_key(key))


def load_generator(choice: GeneratorChoice, fresh: bool = False):
    """Load a generator once per server: later runs, sessions and slider changes reuse the pipeline.

    A local folder is loaded again when its weights or privacy report change on disk. `fresh`
    drops the cached copy first, so that an explicit pull asks the Hub again.
    """
    stamp = local_stamp(choice)
    if fresh:
        _load_cached.clear(choice.key, stamp)
    with st.spinner(f"Loading {choice.label}..."):
        return _load_cached(choice.key, stamp)


def selected_choice() -> GeneratorChoice | None:
    key = st.session_state.get(SELECTED)
    return GeneratorChoice.from_key(key) if key else None


def select_after_rerun(choice: GeneratorChoice, notice: str) -> None:
    """Add `choice` to the sidebar, select it and show `notice` on the next run."""
    opened = st.session_state.setdefault(OPENED, [])
    if choice.key not in opened:
        opened.append(choice.key)
    st.session_state[PENDING] = choice.key
    st.session_state[NOTICE] = notice
    st.rerun()


def require_generator() -> GeneratorChoice:
    """Return the selected generator, or end the page with a hint when there is none."""
    choice = selected_choice()
    if choice is None:
        st.info("No generator selected. Record runs with 'synthgen catalog add-run RUN_DIR', or pull a Hub "
                "release or open a local folder on the Generators page.")
        raise PageStopped
    return choice
