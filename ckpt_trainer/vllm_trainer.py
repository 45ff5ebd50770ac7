"""vLLM's trainer-side weight-transfer API with ckptd behind it: code written for
`WeightTransferTrainerFactory.trainer_init(...)` / `engine.send_weights()` switches by the
init info it passes.

    import ckpt_trainer.vllm_trainer  # registers the "ckptd" trainer backend
    info = CkptdTrainerInitInfo("policy", instances=["vllm-0"], rank=dist.get_rank())
    engine = WeightTransferTrainerFactory.trainer_init(info, client=None, source=source)
    engine.send_weights()        # every rank: materialize; rank 0 publishes the next version

ckptd drives the inference engines itself (through the agents, and vLLM's native API for
engines on the `ckptd` backend), so the vLLM client is not used: pass None, or the client
you have. Every rank iterates the source in lockstep (materializing a DTensor is a
collective); only rank 0 publishes. With `sharded=True` nothing is gathered: every rank
publishes its own shards of a ModuleSource's parameters into its node's host stores, and
ckptd commits the version once all ranks are in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from vllm.distributed.weight_transfer.base import TrainerInitInfo, TrainerWeightTransferEngine
from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

from ckpt_common.credentials import Credentials
from ckpt_trainer.publisher import JobOutcome, Publisher, PublishResult

BACKEND = "ckptd"


@dataclass
class CkptdTrainerInitInfo(TrainerInitInfo):
    backend: ClassVar[str] = BACKEND
    checkpoint: str = "policy"
    instances: list[str] = field(default_factory=list)
    addr: str = ""  # ckptd host:port; "": CKPTD_ADDR or the default
    token_file: str = ""  # "": CKPTD_TOKEN_FILE / CKPTD_TOKEN / ckptd's local admin token
    tls_ca: str = ""  # "": CKPTD_TLS_CA
    keep: int = 2
    dtype: str | None = None
    start_version: int = 0  # 0: one past the newest version ckptd holds
    # every rank pushes its own shards (DTensor local pieces) into its node's host stores,
    # nothing is gathered (Publisher(sharded=True)); rank 0 updates the instances
    sharded: bool = False


class UpdateFailed(RuntimeError):
    pass


class CkptdTrainerWeightTransferEngine(TrainerWeightTransferEngine[CkptdTrainerInitInfo]):
    init_info_cls = CkptdTrainerInitInfo

    def __init__(self, *, client: Any, source: Any, is_sender: bool, info: Any) -> None:
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.info = info
        self.publisher: Publisher | None = None
        self.version = 0
        self.last: PublishResult | None = None

    @classmethod
    def trainer_init(
        cls, init_info: CkptdTrainerInitInfo, *, client: Any, source: Any = None
    ) -> CkptdTrainerWeightTransferEngine:
        sender = init_info.is_sender or init_info.sharded
        engine = cls(client=client, source=source, is_sender=sender, info=init_info)
        if engine.is_sender:
            kw: dict[str, Any] = {"addr": init_info.addr} if init_info.addr else {}
            kw["credentials"] = Credentials(
                token_file=init_info.token_file, tls_ca=init_info.tls_ca
            )
            engine.publisher = Publisher(
                init_info.checkpoint,
                instances=init_info.instances,
                keep=init_info.keep,
                dtype=init_info.dtype,
                sharded=init_info.sharded,
                **kw,
            )
            held = [c.version for c in engine.publisher.client.checkpoints(init_info.checkpoint)]
            engine.version = (init_info.start_version or max(held, default=0) + 1) - 1
        return engine

    def send_weights(self) -> None:
        if self.source is None:
            raise ValueError("the ckptd trainer backend sends a WeightSource: pass source=")
        module = getattr(self.source, "_module", None)
        if self.info.sharded and module is not None:  # local shards, no gather
            tensors = dict(module.named_parameters())
        else:  # every rank: the gathers are collectives
            tensors = {name: t for name, t in self.source}
        if not self.is_sender:
            return
        assert self.publisher is not None
        self.version += 1
        self.last = self.publisher.publish(self.version, tensors)
        if self.last.state not in (JobOutcome.SUCCEEDED, JobOutcome.NOT_RUN):
            raise UpdateFailed(f"{self.info.checkpoint}@{self.version}: {self.last.reason}")

    def shutdown(self) -> None:
        if self.publisher is not None:
            self.publisher.close()


if BACKEND not in WeightTransferTrainerFactory._registry:
    WeightTransferTrainerFactory.register_engine(BACKEND, CkptdTrainerWeightTransferEngine)
