import math

import pytest
import torch
import torch.nn.functional as F

from lm_opt.model import GPT, PRESETS, ROLES, ModelConfig, kind_of, lm_loss


def tiny(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig.from_name("tiny", **overrides))


def test_changing_a_future_token_leaves_earlier_logits_unchanged():
    model = tiny().eval()
    idx = torch.randint(0, 1000, (2, 16))
    changed = idx.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 1000
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_z_loss_matches_its_formula():
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    targets = torch.randint(0, 7, (2, 5))
    ce, z = lm_loss(logits, targets, z_loss=1e-4)
    expected_z = 1e-4 * torch.stack([torch.log(torch.exp(row).sum()) ** 2 for row in logits.reshape(-1, 7)]).mean()
    expected_ce = -torch.log_softmax(logits, -1).gather(-1, targets[..., None]).mean()
    torch.testing.assert_close(z, expected_z.float())
    torch.testing.assert_close(ce, expected_ce.float())
    assert lm_loss(logits, targets, z_loss=0.0)[1].item() == 0.0


def test_the_fused_loss_has_the_gradients_of_cross_entropy_plus_a_separate_z_loss():
    """One log-sum-exp for both terms changes the passes over the logits, not the gradients."""
    logits = torch.randn(3, 6, 11, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (3, 6))
    ce, z = lm_loss(logits, targets, z_loss=1e-2)
    (fused,) = torch.autograd.grad(ce + z, logits)
    flat = logits.flatten(0, 1)
    separate = F.cross_entropy(flat, targets.flatten()) + 1e-2 * torch.logsumexp(flat, -1).pow(2).mean()
    (expected,) = torch.autograd.grad(separate, logits)
    torch.testing.assert_close(fused, expected, rtol=1e-6, atol=1e-9)


def test_qk_norm_adds_exactly_the_query_and_key_layernorms():
    with_qk = dict(tiny(qk_norm=True).named_parameters())
    without = dict(tiny(qk_norm=False).named_parameters())
    extra = set(with_qk) - set(without)
    n_layer = PRESETS["tiny"].n_layer
    assert set(without) <= set(with_qk)
    assert extra == {f"blocks.{i}.attn.{n}_norm.weight" for i in range(n_layer) for n in "qk"}


def test_every_parameter_has_exactly_one_role():
    model = tiny()
    roles = model.param_roles()
    assert list(roles) == [name for name, _ in model.named_parameters()]
    assert set(roles.values()) == set(ROLES)
    assert roles["lm_head.weight"] == "last_layer"
    assert roles["wte.weight"] == "embedding"
    assert roles["blocks.0.attn.qkv.weight"] == "matrix"
    assert roles["blocks.0.attn.q_norm.weight"] == "norm"


@pytest.mark.parametrize("norm_bias", [False, True])
def test_linear_layers_have_no_bias_and_layernorms_a_gain_and_a_bias_only_if_asked(norm_bias):
    """The study's LayerNorms (block, QK and final) have a gain and no bias (`bias_for_layer_norm: false`)."""
    model = tiny(norm_bias=norm_bias)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 4 * model.config.n_layer + 1
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            assert module.bias is None
    for norm in norms:
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
        assert (norm.bias is not None) == norm_bias


# std of a normal truncated at +-3 sigma, in units of sigma
TRUNCATED_STD = math.sqrt(1 - 6 * math.exp(-4.5) / math.sqrt(2 * math.pi) / math.erf(3 / math.sqrt(2)))


@pytest.mark.slow
def test_mitchell_init_of_the_150m_preset_has_the_studys_std_per_tensor():
    """OLMo's `mitchell`: sigma = 1/sqrt(fan_in), cut at 3 sigma; block l's attention and MLP out-projections
    further divided by sqrt(2 (l + 1)). For d = 1024: 1/32 for the embedding, QKV, MLP in and the output
    layer (a smaller vocabulary keeps the test light; it does not change any sigma)."""
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_name("150m", vocab_size=2048))
    expected = {"wte.weight": 1 / 32, "lm_head.weight": 1 / 32}
    for layer in range(12):
        depth = math.sqrt(2 * (layer + 1))
        expected |= {f"blocks.{layer}.attn.qkv.weight": 1 / 32, f"blocks.{layer}.mlp.fc.weight": 1 / 32,
                     f"blocks.{layer}.attn.proj.weight": 1 / 32 / depth,
                     f"blocks.{layer}.mlp.proj.weight": 1 / 64 / depth}
    matrices = {name: p for name, p in model.named_parameters() if p.dim() == 2}
    assert set(matrices) == set(expected)
    for name, weight in matrices.items():
        sigma = expected[name]
        assert weight.abs().max() <= 3 * sigma * (1 + 1e-6), name
        assert weight.std().item() == pytest.approx(TRUNCATED_STD * sigma, rel=0.01), name
        assert weight.mean().abs().item() < 0.01 * sigma, name


def test_normal_init_is_gpt2s():
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_name("cpu", init="normal", init_std=0.02))
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.01)
    assert model.blocks[3].mlp.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.01)
    assert model.wte.weight.abs().max() > 3 * 0.02  # not truncated


def test_vocabulary_is_padded_to_a_multiple_of_128():
    config = ModelConfig.from_name("150m")
    assert config.vocab_size == 32100 and config.padded_vocab_size == 32128


@pytest.mark.parametrize("preset,millions", [("150m", 216), ("300m", 368), ("600m", 661), ("1.2b", 1339)])
def test_presets_match_the_study_parameter_counts(preset, millions):
    with torch.device("meta"):
        model = GPT(ModelConfig.from_name(preset))
    assert math.isclose(model.num_params() / 1e6, millions, rel_tol=0.005)


def test_bad_model_config_names_the_key():
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        ModelConfig.from_name("huge")
    with pytest.raises(ValueError, match="n_layers"):
        ModelConfig.from_name("tiny", n_layers=3)
    with pytest.raises(ValueError, match="n_head"):
        ModelConfig.from_name("tiny", n_head=5)
    with pytest.raises(ValueError, match="model.init must be 'mitchell' or 'normal', got 'xavier'"):
        ModelConfig.from_name("tiny", init="xavier")


def test_sequence_longer_than_context_is_rejected():
    model = tiny()
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, model.config.block_size + 1, dtype=torch.long))


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    """Recomputing each block in backward changes what is kept, not what is computed."""
    idx = torch.randint(0, 1000, (2, 17))
    grads = []
    for checkpointing in (False, True):
        model = tiny()
        model.activation_checkpointing = checkpointing
        ce, z = lm_loss(model(idx[:, :-1]), idx[:, 1:], model.config.z_loss)
        (ce + z).backward()
        grads.append((ce.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (ce0, g0), (ce1, g1) = grads
    assert torch.equal(ce0, ce1)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=0, atol=0, msg=name)


def test_kinds_name_the_matrices_apart_and_give_the_roles():
    model = GPT(ModelConfig.from_name("tiny", n_layer=3, norm_bias=True))
    kinds = model.param_kinds()
    assert list(kinds) == list(model.param_roles())
    assert {kinds[f"blocks.2.{n}.weight"] for n in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")} == {
        "qkv", "attn_out", "mlp_in", "mlp_out"}
    assert kinds["blocks.1.attn_norm.bias"] == "norm" and model.fused_projections("blocks.2.attn.qkv.weight") == 3
    assert all(kind_of(name) == kind for name, kind in kinds.items())  # names alone, as in a run's logs
    assert kind_of("blocks.11.mlp.fc.weight") == "mlp_in" and kind_of("blocks.0.attn.bias") is None
