"""Hub GPTQ/AWQ INT4 checkpoints in and out (monoquant.hub_formats via mq.load / mq.save).

The packers and the unpacker below are written here from the formats' documented layouts, one nibble at a
time with plain integers, independently of monoquant's vectorised code:

* GPTQ ``qweight`` int32 ``[K/8, N]``: bits ``4i..4i+3`` of word ``[r, n]`` hold the code of input ``8r+i``,
  output ``n``; ``qzeros`` int32 ``[G, N/8]``: bits ``4i..`` of word ``[g, c]`` hold the zero-point of output
  ``8c+i`` (v1: ``zero - 1``; v2: ``zero``); ``scales`` fp16 ``[G, N]``; ``g_idx`` int32 ``[K]``.
* AWQ GEMM ``qweight`` int32 ``[K, N/8]``, ``qzeros`` int32 ``[G, N/8]``: bits ``4i..`` of word ``[., c]`` hold
  output ``8c + (0, 2, 4, 6, 1, 3, 5, 7)[i]``; ``scales`` fp16 ``[G, N]``.

Both mean ``W[n, k] = scales[g(k), n] * (q[k, n] - zero[g(k), n])``.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

import monoquant as mq
from monoquant.errors import ConfigError, SerializationError

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


# ---- reference packers (from the documented layouts) -------------------------------------------------------
def _words(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.uint32).view(np.int32).copy())


def pack_gptq_qweight(q_kn: np.ndarray) -> torch.Tensor:
    k, n = q_kn.shape
    out = np.zeros((k // 8, n), dtype=np.uint64)
    for r in range(k // 8):
        for i in range(8):
            out[r] |= q_kn[8 * r + i].astype(np.uint64) << np.uint64(4 * i)
    return _words(out)


def pack_rows_along_outputs(v_gn: np.ndarray, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """GPTQ qzeros (plain order) and AWQ qweight/qzeros (AWQ_ORDER): 8 outputs per word."""
    g, n = v_gn.shape
    out = np.zeros((g, n // 8), dtype=np.uint64)
    for c in range(n // 8):
        for i in range(8):
            out[:, c] |= v_gn[:, 8 * c + order[i]].astype(np.uint64) << np.uint64(4 * i)
    return _words(out)


def unpack_gptq_reference(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                          version: int = 1) -> torch.Tensor:
    """The float64 ``[N, K]`` weight a GPTQ layer holds, nibble by nibble."""
    words, zwords = qweight.numpy().view(np.uint32), qzeros.numpy().view(np.uint32)
    k, n = 8 * words.shape[0], words.shape[1]
    w = np.zeros((n, k))
    for kk in range(k):
        q = (words[kk // 8] >> np.uint32(4 * (kk % 8))) & 0xF
        g = int(g_idx[kk])
        z = np.array([(zwords[g, c // 8] >> np.uint32(4 * (c % 8))) & 0xF for c in range(n)], dtype=np.int64)
        w[:, kk] = scales[g].double().numpy() * (q.astype(np.int64) - (z + (1 if version == 1 else 0)))
    return torch.from_numpy(w)


# ---- random checkpoints ------------------------------------------------------------------------------------
def hub_layer(method: str, n: int, k: int, group: int, *, version: int = 1, act_order: bool = False,
              seed: int = 0, zero_range: tuple[int, int] | None = None):
    """``(tensors, W)``: one layer's Hub tensors and the float64 ``[N, K]`` weight they mean."""
    rng = np.random.default_rng(seed)
    groups = k // group
    q = rng.integers(0, 16, size=(k, n))
    lo, hi = zero_range or ((1, 16) if method == "gptq" and version == 1 else (0, 15))
    zeros = rng.integers(lo, hi + 1, size=(groups, n))
    scales = torch.from_numpy(rng.uniform(1e-3, 2e-2, size=(groups, n))).half()
    if act_order:
        g_idx = torch.from_numpy(rng.permutation(k) // group).int()
    else:
        g_idx = (torch.arange(k) // group).int()
    w = scales.double()[g_idx.long()].t() * torch.from_numpy(q.T - zeros[g_idx.numpy()].T).double()
    if method == "awq":
        return {"qweight": pack_rows_along_outputs(q, AWQ_ORDER), "qzeros": pack_rows_along_outputs(zeros, AWQ_ORDER),
                "scales": scales}, w
    stored_zeros = zeros - 1 if version == 1 else zeros
    tensors = {"qweight": pack_gptq_qweight(q), "qzeros": pack_rows_along_outputs(stored_zeros), "scales": scales,
               "g_idx": g_idx}
    return tensors, w


class TwoLayers(nn.Module):
    def __init__(self, k: int = 128, n: int = 64, out: int = 32, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.up = nn.Linear(k, n, dtype=dtype)
        self.norm = nn.LayerNorm(n, dtype=dtype)
        self.down = nn.Linear(n, out, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.norm(self.up(x))))


def checkpoint(method: str, *, version: int = 1, act_order: bool = False, dtype: torch.dtype = torch.float32,
               group: int = 32, seed: int = 0):
    """``(state, weights)``: a Hub checkpoint of :class:`TwoLayers` and the dequantized weights of its layers."""
    float_model = TwoLayers(dtype=dtype)
    state = {name: t for name, t in float_model.state_dict().items() if not name.endswith(("up.weight", "down.weight"))}
    weights = {}
    for i, (name, (n, k)) in enumerate({"up": (64, 128), "down": (32, 64)}.items()):
        tensors, weights[name] = hub_layer(method, n, k, group, version=version, act_order=act_order, seed=seed + i)
        state.update({f"{name}.{key}": t for key, t in tensors.items()})
    return state, weights


def config(method: str, version: int = 1, group: int = 32) -> dict:
    if method == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group, "version": "gemm", "zero_point": True}
    return {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": True,
            "checkpoint_format": "gptq" if version == 1 else "gptq_v2"}


# ---- reading -----------------------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(method=st.sampled_from(["gptq", "awq"]), version=st.sampled_from([1, 2]), act_order=st.booleans(),
       n8=st.integers(1, 6), groups=st.integers(1, 4), group=st.sampled_from([8, 32, 64]), seed=st.integers(0, 99))
