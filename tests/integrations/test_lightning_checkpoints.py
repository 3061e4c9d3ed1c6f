"""PostTrainingQuantization and checkpoints: the best weights, the deployable file, every restore route."""

from __future__ import annotations

import pytest

pytest.importorskip("lightning")

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from monoquant_lightning import PostTrainingQuantization, QuantizedCheckpointMixin, load_quantized_checkpoint
from ptq_models import MLP, MemoryLogger, classification_data, fit, loader, trainer
from torch import nn

import monoquant as mq

INT4 = mq.QuantConfig(mq.Int4(group_size=32))
W8A8 = mq.QuantConfig(mq.Int8(), activations=mq.Int8())
SCORES = [0.50, 0.90, 0.60]  # the "val_score" of epochs 0, 1, 2: epoch 1 is the best, not the last


class Scored(MLP):
    """Logs a scripted ``val_score`` per epoch, so which epoch is best is known in advance."""

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        super().validation_step(batch, batch_idx)
        self.log("val_score", SCORES[self.current_epoch])


def val_loader():
    return loader(classification_data(16, seed=1))


def fit_with_best(tmp_path, config, **kwargs):
    """3 epochs with ModelCheckpoint(monitor="val_score"); returns (model, callback, trainer, snapshot)."""
    model = Scored()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_score", mode="max", save_last=True)
    cb = PostTrainingQuantization(config, monitor="val_score", **kwargs)
    tr, snap = fit(model, cb, val=val_loader(), max_epochs=3, after=[ckpt], enable_checkpointing=True)
    return model, cb, tr, snap, ckpt


def buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if ".qweight" in k or ".scale" in k or ".zero_point" in k}


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def test_the_best_checkpoint_is_the_one_quantized(tmp_path):
    model, cb, _, snap, ckpt = fit_with_best(tmp_path, INT4)  # weights=None: "best" (a monitored checkpoint)
    assert ckpt.best_model_score == 0.9 and "epoch=1" in ckpt.best_model_path
    assert cb.source == {"weights": "best", "checkpoint": ckpt.best_model_path, "epoch": 1,
                         "global_step": 4, "monitor": "val_score", "score": pytest.approx(0.9)}
    assert cb.float_metric == pytest.approx(0.9)  # the best epoch's value, not the last epoch's 0.6

    best = MLP()
    best.load_state_dict(torch.load(ckpt.best_model_path, weights_only=False)["state_dict"])
    mq.quantize_(best, INT4)
    last = snap.float_model  # the weights the module held when training ended
    mq.quantize_(last, INT4)
    got, want, other = buffers(model), buffers(best), buffers(last)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not all(torch.equal(got[k], other[k]) for k in other)


def test_weights_last_quantizes_the_last_weights(tmp_path):
    model, cb, _, snap, _ = fit_with_best(tmp_path, INT4, weights="last")
    assert cb.source == {"weights": "last"} and cb.float_metric == pytest.approx(0.6)
    mq.quantize_(snap.float_model, INT4)
    want = buffers(snap.float_model)
    assert all(torch.equal(buffers(model)[k], want[k]) for k in want)


def test_weights_best_needs_a_monitored_checkpoint():
    with pytest.raises(mq.ConfigError, match=r"weights='best'\) needs a ModelCheckpoint"):
        fit(MLP(), PostTrainingQuantization(INT4, weights="best"), val=val_loader())
    with pytest.raises(mq.ConfigError, match="weights must be"):
        PostTrainingQuantization(INT4, weights="first")
    cb = PostTrainingQuantization(INT4)  # the default without a monitored ModelCheckpoint: the last weights
    fit(MLP(), cb, val=val_loader())
    assert cb.source == {"weights": "last"}


@pytest.mark.parametrize("config", [INT4, W8A8], ids=["int4", "w8a8"])
def test_test_with_ckpt_path_best_after_fit_gives_the_quantized_best_outputs_bit_exactly(tmp_path, config):
    model, cb, tr, _, _ = fit_with_best(tmp_path, config)
    x = torch.randn(24, 64)
    expected = outputs(model, x)
    layers, report = dict(cb.quantized_layers), cb.report
    tr.test(model, val_loader(), ckpt_path="best", verbose=False)  # a float checkpoint into the quantized model
    assert isinstance(model.fc1, mq.QuantLinear) and cb.quantized_layers == layers
    assert torch.equal(outputs(model, x), expected)
    assert cb.report is not report and cb.report.end_to_end["sqnr_db"] == report.end_to_end["sqnr_db"]


