"""Results as data: the row schema and a run folder's life cycle, scoring, summaries, divergence
numbers, the timing protocol and the run record."""
