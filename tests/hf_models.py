"""Tiny HuggingFace models of five classes, built from configs in the test (no download).

Each is trained a few steps with its own loss, so the weights are not at initialisation, and
saved with ``save_pretrained`` as a user's folder would be. Sizes are 300-1,600 parameters so
that dense float64 truth by double backward takes a second or two.
"""

from __future__ import annotations

import torch

VOCAB = 12
PAD = 0


def _configs(transformers):
    return {
        "gpt2": (transformers.GPT2LMHeadModel, transformers.GPT2Config(
            vocab_size=VOCAB, n_positions=16, n_embd=8, n_layer=1, n_head=2,
            bos_token_id=1, eos_token_id=1, pad_token_id=PAD)),
        "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
            bos_token_id=1, eos_token_id=1, pad_token_id=PAD, tie_word_embeddings=False)),
        "bert": (transformers.BertForMaskedLM, transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=12, max_position_embeddings=16, type_vocab_size=1,
            pad_token_id=PAD)),
        "vit": (transformers.ViTForImageClassification, transformers.ViTConfig(
            image_size=8, patch_size=4, num_channels=1, hidden_size=8, num_hidden_layers=1,
            num_attention_heads=2, intermediate_size=12, num_labels=3)),
        "t5": (transformers.T5ForConditionalGeneration, transformers.T5Config(
            vocab_size=VOCAB, d_model=8, d_kv=4, d_ff=12, num_layers=1, num_decoder_layers=1,
            num_heads=2, decoder_start_token_id=PAD, pad_token_id=PAD, eos_token_id=1,
            relative_attention_num_buckets=4)),
    }


KINDS = ("gpt2", "llama", "bert", "vit", "t5")
CAUSAL = ("gpt2", "llama")


def batches(kind: str, *, seed: int = 0, sizes=(3, 2), length: int = 6, padding="right"):
    """Dict batches for ``kind`` as a user's collate function gives them (HF conventions).

    Causal LMs: ``input_ids``, ``attention_mask``, ``labels`` = the ids with -100 at padding
    (the model shifts them). Masked LM: about a third of the tokens masked, ``labels`` -100
    elsewhere. ViT: ``pixel_values`` and class ``labels``. T5: ``input_ids``,
    ``attention_mask`` and target ``labels`` (-100 at target padding); decoder inputs are
    derived by the model from the labels.
    """
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        if kind == "vit":
            out.append({"pixel_values": torch.randn(n, 1, 8, 8, generator=g),
                        "labels": torch.randint(0, 3, (n,), generator=g)})
            continue
        ids = torch.randint(2, VOCAB, (n, length), generator=g)
        lengths = torch.randint(length // 2, length + 1, (n,), generator=g)
        lengths[0] = length
        pos = torch.arange(length).expand(n, length)
        if padding == "left":
            mask = (pos >= (length - lengths)[:, None]).long()
        else:
            mask = (pos < lengths[:, None]).long()
        ids = torch.where(mask.bool(), ids, torch.full_like(ids, PAD))
        if kind in CAUSAL:
            labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
            out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
        elif kind == "bert":
            pick = (torch.rand(n, length, generator=g) < 0.35) & mask.bool()
            pick[:, 0] = True
            labels = torch.where(pick, ids, torch.full_like(ids, -100))
            masked = torch.where(pick, torch.full_like(ids, VOCAB - 1), ids)
            out.append({"input_ids": masked, "attention_mask": mask, "labels": labels})
        else:  # t5
            tl = 4
            tgt = torch.randint(2, VOCAB, (n, tl), generator=g)
            tlen = torch.randint(2, tl + 1, (n,), generator=g)
            tgt = torch.where(torch.arange(tl)[None] < tlen[:, None], tgt,
                              torch.full_like(tgt, -100))
            out.append({"input_ids": ids, "attention_mask": mask, "labels": tgt})
    return out


def build(kind: str, folder, *, steps: int = 20, seed: int = 0):
    """The model of ``kind`` trained ``steps`` Adam steps on its batches, saved to ``folder``."""
    import transformers

    cls, cfg = _configs(transformers)[kind]
    torch.manual_seed(seed)
    model = cls(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    data = batches(kind, seed=seed + 100)
    model.train()
    for _ in range(steps):
        for b in data:
            opt.zero_grad()
            model(**b).loss.backward()
            opt.step()
    model.eval()
    model.save_pretrained(folder)
    return model