def test_dequantized_weights_are_bit_exact(method, version, act_order, n8, groups, group, seed):
    n, k = 8 * n8, groups * group
    act_order = act_order and method == "gptq"
    tensors, w = hub_layer(method, n, k, group, version=version, act_order=act_order, seed=seed)
    model = nn.Sequential(nn.Linear(k, n, bias=False))
    mq.load(model, {f"0.{name}": t for name, t in tensors.items()}, quantization_config=config(method, version, group))
    layer = model[0]
    assert isinstance(layer, mq.QuantLinear) and layer.group_size == group
    assert torch.equal(layer.weight, w.float())  # fp16 scale x 5-bit integer: exact in float32
    assert (layer.input_permutation is not None) == (act_order and k > group)


@pytest.mark.parametrize("method,version", [("gptq", 1), ("gptq", 2), ("awq", 1)])
def test_float16_dequantization_matches_the_formats_own_rounding(method, version):
    state, weights = checkpoint(method, version=version, act_order=method == "gptq", dtype=torch.float16)
    model = mq.load(TwoLayers(dtype=torch.float16), state, quantization_config=config(method, version))
    for name in ("up", "down"):
        # float16 scales * (q - zero) in float16 is the exact product rounded once
        assert torch.equal(getattr(model, name).weight, weights[name].half())


