"""`python -m lm_opt fit|validate|test ...` (the Lightning CLI), and the study's tools:
`sweep SPEC`, `report SWEEP_DIR`, `recheck SWEEP_DIR`, `plot-eff-lr RUN_DIR`,
`card OPTIMIZER_YAML`."""

import os
import sys

TOOLS = {
    "sweep": "lm_opt.study.sweep",
    "report": "lm_opt.study.report",
    "recheck": "lm_opt.study.recheck",
    "plot-eff-lr": "lm_opt.study.plot_eff_lr",
    "card": "lm_opt.study.card",
}


def run() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in TOOLS:
        module = __import__(TOOLS[sys.argv[1]], fromlist=["main"])
        try:
            module.main(sys.argv[2:])
        except BrokenPipeError:  # output piped into `head`: stop quietly, as Unix tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise SystemExit(1) from None
    else:
        from lm_opt.cli import main

        main()


run()
