"""Callbacks that own the optimizer, track diagnostics and record the run."""

from lm_opt.callbacks.optimizer import OptimizerCallback, Route
from lm_opt.callbacks.run_record import RunRecord
from lm_opt.callbacks.throughput import TokenThroughput
from lm_opt.callbacks.update_size import UpdateSizeQuantiles

__all__ = ["OptimizerCallback", "Route", "RunRecord", "TokenThroughput", "UpdateSizeQuantiles"]
