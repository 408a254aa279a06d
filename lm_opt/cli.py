"""`python -m lm_opt`: the Lightning CLI over LMModule and C4DataModule."""

import logging
from pathlib import Path

import torch

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lm_opt.callbacks.divergence import Diverged, DivergenceStop
from lm_opt.callbacks.effective_lr import EffectiveLRQuantiles
from lm_opt.callbacks.optimizer import OptimizerCallback
from lm_opt.callbacks.run_record import RunRecord
from lm_opt.callbacks.throughput import TokenThroughput
from lm_opt.data import C4DataModule
from lm_opt.module import LMModule
from lm_opt.schedule import resolve_max_steps

# Hyperparameters that change the model's parameters: a checkpoint must agree on them.
ARCHITECTURE_KEYS = ("preset", "qk_norm", "arch")


def check_checkpoint(path: Path, hparams: dict) -> None:
    """Fail before any compute if `path` is unreadable or holds a different architecture."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:
        raise ValueError(f"ckpt_path={str(path)!r} is not a readable Lightning checkpoint: {err}") from err
    saved = checkpoint.get("hyper_parameters")
    if saved is None or "state_dict" not in checkpoint:
        raise ValueError(f"ckpt_path={str(path)!r} is not an lm_opt checkpoint (no state_dict/hyper_parameters)")
    differ = [f"model.{k}: checkpoint {saved.get(k)!r}, this run {hparams[k]!r}"
              for k in ARCHITECTURE_KEYS if saved.get(k) != hparams[k]]
    if differ:
        raise ValueError(f"ckpt_path={str(path)!r} does not match this model: " + "; ".join(differ))


TRAINER_DEFAULTS = {
    "gradient_clip_val": 1.0,
    "max_steps": 1000,
    "val_check_interval": 100,
    "check_val_every_n_epoch": None,
    "log_every_n_steps": 10,
    # The data module shards both splits across ranks itself; a DistributedSampler would split
    # the validation set again and pad it with repeated sequences.
    "use_distributed_sampler": False,
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
        parser.add_lightning_class_args(DivergenceStop, "divergence")
        parser.add_lightning_class_args(EffectiveLRQuantiles, "eff_lr")
        # last.ckpt is what `fit --ckpt_path last` resumes from.
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.monitor": "val/loss",
                             "checkpoint.filename": "best", "checkpoint.save_top_k": 1})

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        super().parse_arguments(parser, args)
        # Lightning reads the hyperparameters of ckpt_path right after parsing: check the file first.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path in (None, "last", "best", "hpc", "registry"):  # Lightning resolves these itself
            return
        if not Path(ckpt_path).is_file():
            raise FileNotFoundError(f"ckpt_path={ckpt_path!r} does not exist")
        check_checkpoint(Path(ckpt_path), vars(self.config[subcommand]["model"]))

    def before_fit(self) -> None:
        trainer, model, data = self.trainer, self.model, self.datamodule
        if data.hparams.seq_len > model.config.block_size:
            raise ValueError(f"data.seq_len={data.hparams.seq_len} exceeds the model's context "
                             f"block_size={model.config.block_size}; lower data.seq_len or set model.arch.block_size")
        optimizer_callbacks = [c for c in trainer.callbacks if isinstance(c, OptimizerCallback)]
        if len(optimizer_callbacks) != 1:
            raise ValueError(f"trainer.callbacks must hold exactly one lm_opt.callbacks.OptimizerCallback, "
                             f"found {len(optimizer_callbacks)} (add one, e.g. --config configs/optim/adamw.yaml)")
        last = Path(trainer.log_dir) / "checkpoints" / "last.ckpt"
        if self.config[self.subcommand].get("ckpt_path") == "last" and last.is_file():
            check_checkpoint(last, model.hparams)
        trainer.fit_loop.epoch_loop.max_steps = optimizer_callbacks[0].hold_steps + resolve_max_steps(
            max_steps=trainer.max_steps,
            max_tokens=model.hparams.max_tokens,
            tokens_per_param=model.hparams.tokens_per_param,
            num_params=model.model.num_params(),
            tokens_per_step=data.tokens_per_step(trainer),
        )


def main(args=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        LMOptCLI(args=args)
    except Diverged as err:
        # A diverged run is a result of a sweep, not a crash: summary.json records it.
        print(f"run diverged: {err}; recorded as status 'diverged' in summary.json")
