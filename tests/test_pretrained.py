"""``mq.quantize_pretrained``: block by block from a sharded HF folder, equal to ``quantize_`` on the whole model."""

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

import monoquant as mq
from monoquant import pipeline

pytestmark = pytest.mark.filterwarnings("ignore::monoquant.AccuracyWarning")
transformers = pytest.importorskip("transformers")

BATCHES = [torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(i)) for i in range(2)]


# output_aware=False: output-aware rounding weighs a small layer's error at the output of what quantize_ is given
# (one block in the pipeline, the whole model in _whole), so with it on the two paths differ by design
def _gptq():  # MinMax ranges keep the test fast; the block path does not depend on the range search
    return mq.Int4(group_size=16, method="gptq", sequential=True, observer=mq.MinMaxObserver(), output_aware=False)


def _config():
    return transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(_config()).save_pretrained(folder, safe_serialization=True, max_shard_size="40KB")
    assert (folder / "model.safetensors.index.json").is_file()  # sharded
    return folder


def _whole(src, spec, data):
    model = transformers.LlamaForCausalLM.from_pretrained(src).eval()
    _whole.report = mq.quantize_(model, spec, calibration_data=data, on_failure="ignore")
    return model.state_dict()


def _assert_equal_files(state, path):
    got = load_file(path)
    assert sorted(got) == sorted(state)
    assert [k for k in state if not torch.equal(state[k], got[k])] == []


def test_gptq_sequential_equals_quantize_on_whole_model(src, tmp_path):
    report = mq.quantize_pretrained(src, tmp_path, _gptq(), BATCHES, progress=False)
    _assert_equal_files(_whole(src, _gptq(), BATCHES), tmp_path / "model.safetensors")
    assert [r.name for r in report.quantized] == [r.name for r in _whole.report.quantized]
    assert len(report.quantized) == 3 * 5 + 1  # q/o/gate/up/down per block + lm_head (k/v are below min size)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "generation_config.json", "model.safetensors"]
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(_config())
    mq.load(skeleton, tmp_path / "model.safetensors")
    assert isinstance(skeleton.model.layers[2].mlp.down_proj, mq.QuantLinear)


def test_quantized_embedding_runs_before_the_blocks_as_in_quantize(src, tmp_path):
    cfg = mq.QuantConfig(_gptq(), embeddings=mq.Int8())  # block 0 sees the quantized embedding's outputs
    report = mq.quantize_pretrained(src, tmp_path, cfg, BATCHES, progress=False)
    assert report.layers[0].name == "model.embed_tokens" and not report.layers[0].skipped
    _assert_equal_files(_whole(src, cfg, BATCHES), tmp_path / "model.safetensors")


@pytest.mark.parametrize("spec", [mq.Int8(), mq.Int4(group_size=16, method="gptq", observer=mq.MinMaxObserver(),
                                                    output_aware=False)],
                         ids=["rtn-with-data", "gptq-one-pass"])
def test_float_activations_are_carried_unless_sequential(src, tmp_path, spec):
    mq.quantize_pretrained(src, tmp_path, spec, BATCHES, progress=False)
    _assert_equal_files(_whole(src, spec, BATCHES), tmp_path / "model.safetensors")


def test_rtn_without_data_equals_quantize(src, tmp_path):
    mq.quantize_pretrained(src, tmp_path, mq.Int8(), progress=False)
    _assert_equal_files(_whole(src, mq.Int8(), None), tmp_path / "model.safetensors")


def test_gptq_without_data_is_refused(src, tmp_path):
    with pytest.raises(mq.ConfigError, match="calibration_data"):
        mq.quantize_pretrained(src, tmp_path, _gptq(), progress=False)
    assert not (tmp_path / "model.safetensors").exists()


