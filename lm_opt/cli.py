"""`python -m lm_opt`: the Lightning CLI over LMModule and C4DataModule."""

import logging
import os
import sys
import warnings
from pathlib import Path

import torch
import yaml

from jsonargparse import Namespace
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, instantiate_class
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from lm_opt.callbacks.checkpoint import Checkpoint
from lm_opt.callbacks.divergence import Diverged, DivergenceStop
from lm_opt.callbacks.effective_lr import EffectiveLRQuantiles
from lm_opt.callbacks.final_validation import FinalValidation
from lm_opt.callbacks.optimizer import OptimizerCallback
from lm_opt.callbacks.model_summary import ParameterSummary
from lm_opt.callbacks.preemption import Preemption
from lm_opt.callbacks.progress_bar import StepProgressBar
from lm_opt.callbacks.run_record import RunRecord
from lm_opt.callbacks.throughput import TokenThroughput
from lm_opt.callbacks.update_size import UpdateSizeQuantiles
from lm_opt.data import C4DataModule, end_data_workers
from lm_opt.errors import DEBUG_ENV, UserError, debug_mode, invalid_yaml
from lm_opt.module import LMModule
from lm_opt.precision import Trainer
from lm_opt.record import SUMMARY_FILE, read_summary, summary_path
from lm_opt.run_lock import holder_of, try_lock
from lm_opt.schedule import resolve_max_steps
from lm_opt.user_yaml import load_yaml

# Hyperparameters that change the model's parameters: a checkpoint must agree on them.
ARCHITECTURE_KEYS = ("preset", "qk_norm", "arch")


