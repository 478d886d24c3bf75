"""A character-level LSTM language model: embedding, ``nn.LSTM``, linear head."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["CharLSTM"]


class CharLSTM(nn.Module):
    """Embedding, a batch-first ``nn.LSTM`` and a linear head over the vocabulary.

    Args:
        vocab_size: number of token ids.
        n_embd: embedding width.
        hidden: LSTM hidden size.
        num_layers: stacked LSTM layers.
    """

    def __init__(self, vocab_size: int, n_embd: int, hidden: int, num_layers: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.emb = nn.Embedding(vocab_size, n_embd)
        self.lstm = nn.LSTM(n_embd, hidden, num_layers=num_layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, vocab_size]`` of the next token at every position of ``[B, T]``."""
        out, _ = self.lstm(self.emb(input_ids))
        return self.head(out)