def test_float_checkpoint_into_a_quantized_model_without_calibration_data_says_what_to_do(tmp_path):
    model, _, _, _, ckpt = fit_with_best(tmp_path, W8A8)
    fresh_callback = PostTrainingQuantization(W8A8)  # knows no fit loaders
    x = torch.randn(24, 64)
    before = outputs(model, x)
    with pytest.raises(mq.CalibrationError, match=r"holds float weights .* calibration_dataloader=loader"):
        trainer([fresh_callback]).test(model, val_loader(), ckpt_path=ckpt.best_model_path, verbose=False)
    assert isinstance(model.fc1, mq.QuantLinear) and torch.equal(outputs(model, x), before)  # nothing changed

    given = PostTrainingQuantization(W8A8, calibration_dataloader=val_loader())
    trainer([given]).test(model, val_loader(), ckpt_path=ckpt.best_model_path, verbose=False)
    assert isinstance(model.fc1, mq.QuantLinear) and not mq.needs_calibration(model)


def test_float_checkpoint_into_a_quantized_module_outside_the_trainer_is_a_clear_error(tmp_path):
    model, _, _, _, ckpt = fit_with_best(tmp_path, INT4)
    with pytest.raises(mq.SerializationError, match=r"float weights .* \['fc1', 'fc2'\] .*mq\.quantize_"):
        load_quantized_checkpoint(model, ckpt.best_model_path)


def test_save_to_writes_a_file_that_reloads_without_lightning(tmp_path, capsys):
    logger = MemoryLogger()
    model = MLP()
    cb = PostTrainingQuantization(INT4, save_to=tmp_path / "out" / "mlp.safetensors")
    fit(model, cb, val=val_loader(), logger=logger)
    path = tmp_path / "out" / "mlp.safetensors"
    assert cb.saved_path == path
    size = path.stat().st_size
    assert f"wrote {path} ({size / 1024:.1f} KiB)" in capsys.readouterr().out
    assert logger.merged()["quant/file_bytes"] == size
    x = torch.randn(7, 64)
    reloaded = mq.load(MLP(), path)  # plain monoquant, no Trainer
    assert isinstance(reloaded.fc1, mq.QuantLinear)
    assert torch.equal(outputs(reloaded, x), outputs(model, x))

    cb = PostTrainingQuantization(INT4, save_to=tmp_path / "dir")  # a directory: <dir>/<ModuleClass>.safetensors
    fit(MLP(), cb, val=val_loader())
    assert cb.saved_path == tmp_path / "dir" / "MLP.safetensors" and cb.saved_path.is_file()


class MixinMLP(QuantizedCheckpointMixin, MLP):
    pass


def test_load_from_checkpoint_with_the_mixin_is_one_line(tmp_path):
    model = MixinMLP()
    tr, _ = fit(model, PostTrainingQuantization(INT4), val=val_loader())
    path = tmp_path / "q.ckpt"
    tr.save_checkpoint(path)
    x = torch.randn(5, 64)
    loaded = MixinMLP.load_from_checkpoint(path)
    assert isinstance(loaded.fc1, mq.QuantLinear)
    assert torch.equal(outputs(loaded, x), outputs(model, x))

    float_model = MixinMLP()  # a float checkpoint still loads as usual
    tr = trainer([])
    tr.fit(float_model, loader(classification_data(32)))
    tr.save_checkpoint(tmp_path / "f.ckpt")
    assert torch.equal(outputs(MixinMLP.load_from_checkpoint(tmp_path / "f.ckpt"), x), outputs(float_model, x))


def test_errors_name_the_load_from_checkpoint_route(tmp_path):
    model = MLP()
    tr, _ = fit(model, PostTrainingQuantization(INT4), val=val_loader())
    path = tmp_path / "w.ckpt"
    tr.save_checkpoint(path, weights_only=True)  # no callback state
    with pytest.raises(mq.SerializationError, match=r"class MyModule\(QuantizedCheckpointMixin, L.LightningModule\)"):
        load_quantized_checkpoint(MLP(), path)


def test_accuracy_error_at_the_end_of_fit_leaves_a_recorded_quantized_model(tmp_path):
    model = MLP()
    strict = {"end_to_end_sqnr_db": 100.0}  # no INT4 model reaches 100 dB
    cb = PostTrainingQuantization(INT4, thresholds=strict, on_failure="raise", save_to=tmp_path / "m.safetensors",
                                  verbose=False)
    tr = trainer([cb])
    with pytest.raises(mq.AccuracyError, match="model output SQNR"):
        tr.fit(model, loader(classification_data(32)), val_loader())
    assert isinstance(model.fc1, mq.QuantLinear)  # documented: the module stays quantized...
    assert cb.quantized and cb.report is not None and cb.quantized_layers == {"fc1": "int4-affine-g32",
                                                                              "fc2": "int4-affine-g32"}
    assert not (tmp_path / "m.safetensors").exists()  # ...and no deployable file is written for it
    path = tmp_path / "after.ckpt"
    tr.save_checkpoint(path)
    x = torch.randn(5, 64)
    assert torch.equal(outputs(load_quantized_checkpoint(MLP(), path), x), outputs(model, x))
    fresh = MLP()
    trainer([PostTrainingQuantization(INT4)]).test(fresh, val_loader(), ckpt_path=path, verbose=False)
    assert torch.equal(outputs(fresh, x), outputs(model, x))


