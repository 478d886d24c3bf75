"""A character-level causal transformer small enough for dense curvature checks.

Attention is written out (``q @ k^T``, a masked softmax, ``@ v``) rather than calling
``scaled_dot_product_attention``: the fused kernels have no double backward on every
backend, and Hessian-vector products need one.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._errors import DataError, arg

__all__ = ["TinyGPT"]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with an optional key padding mask.

    Args:
        n_embd: width of the residual stream.
        n_head: number of heads (``n_embd`` must be divisible by it).
    """

    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attend over earlier positions (and, with ``key_mask`` ``[B, T]``, real tokens only)."""
        b, t, c = x.shape
        h = self.n_head
        q, k, v = self.qkv(x).split(c, dim=-1)
        q, k, v = (z.view(b, t, h, c // h).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(c // h)
        allowed = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        if key_mask is not None:
            allowed = allowed & key_mask[:, None, None, :]
        # The most negative finite number, not -inf: a padded query whose keys are all padding
        # then gets a finite (uniform) row instead of NaN, which would poison every gradient.
        att = att.masked_fill(~allowed, torch.finfo(att.dtype).min).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, c)
        return self.proj(y)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: attention, then a GELU MLP, each residual.

    Args:
        n_embd: width of the residual stream.
        n_head: number of attention heads.
    """

    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd)
        )

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One block on ``x`` ``[B, T, n_embd]``."""
        x = x + self.attn(self.ln1(x), key_mask)
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """A GPT-style causal language model over a small vocabulary.

    Token and position embeddings, ``n_layer`` pre-LayerNorm blocks, a final LayerNorm and a
    linear head. Weights start as in GPT-2 (normal, std 0.02; residual projections scaled by
    ``1/sqrt(2 n_layer)``), drawn from torch's global generator.

    Args:
        vocab_size: number of token ids.
        block_size: longest sequence the position embedding covers.
        n_layer: number of blocks.
        n_head: attention heads per block.
        n_embd: width of the residual stream (divisible by ``n_head``).
    """

    def __init__(
        self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int
    ) -> None:
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd {n_embd} is not divisible by n_head {n_head}")
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab_size)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2:
                std = 0.02
                if name.endswith(("attn.proj.weight", "mlp.2.weight")):
                    std /= math.sqrt(2 * n_layer)
                nn.init.normal_(p, 0.0, std)

    def forward(
        self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits ``[B, T, vocab_size]`` of the next token at every position.

        Args:
            input_ids: token ids ``[B, T]`` (or ``[T]``), ``T <= block_size``.
            attention_mask: ``[B, T]``, 1 for real tokens and 0 for padding. Padded keys are
                masked out and positions count real tokens only, so a left- or right-padded
                sequence gives the same logits at its real positions as the unpadded one.

        Raises:
            DataError: when the sequences are longer than ``block_size``.
        """
        squeeze = input_ids.dim() == 1
        if squeeze:
            input_ids = input_ids[None]
            if attention_mask is not None:
                attention_mask = attention_mask[None]
        t = input_ids.shape[1]
        if t > self.block_size:
            raise DataError(
                f"the sequences hold {t} tokens but the model's {arg('block_size')} is "
                f"{self.block_size}; cut them into windows of at most {self.block_size}."
            )
        if attention_mask is None:
            key_mask = None
            pos = torch.arange(t, device=input_ids.device)
        else:
            key_mask = attention_mask.to(device=input_ids.device).bool()
            pos = (key_mask.long().cumsum(dim=1) - 1).clamp(min=0)
        x = self.tok_emb(input_ids) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x, key_mask)
        logits = self.head(self.ln_f(x))
        return logits[0] if squeeze else logits
