"""Routing parameters to optimizers by role, and the composite optimizer Lightning sees."""

import re
from pathlib import Path

import pytest
import torch
import yaml

from lm_opt.callbacks.optimizer import OptimizerCallback, Route, optimizer_args
from lm_opt.errors import UserError
from lm_opt.model import GPT, ModelConfig
from lm_opt.optim import EMASGD, Adalayer, CompositeOptimizer
from lm_opt.optim.routing import route_parameters

CONFIGS = Path(__file__).parents[2] / "configs" / "optim"


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig.from_name("tiny", n_layer=1))


def callback_from(config: str) -> OptimizerCallback:
    spec = yaml.safe_load((CONFIGS / config).read_text())["trainer"]["callbacks"][0]
    return OptimizerCallback(**spec["init_args"])


def params_of(optimizer: torch.optim.Optimizer) -> set[str]:
    return {n for g in optimizer.param_groups for n in g["param_names"]}


def test_sgd_body_with_adalayer_on_last_layer_and_norms_routes_exactly_those_sets():
    model = tiny_model()
    optimizer = callback_from("sgd_adalayer_last_norm.yaml").build(model)
    adalayer, sgd = optimizer.optimizers
    assert isinstance(optimizer, CompositeOptimizer)
    assert isinstance(adalayer, Adalayer) and isinstance(sgd, EMASGD)
    roles = model.param_roles()
    assert params_of(adalayer) == {n for n, r in roles.items() if r in ("last_layer", "norm")}
    assert params_of(sgd) == {n for n, r in roles.items() if r in ("embedding", "matrix")}
    assert optimizer.param_groups == adalayer.param_groups + sgd.param_groups
    last = next(g for g in adalayer.param_groups if g["role"] == "last_layer")
    assert last["blocks"] == "row" and last["lr"] == pytest.approx(3.16e-3)
    assert {g["lr"] for g in sgd.param_groups} == {1.0}


def test_adalayer_splits_the_fused_qkv_weight_into_three_blocks():
    model = tiny_model()
    optimizer = callback_from("adalayer.yaml").build(model)
    qkv = next(g for g in optimizer.param_groups if "blocks.0.attn.qkv.weight" in g["param_names"])
    assert qkv["blocks"] == 3 and qkv["param_names"] == ["blocks.0.attn.qkv.weight"]


def test_a_parameter_no_route_covers_is_named():
    model = tiny_model()
    routes = [Route(roles=["matrix", "embedding"], optimizer={"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}})]
    with pytest.raises(ValueError, match=r"no route covers these parameters: .*lm_head.weight \(last_layer\)"):
        route_parameters(model, routes)


def test_a_route_that_takes_nothing_is_named_by_its_roles_and_pattern():
    model = tiny_model()
    sgd = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}}
    routes = [Route(optimizer=sgd, name="everything"), Route(roles=["norm"], optimizer=sgd, name="late norms")]
    with pytest.raises(UserError, match=r"route 'late norms' \(roles \['norm'\], pattern None\) takes no parameter: "
                                        r"earlier routes took all \d+ parameters it matches"):
        route_parameters(model, routes)
    routes = [Route(roles=["norm"], pattern=r"blocks\.9\.", optimizer=sgd), Route(optimizer=sgd)]
    expected = re.escape(r"route 'norm' (roles ['norm'], pattern 'blocks\\.9\\.') takes no parameter: no parameter")
    with pytest.raises(UserError, match=expected):
        route_parameters(model, routes)
    with pytest.raises(ValueError, match="roles.*'bias'"):
        Route(roles=["bias"], optimizer=sgd)


def test_name_patterns_select_within_a_role():
    model = tiny_model()
    sgd = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}}
    routes = [Route(roles=["matrix"], pattern=r"attn\.", optimizer=sgd, name="attention"), Route(optimizer=sgd)]
    taken = route_parameters(model, routes)
    assert {n for n, _ in taken[0]} == {"blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight"}


