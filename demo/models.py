"""Tiny random Llama / Qwen2 models with a locally built tokenizer: no downloads.

Both architectures use head_dim 32 (vLLM CPU needs >= 32). Qwen2 has qkv bias and tied
embeddings. Weights are float32 so vLLM on CPU and transformers agree token for token.
"""

from __future__ import annotations

import os
from pathlib import Path

VOCAB = 512
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=3,
)
ARCHS = ("llama", "qwen2")


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    words = [f"w{i}" for i in range(VOCAB - len(specials))]
    vocab = {t: i for i, t in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )


def build_model(arch: str, seed: int):
    import torch
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(seed)
    if arch == "llama":
        m = LlamaForCausalLM(LlamaConfig(**COMMON, tie_word_embeddings=False))
    elif arch == "qwen2":
        m = Qwen2ForCausalLM(Qwen2Config(**COMMON, tie_word_embeddings=True))
    else:
        raise ValueError(f"unknown arch {arch!r}")
    with torch.no_grad():  # a wider spread than the default init: greedy text is not flat
        for n, p in m.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
            elif n.endswith("bias"):
                p.normal_(0, 0.1)
    m = m.to(torch.float32)
    m.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=3)
    return m


def save_model(arch: str, seed: int, directory: str | os.PathLike) -> Path:
    """Writes config, float32 safetensors weights and the tokenizer into directory."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    build_model(arch, seed).save_pretrained(d, safe_serialization=True)
    build_tokenizer().save_pretrained(d)
    return d


def hf_greedy(model_dir: str | os.PathLike, prompts: list[list[int]], max_tokens: int) -> list:
    """Greedy continuations from transformers on the weights in model_dir."""
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    m.eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            g = m.generate(
                ids, max_new_tokens=max_tokens, do_sample=False, min_new_tokens=max_tokens
            )
            out.append(g[0, len(p) :].tolist())
    return out


PROMPTS = [[1, 17, 42, 99], [1, 5, 6, 7, 8, 9], [1, 300, 301], [1, 200]]
