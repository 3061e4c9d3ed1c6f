"""PostTrainingQuantization with real Trainers: small models, a few batches each."""

from __future__ import annotations

import warnings
from functools import partial

import pytest

pytest.importorskip("lightning")

import lightning.pytorch as pl
import torch
from monoquant_lightning import (
    PostTrainingQuantization,
    load_quantized_checkpoint,
    restore_quantized_structure,
)
from ptq_models import (
    MLP,
    DataModule,
    DictBatches,
    KwargsModel,
    MemoryLogger,
    classification_data,
    fit,
    loader,
    trainer,
)
from torch import nn

import monoquant as mq
from monoquant import functional as F

INT4 = mq.QuantConfig(mq.Int4(group_size=32))
W8A8 = mq.QuantConfig(mq.Int8(), activations=mq.Int8())


def quant_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()
            if k.rsplit(".", 1)[-1] in ("qweight", "scale", "zero_point")}


def test_fit_quantizes_measures_logs_and_prints(capsys):
    model, logger = MLP(), MemoryLogger()
    val = loader(classification_data(40, seed=1))
    cb = PostTrainingQuantization(INT4, compare_batches=3)
    _, snap = fit(model, cb, val=val, logger=logger)

    assert isinstance(model.fc1, mq.QuantLinear) and isinstance(model.fc2, mq.QuantLinear)
    assert isinstance(model.head, nn.Linear)  # 640 weights < SkipRules.defaults() min_params
    assert cb.quantized_layers == {"fc1": "int4-affine-g32", "fc2": "int4-affine-g32"}
    assert {n: m.training for n, m in model.named_modules()} == snap.flags  # flags restored
    # the comparison used the first 3 validation batches; recompute it from the float copy
    xs = [b[0] for b in list(val)[:3]]  # batch by batch: the kernel chosen depends on the batch size
    with torch.no_grad():
        ref = torch.cat([snap.float_model.eval()(x) for x in xs])
        out = torch.cat([model.eval()(x) for x in xs])
    e2e = cb.report.end_to_end
    assert e2e["sqnr_db"] == pytest.approx(F.sqnr(ref, out), abs=1e-3)
    assert e2e["top1_agreement"] == pytest.approx((ref.argmax(-1) == out.argmax(-1)).float().mean().item())
    assert 10 < e2e["sqnr_db"] < 60 and (e2e["batches"], e2e["samples"]) == (3, 24)
    logged = logger.merged()
    assert logged["quant/layers_quantized"] == 2 and logged["quant/layers_skipped"] == 1
    assert logged["quant/sqnr_db"] == pytest.approx(e2e["sqnr_db"])
    # an MLP this small is not smaller quantized: its layers are under the tuning threshold and also keep their
    # float weight for speed (kernels.FLOAT_WEIGHT_CACHE_BYTES), counted in bytes_after
    kept = sum(mq.kernels.kept_float_bytes(m) for m in (model.fc1, model.fc2))
    assert kept > 0 and logged["quant/bytes_before"] == cb.report.bytes_before
    assert logged["quant/bytes_after"] == cb.report.bytes_after < logged["quant/bytes_before"] + kept
    assert logged["quant/weight_sqnr_db/fc1"] == pytest.approx(cb.report.row("fc1").weight_sqnr_db)
    printed = capsys.readouterr().out
    assert str(cb.report) in printed and "2 quantized, 1 kept float" in printed


def test_report_rows_have_output_sqnr_measured_against_the_float_twins():
    model, logger = MLP(), MemoryLogger()
    val = loader(classification_data(40, seed=1))
    cb = PostTrainingQuantization(W8A8, compare_batches=3, calibration_batches=2)
    _, snap = fit(model, cb, val=val, logger=logger)
    xs = [b[0] for b in list(val)[:3]]
    f, q = snap.float_model.eval(), model.eval()
    powers = {"fc1": [0.0, 0.0], "fc2": [0.0, 0.0]}
    with torch.no_grad():
        for x in xs:  # each quantized layer vs its float twin, on the inputs the quantized model fed it
            h = q.fc1(x)
            for name, (ref, out) in {"fc1": (f.fc1(x), h), "fc2": (f.fc2(torch.relu(h)), q.fc2(torch.relu(h)))}.items():
                s, n = F.signal_noise_powers(ref, out)
                powers[name][0] += s
                powers[name][1] += n
    for name, (s, n) in powers.items():
        row = cb.report.row(name)
        assert row.output_sqnr_db == pytest.approx(F.sqnr_from_powers(s, n), abs=1e-6), name
        assert logger.merged()[f"quant/output_sqnr_db/{name}"] == pytest.approx(row.output_sqnr_db)
    assert 25 < cb.report.row("fc1").output_sqnr_db < 60  # INT8 weights and activations
    assert cb.report.row("head").output_sqnr_db is None  # kept float

    cb = PostTrainingQuantization(INT4, compare_batches=0)  # nothing compared: nothing measured
    fit(MLP(), cb, val=val)
    assert [r.output_sqnr_db for r in cb.report.quantized] == [None, None]