def check_checkpoint(path: Path, hparams: dict) -> None:
    """Fail before any compute if `path` is unreadable or holds a different architecture."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:
        raise UserError(f"ckpt_path={str(path)!r} is not a readable Lightning checkpoint: {err}") from err
    saved = checkpoint.get("hyper_parameters")
    if saved is None or "state_dict" not in checkpoint:
        raise UserError(f"ckpt_path={str(path)!r} is not an lm_opt checkpoint (no state_dict/hyper_parameters)")
    differ = [f"model.{k}: checkpoint {saved.get(k)!r}, this run {hparams[k]!r}"
              for k in ARCHITECTURE_KEYS if saved.get(k) != hparams[k]]
    if differ:
        raise UserError(f"ckpt_path={str(path)!r} does not match this model: " + "; ".join(differ))


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
    "callbacks": [LearningRateMonitor(logging_interval="step"), TokenThroughput(), FinalValidation()],
}


def check_yaml_files(args: list[str]) -> None:
    """Fail naming the file, line and column of a `--config` that is not valid YAML (jsonargparse
    parses the file's text and names only `<unicode string>`)."""
    paths = [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    paths += [b for a, b in zip(args, args[1:]) if a in ("--config", "-c")]
    for path in map(Path, paths):
        if not path.is_file():
            continue  # jsonargparse names a missing file itself
        try:
            load_yaml(path.read_text())
        except yaml.YAMLError as err:
            raise UserError(f"--config {invalid_yaml(path, err)}") from err


def trained(events: Path) -> bool:
    """Whether a TensorBoard event file records a training step. Lightning creates the file before
    setup, so a run that failed there (a wrong data path, say) leaves one that records nothing."""
    return any(v.tag.startswith("train/") for event in EventFileLoader(str(events)).Load()
               for v in event.summary.value)


def existing_run(log_dir: Path) -> list[str]:
    """What in `log_dir` shows that a run trained there: checkpoints, event files with training
    steps, a summary with steps."""
    found = sorted((log_dir / "checkpoints").glob("*.ckpt")) + [
        p for p in sorted(log_dir.glob("events.out.tfevents.*")) if trained(p)]
    if read_summary(log_dir).steps:
        found.append(summary_path(log_dir))
    return [str(p.relative_to(log_dir)) for p in found]


def check_fresh_run(log_dir: Path, ckpt_path: str | None) -> None:
    """Refuse a `fit` that would write into another run's folder: its events would mix with that
    run's and its record and checkpoints would be overwritten. Resuming the folder's own run is fine."""
    found = existing_run(log_dir)
    if not found or (ckpt_path and log_dir.resolve() in Path(ckpt_path).resolve().parents):
        return
    if ckpt_path == "last":
        if not (log_dir / "checkpoints" / "last.ckpt").is_file():
            raise UserError(f"ckpt_path=last: {log_dir} holds a run but no checkpoints/last.ckpt to resume "
                            "from; start another with --trainer.logger.init_args.name NAME (or .version)")
        return
    shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
    raise UserError(f"{log_dir} already holds a run ({shown}); resume it with --ckpt_path last, or start another "
                    "with --trainer.logger.init_args.name NAME (or .version)")


def run_folder(trainer: Namespace) -> tuple[Logger | None, Path]:
    """The first logger, built from the trainer's config as Lightning builds it, and the folder that
    Lightning's `Trainer.log_dir` then names: the folder the run writes in."""
    root = trainer.default_root_dir or os.getcwd()
    logger = trainer.logger[0] if isinstance(trainer.logger, list) and trainer.logger else trainer.logger
    if logger is True:
        logger = TensorBoardLogger(root, version=SLURMEnvironment.job_id())
    elif logger:
        logger = instantiate_class((), logger.as_dict())
    else:
        return None, Path(root)
    folder = logger.log_dir if isinstance(logger, (TensorBoardLogger, CSVLogger)) else logger.save_dir
    return logger, Path(folder or root)


def global_zero() -> bool:
    """Whether this process is the run's rank 0, before Lightning knows: rank 0 as torchrun, srun or
    Lightning's launcher number it (Lightning's own reading of them), on the first node."""
    return rank_zero_only.rank == 0 and os.environ.get("NODE_RANK", "0") == "0"


class LMOptParser(LightningArgumentParser):
    """Ends a parse error as its `error:` line alone: the usage of every option above it buries it."""

    def error(self, message: str, ex: Exception | None = None):
        if debug_mode() or not self.exit_on_error:
            super().error(message, ex)
        print(f"error: {one_line(message)}", file=sys.stderr)
        self.exit(2)


def one_line(message: str) -> str:
    return " ".join(line.strip() for line in str(message).strip().splitlines())


class LMOptCLI(LightningCLI):
    def __init__(self, args=None, run: bool = True):
        self.run_lock, self.run_logger = None, None
        try:
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
                parser_class=LMOptParser,
                parser_kwargs={"prog": "python -m lm_opt"},  # not `__main__.py`, in every usage line
                trainer_class=Trainer,
            )
        finally:
            if self.run_lock is not None:
                self.run_lock.release()

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        parser.add_lightning_class_args(DivergenceStop, "divergence")
        parser.add_lightning_class_args(EffectiveLRQuantiles, "eff_lr")
        parser.add_lightning_class_args(UpdateSizeQuantiles, "update_size")
        # last.ckpt is what `fit --ckpt_path last` resumes from, always under that name (a fresh run
        # never writes into a folder that holds checkpoints: check_fresh_run).
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.monitor": "val/loss",
                             "checkpoint.filename": "best", "checkpoint.save_top_k": 1,
                             "checkpoint.enable_version_counter": False})

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        if args is None or isinstance(args, list):
            check_yaml_files(sys.argv[1:] if args is None else args)
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand == "fit" and global_zero():
            self.lock_run_folder(self.config.fit.trainer)
        # Lightning reads the hyperparameters of ckpt_path right after parsing: check the file first.
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path in (None, "last", "best", "hpc", "registry"):  # Lightning resolves these itself
            return
        if not Path(ckpt_path).is_file():
            raise UserError(f"ckpt_path={ckpt_path!r} does not exist")
        check_checkpoint(Path(ckpt_path), vars(self.config[subcommand]["model"]))

    def lock_run_folder(self, trainer: Namespace) -> None:
        """Hold the run folder (lm_opt.run_lock) until the run ends, from before the model and data are
        built: a `fit` into a folder that another live process holds stops here. The trainer gets the
        logger whose folder is held, so that a logger that numbers its versions does not count the
        folder that the lock has just made."""
        self.run_logger, folder = run_folder(trainer)
        try:
            self.run_lock = try_lock(folder, "fit")
        except OSError as err:
            raise UserError(f"{folder}: cannot write the run folder there: {err}") from err
        if self.run_lock is None:
            raise UserError(f"{folder} is in use by {holder_of(folder)}: wait for it to end, or start another run "
                            "with --trainer.logger.init_args.name NAME (or .version)")

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, MisconfigurationException) as err:
            # Constructors check their arguments with ValueError: here, those are the config's values.
            raise UserError(str(err)) from err

    def instantiate_trainer(self, **kwargs):
        """The trainer, with lm_opt's progress bar and model summary in place of Lightning's defaults,
        pre-emption handling (a fresh instance per run: it holds the run's signal) and, in a `fit`, the
        logger of the folder it holds (lock_run_folder)."""
        config = self._get(self.config_init, "trainer", default={})
        callbacks = list(config.get("callbacks") or [])
        has_bar = any(isinstance(c, ProgressBar) for c in callbacks)
        if config.get("enable_progress_bar", True) is not False and not has_bar:
            callbacks.append(StepProgressBar())
        if config.get("enable_model_summary", True) is not False:
            callbacks.append(ParameterSummary())
            kwargs["enable_model_summary"] = False  # Lightning would add its own, and say so
        callbacks.append(Preemption())
        if self.run_logger is not None:
            loggers = config.get("logger")
            kwargs["logger"] = [self.run_logger, *loggers[1:]] if isinstance(loggers, list) else self.run_logger
        return super().instantiate_trainer(callbacks=callbacks, **kwargs)

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except BaseException as err:
            # Lightning's on_exception may itself have failed (a callback raising there, a log folder
            # gone): make sure the record says how the run ended, where it still can.
            records = [c for c in self.trainer.callbacks if isinstance(c, RunRecord)]
            for record in records:
                record.record_failure(self.trainer, self.model, err)
            raise

    def before_fit(self) -> None:
        trainer, model, data = self.trainer, self.model, self.datamodule
        check_fresh_run(Path(trainer.log_dir), self.config[self.subcommand].get("ckpt_path"))
        if data.hparams.seq_len > model.config.block_size:
            raise UserError(f"data.seq_len={data.hparams.seq_len} exceeds the model's context "
                            f"block_size={model.config.block_size}; lower data.seq_len or set model.arch.block_size")
        optimizer = OptimizerCallback.of(trainer)
        optimizer.on_shards(trainer)  # refused here, before Lightning starts the other ranks
        hold_steps = optimizer.hold_steps
        last = Path(trainer.log_dir) / "checkpoints" / "last.ckpt"
        if self.config[self.subcommand].get("ckpt_path") == "last" and last.is_file():
            check_checkpoint(last, model.hparams)
        trainer.fit_loop.epoch_loop.max_steps = hold_steps + resolve_max_steps(
            max_steps=trainer.max_steps,
            max_tokens=model.hparams.max_tokens,
            tokens_per_param=model.hparams.tokens_per_param,
            num_params=model.model.num_params(),
            tokens_per_step=data.tokens_per_step(trainer),
        )


