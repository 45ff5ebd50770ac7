"""vLLM general plugin (entry point `vllm.general_plugins`: ckptd = vllm_ext.plugin:register):
registers the `ckptd` weight-transfer backend (vllm_ext.transfer_engine) in every vLLM
process, lazily (nothing is imported until an engine asks for the backend)."""

from __future__ import annotations

BACKEND = "ckptd"


def register() -> None:
    try:
        from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
    except ImportError:  # a vLLM without the weight-transfer API: the extension path only
        return
    if BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(
            BACKEND, "vllm_ext.transfer_engine", "CkptdWeightTransferEngine"
        )