def test_kwargs_model_with_dict_batches_goes_through_transfer_hooks():
    model = KwargsModel()
    ds = DictBatches()
    cb = PostTrainingQuantization(mq.Int8(), compare_batches=2)
    _, snap = fit(model, cb, train=loader(ds), val=loader(ds))
    assert model.transfers == [0, 0]  # both comparison batches went through on_before_batch_transfer
    batches = list(loader(ds))[:2]
    for b in batches:
        b.pop("label")  # what the module's on_after_batch_transfer hook does
    with torch.no_grad():
        ref = torch.cat([snap.float_model(**b)["logits"] for b in batches])
        out = torch.cat([model(**b)["logits"] for b in batches])
    assert cb.report.end_to_end["sqnr_db"] == pytest.approx(F.sqnr(ref, out), abs=1e-3)
    assert cb.report.end_to_end["top1_agreement"] == pytest.approx((ref.argmax(-1) == out.argmax(-1)).float().mean())
    assert isinstance(model.fc1, mq.QuantLinear)


def test_forward_fn_option_feeds_custom_batches():
    class TwoInputs(MLP):
        def forward(self, x, shift):
            return super().forward(x + shift)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x, 0.0), y)

        def validation_step(self, batch, batch_idx):
            pass

    calls = []

    def forward_fn(module, batch):
        calls.append(batch[0].shape[0])
        return module(batch[0], 1.0)

    model = TwoInputs()
    cb = PostTrainingQuantization(INT4, forward_fn=forward_fn, compare_batches=2)
    fit(model, cb, val=loader(classification_data(24), batch_size=8))
    assert calls == [8, 8, 8, 8]  # 2 float + 2 quantized comparison batches
    assert cb.report.end_to_end["sqnr_db"] > 10


def test_several_val_loaders_limit_val_batches_and_caps():
    model = MLP()
    vals = {"a": loader(classification_data(40, seed=1)), "b": loader(classification_data(40, seed=2))}
    cb = PostTrainingQuantization(INT4, compare_batches=5)
    fit(model, cb, val=vals, limit_val_batches=2)
    # 5 batches split over 2 loaders (3 each), each capped at limit_val_batches=2 -> 2 + 2
    assert model.transfers == [0, 0, 1, 1]

    model = MLP()
    cb = PostTrainingQuantization(INT4, compare_batches=3)
    fit(model, cb, val=[vals["a"], vals["b"]])
    assert model.transfers == [0, 0, 1]  # ceil(3/2) = 2 from the first loader, the remaining 1 from the second


@pytest.mark.parametrize("inference_mode", [True, False])
def test_datamodule_and_validate_quantized_model(inference_mode):
    model, dm = MLP(), DataModule()
    cb = PostTrainingQuantization(INT4, monitor="val_acc", tolerance=1.0)
    tr, _ = fit(model, cb, datamodule=dm, inference_mode=inference_mode)
    float_acc = tr.callback_metrics["val_acc"].item()
    assert cb.float_metric == pytest.approx(float_acc)
    with warnings.catch_warnings():
        warnings.simplefilter("error", mq.AccuracyWarning)
        (result,) = tr.validate(model, datamodule=dm, verbose=False)
    x, y = _all(dm.val_dataloader())
    with torch.no_grad():
        expected = (model(x).argmax(-1) == y).float().mean().item()
    assert result["val_acc"] == pytest.approx(expected)
    assert cb.accuracy_check == {"monitor": "val_acc", "float": pytest.approx(float_acc),
                                 "quantized": pytest.approx(expected), "drop": pytest.approx(float_acc - expected),
                                 "tolerance": 1.0, "failed": False}
    assert isinstance(model.fc1, mq.QuantLinear)