def train(model: GPT, optimizer: torch.optim.Optimizer, steps: range) -> list[float]:
    losses = []
    for step in steps:
        gen = torch.Generator().manual_seed(step)
        idx = torch.randint(0, 500, (2, 9), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def resume_routed(save, load):
    """The study's SGD + Adalayer routing, stopped after 3 of 6 steps: ``save(model, optimizer)``
    gives its optimizer state, ``load(model, optimizer, saved)`` puts it into a fresh model's; the
    resumed run must continue bit for bit. Returns the saved state and the resumed optimizer."""
    callback = callback_from("sgd_adalayer_last_norm.yaml")
    model = tiny_model()
    uninterrupted = train(model, callback.build(model), range(6))

    first = tiny_model()
    optimizer = callback.build(first)
    train(first, optimizer, range(3))
    saved = save(first, optimizer)
    second = tiny_model(seed=1)
    second.load_state_dict(first.state_dict())
    resumed_optimizer = callback.build(second)
    load(second, resumed_optimizer, saved)
    assert train(second, resumed_optimizer, range(3, 6)) == uninterrupted[3:]
    return saved, resumed_optimizer


def test_composite_state_dict_round_trip_continues_bit_for_bit():
    _, resumed_optimizer = resume_routed(lambda model, opt: opt.state_dict(),
                                         lambda model, opt, saved: opt.load_state_dict(saved))
    assert all(a is b for a, b in zip(resumed_optimizer.param_groups,
                                      [g for opt in resumed_optimizer.optimizers for g in opt.param_groups]))


def test_composite_state_is_named_by_parameter_in_torch_distributed_checkpoints():
    """`torch.distributed.checkpoint`, which Lightning's FSDP2 strategy uses, reads the composite's
    state as torch's layout: every parameter's state under its name, whichever route holds it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    saved, _ = resume_routed(get_optimizer_state_dict, set_optimizer_state_dict)
    assert set(saved["state"]) == {n for n, _ in tiny_model().named_parameters()}
    assert "exp_avg_sq" in saved["state"]["lm_head.weight"]  # Adalayer's
    assert set(saved["state"]["wte.weight"]) == {"exp_avg", "step"}  # EMASGD's


def test_frozen_adalayer_keeps_body_v_and_adapts_last_layer_and_norm_v():
    config = yaml.safe_load((CONFIGS / "frozen_adalayer.yaml").read_text())["trainer"]["callbacks"][0]["init_args"]
    for route in config["routes"]:
        route["optimizer"]["init_args"]["freeze_after"] = 3
    model = tiny_model()
    optimizer = OptimizerCallback(**config).build(model)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, optimizer, range(3))
    assert all(torch.equal(p, start[n]) for n, p in model.named_parameters()), "parameters moved while lr was 0"
    v_at_freeze = {n: optimizer.state[p]["exp_avg_sq"].clone() for n, p in model.named_parameters()}
    train(model, optimizer, range(3, 6))
    roles = model.param_roles()
    for name, p in model.named_parameters():
        v = optimizer.state[p]["exp_avg_sq"]
        if roles[name] in ("last_layer", "norm"):
            assert not torch.equal(v, v_at_freeze[name]), f"{name} stopped adapting"
        else:
            assert torch.equal(v, v_at_freeze[name]), f"{name} kept adapting after the freeze"


def test_only_torch_muon_is_known_not_to_shard():
    from lm_opt.optim import SOAP, Adafactor, AdamMini, Lion, Muon, Shampoo, Signum
    from lm_opt.optim.routing import sharding_obstacle, sharding_scheme

    assert "lm_opt.optim.Muon" in sharding_obstacle(torch.optim.Muon)
    shardable = (torch.optim.AdamW, torch.optim.SGD, Lion, Signum, EMASGD, Adalayer, Adafactor, AdamMini, SOAP, Shampoo,
                 Muon)
    assert not any(sharding_obstacle(c) for c in shardable)
    assert "all-reduce" in sharding_scheme(Adafactor) and "elementwise" in sharding_scheme(Lion)
    assert all("owner" in sharding_scheme(c) for c in (SOAP, Shampoo, Muon))


def test_the_optimizer_of_a_config_is_read_in_one_place_and_its_hold_lengthens_the_run():
    config = yaml.safe_load((CONFIGS / "frozen_adalayer.yaml").read_text())
    args = optimizer_args(config, "frozen_adalayer.yaml")
    assert args is config["trainer"]["callbacks"][0]["init_args"]
    assert OptimizerCallback(**args).hold_steps == 1000
    assert callback_from("adamw.yaml").hold_steps == 0
    twice = {"trainer": {"callbacks": config["trainer"]["callbacks"] * 2}}
    for wrong, found in (({}, 0), (twice, 2)):
        with pytest.raises(UserError, match=f"x.yaml: needs exactly one OptimizerCallback .*found {found}"):
            optimizer_args(wrong, "x.yaml")
