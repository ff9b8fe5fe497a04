"""The machinery every stage shares, none of it the task's own: atomic files, signals and
fingerprints (`io`), logging (`logs`), the one rule typed records are read by (`records`), a run's
`metrics.jsonl` (`history`) and the shared-memory gallery decoder (`gallery`). Torch-free, like
`competition/`, so predict can use all of it."""