def _all(dl):
    xs, ys = zip(*dl)
    return torch.cat(xs), torch.cat(ys)


def test_accuracy_drop_warns_logs_both_values_and_can_raise():
    model, logger = MLP(), MemoryLogger()
    val = loader(classification_data(32, seed=1))
    cb = PostTrainingQuantization(INT4, monitor="val_acc", tolerance=0.1)
    tr, _ = fit(model, cb, val=val, logger=logger)
    model.val_offset = -0.5  # the quantized model now "scores" 0.5 lower
    with pytest.warns(mq.AccuracyWarning, match=r"val_acc got worse by 0\.[45]"):
        tr.validate(model, val, verbose=False)
    check = cb.accuracy_check
    assert check["failed"] and check["drop"] > 0.4
    logged = logger.merged()
    assert logged["quant/val_acc_float"] == pytest.approx(cb.float_metric)
    assert logged["quant/val_acc_quantized"] == pytest.approx(check["quantized"])
    assert any("got worse" in w for w in cb.report.warnings)

    cb.on_failure = "raise"
    with pytest.raises(mq.AccuracyError) as info:
        tr.validate(model, val, verbose=False)
    assert info.value.report is cb.report


def test_fit_twice_does_not_quantize_again(capsys):
    model = MLP()
    val = loader(classification_data(16, seed=1))
    cb = PostTrainingQuantization(INT4)
    fit(model, cb, val=val)
    first = quant_buffers(model)
    report = cb.report
    capsys.readouterr()
    trainer([cb]).fit(model, loader(classification_data(32)), val)
    assert "already quantized; not quantizing it again" in capsys.readouterr().out
    assert cb.report is report
    after = quant_buffers(model)
    assert first.keys() == after.keys() and all(torch.equal(first[k], after[k]) for k in first)


def test_without_validation_data():
    model = MLP()
    cb = PostTrainingQuantization(INT4)
    fit(model, cb)  # weight-only RTN needs no data: quantized, and the report says nothing was compared
    assert isinstance(model.fc1, mq.QuantLinear)
    assert cb.report.end_to_end == {}
    assert cb.report.warnings == ["no end-to-end comparison: no validation data; pass calibration_dataloader=..."]

    model = MLP()
    explicit = loader(classification_data(16, seed=3))
    cb = PostTrainingQuantization(INT4, calibration_dataloader=explicit, compare_batches=2)
    fit(model, cb)
    assert model.transfers == [0, 0]
    assert cb.report.end_to_end["sqnr_db"] > 10


def test_state_key_is_config_derived_and_state_round_trips():
    a, b = PostTrainingQuantization(INT4), PostTrainingQuantization(mq.Int8())
    assert a.state_key == "PostTrainingQuantization{'weights': 'int4-affine-g32', 'activations': None}"
    assert b.state_key == "PostTrainingQuantization{'weights': 'int8-sym-channel', 'activations': None}"
    a.quantized_layers, a.float_metric = {"fc1": "int4-affine-g32"}, 0.75
    c = PostTrainingQuantization(INT4, monitor="val_loss")
    c.load_state_dict(a.state_dict())
    assert (c.quantized_layers, c.float_metric) == ({"fc1": "int4-affine-g32"}, None)  # other monitor: not used
    m = PostTrainingQuantization(INT4, monitor="val_acc")
    a.monitor = "val_acc"
    m.load_state_dict(a.state_dict())
    assert m.float_metric == 0.75


def test_checkpoint_restores_identically_with_trainer_and_outside(tmp_path):
    model = MLP()
    val = loader(classification_data(16, seed=1))
    cb = PostTrainingQuantization(INT4, monitor="val_acc")
    tr, _ = fit(model, cb, val=val)
    path = tmp_path / "quantized.ckpt"
    tr.save_checkpoint(path)
    x = torch.randn(5, 64)
    with torch.no_grad():
        expected = model.eval()(x)

    fresh, cb2 = MLP(), PostTrainingQuantization(INT4, monitor="val_acc")
    trainer([cb2]).test(fresh, val, ckpt_path=path, verbose=False)
    assert isinstance(fresh.fc1, mq.QuantLinear) and isinstance(fresh.head, nn.Linear)
    assert cb2.quantized_layers == cb.quantized_layers and cb2.float_metric == cb.float_metric
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), expected)

    outside = load_quantized_checkpoint(MLP(), path)
    with torch.no_grad():
        assert torch.equal(outside.eval()(x), expected)

    class Restoring(MLP):
        def on_load_checkpoint(self, checkpoint):
            restore_quantized_structure(self, checkpoint)

    loaded = Restoring.load_from_checkpoint(path, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), expected)


