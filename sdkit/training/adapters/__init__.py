"""What trains: each training method is an adapter that answers for itself.

The trainer, `sdkit plan` and `sdkit bench` ask the adapter and never the method's name:
which parameters train and in which dtype, the dtype of the denoiser's inputs, what a
checkpoint holds, how the result is saved and described, and which recipe values a resumed
run must share (its part of the run's shape).

  full     the whole denoiser (and text encoders)              sdkit.training.adapters.full
  lora     LoRA, or DoRA with method.use_dora (peft)            sdkit.training.adapters.peft_methods
  loha     LyCORIS LoHa (peft), saved in the LyCORIS layout     sdkit.training.adapters.peft_methods
  lokr     LyCORIS LoKr (peft), saved in the LyCORIS layout     sdkit.training.adapters.peft_methods
  textual_inversion   new token embeddings of the CLIP encoders   sdkit.training.adapters.textual_inversion
"""

from __future__ import annotations

from sdkit.training.adapters.full import FullFineTune
from sdkit.training.adapters.peft_methods import LoHa, LoKr, LoRA
from sdkit.training.adapters.textual_inversion import TextualInversion

ADAPTERS = {cls.kind: cls for cls in (FullFineTune, LoRA, LoHa, LoKr, TextualInversion)}


def make_adapter(method):
    return ADAPTERS[method.type](method)


__all__ = ["ADAPTERS", "FullFineTune", "LoHa", "LoKr", "LoRA", "TextualInversion", "make_adapter"]
