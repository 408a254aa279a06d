"""`python -m lm_opt`: the Lightning CLI over LMModule and C4DataModule."""

import logging

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lm_opt.callbacks.optimizer import OptimizerCallback
from lm_opt.callbacks.run_record import RunRecord
from lm_opt.callbacks.throughput import TokenThroughput
from lm_opt.data import C4DataModule
from lm_opt.module import LMModule
from lm_opt.schedule import resolve_max_steps

TRAINER_DEFAULTS = {
    "gradient_clip_val": 1.0,
    "max_steps": 1000,
    "val_check_interval": 100,
    "check_val_every_n_epoch": None,
    "log_every_n_steps": 10,
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "logs", "name": "default", "version": ""},
    },
    "callbacks": [LearningRateMonitor(logging_interval="step"), TokenThroughput()],
}


class LMOptCLI(LightningCLI):
    def __init__(self, args=None, run: bool = True):
        super().__init__(
            LMModule,
            C4DataModule,
            save_config_callback=RunRecord,
            save_config_kwargs={"overwrite": True},
            trainer_defaults=TRAINER_DEFAULTS,
            auto_configure_optimizers=False,
            seed_everything_default=0,
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        # last.ckpt is what `fit --ckpt_path last` resumes from.
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.monitor": "val/loss",
                             "checkpoint.filename": "best", "checkpoint.save_top_k": 1})

    def before_fit(self) -> None:
        trainer, model, data = self.trainer, self.model, self.datamodule
        if data.hparams.seq_len > model.config.block_size:
            raise ValueError(f"data.seq_len={data.hparams.seq_len} exceeds the model's context "
                             f"block_size={model.config.block_size}; lower data.seq_len or set model.arch.block_size")
        optimizer_callbacks = [c for c in trainer.callbacks if isinstance(c, OptimizerCallback)]
        if len(optimizer_callbacks) != 1:
            raise ValueError(f"trainer.callbacks must hold exactly one lm_opt.callbacks.OptimizerCallback, "
                             f"found {len(optimizer_callbacks)} (add one, e.g. --config configs/optim/adamw.yaml)")
        trainer.fit_loop.epoch_loop.max_steps = resolve_max_steps(
            max_steps=trainer.max_steps,
            max_tokens=model.hparams.max_tokens,
            tokens_per_param=model.hparams.tokens_per_param,
            num_params=model.model.num_params(),
            tokens_per_step=data.hparams.batch_size * data.hparams.seq_len * trainer.world_size
            * trainer.accumulate_grad_batches,
        )


def main(args=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    LMOptCLI(args=args)
