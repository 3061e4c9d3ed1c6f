import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import monoquant as mq
from monoquant.packing import pack_int4, unpack_int4


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(0, 9), cols=st.integers(1, 67), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip_exactly(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (rows, cols), generator=g, dtype=torch.int64)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, (cols + 1) // 2)
    assert torch.equal(unpack_int4(packed, cols), q.to(torch.uint8))


def test_canonical_layout_low_nibble_is_even_column():
    q = torch.tensor([[1, 2, 3, 4, 15], [0, 15, 7, 8, 9]])
    assert pack_int4(q).tolist() == [[0x21, 0x43, 0x0F], [0xF0, 0x87, 0x09]]


def test_pack_rejects_out_of_range_and_bad_shapes():
    with pytest.raises(mq.ConfigError, match="offset signed codes by \\+8"):
        pack_int4(torch.tensor([[-1, 3]]))
    with pytest.raises(mq.ConfigError, match=r"0\.\.15"):
        pack_int4(torch.tensor([[16, 3]]))
    with pytest.raises(mq.ConfigError, match="2-D"):
        pack_int4(torch.zeros(4, dtype=torch.int64))
    with pytest.raises(mq.ConfigError, match=r"\[N, 3\] uint8 tensor for 5 columns"):
        unpack_int4(torch.zeros(2, 2, dtype=torch.uint8), 5)
