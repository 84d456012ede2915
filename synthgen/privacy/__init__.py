"""Where private information can leave synthgen: the teacher-querying mechanism, the
accountant that prices each query, and the ledger that records every spend."""
