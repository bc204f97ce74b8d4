"""Random-weight Hugging Face Mistral reference models (PyTorch, CPU, float32) for parity tests."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np


@dataclasses.dataclass
class HFRef:
    path: Path          # folder written by save_pretrained
    model: object       # transformers.MistralForCausalLM, eval mode, float32

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        import torch
        with torch.no_grad():
            return self.model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()

    def state_dict(self) -> dict[str, np.ndarray]:
        """Float32 copies (never views of the live model's weights, which session fixtures share)."""
        return {k: v.detach().float().numpy().copy() for k, v in self.model.state_dict().items()}


def make_hf_model(path: Path, n_heads: int = 8, n_kv_heads: int = 2, window: int | None = 16,
                  seed: int = 0, vocab: int = 256, dim: int = 64, head_dim: int = 16, hidden: int = 128,
                  layers: int = 2, theta: float = 10000.0, max_shard_size: str | None = None,
                  init_std: float = 0.02) -> HFRef:
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    cfg = MistralConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, head_dim=head_dim,
                        sliding_window=window, max_position_embeddings=2048, rms_norm_eps=1e-5,
                        rope_theta=theta, tie_word_embeddings=False,
                        initializer_range=init_std)
    cfg._attn_implementation = "eager"
    model = MistralForCausalLM(cfg).eval()
    with torch.no_grad():  # make the norm weights non-trivial so a mapping mix-up shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kw)
    return HFRef(Path(path), model)
