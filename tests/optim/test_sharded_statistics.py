"""Adafactor*, Adalayer and Adam-mini under FSDP2 (2 and 4 gloo ranks) against one process."""

import pytest
import torch
import torch.distributed as dist

from lm_opt.optim import Adafactor, Adalayer, AdamMini
from optim_harness import single_rank_mesh
from sharded_harness import OPTIMIZERS, STEPS, expected_all_reduce, factored_3d, reference, worker

pytestmark = [pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
              pytest.mark.slow]


@pytest.fixture(scope="module", params=[2, 4])
def sharded(request, tmp_path_factory):
    """What each optimizer did on `world` FSDP2 ranks (see `sharded_harness.worker`)."""
    world, out = request.param, tmp_path_factory.mktemp(f"world{request.param}")
    torch.multiprocessing.spawn(worker, args=(world, str(out / "init"), str(out)), nprocs=world)
    return world, torch.load(out / f"results-{world}.pt")


@pytest.fixture(scope="module")
def references():
    """One process's parameters after all steps, and its optimizer and model after 2."""
    torch.set_num_threads(1)
    return {name: (reference(name)[0], *reference(name, steps=2)[1:]) for name in OPTIMIZERS}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_sharded_steps_equal_one_process(sharded, references, name):
    """Same parameters as one process on the same global batch, up to float32 summation order."""
    world, results = sharded
    for pname, value in references[name][0].items():
        torch.testing.assert_close(results[name]["params"][pname], value, rtol=1e-5, atol=1e-7,
                                   msg=lambda m: f"{name}, {world} ranks: {pname}: {m}")


def test_factored_3d_shards_need_no_communication(sharded):
    """Dim 0 of a 3-D tensor is a batch dim of its factoring: its shards' statistics are local
    (the worker checks that no collective ran), and the result is one process's."""
    _, results = sharded
    torch.testing.assert_close(results["factored_3d"], factored_3d(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_all_reduce_volume_is_the_docstring_figure(sharded, name):
    """One all-reduce per param group that has multi-row statistics, of the elements the scheme says."""
    _, results = sharded
    assert len(results[name]["all_reduce"]) == STEPS
    for step, counts in enumerate(results[name]["all_reduce"], start=1):
        assert counts == expected_all_reduce(name, step), f"{name}: step {step}"


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_gathered_state_is_that_of_one_process(sharded, references, name):
    """The full state dict at step 2 holds whole tensors equal to one process's state (to 1e-5
    of each tensor's largest entry: gradient entries that nearly cancel differ more in relative terms)."""
    _, results = sharded
    _, optimizer, model = references[name]
    gathered = results[name]["gathered"]
    for pname, p in model.named_parameters():
        for key, value in optimizer.state[p].items():
            atol = 1e-5 * value.abs().max().item()
            torch.testing.assert_close(gathered[pname][key], value, rtol=1e-5, atol=atol,
                                       msg=lambda m: f"{name}: {pname}/{key}: {m}")


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_resume_from_a_full_state_dict_continues_identically(sharded, name):
    """Gathered at step 2 (`full_state_dict`, `cpu_offload`), loaded into a fresh sharded model and
    optimizer: the state keeps its layout, and the run ends where the uninterrupted one does."""
    world, results = sharded
    saved_layout, loaded_layout = results[name]["layouts"]
    assert loaded_layout == saved_layout
    assert all(layout["exp_avg"] == "(Shard(dim=0),)" for layout in saved_layout.values())
    for pname, value in results[name]["params"].items():
        assert torch.equal(results[name]["resumed"][pname], value), f"{name}, {world} ranks: {pname}"


def test_state_layout_of_shards(sharded):
    """Statistics indexed by rows are sharded like the parameter; the others are whole on every rank."""
    _, results = sharded
    shard0, plain = "(Shard(dim=0),)", "plain"
    adafactor = results["adafactor"]["layouts"][0]
    assert adafactor["blocks.0.attn.qkv.weight"] == {
        "step": plain, "exp_avg": shard0, "exp_avg_sq_row": shard0, "exp_avg_sq_col": plain}
    assert adafactor["blocks.0.attn_norm.weight"]["exp_avg_sq"] == plain
    assert results["adafactor_full"]["layouts"][0]["blocks.0.attn_norm.weight"]["exp_avg_sq"] == shard0
    adam_mini = results["adam_mini"]["layouts"][0]
    assert adam_mini["blocks.0.attn.qkv.weight"]["exp_avg_sq"] == plain
    assert adam_mini["wte.weight"]["exp_avg_sq"] == shard0


@pytest.mark.parametrize("cls", [Adafactor, Adalayer, AdamMini])
def test_sharded_classes_name_their_scheme(cls):
    assert "all-reduce" in cls.sharding_scheme


@pytest.mark.parametrize("cls", [Adafactor, Adalayer, AdamMini])
def test_dtensors_not_sharded_as_fsdp2_shards_them_are_refused(cls):
    from torch.distributed.tensor import Replicate, distribute_tensor

    with single_rank_mesh() as mesh:
        replicated = torch.nn.Parameter(distribute_tensor(torch.randn(4, 4), mesh, [Replicate()]))
        with pytest.raises(RuntimeError, match=f"{cls.__name__} supports DTensor parameters sharded on dim 0"):
            cls([replicated])
        optimizer = cls([torch.nn.Parameter(torch.randn(4, 4))])
        with pytest.raises(RuntimeError, match=cls.__name__):
            optimizer.add_param_group({"params": [replicated]})
        assert len(optimizer.param_groups) == 1
