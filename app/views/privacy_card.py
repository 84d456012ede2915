"""Privacy card: the datasheet, its differential_privacy facts, the recomputed epsilon and the audit."""

from __future__ import annotations

import streamlit as st
from app_common import load_generator, page_errors, require_generator, run_page

from synthgen.app_support import audit_table, events_table, facts_table, load_card, recompute


def show_recomputation(metadata: dict) -> None:
    st.subheader("Recomputed epsilon")
    with page_errors("Recomputing epsilon from the card"):
        outcome = recompute(metadata)
    if outcome.passed:
        st.success(f"The card agrees with the recomputation: epsilon {outcome.recomputed_epsilon:.6g} at delta "
                   f"{outcome.delta:g} (PLD accountant, dp_accounting {outcome.accountant_version}); the card "
                   f"states {outcome.card_epsilon:.6g}.")
    else:
        lines = [f"The card disagrees with the recomputation. The card states epsilon {outcome.card_epsilon:.6g}, the "
                 f"PLD accountant gives {outcome.recomputed_epsilon:.6g} at delta {outcome.delta:g}: a difference of "
                 f"{outcome.difference:+.6g} ({outcome.relative_difference:.2%}).", "", "Failed checks:"]
        lines += [f"- {name}: {detail}" for name, detail in outcome.failed]
        if outcome.card_accountant_version and outcome.card_accountant_version != outcome.accountant_version:
            lines.append(f"\nThe card was computed with dp_accounting {outcome.card_accountant_version}, this is "
                         f"{outcome.accountant_version}; small differences can come from that.")
        st.error("\n".join(lines))
    if outcome.rdp_epsilon is not None:
        st.caption(f"RDP cross-check: epsilon {outcome.rdp_epsilon:.6g} (never below the PLD value).")


def body() -> None:
    st.title("Privacy card")
    choice = require_generator()
    with page_errors(f"Loading {choice.label}"):
        source = load_generator(choice)
    with page_errors("Reading the privacy card"):
        card = load_card(source.path, source.report)
    block = card.metadata.get("differential_privacy")
    if not isinstance(block, dict):
        st.error(f"The card ({card.source}) has no differential_privacy block in its YAML metadata: it is not a "
                 "synthgen privacy datasheet, so there is no claim to check.")
        return

    accountant = block.get("accountant")
    name = accountant.get("name") if isinstance(accountant, dict) else accountant
    columns = st.columns(4)
    columns[0].metric("epsilon", f"{block.get('epsilon'):.4g}" if isinstance(block.get("epsilon"), float)
                      else str(block.get("epsilon")))
    columns[1].metric("delta", f"{block.get('delta'):g}" if block.get("delta") is not None else "none")
    columns[2].metric("privacy unit", str(block.get("unit")))
    columns[3].metric("accountant", str(name))
    st.caption(f"Card: {card.source}")

    show_recomputation(card.metadata)

    st.subheader("differential_privacy facts")
    st.dataframe(facts_table(block), hide_index=True)
    events = events_table(block)
    if not events.empty:
        st.caption("Privacy events composed by the accountant:")
        st.dataframe(events, hide_index=True)

    st.subheader("Audit")
    audit = audit_table(card.audit)
    if audit is None:
        st.info("No audit: run 'synthgen audit RUN_DIR' on the run folder, which needs the private data.")
    else:
        st.dataframe(audit, hide_index=True)
        if card.audit.get("note"):
            st.caption(card.audit["note"])

    st.subheader("Datasheet")
    with st.container(border=True):
        st.markdown(card.body)


run_page(body)