@pytest.mark.parametrize("kernel", ["dequant", "int4pack_cpu", "fused_cpu"])
def test_act_order_matches_the_float_model_on_every_kernel(kernel):
    state, weights = checkpoint("gptq", act_order=True)
    model = mq.load(TwoLayers(), state, quantization_config=config("gptq"))
    perm = model.up.input_permutation
    assert perm is not None and sorted(perm.tolist()) == list(range(128)) and perm.tolist() != list(range(128))
    assert model.up.qweight.shape == (64, 64) and model.up.scale.shape == (64, 4)  # the group layout is kept
    inputs = {"up": torch.randn(5, 128), "down": torch.randn(5, 64)}
    # dequant: a float32 GEMM of the same weight; the packed kernels round activations to bf16 (~2^-8)
    tolerance = 1e-5 if kernel == "dequant" else 1e-2
    for name, x in inputs.items():
        layer = getattr(model, name)
        ref = x @ weights[name].float().t() + (state["up.bias"] if name == "up" else 0)
        with torch.no_grad(), mq.kernels.pin(kernel):
            y = layer(x)
        if layer.last_kernel != kernel:
            pytest.skip(f"{kernel} does not run here (ran {layer.last_kernel})")
        assert (y - ref).abs().max() <= tolerance * ref.abs().max(), name


def test_dequantize_gives_back_the_weight_in_the_float_layers_order():
    state, weights = checkpoint("gptq", act_order=True)
    model = mq.load(TwoLayers(), state, quantization_config=config("gptq"))
    mq.dequantize_(model)  # back to float: the weight in the float layer's input order
    assert torch.equal(model.up.weight, weights["up"].float())


def test_file_with_config_json_next_to_it(tmp_path):
    state, weights = checkpoint("gptq", version=2, act_order=True)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "x", "quantization_config": config("gptq", 2)}))
    model = mq.load(TwoLayers(), tmp_path / "model.safetensors")
    for name in ("up", "down"):
        assert torch.equal(getattr(model, name).weight, weights[name].float())
    # the same file read as v1 (no config) gives other zero-points: the config is what was read
    (tmp_path / "config.json").unlink()
    v1 = mq.load(TwoLayers(), tmp_path / "model.safetensors")
    assert not torch.equal(v1.up.weight, weights["up"].float())


def test_autoawq_quant_config_json_without_a_method_name(tmp_path):
    state, weights = checkpoint("awq")
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "quant_config.json").write_text(json.dumps({"zero_point": True, "q_group_size": 32, "w_bit": 4,
                                                            "version": "GEMM"}))
    model = mq.load(TwoLayers(), tmp_path / "model.safetensors")
    assert torch.equal(model.up.weight, weights["up"].float())
    (tmp_path / "quant_config.json").write_text(json.dumps({"w_bit": 4, "version": "GEMV"}))
    with pytest.raises(SerializationError, match="GEMM"):
        mq.load(TwoLayers(), tmp_path / "model.safetensors")


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_without_config_the_layout_comes_from_shapes(tmp_path, method):
    state, weights = checkpoint(method)
    save_file(state, tmp_path / "model.safetensors")
    model = mq.load(TwoLayers(), tmp_path / "model.safetensors")
    assert torch.equal(model.up.weight, weights["up"].float())


def test_transformers_config_objects_are_accepted():
    transformers = pytest.importorskip("transformers")
    state, weights = checkpoint("awq")
    cfg = transformers.AwqConfig(bits=4, group_size=32, version="gemm")
    model = mq.load(TwoLayers(), state, quantization_config=cfg)
    assert torch.equal(model.down.weight, weights["down"].float())


def test_converted_model_saves_and_loads_in_monoquant_format(tmp_path):
    state, _ = checkpoint("gptq", act_order=True)
    model = mq.load(TwoLayers(), state, quantization_config=config("gptq"))
    mq.save(model, tmp_path / "mq.safetensors")
    with torch.device("meta"):
        skeleton = TwoLayers()
    again = mq.load(skeleton, tmp_path / "mq.safetensors")
    assert torch.equal(again.up.input_permutation, model.up.input_permutation)
    x = torch.randn(3, 128)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_a_corrupt_permutation_is_refused():
    state, _ = checkpoint("gptq", act_order=True)
    saved = mq.load(TwoLayers(), state, quantization_config=config("gptq")).state_dict()
    saved["up.input_permutation"] = saved["up.input_permutation"].clone()
    saved["up.input_permutation"][0] = saved["up.input_permutation"][1]
    model = TwoLayers()
    with pytest.raises(SerializationError, match="not a permutation"):
        mq.load(model, saved)
    assert isinstance(model.up, nn.Linear)