def quiet_known_warnings() -> None:
    """Hide warnings that every run prints and lm_opt cannot fix where they arise, each by its message."""
    # Lightning's own code still uses torch's deprecated LeafSpec (lightning/pytorch/utilities/_pytree.py).
    warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
    # LightningCLI calls jsonargparse APIs deprecated since jsonargparse 4.49 (skip_none in
    # SaveConfigCallback and --print_config, instantiate_classes, add_instantiator).
    warnings.filterwarnings("ignore", r"\s*(skip_none parameter|``instantiate_classes``|"
                            r"``ArgumentParser.add_instantiator``) was deprecated", DeprecationWarning)
    warnings.filterwarnings("ignore", r"\s*By default only one JsonargparseDeprecationWarning", DeprecationWarning)
    # val/loss comes from a torchmetrics MeanMetric, which reduces its sums across ranks itself.
    warnings.filterwarnings("ignore", r"It is recommended to use `self.log\('val/(loss|ppl)', ..., sync_dist=True\)`")


def main(args: list[str] | None = None) -> None:
    """Run the CLI; a user error ends as one `error:` line and exit status 2 (`--debug` or
    LM_OPT_DEBUG=1 shows its traceback)."""
    args = None if args is None else list(args)
    argv = sys.argv if args is None else args
    if "--debug" in argv:
        argv.remove("--debug")
        os.environ[DEBUG_ENV] = "1"
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_known_warnings()
    try:
        LMOptCLI(args=args)
    except Diverged as err:
        # A diverged run is a result of a sweep, not a crash: its summary records it.
        print(f"run diverged: {err}; recorded as status 'diverged' in {SUMMARY_FILE}")
    except (UserError, MisconfigurationException) as err:
        if debug_mode():
            raise
        if rank_zero_only.rank == 0:  # every process of a multi-process run raises the same error
            print(f"error: {one_line(err)}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        end_data_workers()
