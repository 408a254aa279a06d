"""The optimizers of the study and of SOAP, and the ones a researcher tries next.

`torch.optim.AdamW` and `torch.optim.SGD` are used as they are (`lm_opt.optim.Muon` is
`torch.optim.Muon`'s arithmetic, on FSDP2 shards too); YAML
names any optimizer by `class_path` (e.g. `lm_opt.optim.Lion`, `torch.optim.AdamW`).

`routing` routes parameters to optimizers by role and builds the optimizer of a model; `hooks`
declares the optional methods by which an optimizer asks the training loop for more (a hold of
the lr schedule, a train/eval switch).
"""

from lm_opt.optim.adafactor import Adafactor
from lm_opt.optim.adalayer import Adalayer
from lm_opt.optim.adam_mini import AdamMini
from lm_opt.optim.composite import CompositeOptimizer
from lm_opt.optim.ema_sgd import EMASGD
from lm_opt.optim.lion import Lion
from lm_opt.optim.muon import Muon
from lm_opt.optim.schedule_free import ScheduleFreeAdamW
from lm_opt.optim.shampoo import Shampoo
from lm_opt.optim.signum import Signum
from lm_opt.optim.soap import SOAP

__all__ = [
    "EMASGD",
    "SOAP",
    "Adafactor",
    "Adalayer",
    "AdamMini",
    "CompositeOptimizer",
    "Lion",
    "Muon",
    "ScheduleFreeAdamW",
    "Shampoo",
    "Signum",
]
