import math

import pytest

from lm_opt.schedule import lr_factor, resolve_max_steps


def test_warmup_starts_at_min_ratio_and_cosine_ends_there():
    total = 100
    factors = [lr_factor(s, total, warmup=0.1, min_ratio=0.1) for s in range(total)]
    assert factors[0] == pytest.approx(0.1)
    assert factors[5] == pytest.approx(0.1 + 0.9 * 5 / 10)
    assert factors[10] == pytest.approx(1.0)
    assert factors[-1] == pytest.approx(0.1)
    mid = 10 + (total - 1 - 10) / 2
    assert lr_factor(int(mid), total) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (int(mid) - 10) / 89)))
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))


def test_warmup_in_steps_and_hold_phase():
    assert lr_factor(0, 100, warmup=20) == pytest.approx(0.1)
    assert lr_factor(20, 100, warmup=20) == pytest.approx(1.0)
    assert [lr_factor(s, 110, warmup=0.1, hold_steps=10) for s in range(10)] == [0.0] * 10
    assert lr_factor(10, 110, warmup=0.1, hold_steps=10) == pytest.approx(0.1)
    assert lr_factor(20, 110, warmup=0.1, hold_steps=10) == pytest.approx(1.0)


def test_run_length_from_steps_tokens_or_tokens_per_param():
    kw = dict(max_steps=50, num_params=1000, tokens_per_step=100)
    assert resolve_max_steps(max_tokens=None, tokens_per_param=None, **kw) == 50
    assert resolve_max_steps(max_tokens=1050, tokens_per_param=None, **kw) == 11
    assert resolve_max_steps(max_tokens=None, tokens_per_param=20, **kw) == 200
    with pytest.raises(ValueError, match="at most one"):
        resolve_max_steps(max_tokens=1, tokens_per_param=1, **kw)
    with pytest.raises(ValueError, match="max_steps"):
        resolve_max_steps(max_steps=-1, max_tokens=None, tokens_per_param=None, num_params=1, tokens_per_step=1)
