"""The trainer SDK: publish a model's weights to a fleet in one call.

    from ckpt_trainer import Publisher
    pub = Publisher("policy", instances=["vllm-0"], keep=2, dtype="bf16")
    result = pub.publish(step, model)            # push, update, prune old versions
    assert result.state is JobOutcome.SUCCEEDED

`AsyncPublisher` is the same for asyncio trainers. Imports no torch at package import.
"""

from __future__ import annotations

from ckpt_trainer.publisher import AsyncPublisher, JobOutcome, Publisher, PublishResult

__all__ = ["AsyncPublisher", "JobOutcome", "PublishResult", "Publisher"]