def quantized_checkpoint(tmp_path, config, callback=PostTrainingQuantization) -> tuple[MLP, str]:
    """Fit + quantize an MLP with ``callback(config)``, save a checkpoint; returns (model, path)."""
    model = MLP()
    tr, _ = fit(model, callback(config), val=loader(classification_data(16, seed=1)))
    path = tmp_path / "quantized.ckpt"
    tr.save_checkpoint(path)
    return model, path


def test_checkpoint_of_a_different_architecture_is_a_clear_error(tmp_path):
    _, path = quantized_checkpoint(tmp_path, INT4)

    class Other(MLP):
        def __init__(self):
            super().__init__()
            del self.fc2

    with pytest.raises(mq.SerializationError, match=r"quantized layers \['fc2'\]"):
        load_quantized_checkpoint(Other(), path)


def test_checkpoint_of_a_callback_subclass_restores_outside_the_trainer(tmp_path):
    class MyPTQ(PostTrainingQuantization):
        pass

    model, path = quantized_checkpoint(tmp_path, INT4, MyPTQ)
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.equal(load_quantized_checkpoint(MLP(), path).eval()(x), model.eval()(x))


def test_checkpoint_without_callback_state_is_a_clear_error_and_restores_in_the_trainer(tmp_path):
    model = MLP()
    val = loader(classification_data(16, seed=1))
    tr, _ = fit(model, PostTrainingQuantization(INT4), val=val)
    path = tmp_path / "weights.ckpt"
    tr.save_checkpoint(path, weights_only=True)  # no callback states in the file
    with pytest.raises(mq.SerializationError, match=r"quantized layers \['fc1', 'fc2'\] but no PostTrainingQuant"):
        load_quantized_checkpoint(MLP(), path)
    fresh = MLP()  # what the message suggests
    trainer([PostTrainingQuantization(INT4)]).test(fresh, val, ckpt_path=path, verbose=False)
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model.eval()(x))


