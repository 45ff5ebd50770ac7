"""One vLLM worker taking one update from its agent worker: the logic both engine-side entry
points share (the worker extension's `ckpt_update`, and the `ckptd` weight-transfer backend
driven through vLLM's native /update_weights).

Loading goes through vLLM's in-place `reload_weights(vllm_config, model,
weights_iterator=..., is_checkpoint_format=True)`, which buffers a layer's tensors until the
layer is complete and runs post-load processing; `vllm_ext.post_load` does what that path
leaves undone (the fused-MoE experts' prepack, layers that share a loaded layer's weights
such as a tied lm_head); `vllm_ext.coverage` refuses partial updates that would leave an
engine layer half loaded. Nothing is loaded before the update's names and shapes are
validated, and every bucket's checksums verified.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from ckpt_common.ipc import endpoint_refusal
from vllm_ext.receiver import Receiver, UpdateInfo

STEP_TIMEOUT_S = 30.0


class EngineUpdate:
    """model: returns the worker's model; reload: (model, tensors) -> None, vLLM's in-place
    reload (the runner's where there is one)."""

    def __init__(
        self,
        vllm_config: Any,
        model: Callable[[], Any],
        device: Any,
        reload: Callable[[Any, Iterator[tuple[str, Any]]], None] | None = None,
    ) -> None:
        self.vllm_config = vllm_config
        self._model = model
        self._reload = reload
        self.device = None if getattr(device, "type", "cpu") == "cpu" else device
        self.checkpoint = ""
        self.version = 0
        self.updates = 0
        self.overlays: list[str] = []  # partial updates since the last whole one: "ck@v"
        self._receiver: Receiver | None = None
        self._expected: dict[str, tuple[int, ...]] | None = None
        self._feeds: Any = None
        self._layout: dict[tuple[str, str, tuple[int, ...]], Any] = {}  # tensor -> box

    def update(self, spec: dict, rank: int) -> dict:
        """Takes one update. spec: {job_id, endpoints, timeout_s, step_timeout_s,
        checkpoint, version}. Returns a plain dict (JSON-safe): ok, touched (False: nothing
        was loaded, the engine serves on), rank, reason, checkpoint, version, seconds."""
        t0 = time.monotonic()
        endpoints = spec.get("endpoints") or []
        if rank >= len(endpoints):
            why = f"worker rank {rank} has no endpoint ({len(endpoints)} given)"
            return {"ok": False, "rank": rank, "reason": why, "touched": False}
        why = endpoint_refusal(str(endpoints[rank]))
        if why:
            return {"ok": False, "rank": rank, "reason": why, "touched": False}
        timeout = float(spec.get("timeout_s") or 300.0)
        # Between two steps of an update (bucket to bucket) a healthy worker takes well
        # under a second; a frozen one must not hold the engine for the whole job.
        step = min(timeout, float(spec.get("step_timeout_s") or STEP_TIMEOUT_S))
        recv = self._receiver_for(str(endpoints[rank]))
        try:
            done = recv.receive(
                load=self._load,
                validate=self._validate,
                layout=self._layout_of,
                job_id=str(spec.get("job_id", "")),
                wait_s=min(60.0, timeout),
                step_timeout_s=step,
            )
        except TimeoutError as e:  # no update started: nothing was loaded
            recv.reset()
            return {"ok": False, "rank": rank, "reason": str(e), "touched": False}
        except Exception as e:  # never raise through the engine: say what happened
            recv.reset()
            return {"ok": False, "rank": rank, "reason": f"{type(e).__name__}: {e}"}
        return {
            "ok": bool(done.ok),
            "touched": bool(done.touched),
            "rank": rank,
            "reason": done.reason,
            "checkpoint": done.checkpoint,
            "version": int(done.version),
            "seconds": round(time.monotonic() - t0, 4),
        }

    def info(self, rank: int) -> dict:
        import os

        return {
            "rank": rank,
            "checkpoint": self.checkpoint,
            "version": self.version,
            "overlays": list(self.overlays),
            "updates": self.updates,
            "pid": os.getpid(),
        }

    def _receiver_for(self, endpoint: str) -> Receiver:
        r = self._receiver
        if r is None or r.endpoint != endpoint:
            if r is not None:
                r.close()
            r = self._receiver = Receiver(endpoint, engine="vllm", device=self.device)
        return r

    def _expected_names(self) -> dict[str, tuple[int, ...]] | None:
        """Checkpoint-format names and shapes the model takes: the model directory's
        safetensors headers when it has them (exact); None when unknown."""
        if self._expected is None:
            from vllm_ext.model_names import expected_from_model

            self._expected = expected_from_model(self.vllm_config, self._model())
        return self._expected or None

    def _layout_of(self, info: UpdateInfo) -> dict[str, Any]:
        """This rank's sharding map (vllm_ext.layout) over every tensor it has seen, the
        update's included: taken once per tensor (name, dtype, shape) for the life of the
        engine, so a full update's map covers the checkpoint."""
        from vllm_ext.layout import capture

        keys = [(m.name, m.dtype, tuple(int(d) for d in m.shape)) for m in info.tensors]
        todo = list(dict.fromkeys(k for k in keys if k not in self._layout))
        if todo:
            got = capture(self._model(), todo, self.device or "cpu")
            for k in todo:
                self._layout[k] = got.get(k[0])
        return {k[0]: box for k, box in self._layout.items() if box is not None}

    def _validate(self, info: UpdateInfo) -> str | None:
        from vllm_ext.model_names import check_names

        expected = self._expected_names()
        partial = info.partial or info.kept  # a rank's parts: the layout check covers them
        problem = check_names(info.tensors, expected, self._model(), partial=partial)
        if problem or not info.partial:
            return problem
        return self._check_layers({t.name for t in info.tensors}, expected)

    def _check_layers(self, names: set[str], expected: dict | None) -> str | None:
        """A partial update must fill every engine layer it touches (vllm_ext.coverage)."""
        from vllm_ext.coverage import incomplete_layers, module_feeds

        if self._feeds is None:
            if not expected:
                return "partial update refused: the engine's checkpoint tensors are unknown"
            try:
                self._feeds = module_feeds(self._model(), expected)
            except Exception as e:  # a model whose loading cannot be traced on meta
                return f"partial update refused: cannot map tensors to engine layers ({e!r})"
        return incomplete_layers(names, self._feeds)

    def _load(self, info: UpdateInfo, tensors: Iterator[tuple[str, Any]]) -> None:
        from vllm_ext.post_load import PostLoad

        model = self._model()
        with PostLoad(model) as post:
            if self._reload is not None:
                self._reload(model, tensors)
            else:
                from vllm.model_executor.model_loader.reload.inplace import reload_weights

                reload_weights(
                    self.vllm_config,
                    model,
                    weights_iterator=tensors,
                    weights_path=None,
                    is_checkpoint_format=True,
                )
        post.finish()
        if info.partial:  # what it serves: the base it had, this version's tensors on top
            self.overlays.append(f"{info.checkpoint}@{info.version}")
        else:
            self.checkpoint, self.version, self.overlays = info.checkpoint, int(info.version), []
        self.updates += 1
