"""Pre-emption: a scheduler's signal ends the run after the step in progress, with a checkpoint of it."""

import logging
import os
import signal
import subprocess

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lm_opt.callbacks.checkpoint import Checkpoint, end_of_step

log = logging.getLogger("lm_opt")


class Preempted(SIGTERMException):
    """The run stopped on a signal after saving its step: its summary says `interrupted`, and the
    process exits with status 128 + the signal's number, as a shell reports a signalled process."""

    def __init__(self, signum: int, step: int, saved: bool, requeued: bool):
        super().__init__(128 + signum)
        self.message = (f"{signal.Signals(signum).name} at step {step}: "
                        + ("saved checkpoints/last.ckpt" if saved else "no checkpoint (checkpointing is off)")
                        + ("; Slurm job requeued" if requeued else ""))

    def __str__(self) -> str:
        return self.message


class Preemption(L.Callback):
    """Saves the current step and stops when a scheduler signals the run.

    SIGTERM (what a scheduler sends every process of a job it pre-empts or cancels) and the
    requeue signal (Slurm's warning ahead of the time limit, `#SBATCH --signal=USR1@<s>`: the
    `requeue_signal` of Lightning's SLURMEnvironment, SIGUSR1 unless set) end the run at the end
    of the optimizer step in progress. Every rank stops at the same step (the ranks reduce the
    signal at each step's end), `last.ckpt` of that step is written (weights, optimizer, schedule,
    data position) and the run ends as `interrupted`. On Slurm with `auto_requeue` (Lightning's
    default), the requeue signal also requeues the job (`scontrol requeue`, as Lightning does); its
    next start runs the same command, which resumes from `last.ckpt`. The DataLoader workers ignore
    these signals (`lm_opt.data`), so a signal to the whole process group reaches this decision too.

    This replaces Lightning's own handling while training. Lightning's SIGTERM handler broadcasts
    from inside the handler and its loops then stop at the next micro-batch, inside a gradient
    accumulation, saving nothing. Its Slurm handler saves from inside the signal handler, wherever
    the step is, into `default_root_dir` (the working directory, which all of a sweep's points
    share), from where a later first attempt of any run on Slurm would silently resume.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.received = self.stopping = 0
        self.auto_requeue = False
        if stage != "fit":
            return
        # Where Lightning's signal connector reads it; single-device strategies hold none themselves.
        environment = trainer._accelerator_connector.cluster_environment
        slurm = isinstance(environment, SLURMEnvironment)
        self.requeue_signal = (slurm and environment.requeue_signal) or signal.SIGUSR1
        self.auto_requeue = slurm and environment.auto_requeue
        if self.auto_requeue:  # keep Lightning from registering its Slurm handler; restored in on_train_start
            environment.auto_requeue = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning registered its handlers before this hook and restores the ones it found at teardown.
        for signum in (signal.SIGTERM, self.requeue_signal):
            signal.signal(signum, self.handle)
        if self.auto_requeue:
            trainer._accelerator_connector.cluster_environment.auto_requeue = True

    def handle(self, signum: int, frame) -> None:
        self.received = self.received or signum  # no more here: a handler runs between any two bytecodes

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if not end_of_step(trainer, batch_idx):
            return
        signum = self.received
        if trainer.world_size > 1:  # a signal may reach one rank only, or the ranks at different steps
            signum = int(trainer.strategy.reduce(torch.tensor(float(signum), device=pl_module.device),
                                                 reduce_op="max").item())
        if not signum or trainer.global_step >= trainer.max_steps > 0:  # the last step: let it validate and finish
            return
        checkpoints = [c for c in trainer.checkpoint_callbacks if isinstance(c, Checkpoint) and c.save_last]
        for callback in checkpoints:
            callback.write_last(trainer)
        self.stopping, self.saved = signum, bool(checkpoints)
        rank_zero_info(f"{signal.Signals(signum).name}: stopping after step {trainer.global_step}"
                       + (", saved in checkpoints/last.ckpt" if checkpoints else ""))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        # Stop here rather than where the step was saved: the loggers have then written its loss
        # (and a validation due at that step has run), so the run's record ends with its checkpoint.
        if not self.stopping:
            return
        for logger in trainer.loggers:
            logger.save()
        requeued = self.auto_requeue and self.stopping == self.requeue_signal
        if requeued and trainer.is_global_zero:
            requeue_slurm_job()
        raise Preempted(self.stopping, trainer.global_step, self.saved, requeued)


def requeue_slurm_job() -> None:
    """`scontrol requeue` this job (the array task where it is one), as Lightning's Slurm handler does."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    except FileNotFoundError:
        log.warning("could not requeue Slurm job %s: no scontrol on PATH", job)
        return
    if result.returncode:
        log.warning("could not requeue Slurm job %s: %s", job, result.stderr.strip())
    else:
        log.info("requeued Slurm job %s: it resumes from checkpoints/last.ckpt", job)
