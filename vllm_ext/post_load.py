"""What vLLM's in-place reload leaves undone, done around it.

vLLM 0.32's `reload_weights(..., is_checkpoint_format=True)` (model_loader/reload/
layerwise.py) puts every layer back on the meta device in checkpoint format, buffers the
tensors loaded into it, and once a layer is complete materializes it, runs the original
weight loaders, runs `quant_method.process_weights_after_loading(layer)` and copies the
result into the tensors the engine serves from. Two things a first load does are lost:

1. A quant method keeps state from the first load and, seeing it, takes its in-place update
   branch. `UnquantizedFusedMoEMethod` does: with a kernel already built, it skips the
   experts' own post-load step (`moe_kernel.fused_experts.process_weights_after_loading`),
   which on CPU pads the expert width and prepacks w13/w2 for the grouped GEMM. The served
   expert weights are then left in checkpoint layout (or the copy fails where the padded
   shape differs). `PostLoad` watches every quant method's processing during the reload
   and runs the experts' step where the method kept its kernel and did not run it, on the
   freshly loaded layer, before vLLM copies it into the served tensors: once per layer, as
   on a first load. Methods that rebuild their kernel (quantized MoE) run it themselves.
2. Processing runs only for layers that received tensors. A layer that shares a parameter
   with one that did (an lm_head tied to the input embedding, wherever either sits) never
   does, so what it derived from the weight (vLLM CPU packs its own copy of lm_head's
   weight for the GEMM) stays stale. `PostLoad.finish` finds such layers by storage
   (data_ptr), not by attribute path, and re-runs their processing on the served tensors.
   It refuses a layer whose processing would rebind a shared tensor (it would untie it).
"""

from __future__ import annotations

from typing import Any

import structlog

log = structlog.get_logger("ckpt_vllm_post_load")

_HOOK = "process_weights_after_loading"


def _quant_method(module: Any) -> Any:
    from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase

    qm = getattr(module, "quant_method", None)
    return qm if isinstance(qm, QuantizeMethodBase) else None


def _storage(t: Any) -> int:
    try:
        return int(t.untyped_storage().data_ptr())
    except (RuntimeError, ValueError, NotImplementedError):
        return 0


def _own_params(module: Any) -> dict[str, Any]:
    return {n: p for n, p in module._parameters.items() if p is not None}


class _Watch:
    """Notes whether an object's post-load hook ran while it is watched."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj
        self.ran = False
        if obj is not None:
            orig = getattr(obj, _HOOK)

            def hook(layer: Any) -> None:
                self.ran = True
                orig(layer)

            setattr(obj, _HOOK, hook)

    def close(self) -> None:
        if self.obj is not None:
            self.obj.__dict__.pop(_HOOK, None)


class PostLoad:
    """Around one `reload_weights` call:

    with PostLoad(model) as post:
        runner.reload_weights(weights_iterator=..., is_checkpoint_format=True)
    post.finish()
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.processed: dict[int, Any] = {}
        self.completed_experts: list[str] = []
        self._wrapped: list[Any] = []
        self._names = {id(m): n for n, m in model.named_modules()}

    def __enter__(self) -> PostLoad:
        seen: set[int] = set()
        for _, module in self.model.named_modules():
            qm = _quant_method(module)
            if qm is not None and id(qm) not in seen:
                seen.add(id(qm))
                self._wrap(qm)
        return self

    def __exit__(self, *exc: object) -> None:
        for qm in self._wrapped:
            qm.__dict__.pop(_HOOK, None)
        self._wrapped.clear()

    def _wrap(self, qm: Any) -> None:
        orig = getattr(qm, _HOOK)

        def process(layer: Any) -> None:
            kernel = getattr(qm, "moe_kernel", None)
            watch = _Watch(getattr(kernel, "fused_experts", None))
            try:
                orig(layer)
            finally:
                watch.close()
            if (
                watch.obj is not None
                and not watch.ran
                and getattr(qm, "moe_kernel", None) is kernel
            ):
                # the in-place update branch kept the kernel and skipped the experts' step
                getattr(watch.obj, _HOOK)(layer)
                self.completed_experts.append(self._names.get(id(layer), "?"))
            self.processed[id(layer)] = layer

        setattr(qm, _HOOK, process)
        self._wrapped.append(qm)

    def finish(self) -> list[str]:
        """Re-runs the processing of every layer that was not processed but shares a
        parameter's storage with one that was. Returns their names."""
        loaded = {
            s
            for m in self.processed.values()
            for p in _own_params(m).values()
            if (s := _storage(p))
        }
        refreshed: list[str] = []
        for name, module in self.model.named_modules():
            qm = _quant_method(module)
            if qm is None or id(module) in self.processed:
                continue
            params = _own_params(module)
            if not any(_storage(p) in loaded for p in params.values()):
                continue
            before = {n: (id(p), _storage(p)) for n, p in params.items()}
            getattr(qm, _HOOK)(module)
            after = {n: (id(p), _storage(p)) for n, p in _own_params(module).items()}
            if after != before:
                raise RuntimeError(
                    f"re-processing {name!r}, which shares weights with a loaded layer, "
                    "rebound its parameters (it would no longer share them)"
                )
            refreshed.append(name)
        log.info(
            "post_load_done",
            processed=len(self.processed),
            experts_completed=len(self.completed_experts),
            shared_refreshed=refreshed,
        )
        return refreshed
