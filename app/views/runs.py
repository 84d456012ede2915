"""Runs: training curves of a run and the privacy-utility trade-off across runs and releases."""

from __future__ import annotations

import altair as alt
import streamlit as st
from app_common import PageStopped, page_errors, run_page

from synthgen.app_support import ACCURACY_NOTE, privacy_utility_points, read_catalog, run_metrics


def training_curves(run_dir: str) -> None:
    with page_errors(f"Reading the metrics of {run_dir}"):
        metrics = run_metrics(run_dir)
    if metrics.empty or "epsilon_spent" not in metrics:
        st.info(f"{run_dir} logged no evaluation with the privacy spent (eval_every was 0).")
        return
    columns = st.columns(2)
    epsilon = alt.X("epsilon_spent:Q", title="epsilon spent")
    if "student_accuracy" in metrics:
        columns[0].markdown("**Student accuracy (%) against epsilon spent**")
        accuracy = alt.Chart(metrics).mark_line(point=True).encode(
            x=epsilon, y=alt.Y("student_accuracy:Q", title="student accuracy (%)"),
            tooltip=["step", "epsilon_spent", "student_accuracy"])
        columns[0].altair_chart(accuracy)
    losses = [name for name in ("student_loss", "generator_loss") if name in metrics]
    if losses:
        columns[1].markdown("**Loss against epsilon spent**")
        long = metrics.melt(id_vars=["step", "epsilon_spent"], value_vars=losses, var_name="loss", value_name="value")
        loss = alt.Chart(long).mark_line(point=True).encode(
            x=epsilon, y=alt.Y("value:Q", title="loss"), color=alt.Color("loss:N", title=None),
            tooltip=["step", "epsilon_spent", "loss", "value"])
        columns[1].altair_chart(loss)
    count = len(metrics)
    st.caption(f"{count} evaluation{'s' if count != 1 else ''} from {run_dir}/metrics.jsonl. {ACCURACY_NOTE}")


def privacy_utility(points) -> None:
    st.subheader("Privacy and utility across runs and releases")
    if points.empty:
        st.info("No run or pulled release with a student accuracy yet.")
        return
    chart = alt.Chart(points).mark_point(size=120, filled=True).encode(
        x=alt.X("epsilon:Q", scale=alt.Scale(type="log"), title="epsilon (at each point's delta)"),
        y=alt.Y("student_accuracy:Q", title="student accuracy (%)"),
        color=alt.Color("unit:N", title="privacy unit"),
        shape=alt.Shape("mechanism:N", title="mechanism"),
        tooltip=["kind", "location", "unit", "mechanism", "epsilon", "delta", "student_accuracy", "commit"],
    )
    st.altair_chart(chart)
    st.dataframe(points[["kind", "location", "unit", "mechanism", "epsilon", "delta", "student_accuracy"]],
                 hide_index=True)
    st.caption(ACCURACY_NOTE)


def body() -> None:
    st.title("Runs")
    with page_errors("Reading the catalog"):
        snapshot = read_catalog()
        points = privacy_utility_points(snapshot)
    runs = list(snapshot.runs["run_dir"]) if not snapshot.runs.empty else []
    if runs:
        st.subheader("Training curves")
        run_dir = st.selectbox("Run", runs)
        try:
            training_curves(run_dir)
        except PageStopped:
            pass  # the error is shown; the plot across runs below still helps
    else:
        st.info(f"The catalog {snapshot.path} records no run. Record one with 'synthgen catalog add-run RUN_DIR'.")
    privacy_utility(points)


run_page(body)
