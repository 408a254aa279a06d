"""The study's tooling around training: sweeps (`sweep_plan`, `sweep`, `reuse`), their report
(`report`, over `rows`, `stats`, `tables`, `plots` and `target`) and the data's unigram baseline
(`baseline`), reruns of recorded points (`recheck`), and the effective-lr figure (`plot_eff_lr`).
Every record on disk is read and written through lm_opt.record."""