@pytest.mark.parametrize("cfg,match", [
    ({"quant_method": "gptq", "bits": 8}, "8-bit"),
    ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "GEMM"),
    ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "checkpoint_format"),
    ({"quant_method": "bitsandbytes"}, "neither"),
])
def test_unreadable_configs_are_refused(cfg, match):
    state, _ = checkpoint("gptq")
    model = TwoLayers()
    with pytest.raises(SerializationError, match=match):
        mq.load(model, state, quantization_config=cfg)
    assert isinstance(model.up, nn.Linear)


def test_g_idx_with_uneven_groups_is_refused():
    tensors, _ = hub_layer("gptq", 64, 128, 32)
    tensors["g_idx"] = torch.zeros(128, dtype=torch.int32)
    tensors["g_idx"][:5] = 1
    with pytest.raises(SerializationError, match="g_idx"):
        mq.load(nn.Sequential(nn.Linear(128, 64, bias=False)), {f"0.{k}": v for k, v in tensors.items()})


# ---- writing -----------------------------------------------------------------------------------------------
def _read(path) -> dict:
    return load_file(str(path))


def test_hub_checkpoint_written_back_is_identical(tmp_path):
    state, _ = checkpoint("gptq", act_order=True)
    model = mq.load(TwoLayers(), state, quantization_config=config("gptq"))
    mq.save(model, tmp_path / "out.safetensors", format="gptq")
    written = _read(tmp_path / "out.safetensors")
    assert sorted(written) == sorted(state)
    for name, t in state.items():
        assert written[name].dtype == t.dtype and torch.equal(written[name], t), name
    saved_config = json.loads((tmp_path / "quantize_config.json").read_text())
    assert saved_config == {"bits": 4, "checkpoint_format": "gptq", "desc_act": True, "group_size": 32,
                            "quant_method": "gptq", "static_groups": False, "sym": False, "true_sequential": True}


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_save_gptq_of_a_quantized_model_reference_unpacks_to_its_weights(tmp_path, symmetric, fmt):
    model = TwoLayers()
    with torch.no_grad():
        model.up.weight.sub_(model.up.weight.min() - 0.01)  # all positive: zero-points of 0 in affine groups
    spec = mq.Int4(group_size=32, symmetric=symmetric)
    mq.quantize_(model, mq.QuantConfig(weights=spec))
    if fmt == "gptq" and not symmetric:
        with pytest.raises(SerializationError, match="gptq_v2"):
            mq.save(model, tmp_path / "q.safetensors", format=fmt)
        return
    mq.save(model, tmp_path / "q.safetensors", format=fmt)
    written = _read(tmp_path / "q.safetensors")
    version = 1 if fmt == "gptq" else 2
    expected = {}
    for name in ("up", "down"):
        layer = getattr(model, name)
        t = {key: written[f"{name}.{key}"] for key in ("qweight", "qzeros", "scales", "g_idx")}
        assert t["scales"].dtype == torch.float16 and t["qweight"].shape == (layer.in_features // 8, layer.out_features)
        # the model's weight with its float32 scales rounded to float16, as the format stores them
        codes = (layer.dequantize_weight(torch.float64, flat=True) / layer.scale.double().repeat_interleave(32, 1))
        expected[name] = codes * layer.scale.half().double().repeat_interleave(32, 1)
        assert torch.equal(unpack_gptq_reference(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], version),
                           expected[name])
    assert torch.equal(written["up.bias"], model.up.bias) and "down.bias" not in written
    reloaded = mq.load(TwoLayers(), tmp_path / "q.safetensors")  # quantize_config.json next to it says v1/v2
    for name in ("up", "down"):
        assert torch.equal(getattr(reloaded, name).weight.double(), expected[name])


