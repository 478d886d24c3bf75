"""Small built-in sequence models (``arch`` types ``tiny-gpt`` and ``char-lstm``).

They import only torch and curvscope's errors, so :mod:`curvscope.io` can build them from a
checkpoint's ``arch`` without any code from the checkpoint.
"""

from ._lstm import CharLSTM
from ._transformer import TinyGPT

__all__ = ["CharLSTM", "TinyGPT"]
