"""monoquant-lightning: post-training quantization for Lightning (``lightning.pytorch``) models.

>>> from monoquant_lightning import PostTrainingQuantization
>>> ptq = PostTrainingQuantization(mq.Int4(group_size=32), monitor="val_acc")  # doctest: +SKIP
>>> trainer = L.Trainer(callbacks=[ptq])  # doctest: +SKIP
"""

from .callback import PostTrainingQuantization
from .checkpoint import find_callback_state, load_quantized_checkpoint, restore_quantized_structure

__version__ = "0.1.0"

__all__ = ["PostTrainingQuantization", "find_callback_state", "load_quantized_checkpoint",
           "restore_quantized_structure"]
