"""The Python client of ckptd: the gRPC client (`ckpt_client.client.Client`), the direct push
of in-memory tensors into the agents' host stores (`direct_push`, `d2h`, `segments`) and
probes (`probes`). Used by ckptctl (the CLI), the trainer SDK (ckpt_trainer) and vllm_ext.
Imports nothing heavy: torch is imported only by the calls that move tensors."""
