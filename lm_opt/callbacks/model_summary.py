"""Lightning's model summary without its FLOPs."""

import logging

from lightning.pytorch.callbacks import ModelSummary

log = logging.getLogger("lm_opt")


class ParameterSummary(ModelSummary):
    """The top-level modules and their parameters. Lightning's FLOPs column and total are left
    out: they count a forward pass of `example_input_array`, which LMModule has no use for, so
    they always read 0 (TokenThroughput reports the real FLOPs, as MFU)."""

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int, **kwargs) -> None:
        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        widths = [max(len(name), *map(len, values)) for name, values in columns]
        rows = [[name for name, _ in columns], *zip(*(values for _, values in columns))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
        lines.append(f"{trainable_parameters:,} trainable and {total_parameters - trainable_parameters:,} "
                     f"frozen parameters, {model_size:.1f} MB")
        log.info("\n".join(lines))