def test_save_gptq_refuses_what_the_format_cannot_hold(tmp_path):
    model = TwoLayers()
    mq.quantize_(model, mq.QuantConfig(weights=mq.Int8()))
    with pytest.raises(SerializationError, match="weight-only INT4"):
        mq.save(model, tmp_path / "a.safetensors", format="gptq")
    with pytest.raises(SerializationError, match="no quantized layer"):
        mq.save(TwoLayers(), tmp_path / "b.safetensors", format="gptq")
    with pytest.raises(ConfigError, match="format must be"):
        mq.save(model, tmp_path / "c.safetensors", format="awq")
    assert not list(tmp_path.iterdir())


# ---- a Llama-style model from the transformers side -------------------------------------------------------
def quantize_act_order(w: torch.Tensor, group: int, seed: int) -> tuple[dict, torch.Tensor]:
    """Min-max INT4 of ``w`` (``[N, K]``) with act-order groups (a random column order, as GPTQ's ``desc_act``
    makes), packed as GPTQ v1: ``(tensors, dequantized float64 weight)``."""
    n, k = w.shape
    g_idx = torch.from_numpy(np.random.default_rng(seed).permutation(k) // group)
    q, zeros, scales = torch.zeros(k, n, dtype=torch.int64), [], []
    for g in range(k // group):
        cols = (g_idx == g).nonzero().flatten()
        block = w[:, cols].double()
        lo, hi = block.min(1).values.clamp(max=0), block.max(1).values.clamp(min=0)
        scale = ((hi - lo) / 15).clamp(min=1e-4).half()
        zero = torch.round(-lo / scale.double()).clamp(1, 15).long()  # >= 1: v1 stores zero - 1
        q[cols] = (torch.round(block / scale.double()[:, None]) + zero[:, None]).clamp(0, 15).long().t()
        zeros.append(zero), scales.append(scale)
    zeros_gn, scales_gn = torch.stack(zeros), torch.stack(scales)
    tensors = {"qweight": pack_gptq_qweight(q.numpy()), "qzeros": pack_rows_along_outputs(zeros_gn.numpy() - 1),
               "scales": scales_gn, "g_idx": g_idx.int()}
    deq = scales_gn.double()[g_idx].t() * (q.t() - zeros_gn[g_idx].t()).double()
    return tensors, deq


def _causal_lm_example():
    pytest.importorskip("transformers")
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import transformers_causal_lm as lm
    return lm


@pytest.mark.transformers
def test_llama_gptq_act_order_checkpoint_from_a_folder(tmp_path):
    lm = _causal_lm_example()
    torch.manual_seed(0)
    model = lm.tiny_llama().eval()
    state, dequantized = {}, {}
    for i, (name, module) in enumerate(model.named_modules()):
        if isinstance(module, nn.Linear) and name != "lm_head":
            tensors, dequantized[name] = quantize_act_order(module.weight.detach(), 32, seed=i)
            state.update({f"{name}.{key}": t for key, t in tensors.items()})
    linear_weights = {f"{name}.weight" for name in dequantized}
    state.update({k: v.clone() for k, v in model.state_dict().items()
                  if k not in linear_weights and k != "lm_head.weight"})
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model.config.quantization_config = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True,
                                        "sym": False, "checkpoint_format": "gptq"}
    model.config.save_pretrained(tmp_path)  # config.json with the quantization_config, as the Hub has it

    torch.manual_seed(1)
    loaded = mq.load(lm.tiny_llama().eval(), tmp_path / "model.safetensors")
    assert sorted(n for n, m in loaded.named_modules() if isinstance(m, mq.QuantLinear)) == sorted(dequantized)
    assert all(loaded.get_submodule(n).input_permutation is not None for n in dequantized)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tied again
    with torch.no_grad():
        for name, w in dequantized.items():
            model.get_submodule(name).weight.copy_(w.float())
        tokens = torch.randint(0, model.config.vocab_size, (2, 16))
        with mq.kernels.pin("dequant"):
            got = loaded(input_ids=tokens).logits
        ref = model(input_ids=tokens).logits
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


@pytest.mark.parametrize("break_it,match", [
    (lambda s: s.update({"up.qweight": s["up.qweight"][:-1]}), "qweight is"),
    (lambda s: s.pop("up.qzeros"), "without qzeros"),
    (lambda s: s.update({"up.scales": s["up.scales"][:, :8]}), "scales is"),
    (lambda s: s.update({"norm.qweight": s["up.qweight"], "norm.scales": s["up.scales"]}), "LayerNorm"),
])
def test_broken_checkpoints_raise_and_change_nothing(break_it, match):
    state, _ = checkpoint("gptq")
    break_it(state)
    model = TwoLayers()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SerializationError, match=match):
        mq.load(model, state, quantization_config=config("gptq"))
    assert isinstance(model.up, nn.Linear) and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


