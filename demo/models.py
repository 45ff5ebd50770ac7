"""Tiny random models with a locally built tokenizer: no downloads.

Every architecture uses head_dim 32 (vLLM CPU needs >= 32) and float32 weights, so vLLM on
CPU and transformers agree token for token. `ARCHS` are the demo's two (Llama; Qwen2 with
qkv bias and tied embeddings); `MATRIX` is the architecture matrix the vLLM tests update
in place: MoE with and without shared experts (one with an expert width the CPU kernel
pads), embeddings tied at different paths, fused qkv in the checkpoint, q/k norms.
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
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=64)
GPT = dict(
    vocab_size=VOCAB,
    n_embd=64,
    n_head=2,
    n_layer=2,
    n_positions=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=3,
    tie_word_embeddings=True,
)
# model_type -> config keywords: COMMON's names, or GPT's for the GPT-2 family
MATRIX: dict[str, dict] = {
    "llama": {**COMMON, "tie_word_embeddings": False},
    "qwen2": {**COMMON, "tie_word_embeddings": True},  # tied at model.embed_tokens, qkv bias
    "qwen3": {**COMMON, "tie_word_embeddings": True},  # q/k norm per head
    "olmo2": {**COMMON, "tie_word_embeddings": False},  # q/k norm over the whole projection
    "phi3": {**COMMON, "tie_word_embeddings": False},  # qkv_proj, gate_up_proj fused on disk
    "gpt2": GPT,  # tied at transformer.wte with a separate lm_head; fused c_attn (Conv1D)
    "gpt_bigcode": {**GPT, "multi_query": True},  # lm_head is transformer.wte itself
    "mixtral": {**COMMON, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {  # shared expert behind a sigmoid gate, qkv bias
        **COMMON,
        **MOE,
        "num_experts": 4,
        "shared_expert_intermediate_size": 64,
        "norm_topk_prob": False,
    },
    "qwen3_moe": {  # q/k norm, tied; expert width 48: the CPU kernel pads it to 64
        **COMMON,
        **MOE,
        "num_experts": 4,
        "moe_intermediate_size": 48,
        "norm_topk_prob": True,
        "tie_word_embeddings": True,
    },
    "olmoe": {**COMMON, **MOE, "num_experts": 4},  # q/k norm, no shared expert
}


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


def build_config(arch: str):
    from transformers import CONFIG_MAPPING

    if arch not in MATRIX:
        raise ValueError(f"unknown arch {arch!r}")
    return CONFIG_MAPPING[arch](**MATRIX[arch])


def build_model(arch: str, seed: int):
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(build_config(arch))
    with torch.no_grad():  # a wider spread than the default init: greedy text is not flat
        for n, p in m.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
            elif n.endswith("bias"):
                p.normal_(0, 0.1)
            else:  # norms (q/k norms included) away from 1: a norm left stale shows
                p.normal_(1, 0.1)
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