def test_restoring_a_checkpoint_repeats_no_accuracy_warning(tmp_path):
    every_layer = mq.QuantConfig(mq.Int4(group_size=32), skip=mq.SkipRules.none())
    strict = partial(PostTrainingQuantization, thresholds={"end_to_end_sqnr_db": 80.0})  # INT4 gives ~30 dB
    with pytest.warns(mq.AccuracyWarning, match="model output SQNR .* is below 80 dB"):  # when quantizing: fair
        model, path = quantized_checkpoint(tmp_path, every_layer, strict)
    x = torch.randn(5, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", mq.AccuracyWarning)  # restoring a checkpoint must not repeat it
        outside = load_quantized_checkpoint(MLP(), path)
        fresh = MLP()
        trainer([PostTrainingQuantization(every_layer)]).test(fresh, loader(classification_data(8)), ckpt_path=path,
                                                              verbose=False)
    with torch.no_grad():
        assert torch.equal(outside.eval()(x), model.eval()(x)) and torch.equal(fresh.eval()(x), model.eval()(x))


def test_bad_arguments_are_config_errors():
    with pytest.raises(mq.ConfigError, match="mode"):
        PostTrainingQuantization(INT4, mode="maximize")
    with pytest.raises(mq.ConfigError, match="calibration_batches"):
        PostTrainingQuantization(INT4, calibration_batches=0)
    with pytest.raises(mq.ConfigError, match="wrap a single batch"):
        PostTrainingQuantization(INT4, calibration_dataloader=torch.randn(4, 64))
    with pytest.raises(mq.ConfigError, match="on_failure"):
        PostTrainingQuantization(INT4, on_failure="ignore")



def test_static_activations_are_calibrated_on_validation_batches_like_a_manual_calibration():
    model, logger = MLP(), MemoryLogger()
    val = loader(classification_data(48, seed=1))
    cb = PostTrainingQuantization(W8A8, calibration_batches=4, compare_batches=2)
    _, snap = fit(model, cb, val=val, logger=logger, limit_val_batches=3)
    # 2 comparison batches, then calibration capped by limit_val_batches=3 (not calibration_batches=4)
    assert model.transfers == [0] * 5
    assert not mq.needs_calibration(model)
    assert all(m.training for m in model.modules())  # train() flags restored, new input quantizers included

    manual = snap.float_model
    mq.quantize_(manual, W8A8)
    with mq.calibrate(manual):
        for x, _ in list(val)[:3]:
            manual(x)
    mq.freeze(manual)
    got, want = model.state_dict(), manual.state_dict()
    assert got.keys() == want.keys() and "fc1.input_quantizer.scale" in got
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_sequential_gptq_reruns_the_validation_batches_per_stage_like_calibrate_and_freeze():
    model = MLP()
    val = loader(classification_data(48, seed=1))
    cfg = mq.QuantConfig(mq.Int8(method="gptq", sequential=True), skip=mq.SkipRules(min_params=0))
    cb = PostTrainingQuantization(cfg, calibration_batches=3, compare_batches=1)
    _, snap = fit(model, cb, val=val)
    assert not mq.needs_calibration(model)
    manual = snap.float_model
    mq.quantize_(manual, cfg)
    frozen = mq.calibrate_and_freeze(manual, list(val)[:3])
    assert len(frozen) == len(cb.report.quantized) >= 2 and {r.method for r in cb.report.quantized} == {"gptq"}
    got, want = model.state_dict(), manual.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("cfg", [
    mq.QuantConfig(mq.Int4(group_size=32, method="awq+gptq"), skip=mq.SkipRules(min_params=0)),
    mq.QuantConfig(mq.Int8(), activations=mq.Int8(), smoothquant=0.5, skip=mq.SkipRules(min_params=0)),
], ids=["awq+gptq", "smoothquant"])
def test_channel_scaling_takes_the_callbacks_batches_like_quantize_(cfg):
    model = MLP()
    val = loader(classification_data(48, seed=1))
    cb = PostTrainingQuantization(cfg, calibration_batches=3, compare_batches=1)
    _, snap = fit(model, cb, val=val)
    assert not mq.needs_calibration(model)
    manual = snap.float_model
    mq.quantize_(manual, cfg, calibration_data=list(val)[:3])
    got, want = model.state_dict(), manual.state_dict()
    assert got.keys() == want.keys() and any(k.endswith("input_scale") for k in got)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_calibration_without_validation_data_fails_before_training():
    model = MLP()
    cb = PostTrainingQuantization(W8A8)
    tr = trainer([cb])
    with pytest.raises(mq.CalibrationError, match="calibration_dataloader="):
        tr.fit(model, loader(classification_data(32)))
    assert tr.global_step == 0 and isinstance(model.fc1, nn.Linear)

    model = MLP()
    cb = PostTrainingQuantization(W8A8, calibration_dataloader=loader(classification_data(16, seed=4)))
    fit(model, cb)
    assert isinstance(model.fc1, mq.QuantLinear) and not mq.needs_calibration(model)


def test_no_calibration_data_error_says_why():
    class NoValidationStep(MLP):
        validation_step = pl.LightningModule.validation_step

    val = loader(classification_data(16, seed=1))
    for model, kwargs, why in [(MLP(), {"limit_val_batches": 0}, "limit_val_batches=0"),
                               (NoValidationStep(), {}, "NoValidationStep defines no validation_step")]:
        with pytest.raises(mq.CalibrationError, match=why) as info:
            trainer([PostTrainingQuantization(W8A8)], **kwargs).fit(model, loader(classification_data(32)), val)
        assert "calibration_dataloader=" in str(info.value) and isinstance(model.fc1, nn.Linear)

    with pytest.raises(mq.CalibrationError, match="calibration_dataloader gave no batch"):
        fit(MLP(), PostTrainingQuantization(W8A8, calibration_dataloader=[]))


class OtherRank(pl.strategies.SingleDeviceStrategy):
    """A single-process strategy that reports itself as a rank other than zero."""

    @property
    def is_global_zero(self) -> bool:
        return False


class ClampedMLP(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.nan_to_num(self.fc1(x), nan=0.0, posinf=100.0, neginf=-100.0)
        return self.head(torch.relu(self.fc2(torch.relu(hidden))))


@pytest.mark.parametrize("rank_zero", [True, False])
def test_calibration_warnings_come_from_rank_zero_only(rank_zero):
    x, y = classification_data(16, seed=4).tensors
    x[0, 0] = float("inf")  # fc1's input observer ignores it with a NonFiniteInputWarning
    cb = PostTrainingQuantization(W8A8, calibration_dataloader=[(x, y)], compare_batches=0, verbose=False)
    strategy = {} if rank_zero else {"strategy": OtherRank(torch.device("cpu"))}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(ClampedMLP(), cb, **strategy)
    assert [w.category for w in caught if issubclass(w.category, mq.NonFiniteInputWarning)] \
        == ([mq.NonFiniteInputWarning] if rank_zero else [])


def test_calibration_dataloader_given_as_a_list_of_batches_is_one_source_of_whole_batches():
    x, y = classification_data(16, seed=4).tensors
    model = MLP()
    cb = PostTrainingQuantization(W8A8, calibration_dataloader=[(x, y)], compare_batches=1)
    _, snap = fit(model, cb)
    # the one batch is fed whole (not split into its tensors' rows): compared once, calibrated once
    assert model.transfers == [0, 0]
    assert (cb.report.end_to_end["batches"], cb.report.end_to_end["samples"]) == (1, 16)
    manual = snap.float_model
    mq.quantize_(manual, W8A8)
    with mq.calibrate(manual):
        manual(x)
    mq.freeze(manual)
    got, want = model.state_dict(), manual.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_checkpoint_with_static_activations_restores_identically(tmp_path):
    model, path = quantized_checkpoint(tmp_path, W8A8)
    x = torch.randn(5, 64)
    with torch.no_grad():
        expected = model.eval()(x)
    fresh = MLP()
    trainer([PostTrainingQuantization(W8A8)]).test(fresh, loader(classification_data(16)), ckpt_path=path,
                                                   verbose=False)
    outside = load_quantized_checkpoint(MLP(), path)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), expected)
        assert torch.equal(outside.eval()(x), expected)


