"""transformers as the referee for HF outputs: load offline, logits on fixed tokens."""

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tokens(vocab_size: int, seq: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, vocab_size, (2, seq), generator=g)


def logits(path: str, seq: int = 12) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(tokens(model.config.vocab_size, seq)).logits
