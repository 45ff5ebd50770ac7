"""Partial updates must fill whole engine layers: the pure check on a module map."""

from __future__ import annotations

from vllm_ext.coverage import incomplete_layers

L = "model.layers.0"
QKV = f"{L}.self_attn.qkv_proj"
MOE = f"{L}.mlp.experts"
FEEDS = {
    **{f"{L}.self_attn.{p}.weight": frozenset({QKV}) for p in ("q_proj", "k_proj", "v_proj")},
    f"{L}.input_layernorm.weight": frozenset({f"{L}.input_layernorm"}),
    **{
        f"{L}.mlp.experts.{e}.{w}.weight": frozenset({MOE})
        for e in range(2)
        for w in ("w1", "w2", "w3")
    },
    # a tied embedding feeds the embedding and the lm_head that shares its weight
    "model.embed_tokens.weight": frozenset({"model.embed_tokens", "lm_head"}),
}


def test_whole_layers_pass() -> None:
    qkv = {f"{L}.self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj")}
    assert incomplete_layers(qkv | {f"{L}.input_layernorm.weight"}, FEEDS) is None
    experts = {n for n in FEEDS if ".experts." in n}
    assert incomplete_layers(experts, FEEDS) is None
    assert incomplete_layers({"model.embed_tokens.weight"}, FEEDS) is None
    assert incomplete_layers(set(), FEEDS) is None


def test_part_of_a_fused_layer_is_refused_with_the_missing_tensor() -> None:
    problem = incomplete_layers({f"{L}.self_attn.q_proj.weight"}, FEEDS)
    assert problem and QKV in problem and "k_proj" in problem
    one_expert = {f"{L}.mlp.experts.1.{w}.weight" for w in ("w1", "w2", "w3")}
    problem = incomplete_layers(one_expert, FEEDS)
    assert problem and MOE in problem and "experts.0.w1" in problem and "6 tensor" not in problem
    w1_without_w3 = {f"{L}.mlp.experts.{e}.{w}.weight" for e in range(2) for w in ("w1", "w2")}
    problem = incomplete_layers(w1_without_w3, FEEDS)
    assert problem and "w3" in problem and "2 tensor(s)" in problem
