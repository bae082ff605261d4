"""Experiments and probes: one-off measurements behind a finding or a tuning choice, kept to be
re-run, not suites (nothing here is collected by pytest or gated). Run from the repository
root as `python -m bench.lab.<name>`; results go where --out says."""
