"""The study's tooling around training: sweeps (`sweep_plan`, `sweep`), their report and the
data's unigram baseline (`report`, `baseline`), and the effective-lr figure (`plot_eff_lr`)."""