HUB_CONFIGS = {
    "gptq v1 act-order": ("gptq", 1, True, {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True,
                                            "sym": False, "checkpoint_format": "gptq"}),
    "gptq v2": ("gptq", 2, False, {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False,
                                   "sym": True, "checkpoint_format": "gptq_v2"}),
    "awq gemm": ("awq", 1, False, {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm",
                                   "zero_point": True}),
}


def write_hub_llama(folder, kind: str):
    """A tiny Llama (examples/transformers_causal_lm.py) written as the Hub has such checkpoints: every Linear but
    the tied head packed by the reference packers above, config.json with the quantization_config. Returns the
    float model holding the dequantized weights, and those weights by layer."""
    lm = _causal_lm_example()
    method, version, act_order, qc = HUB_CONFIGS[kind]
    torch.manual_seed(0)
    model = lm.tiny_llama().eval()
    state, dequantized = {}, {}
    for i, (name, module) in enumerate(model.named_modules()):
        if isinstance(module, nn.Linear) and name != "lm_head":
            n, k = module.weight.shape
            tensors, w = hub_layer(method, n, k, 32, version=version, act_order=act_order, seed=i)
            dequantized[name] = w.float()
            state.update({f"{name}.{key}": t for key, t in tensors.items()})
    with torch.no_grad():
        for name, w in dequantized.items():
            model.get_submodule(name).weight.copy_(w)
    state.update({k: v.clone() for k, v in model.state_dict().items()
                  if k.rpartition(".")[0] not in dequantized and k != "lm_head.weight"})
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    model.config.quantization_config = qc
    model.config.save_pretrained(folder)
    del model.config.quantization_config
    return model, dequantized


@pytest.mark.transformers
@pytest.mark.parametrize("kind", sorted(HUB_CONFIGS))
def test_from_pretrained_reads_hub_checkpoints_into_monoquant_layers(tmp_path, kind):
    from transformers import AutoModelForCausalLM

    import monoquant.hf  # noqa: F401  (makes monoquant the reader of GPTQ/AWQ checkpoints)

    reference, dequantized = write_hub_llama(tmp_path, kind)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    layers = {n: m for n, m in loaded.named_modules() if isinstance(m, mq.QuantLinear)}
    assert sorted(layers) == sorted(dequantized)
    for name, layer in layers.items():
        assert layer.spec.kind == "int4" and layer.group_size == 32
        assert (layer.input_permutation is not None) == HUB_CONFIGS[kind][2]
        assert torch.equal(layer.weight, dequantized[name]), name  # bit-exact dequantized weights
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # the tied head stays tied
    tokens = torch.randint(0, reference.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with mq.kernels.pin("dequant"):
            got = loaded(input_ids=tokens).logits
        ref = reference(input_ids=tokens).logits
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
    # the loaded model is a monoquant model: it saves in monoquant's format and loads back bit-exactly
    loaded.save_pretrained(tmp_path / "mq")
    qc = json.loads((tmp_path / "mq" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "monoquant" and sorted(qc["modules"]) == sorted(dequantized)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "mq").eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=tokens).logits, loaded(input_ids=tokens).logits)


