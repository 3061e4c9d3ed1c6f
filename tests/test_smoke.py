import torch
from torch import nn

import monoquant as mq


def test_quantize_int4_linear_stack_matches_dequantized_reference():
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)).eval()
    report = mq.quantize_(model, mq.QuantConfig(mq.Int4(group_size=128), skip=mq.SkipRules.none()))
    assert [r.name for r in report.quantized] == ["0", "2"]
    assert isinstance(model[0], mq.QuantLinear)
    x = torch.randn(4, 256)
    with torch.inference_mode():
        y = model(x)
        mq.dequantize_(model)
        ref = model(x)
    assert isinstance(model[0], nn.Linear)
    assert ((y - ref).norm() / ref.norm()) < 1e-2
