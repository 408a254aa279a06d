"""`python -m lm_opt COMMAND ...`: Lightning's `fit` and `validate` over lm_opt's model and data
(lm_opt.cli), and the study's tools (`sweep`, `report`, `recheck`, `card`, `plot-eff-lr`).

`python -m lm_opt --help` (or `-h`) lists the commands, without importing Lightning, so that it
answers at once; `python -m lm_opt COMMAND --help` gives a command's own options. Without a
command the list goes to stderr with exit status 2, as a missing argument does.
"""

import os
import sys

PROGRAM = "python -m lm_opt"
LIGHTNING = {
    "fit": "train: the --config files' model, data, optimizer callback and trainer",
    "validate": "the validation loss of the configs' model, or of a checkpoint (--ckpt_path)",
}
"""Lightning's subcommands that LMModule implements a step for (tests/test_main.py holds this to its
`*_step` methods). `test` and `predict` still reach Lightning, which ends them with the error that
LMModule has no `test_step` or `predict_step`; they are not listed."""
TOOLS = {
    "sweep": ("lm_opt.study.sweep", "run a sweep spec's grid of fit runs (resuming), then its report"),
    "report": ("lm_opt.study.report", "a sweep folder's tables, plots, stable lr ranges and steps to target"),
    "recheck": ("lm_opt.study.recheck", "rerun finished points of a sweep and compare their final losses"),
    "card": ("lm_opt.study.card", "an optimizer YAML through the CPU study's protocol, beside AdamW"),
    "plot-eff-lr": ("lm_opt.study.plot_eff_lr", "a run's effective-lr quantiles per layer over training"),
}


def usage() -> str:
    """The program's help: every command with one line."""
    commands = {**LIGHTNING, **{name: line for name, (_, line) in TOOLS.items()}}
    width = max(map(len, commands))
    return "\n".join([
        f"usage: {PROGRAM} COMMAND [options]", "",
        "lm_opt: optimizers in language-model pretraining, with PyTorch Lightning.", "",
        "commands:", *(f"  {name:<{width}}  {line}" for name, line in commands.items()), "",
        f"`{PROGRAM} COMMAND --help` gives a command's options; e.g. "
        f"`{PROGRAM} fit --config configs/quickstart.yaml`. Docs: README.md and docs/."])


def main(argv: list[str] | None = None) -> None:
    """Dispatch `argv` (default: the command line) to its command."""
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if args else sys.stderr)
        raise SystemExit(0 if args else 2)
    if args[0] in TOOLS:
        module = __import__(TOOLS[args[0]][0], fromlist=["main"])
        try:
            module.main(args[1:])
        except BrokenPipeError:  # output piped into `head`: stop quietly, as Unix tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise SystemExit(1) from None
        return
    if not args[0].startswith("-") and args[0] not in (*LIGHTNING, "test", "predict"):
        print(f"{PROGRAM}: error: unknown command {args[0]!r}; expected one of "
              f"{', '.join([*LIGHTNING, *TOOLS])} (`{PROGRAM} --help`)", file=sys.stderr)
        raise SystemExit(2)
    from lm_opt.cli import main as lightning_main

    lightning_main(argv)  # None: LightningCLI reads the command line itself, as it does in its launched ranks


if __name__ == "__main__":
    main()
