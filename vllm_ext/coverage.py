"""Which engine layers each checkpoint tensor goes into, so that a partial update that would
leave a layer half loaded is refused before any weight is touched.

vLLM's in-place reload processes a layer once every element of it has been loaded; a layer
that got only part of its tensors (one expert of a fused MoE layer, w1 without w3, q_proj
without k_proj) is materialized from uninitialised memory at the end and served that way.
A partial update must therefore carry all the checkpoint tensors of every layer it touches.

The map comes from the model's own `load_weights`, run once over the checkpoint's names with
meta tensors: every parameter's weight loader is swapped for a recorder that notes which
layer (module) the current checkpoint tensor lands in, then runs the real loader on a meta
copy of the parameter in its load-time shape (the one vLLM's reload records), so the
model's routing (fused qkv, stacked gate/up, expert mappings, tied weights) is vLLM's own
and nothing the engine serves is written. Layers that share a parameter (a tied lm_head)
are all fed by the tensor that loads it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

Feeds = dict[str, frozenset[str]]  # checkpoint tensor name -> engine module names


def incomplete_layers(names: set[str], feeds: Feeds) -> str | None:
    """None when every engine layer the tensors go into gets all its tensors, else why not."""
    touched: set[str] = set()
    for n in names:
        touched |= feeds.get(n, frozenset())
    missing = sorted(n for n, mods in feeds.items() if mods & touched and n not in names)
    if not missing:
        return None
    layer = sorted(feeds[missing[0]] & touched)[0]
    carried = sorted(n for n in names if layer in feeds.get(n, frozenset()))[0]
    return (
        f"partial update: {carried!r} goes into the engine layer {layer!r}, which also takes "
        f"{missing[0]!r} ({len(missing)} tensor(s) of the layers it touches are missing); "
        "a partial update must carry every tensor of each layer it touches (widen --tensors "
        "to the whole layer, e.g. all experts of an MoE block)"
    )


def _meta_param(module: Any, attr: str, live: Any) -> Any:
    """The parameter as the weight loader expects it (checkpoint-time shape), on meta."""
    from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info
    from vllm.model_executor.model_loader.reload.meta import to_meta_tensor
    from vllm.model_executor.model_loader.reload.sanitize import restore_layer_refs

    recorded = get_layerwise_info(module).restore_metadata[0].get(attr)
    if recorded is None:  # tensors vLLM does not put on meta (bias): shape unchanged
        return to_meta_tensor(live)
    return restore_layer_refs(to_meta_tensor(recorded), module)


def module_feeds(model: Any, shapes: dict[str, tuple[int, ...]]) -> Feeds:
    """Checkpoint name -> names of the modules whose parameters its loading writes."""
    import torch
    from vllm.model_executor.model_loader.weight_utils import default_weight_loader

    owners: dict[int, list[str]] = {}
    params: dict[int, tuple[Any, Any, str]] = {}  # id -> (param, module, attr)
    for mname, m in model.named_modules():
        for attr, p in m._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append(mname)
                params.setdefault(id(p), (p, m, attr))
    dtype = next((p.dtype for p, _, _ in params.values() if p.is_floating_point()), None)
    current = [""]
    fed: dict[str, set[str]] = {}

    def recorder(pid: int, loader: Any, meta: Any) -> Any:
        def record(*args: Any, **kwargs: Any) -> Any:
            fed.setdefault(current[0], set()).update(owners[pid])
            if "param" in kwargs:  # loaders are called both ways
                kwargs["param"] = meta
            else:
                args = (meta, *args[1:])
            return loader(*args, **kwargs)

        return record

    saved = {pid: dict(p.__dict__) for pid, (p, _, _) in params.items()}
    try:
        for pid, (p, m, attr) in params.items():
            meta = _meta_param(m, attr, p)  # post-load processing may have dropped the
            loader = getattr(meta, "weight_loader", default_weight_loader)  # live one's
            p.weight_loader = recorder(pid, loader, meta)

        def weights() -> Iterator[tuple[str, Any]]:
            for name, shape in shapes.items():
                current[0] = name
                yield name, torch.empty(shape, dtype=dtype or torch.float32, device="meta")

        model.load_weights(weights())
    finally:
        for pid, (p, _, _) in params.items():
            p.__dict__.clear()
            p.__dict__.update(saved[pid])
    return {n: frozenset(mods) for n, mods in fed.items()}
