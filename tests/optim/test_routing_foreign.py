"""Optimizers from other packages in routing (lm_opt.optim.routing): which may run on FSDP2's
parameter shards, the route key that declares one elementwise, and objects nested in init_args."""

import pytest
import pytorch_optimizer
import torch

import lm_opt.optim
from lm_opt.errors import UserError
from lm_opt.model import GPT, ModelConfig
from lm_opt.optim.routing import Route, Routing, sharding_obstacle


class Grafting:
    """A config object an optimizer takes in its init_args (as Shampoo implementations take grafting)."""

    def __init__(self, kind: str, eps: float = 1e-8):
        self.kind, self.eps = kind, eps


class GraftedSGD(torch.optim.SGD):
    def __init__(self, params, lr: float, grafting: Grafting | None = None):
        if not isinstance(grafting, Grafting):
            raise TypeError(f"grafting must be a Grafting, got {type(grafting).__name__}")
        super().__init__(params, lr=lr)
        self.grafting = grafting


@pytest.mark.parametrize("cls", [torch.optim.SGD, torch.optim.AdamW, torch.optim.NAdam, torch.optim.RAdam,
                                 lm_opt.optim.SOAP, lm_opt.optim.Muon, lm_opt.optim.Lion])
def test_torch_elementwise_and_lm_opt_optimizers_run_on_shards(cls):
    assert sharding_obstacle(cls) is None


@pytest.mark.parametrize("cls, why", [
    (torch.optim.Adafactor, "row and column statistics"), (torch.optim.Muon, "Newton-Schulz"),
    (pytorch_optimizer.SOAP, "cannot show"), (pytorch_optimizer.Shampoo, "cannot show"),
    (pytorch_optimizer.Muon, "cannot show"), (pytorch_optimizer.Lion, "cannot show")])
def test_whole_tensor_and_unknown_optimizers_are_refused_on_shards(cls, why):
    assert why in sharding_obstacle(cls)


def test_the_refusal_names_the_route_and_the_way_out_and_a_declared_route_runs():
    routing = Routing([Route(optimizer={"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3}}, roles=["norm"]),
                       Route(optimizer={"class_path": "pytorch_optimizer.Lion", "init_args": {"lr": 1e-4}}, name="rest")])
    with pytest.raises(UserError) as err:
        routing.on_shards("FSDP2Strategy")
    message = str(err.value)
    assert message.startswith("route 'rest': Lion cannot run under FSDP2Strategy")
    assert "`elementwise: true` on its route" in message and "strategy: ddp" in message
    declared = Routing([Route(optimizer={"class_path": "pytorch_optimizer.Lion", "init_args": {"lr": 1e-4}},
                              elementwise=True)])
    assert declared.on_shards("FSDP2Strategy") == ["route 'all': Lion on parameter shards: elementwise on each "
                                                   "shard, no communication"]
    with pytest.raises(UserError, match="route 'all': Adafactor cannot run"):
        Routing([Route(optimizer={"class_path": "torch.optim.Adafactor", "init_args": {}})]).on_shards("FSDP2Strategy")


def test_class_path_objects_nested_in_init_args_are_instantiated():
    optimizer = {"class_path": "test_routing_foreign.GraftedSGD", "init_args": {
        "lr": 0.1, "grafting": {"class_path": "test_routing_foreign.Grafting", "init_args": {"kind": "adagrad"}}}}
    model = GPT(ModelConfig.from_name("tiny"))
    built, _ = Routing([Route(optimizer=optimizer)]).build(model)
    assert isinstance(built.grafting, Grafting) and (built.grafting.kind, built.grafting.eps) == ("adagrad", 1e-8)
    bad = {**optimizer, "init_args": {**optimizer["init_args"], "grafting": {
        "class_path": "test_routing_foreign.Grafting", "init_args": {"kind": "adagrad", "nope": 1}}}}
    with pytest.raises(UserError, match="GraftedSGD rejects init_args"):
        Routing([Route(optimizer=bad)])
    with pytest.raises(UserError, match="class_path 'test_routing_foreign.Nowhere' cannot be imported"):
        Routing([Route(optimizer={**optimizer, "init_args": {"lr": 0.1, "grafting": {
            "class_path": "test_routing_foreign.Nowhere"}}})])
