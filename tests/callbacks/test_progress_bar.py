"""What a run prints: a progress bar in steps with tokens/s and val loss, a model summary without
FLOPs, the tokenizer once, and none of the warnings lm_opt cannot fix."""

import logging
import re

from cli_helpers import fit, tiny_args

KNOWN_WARNINGS = ("LeafSpec", "skip_none", "instantiate_classes", "add_instantiator")


def test_a_run_shows_steps_tokens_per_second_and_val_loss_without_noise(tmp_path, capsys, caplog, recwarn):
    caplog.set_level(logging.INFO)
    fit(*tiny_args(tmp_path, "run", 4, "--trainer.enable_progress_bar", "true", "--trainer.val_check_interval", "2"))
    shown = capsys.readouterr()
    bar = shown.out + shown.err
    steps = [line for line in re.split(r"[\r\n]", bar) if line.startswith("step ")]
    assert steps[0].startswith("step 0/4") and steps[-1].startswith("step 4/4")
    assert not re.search(r"Epoch \d+[:/]", bar)  # Lightning's bars: `Epoch 0: ...`, `Epoch 0/-2 ...`
    assert "tok/s=" in bar and "val_loss=" in bar
    assert "Params" in caplog.text and "FLOPs" not in caplog.text and "Total Flops" not in caplog.text
    assert sum(r.getMessage().startswith("tokenizer: ") for r in caplog.records) == 1
    assert not [w for w in recwarn if any(k in str(w.message) for k in KNOWN_WARNINGS)]
    # A resumed run counts on from its step, towards the run's total.
    fit(*tiny_args(tmp_path, "run", 6, "--trainer.enable_progress_bar", "true", "--ckpt_path", "last"))
    shown = capsys.readouterr()
    bar = shown.out + shown.err
    steps = [line for line in re.split(r"[\r\n]", bar) if line.startswith("step ")]
    assert steps[0].startswith("step 4/6") and steps[-1].startswith("step 6/6")


def test_under_accumulation_the_bar_reads_the_loss_once_per_optimizer_step(tmp_path, monkeypatch):
    """Reading a logged loss is a host sync: not on every micro-batch."""
    from lm_opt.callbacks.progress_bar import StepProgressBar

    reads = []
    get_metrics = StepProgressBar.get_metrics

    def counted(self, trainer, pl_module):
        if trainer.training:
            reads.append(trainer.global_step)
        return get_metrics(self, trainer, pl_module)

    monkeypatch.setattr(StepProgressBar, "get_metrics", counted)
    fit(*tiny_args(tmp_path, "run", 3, "--trainer.enable_progress_bar", "true",
                   "--trainer.accumulate_grad_batches", "4", "--trainer.val_check_interval", "12"))
    # 12 micro-batches: a read after each of the 3 optimizer steps, and one as training ends.
    assert reads == [1, 2, 3, 3]