def test_resume_after_a_failure_skips_finished_blocks(src, tmp_path, monkeypatch):
    real_save, real_part = pipeline.save, pipeline._quantize_part
    saved = []

    def save_then_die(module, path):
        if "block-00001" in str(path):
            raise KeyboardInterrupt  # killed while writing block 1
        real_save(module, path)
        saved.append(path.name)

    monkeypatch.setattr(pipeline, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        mq.quantize_pretrained(src, tmp_path, _gptq(), BATCHES, progress=False)
    assert saved == ["block-00000.safetensors"]
    assert not (tmp_path / "model.safetensors").exists()

    quantized = []

    def count(module, cfg, data, forward_fn, prefix, progress):
        quantized.append(prefix)
        return real_part(module, cfg, data, forward_fn, prefix, progress)

    monkeypatch.setattr(pipeline, "save", real_save)
    monkeypatch.setattr(pipeline, "_quantize_part", count)
    mq.quantize_pretrained(src, tmp_path, _gptq(), BATCHES, progress=False)
    assert quantized == ["model.layers.1.", "model.layers.2.", ""]  # block 0 was not redone
    _assert_equal_files(_whole(src, _gptq(), BATCHES), tmp_path / "model.safetensors")
    assert not (tmp_path / pipeline.PARTS_DIR).exists()


def test_parts_of_another_job_are_refused(src, tmp_path, monkeypatch):
    (tmp_path / pipeline.PARTS_DIR).mkdir()
    (tmp_path / pipeline.PARTS_DIR / "job.json").write_text('{"source": "elsewhere"}')
    with pytest.raises(mq.ConfigError, match="another quantization"):
        mq.quantize_pretrained(src, tmp_path, mq.Int8(), progress=False)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, src, dst):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mq.quantize_pretrained(src, dst, _gptq(), BATCHES, progress=False)  # each rank runs BATCHES[rank::2]
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")
def test_two_gloo_processes_give_the_same_file_as_one(src, tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(src), str(tmp_path / "two")), nprocs=2, join=True)
    mq.quantize_pretrained(src, tmp_path / "one", _gptq(), BATCHES, progress=False)
    _assert_equal_files(load_file(tmp_path / "one" / "model.safetensors"), tmp_path / "two" / "model.safetensors")


def test_cli_equals_the_function(src, tmp_path, capsys):
    from monoquant.cli import main

    mq.quantize_pretrained(src, tmp_path / "api", mq.Int4(group_size=16), progress=False)
    assert main(["quantize-pretrained", str(src), str(tmp_path / "cli"), "--bits", "4", "--group-size", "16",
                 "--no-progress"]) == 0
    _assert_equal_files(load_file(tmp_path / "api" / "model.safetensors"), tmp_path / "cli" / "model.safetensors")
    assert "layers quantized" in capsys.readouterr().out


def test_cli_gptq_reads_token_ids(src, tmp_path, capsys):
    from monoquant.cli import main

    torch.save(torch.cat(BATCHES), tmp_path / "tokens.pt")
    assert main(["quantize-pretrained", str(src), str(tmp_path / "out"), "--bits", "4", "--group-size", "16",
                 "--method", "gptq", "--no-progress"]) == 1  # no --calibration
    assert "calibration_data" in capsys.readouterr().err
    torch.save(torch.randn(2, 3), tmp_path / "floats.pt")
    assert main(["quantize-pretrained", str(src), str(tmp_path / "out"), "--bits", "4", "--method", "gptq",
                 "--calibration", str(tmp_path / "floats.pt")]) == 1
    assert "2-D integer tensor of token ids" in capsys.readouterr().err


CAPPED_CHILD = r"""
import resource, sys
from pathlib import Path
import torch, transformers
import monoquant as mq
from monoquant.pipeline import _skeleton

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

what, src, dst, budget = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
torch.set_num_threads(1)
_skeleton(Path(src))  # every library mapped before the cap: only what quantizing allocates counts
warm = torch.nn.Sequential(torch.nn.Linear(64, 64))
mq.save(mq.quantize_(warm, mq.Int8(), progress=False) and warm, Path(dst).parent / "warm.safetensors")
warm(torch.randn(2, 64))
cap = status("VmSize") + budget
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
try:
    if what == "blocks":
        mq.quantize_pretrained(src, dst, mq.Int8(), progress=False)
    else:
        model = transformers.LlamaForCausalLM.from_pretrained(src)
        mq.quantize_(model, mq.Int8(), progress=False)
except (MemoryError, RuntimeError, OSError) as e:
    import traceback; traceback.print_exc()
    print("OUT OF MEMORY", type(e).__name__)
    sys.exit(3)
print("DONE")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc/self/status: Linux")
def test_block_by_block_fits_where_the_whole_model_does_not(tmp_path):
    """A child process caps its address space at its size after imports + a third of the checkpoint: the whole
    model cannot even be loaded under it, quantize_pretrained finishes."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=704, num_hidden_layers=24,
                                      num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    src = tmp_path / "src"
    transformers.LlamaForCausalLM(config).save_pretrained(src, safe_serialization=True, max_shard_size="4MB")
    total = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    budget = total // 3
    env = dict(os.environ, MALLOC_ARENA_MAX="2")
    runs = {what: subprocess.run([sys.executable, "-c", CAPPED_CHILD, what, str(src), str(tmp_path / what),
                                  str(budget)], capture_output=True, text=True, env=env, timeout=600)
            for what in ("whole", "blocks")}
    assert runs["whole"].returncode == 3, runs["whole"].stderr[-2000:]  # the cap bites
    assert runs["blocks"].returncode == 0, runs["blocks"].stderr[-2000:]
    assert total > 3 * budget - 8
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(config)
    mq.load(skeleton, tmp_path / "blocks" / "model.safetensors")
    assert isinstance(skeleton.model.layers[23].mlp.up_proj, mq.QuantLinear)
