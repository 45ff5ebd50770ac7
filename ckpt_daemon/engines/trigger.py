"""Triggers inference engines to take an update from their agent workers.

INSTANCE_RECEIVER instances drive themselves (they wait on their worker's socket). A vLLM
server (VLLM_SERVER_DEV_MODE=1, --worker-extension-cls vllm_ext.WorkerExtension,
--scheduler-cls vllm_ext.ProbeScheduler) is called over HTTP: pause new work
(`/pause?mode=keep`: queued and running requests are kept and go on after `/resume`),
`/collective_rpc` of `ckpt_update` on every worker, check every worker's result, run the
version's probe while still paused (ckpt_daemon.engines.probes), record the version
(`/update_weight_version`), resume. An engine whose update failed after it started loading
stays paused: it may hold a mix, and serves again only once a restore (ckpt_daemon.jobs.restore)
brought it back to one version.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

import structlog

from ckpt_common.errors import Aborted, DeadlineExceeded, FailedPrecondition, Unavailable
from ckpt_common.ipc import worker_endpoint
from ckpt_daemon.engines import probes
from ckpt_daemon.engines.http import Signer, bounded, http_json
from ckpt_daemon.engines.keys import EngineKeys
from ckpt_daemon.engines.proof import EngineUnproven, prove
from ckpt_daemon.model import Instance, InstanceKind, Job, Probe
from ckpt_daemon.registry.serving import serving_after
from ckpt_daemon.registry.store import Registry

log = structlog.get_logger("ckptd.engines")
UPDATE_METHOD = "ckpt_update"  # vllm_ext.WorkerExtension.ckpt_update
NATIVE = "ckptd"  # Instance.weight_transfer: vLLM's native API, vllm_ext.transfer_engine
PROBE_TIMEOUT_S = 10.0


class EngineTrigger:
    def __init__(
        self,
        registry: Registry,
        *,
        control_timeout_s: float = 30.0,
        keys: EngineKeys | None = None,
        on_pause: Callable[[str, float], None] | None = None,
    ) -> None:
        """keys: each instance's key, to sign requests for engines behind vllm_ext.guard
        (None: requests go unsigned). on_pause(instance, seconds): how long an engine was
        paused (metrics)."""
        self._registry = registry
        self._on_pause = on_pause
        self._control_timeout = control_timeout_s
        self._keys = keys

    def endpoints(self, instance: Instance) -> list[str]:
        out = []
        for r in instance.ranks:
            agent = self._registry.agent(r.node_id)
            out.append(worker_endpoint(r.node_id, r.device, agent.ipc_dir if agent else None))
        return out

    async def signer(self, instance: Instance, timeout: float) -> Signer | None:
        """Signs requests for the instance's engine once it proved it holds the instance's
        key (nothing signed goes to an endpoint before). Raises EngineUnproven, OSError."""
        if self._keys is None:
            return None
        key = self._keys.key(instance.name)
        return await asyncio.to_thread(prove, instance.endpoint, key, timeout)

    async def verify(self, instance: Instance, timeout: float = 10.0) -> None:
        """Registration: the engine at the endpoint proves it is the instance's, or a precise
        error (FailedPrecondition, Unavailable, DeadlineExceeded)."""
        if instance.kind != InstanceKind.VLLM or self._keys is None:
            return
        where = f"instance {instance.name!r} at {instance.endpoint}"
        try:
            await self.signer(instance, timeout)
        except EngineUnproven as e:
            raise FailedPrecondition(
                f"{where} did not prove it is the instance's engine: {e}"
            ) from None
        except TimeoutError:
            raise DeadlineExceeded(f"{where} did not answer the proof in time") from None
        except OSError as e:
            raise Unavailable(f"{where} unreachable: {e}") from None

    async def _post(self, url: str, body: dict | None, timeout: float, sign: Signer | None) -> Any:
        return await asyncio.to_thread(http_json, url, body, timeout, "POST", None, sign)

    async def trigger(self, instance: Instance, job: Job, timeout: float) -> None:
        base = instance.endpoint.rstrip("/")
        bind = {"instance": instance.name, "job": job.id}
        ctl = min(self._control_timeout, timeout)
        paused = False
        state = {"committed": False}  # True: on one version (new, or untouched): it may serve
        t_pause = time.monotonic()
        sign: Signer | None = None
        try:
            sign = await self.signer(instance, ctl)
            try:
                await self._post(f"{base}/pause?mode=keep", None, ctl, sign)
                paused = True
            except urllib.error.HTTPError as e:
                if e.code != 404:  # servers without /pause: collective_rpc runs between steps
                    raise
            await self._load_and_prove(instance, job, (timeout, ctl), state, sign)
            state["committed"] = True
        except EngineUnproven as e:  # nothing signed was sent to it
            raise Aborted(
                f"instance {instance.name} at {base} did not prove it is the instance's engine: {e}"
            ) from None
        except urllib.error.HTTPError as e:  # the body is the engine's: never echoed
            path = urllib.parse.urlsplit(e.url or "").path
            raise Aborted(f"instance {instance.name}: HTTP {e.code} from {path}") from None
        except ValueError as e:  # not JSON, or too long
            raise Aborted(f"instance {instance.name}: bad answer: {type(e).__name__}") from None
        except TimeoutError:
            raise DeadlineExceeded(f"instance {instance.name} did not answer in time") from None
        except (urllib.error.URLError, ConnectionError, OSError) as e:
            raise Unavailable(f"instance {instance.name} at {base} unreachable: {e}") from None
        finally:
            if paused and state["committed"]:
                await self.resume(instance, ctl, sign)
                paused_s = time.monotonic() - t_pause
                log.info("engine_paused", seconds=round(paused_s, 4), **bind)
                if self._on_pause is not None:
                    self._on_pause(instance.name, paused_s)
            elif paused:  # it may hold a mix: it serves again only once restored
                log.warning("engine_kept_paused", **bind)

    async def _load_and_prove(
        self,
        instance: Instance,
        job: Job,
        timeouts: tuple[float, float],
        state: dict[str, bool],
        sign: Signer | None,
    ) -> None:
        """Has the paused engine load the job's bytes (vLLM's native weight-transfer API or
        the extension), proves the version with its probe, and names what it now serves."""
        timeout, ctl = timeouts
        base = instance.endpoint.rstrip("/")
        spec = {
            "job_id": job.id,
            "endpoints": self.endpoints(instance),
            "timeout_s": timeout,
            "checkpoint": job.spec.checkpoint,
            "version": job.version,
        }
        version = serving_after(instance, job)  # what it serves once committed
        if instance.weight_transfer == NATIVE:
            await self._load_native(instance, base, spec, (timeout, ctl), state, sign)
            try:
                await self._probe(instance, job, min(ctl, PROBE_TIMEOUT_S), sign)
            except BaseException:  # close vLLM's update session; the version stays old
                with contextlib.suppress(Exception):
                    await self._post(f"{base}/finish_weight_update", {}, ctl, sign)
                raise
            finish = {"weight_version": version}
            await self._post(f"{base}/finish_weight_update", finish, ctl, sign)
        else:
            await self._load_extension(instance, base, spec, timeout, state, sign)
            await self._probe(instance, job, min(ctl, PROBE_TIMEOUT_S), sign)
            await self._post_optional(
                f"{base}/update_weight_version", {"new_version": version}, ctl, sign
            )

    async def _post_optional(
        self, url: str, body: dict, timeout: float, sign: Signer | None
    ) -> None:
        try:
            await self._post(url, body, timeout, sign)
        except urllib.error.HTTPError as e:
            if e.code != 404:
                raise

    async def _load_extension(
        self,
        instance: Instance,
        base: str,
        spec: dict,
        timeout: float,
        state: dict,
        sign: Signer | None,
    ) -> None:
        """The worker extension, through /collective_rpc: every worker answers with a dict."""
        res = await self._post(
            f"{base}/collective_rpc",
            {"method": UPDATE_METHOD, "args": [json.dumps(spec)], "timeout": timeout},
            timeout + 10,
            sign,
        )
        results = (res or {}).get("results") or []
        if len(results) != len(instance.ranks):
            raise Aborted(
                f"instance {instance.name}: {len(results)} workers answered, "
                f"{len(instance.ranks)} expected"
            )
        bad = [r for r in results if not (isinstance(r, dict) and r.get("ok"))]
        # Nothing loaded anywhere (refused before any weight was touched): it can serve.
        state["committed"] = all(isinstance(r, dict) and r.get("touched") is False for r in results)
        if bad:
            r = bad[0]
            reason = r.get("reason") if isinstance(r, dict) else r
            raise Aborted(f"instance {instance.name}: worker failed: {bounded(reason)}")

    async def _load_native(
        self,
        instance: Instance,
        base: str,
        spec: dict,
        timeouts: tuple[float, float],
        state: dict,
        sign: Signer | None,
    ) -> None:
        """vLLM's weight-transfer API with the `ckptd` backend (vllm_ext.transfer_engine).
        timeouts: (the update's, a control call's)."""
        timeout, ctl = timeouts
        state["committed"] = True  # until weights may have been touched
        await self._post(f"{base}/start_weight_update", None, ctl, sign)
        state["committed"] = False
        try:
            info = {"update_info": spec}
            await self._post(f"{base}/update_weights", info, timeout + 10, sign)
        except urllib.error.HTTPError as e:
            # The engine's reason reaches the job from the agent's side; from its answer
            # only our own marker is read: whether any weight was touched.
            body = e.read(4096)
            state["committed"] = b"touched=False" in body
            raise Aborted(
                f"instance {instance.name}: its update failed (HTTP {e.code}"
                f"{', nothing loaded' if state['committed'] else ''}); see the ranks' reasons"
            ) from None

    def probe_of(self, job: Job) -> Probe | None:
        """The probe an update must pass: its version's, when it loads the whole version."""
        if job.spec.tensors:  # a partial update: the engine serves a mix the probe is not for
            return None
        cv = self._registry.checkpoint(job.spec.checkpoint, job.version)
        return cv.probe if cv is not None else None

    async def _probe(
        self, instance: Instance, job: Job, timeout: float, sign: Signer | None
    ) -> None:
        probe = self.probe_of(job)
        if probe is None:
            return
        t0 = time.monotonic()
        miss = await probes.run(instance.endpoint, probe, timeout, sign)
        log.info(
            "probe",
            instance=instance.name,
            job=job.id,
            passed=not miss,
            seconds=round(time.monotonic() - t0, 4),
        )
        if miss:
            raise Aborted(f"instance {instance.name}: {miss}")

    async def alive(self, instance: Instance) -> bool:
        """The engine answers its health check (a restore is pointless otherwise)."""
        if instance.kind != InstanceKind.VLLM:
            return True  # a receiver waits on its worker's socket: the update tells
        try:
            await asyncio.to_thread(
                http_json, f"{instance.endpoint.rstrip('/')}/health", None, 3.0, "GET"
            )
            return True
        except Exception:
            return False

    async def resume(self, instance: Instance, timeout: float, sign: Signer | None) -> None:
        try:
            await self._post(f"{instance.endpoint.rstrip('/')}/resume", None, timeout, sign)
        except Exception as e:  # still report the update's own outcome
            log.error("engine_resume_failed", error=str(e), instance=instance.name)
