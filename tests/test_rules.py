import re

import pytest
import torch
from torch import nn

import monoquant as mq
from monoquant.rules import DEFAULT_MIN_PARAMS, HEAD_REASON, LAST_LINEAR_HEAD_REASON


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)  # 216 weights: tiny
        self.encoder = nn.ModuleList([nn.ModuleDict({"fc1": nn.Linear(64, 128), "fc2": nn.Linear(128, 64)})
                                      for _ in range(2)])
        self.odd = nn.Linear(262, 64)  # 262 = 2 x 131 has no divisor from 32 to 64
        self.lm_head = nn.Linear(64, 100)


def run(rules, spec=None, model=None):
    model = model or Net()
    return mq.quantize_(model, mq.QuantConfig(spec or mq.Int4(group_size=64), skip=rules)), model


@pytest.mark.parametrize("cols, group, expected", [
    (4096, 128, 128), (128, 128, 128), (96, 128, 96), (9, 128, 9), (320, 128, 64), (288, 256, 32),
    (300, 128, 100), (480, 96, 96), (144, 96, 48), (200, 64, 50), (4128, 128, 32), (256, 100, 64), (250, 128, 125),
    (262, 128, None), (262, 64, None), (100, 24, None), (96, 24, 24),
])
def test_int4_resolve_group_size_policy(cols, group, expected):
    assert mq.Int4(group_size=group).resolve_group_size(cols) == expected


def test_defaults_keep_tiny_layers_and_optionally_heads():
    rules = mq.SkipRules.defaults()
    assert rules.min_params == DEFAULT_MIN_PARAMS and not rules.skip_head
    report, model = run(mq.SkipRules.defaults(skip_head=True))
    assert report.skipped == {
        "stem": f"too small: 216 weights < min_params={DEFAULT_MIN_PARAMS}",
        "odd": "input size 262 has no divisor between 32 and 64 to use as the INT4 group size (its divisors below "
               "32: [1, 2]); pass Int4(group_size=...) with a divisor of 262",
        "lm_head": HEAD_REASON,
    }
    assert [r.name for r in report.quantized] == [
        "encoder.0.fc1", "encoder.0.fc2", "encoder.1.fc1", "encoder.1.fc2"]
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.encoder[1]["fc2"], mq.QuantLinear)
    # None means defaults(): tiny stem stays float, head is quantized
    report, _ = run(None, mq.Int8())
    assert set(report.skipped) == {"stem"}


def test_last_linear_is_the_head_when_no_name_matches():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 10)))
    report, _ = run(mq.SkipRules(skip_head=True), mq.Int8(), model)
    assert report.skipped == {"2.1": LAST_LINEAR_HEAD_REASON}
    # without candidates (a direct decide call) only names count
    rules = mq.SkipRules(skip_head=True)
    rules.start()
    assert rules.decide("2.1", nn.Linear(64, 10), mq.Int8()).quantize
    assert rules.decide("model.lm_head", nn.Linear(64, 10), mq.Int8()).reason == HEAD_REASON


def test_include_exclude_globs_regex_types_predicate_and_unmatched():
    rules = mq.SkipRules(
        include=["encoder.*", "odd", "nothing_like_this"],
        exclude=[re.compile(r"\.1\.fc\d$"), "typo.*"],
        exclude_types=(nn.Conv3d,),
        predicate=lambda name, m: m.out_features == 128 if isinstance(m, nn.Linear) else False,
    )
    report, _ = run(rules, mq.Int8())
    assert report.skipped == {
        "stem": "not matched by include patterns",
        "encoder.0.fc1": "excluded by predicate",
        "encoder.1.fc1": r"excluded by name pattern 're:\.1\.fc\d$'",
        "encoder.1.fc2": r"excluded by name pattern 're:\.1\.fc\d$'",
        "lm_head": "not matched by include patterns",
    }
    assert [r.name for r in report.quantized] == ["encoder.0.fc2", "odd"]
    assert report.unmatched_rules == ["nothing_like_this", "typo.*", "Conv3d"]
    assert "rule matched no layer (typo?): typo.*" in str(report)


def test_exclude_types_and_min_params():
    report, _ = run(mq.SkipRules(exclude_types=(nn.Conv2d,), min_params=64 * 128 + 1), mq.Int8())
    assert report.skipped["stem"] == "excluded by type Conv2d"
    assert report.skipped["encoder.0.fc1"] == "too small: 8192 weights < min_params=8193"
    assert [r.name for r in report.quantized] == ["odd"]
    assert report.unmatched_rules == []


def test_int4_non_dividing_group_falls_back_to_smaller_group():
    model = nn.Sequential(nn.Linear(320, 32))
    report, _ = run(mq.SkipRules.none(), mq.Int4(group_size=128), model)
    assert report.quantized[0].scheme == "int4-affine-g64"
    assert model[0].group_size == 64 and model[0].scale.shape == (32, 5)
    x = torch.randn(2, 320)
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def test_a_single_pattern_or_type_is_one_rule_and_bad_entries_are_config_errors():
    report, _ = run(mq.SkipRules(exclude="encoder.*.fc1", exclude_types=nn.Conv2d), mq.Int8())
    assert report.skipped == {"stem": "excluded by type Conv2d", "encoder.0.fc1": "excluded by name pattern "
                              "'encoder.*.fc1'", "encoder.1.fc1": "excluded by name pattern 'encoder.*.fc1'"}
    assert report.unmatched_rules == []
    rules = mq.SkipRules(include=re.compile("fc"))
    assert rules.include == [rules.include[0]] and isinstance(rules.include[0], re.Pattern)
    with pytest.raises(mq.ConfigError, match="exclude takes name patterns"):
        mq.SkipRules(exclude=["fc1", nn.Linear])
    with pytest.raises(mq.ConfigError, match="exclude_types takes classes"):
        mq.SkipRules(exclude_types=("Linear",))
    with pytest.raises(mq.ConfigError, match="min_params must be a non-negative number"):
        mq.SkipRules(min_params=-1)
