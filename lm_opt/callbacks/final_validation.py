"""Validate the final weights of every run, once."""

import lightning as L


class FinalValidation(L.Callback):
    """Asks the loop to stop at the last step, so that Lightning validates there (as it does for
    a run that early stopping ends) also when `val_check_interval` does not divide the run.
    Validation still runs once when it does: the loop decides once per step whether to validate.
    The run's final validation loss is then that of its final weights, which `last.ckpt` holds."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            trainer.should_stop = True
