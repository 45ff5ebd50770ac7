"""A vLLM scheduler that runs ckptd's probes while every other request is held.

`--scheduler-cls vllm_ext.ProbeScheduler`. ckptd pauses an engine (`/pause?mode=keep`:
vLLM's scheduler is PAUSED_ALL, nothing runs), loads the new weights, and before it resumes
sends the checkpoint's probe as an ordinary completion marked `vllm_xargs.ckpt_probe`. This
scheduler schedules such requests, and only them, while PAUSED_ALL: the kept requests stay
frozen, so nothing but the probe ever runs on weights the probe has not passed. Unpaused, it
is vLLM's own scheduler (the synchronous one, or the asynchronous one where vLLM's config
asks for it), and a marked request is an ordinary request.

Whether a marked request may come in at all is the HTTP layer's decision
(vllm_ext.guard): it is ckptd's, signed with the instance's key.
"""

from __future__ import annotations

from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.interface import PauseState
from vllm.v1.core.sched.request_queue import create_request_queue
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request

PROBE_ARG = "ckpt_probe"  # the key in SamplingParams.extra_args (`vllm_xargs` over HTTP)


def is_probe(request: Request) -> bool:
    sp = request.sampling_params
    return bool(sp is not None and sp.extra_args and sp.extra_args.get(PROBE_ARG))


class ProbeScheduler(Scheduler):
    """vLLM's scheduler plus probes while paused; see the module docstring."""

    def __new__(cls, *args: Any, **kwargs: Any) -> ProbeScheduler:
        config = kwargs.get("vllm_config", args[0] if args else None)
        if (
            cls is ProbeScheduler
            and config is not None
            and config.scheduler_config.async_scheduling
        ):
            cls = AsyncProbeScheduler
        return object.__new__(cls)

    def _probes(self) -> list[Request]:
        return [r for r in self.requests.values() if is_probe(r) and not r.is_finished()]

    def get_num_unfinished_requests(self) -> int:
        if self._pause_state == PauseState.PAUSED_ALL:
            return len(self._probes())
        return super().get_num_unfinished_requests()

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        if self._pause_state != PauseState.PAUSED_ALL:
            return super().schedule(*args, **kwargs)
        probes = {r.request_id for r in self._probes()}
        if not probes:
            return super().schedule(*args, **kwargs)
        # Hide every other request, schedule the probes as if unpaused, then put it all back.
        running, waiting, holding = self.running, self.waiting, self.kv_holding_waiting
        waiting_probes = [r for r in waiting if r.request_id in probes]
        waiting.remove_requests(waiting_probes)
        self.running = [r for r in running if r.request_id in probes]
        self.waiting = create_request_queue(self.policy)
        self.waiting.prepend_requests(waiting_probes)
        self.kv_holding_waiting = create_request_queue(self.policy)
        self._pause_state = PauseState.UNPAUSED
        try:
            return super().schedule(*args, **kwargs)
        finally:
            self._pause_state = PauseState.PAUSED_ALL
            self.running = [r for r in running if r.request_id not in probes] + self.running
            waiting.prepend_requests(list(self.waiting))  # probes not scheduled, or preempted
            holding.prepend_requests(list(self.kv_holding_waiting))
            self.waiting, self.kv_holding_waiting = waiting, holding


class AsyncProbeScheduler(ProbeScheduler, AsyncScheduler):
    """The same on vLLM's asynchronous scheduler (chosen by ProbeScheduler itself)."""