def test_bf16_mixed_precision_compares_under_autocast():
    model = MLP()
    val = loader(classification_data(16, seed=1))
    cb = PostTrainingQuantization(mq.Int8(), compare_batches=2)
    _, snap = fit(model, cb, val=val, precision="bf16-mixed")
    xs = [b[0] for b in val]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = torch.cat([snap.float_model.eval()(x) for x in xs])
        out = torch.cat([model.eval()(x) for x in xs])
    assert ref.dtype == torch.bfloat16  # the comparison ran under the trainer's autocast, like validation
    assert cb.report.end_to_end["sqnr_db"] == pytest.approx(F.sqnr(ref, out), abs=1e-3)


def test_validation_loaders_are_fetched_when_validation_never_ran():
    model = MLP()
    cb = PostTrainingQuantization(INT4, compare_batches=2)
    tr, _ = fit(model, cb, val=loader(classification_data(24, seed=1)), check_val_every_n_epoch=10)
    assert "val_acc" not in tr.callback_metrics  # no validation epoch ran during fit
    assert model.transfers == [0, 0] and cb.report.end_to_end["batches"] == 2


def test_end_to_end_comparison_below_thresholds_warns_or_raises():
    val = loader(classification_data(40, seed=1))
    strict = {"end_to_end_sqnr_db": 100.0}  # no INT4 model reaches 100 dB
    cb = PostTrainingQuantization(INT4, compare_batches=2, thresholds=strict, verbose=False)
    with pytest.warns(mq.AccuracyWarning, match="model output SQNR"):
        fit(MLP(), cb, val=val)
    assert any("model output SQNR" in w for w in cb.report.warnings)
    cb = PostTrainingQuantization(INT4, compare_batches=2, thresholds=strict, on_failure="raise", verbose=False)
    with pytest.raises(mq.AccuracyError, match="model output SQNR") as err:
        fit(MLP(), cb, val=val)
    assert err.value.report.end_to_end["sqnr_db"] < 100
    with warnings.catch_warnings():  # default floors: a healthy INT4 model raises nothing
        warnings.simplefilter("error", mq.AccuracyWarning)
        fit(MLP(), PostTrainingQuantization(INT4, compare_batches=2, verbose=False), val=val)
