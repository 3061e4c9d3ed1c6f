"""monoquant-lightning: post-training quantization for Lightning (``lightning.pytorch``) models.

>>> from monoquant_lightning import PostTrainingQuantization
>>> ptq = PostTrainingQuantization(mq.Int4(group_size=32), save_to="model.safetensors")  # doctest: +SKIP
>>> trainer = L.Trainer(callbacks=[ModelCheckpoint(monitor="val_acc", mode="max"), ptq])  # doctest: +SKIP
"""

from ._version import __version__
from .callback import PostTrainingQuantization
from .checkpoint import (
    QuantizedCheckpointMixin,
    find_callback_state,
    load_quantized_checkpoint,
    restore_quantized_structure,
)
from .configs import coerce_config, let_jsonargparse_build_configs

let_jsonargparse_build_configs()  # LightningCLI: class_path: monoquant.QuantConfig / monoquant.Int4 in YAML files

__all__ = ["PostTrainingQuantization", "QuantizedCheckpointMixin", "__version__", "coerce_config",
           "find_callback_state", "load_quantized_checkpoint", "restore_quantized_structure"]
