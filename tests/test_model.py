import math

import pytest
import torch

from lm_opt.model import GPT, PRESETS, ROLES, ModelConfig, lm_loss


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


def test_qk_norm_adds_exactly_the_query_and_key_layernorms():
    with_qk = dict(tiny(qk_norm=True).named_parameters())
    without = dict(tiny(qk_norm=False).named_parameters())
    extra = set(with_qk) - set(without)
    n_layer = PRESETS["tiny"].n_layer
    assert set(without) <= set(with_qk)
    assert extra == {f"blocks.{i}.attn.{n}_norm.{w}" for i in range(n_layer) for n in "qk" for w in ("weight", "bias")}


def test_every_parameter_has_exactly_one_role():
    model = tiny()
    roles = model.param_roles()
    assert list(roles) == [name for name, _ in model.named_parameters()]
    assert set(roles.values()) == set(ROLES)
    assert roles["lm_head.weight"] == "last_layer"
    assert roles["wte.weight"] == "embedding"
    assert roles["blocks.0.attn.qkv.weight"] == "matrix"
    assert roles["blocks.0.attn.q_norm.bias"] == "norm"


def test_linear_layers_have_no_bias_and_layernorms_have_gain_and_bias():
    model = tiny()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            assert module.bias is None
        if isinstance(module, torch.nn.LayerNorm):
            assert module.weight is not None and module.bias is not None


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


def test_sequence_longer_than_context_is_rejected():
    model = tiny()
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, model.config.block_size + 1, dtype=torch.long))