class XY(torch.utils.data.Dataset):
    def __init__(self):
        self.x, self.y = classification_data(16, seed=1).tensors

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


class DictMLP(MLP):
    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch["x"]), batch["y"])

    def validation_step(self, batch, batch_idx):
        self.log("val_acc", (self(batch["x"]).argmax(-1) == batch["y"]).float().mean())


class InputsDS(XY):
    def __getitem__(self, i):
        return {"inputs": self.x[i], "y": self.y[i]}


class InputsMLP(MLP):
    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch["inputs"]), batch["y"])

    def validation_step(self, batch, batch_idx):
        self.log("val_acc", (self(batch["inputs"]).argmax(-1) == batch["y"]).float().mean())


def test_dict_batches_that_forward_cannot_take_fail_before_training_naming_forward_fn():
    model = InputsMLP()
    tr = trainer([PostTrainingQuantization(INT4)])
    with pytest.raises(mq.ConfigError, match=r"dicts with keys \['inputs', 'y'\] .*forward_fn=") as info:
        tr.fit(model, loader(InputsDS()), loader(InputsDS()))
    assert "missing a required argument: 'x'" in str(info.value)
    assert "PostTrainingQuantization(..., forward_fn=" in str(info.value)
    assert tr.global_step == 0 and isinstance(model.fc1, nn.Linear)

    cb = PostTrainingQuantization(INT4, forward_fn=lambda module, batch: module(batch["inputs"]))
    fit(model, cb, train=loader(InputsDS()), val=loader(InputsDS()))
    assert isinstance(model.fc1, mq.QuantLinear) and cb.report.end_to_end["batches"] == 2


def test_dict_batch_keys_forward_does_not_take_are_left_out_with_one_warning():
    """``{"x", "y"}`` for ``forward(self, x)``: the label is dropped (noted once), the model is fed ``x``."""
    model = DictMLP()
    cb = PostTrainingQuantization(INT4)
    with pytest.warns(UserWarning, match=r"forward takes no \['y'\]") as caught:
        fit(model, cb, train=loader(XY()), val=loader(XY()))
    assert sum("takes no ['y']" in str(w.message) for w in caught) == 1
    assert isinstance(model.fc1, mq.QuantLinear) and cb.report.end_to_end["batches"] == 2


def test_the_first_batch_check_leaves_training_unchanged():
    """Peeking at a validation batch draws no random number that training would have used."""
    runs = []
    for callback in (PostTrainingQuantization(INT4), pl.Callback()):
        pl.seed_everything(0, verbose=False)
        model = MLP()
        shuffled = torch.utils.data.DataLoader(classification_data(32), batch_size=8, shuffle=True)
        trainer([callback], max_epochs=1).fit(model, shuffled, val_loader())
        runs.append(model.head.weight.detach().clone())  # the head stays float
    assert torch.equal(runs[0], runs[1])


def test_weights_best_without_a_saved_best_checkpoint_warns_and_quantizes_the_last_weights(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_score", mode="max")
    model, cb = Scored(), PostTrainingQuantization(INT4, weights="best")
    with pytest.warns(UserWarning, match="saved no best checkpoint .* quantizing the last weights"):
        _, snap = fit(model, cb, val=val_loader(), after=[ckpt], enable_checkpointing=True,
                      check_val_every_n_epoch=5)  # no validation ran: nothing to call best
    assert cb.source == {"weights": "last"}
    mq.quantize_(snap.float_model, INT4)
    want = buffers(snap.float_model)
    assert all(torch.equal(buffers(model)[k], want[k]) for k in want)


def test_a_gptq_spec_with_options_rebuilds_its_layers_by_round_to_nearest():
    # the rebuild only needs the layer structure (the checkpoint's buffers replace the values): before the method
    # config, it copied the spec with method='rtn' and kept act_order=True, which rtn refuses
    from monoquant_lightning.checkpoint import _rebuild

    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    spec = mq.Int4(group_size=32, method="gptq", act_order=True, sequential=True)
    assert _rebuild(model, spec, None, None, ["0"]) == {"0": "int4-affine-g32"}
    assert isinstance(model[0], mq.QuantLinear) and model[0].spec == spec.storage()
    assert isinstance(model[2], nn.Linear)