@pytest.mark.transformers
def test_from_pretrained_refuses_what_monoquant_cannot_read(tmp_path):
    from transformers import AutoModelForCausalLM, GPTQConfig
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    import monoquant.hf as mqhf

    write_hub_llama(tmp_path, "gptq v1 act-order")
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["bits"] = 8
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SerializationError, match="8-bit"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    _causal_lm_example().tiny_llama().save_pretrained(tmp_path / "float")
    with pytest.raises(ConfigError, match=r"mq\.quantize_"):  # a float checkpoint quantized while loading
        AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=GPTQConfig(bits=4))
    mqhf.use_transformers_for_hub_checkpoints()
    try:
        assert AUTO_QUANTIZER_MAPPING["gptq"] is not mqhf.HubCheckpointQuantizer
    finally:
        mqhf.use_monoquant_for_hub_checkpoints()
    assert all(AUTO_QUANTIZER_MAPPING[m] is mqhf.HubCheckpointQuantizer for m in mqhf.HUB_METHODS)


def test_importing_monoquant_hf_keeps_transformers_own_hub_loaders_when_their_backend_is_installed(tmp_path):
    """A user who installed gptqmodel keeps transformers' GPTQ/AWQ loaders: only an import that would otherwise
    leave those checkpoints unloadable makes monoquant their reader."""
    fake = tmp_path / "gptqmodel"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    code = ("import monoquant.hf as h; from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as M; "
            "print(h.transformers_backend_installed(), [M[m] is h.HubCheckpointQuantizer for m in h.HUB_METHODS])")
    for path, expected in ((str(tmp_path), "True [False, False]"), ("", "False [True, True]")):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (path, os.environ.get("PYTHONPATH", "")) if p)}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        assert out.stdout.strip() == expected, out.stderr[-2000:]


# ---- monoquant inspect -------------------------------------------------------------------------------------
def test_inspect_describes_hub_files_and_folders(tmp_path, capsys):
    from monoquant.cli import main

    state, _ = checkpoint("gptq", version=2, act_order=True)
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": config("gptq", 2)}))
    for target in (tmp_path, tmp_path / "model.safetensors"):
        assert main(["inspect", str(target)]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0].startswith(f"{target}: Hub INT4 checkpoint (GPTQ v2), 1 file(s)")
        assert out[1].startswith(f"quantization_config: {tmp_path / 'config.json'}: quant_method=gptq, bits=4")
        assert out[2] == "bits 4, group size 32, act-order: yes"
        rows = [line.split() for line in out[4:6]]
        assert [r[:5] for r in rows] == [["down", "GPTQ", "v2", "32x64", "32"], ["up", "GPTQ", "v2", "64x128", "32"]]
        assert [r[5] for r in rows] == ["yes", "yes"]
        assert out[6].startswith("2 INT4 layers:")
    # AWQ, sharded behind an index, no config: the layout comes from the shapes
    awq, _ = checkpoint("awq")
    folder = tmp_path / "awq"
    folder.mkdir()
    names = sorted(awq)
    save_file({n: awq[n] for n in names[:3]}, folder / "a.safetensors")
    save_file({n: awq[n] for n in names[3:]}, folder / "b.safetensors")
    weight_map = {n: "a.safetensors" if i < 3 else "b.safetensors" for i, n in enumerate(names)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{folder}: Hub INT4 checkpoint (AWQ GEMM), 2 file(s)")
    assert out[1].startswith("quantization_config: none found")
    assert out[2] == "bits 4, group size 32, act-order: no"
    assert [line.split()[:6] for line in out[4:6]] == [["down", "AWQ", "GEMM", "32x64", "32", "no"],
                                                       ["up", "AWQ", "GEMM", "64x128", "32", "no"]]


def test_inspect_of_an_unreadable_hub_config_fails_with_one_line(tmp_path, capsys):
    from monoquant.cli import main

    state, _ = checkpoint("gptq")
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq", "bits": 3}}))
    assert main(["inspect", str(tmp_path / "model.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("monoquant: error:") and "3-bit" in err and err.count("\n") == 1
