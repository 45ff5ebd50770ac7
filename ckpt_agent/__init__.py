"""ckpt-agent: one per node; one worker process per device."""

__version__ = "0.1.0"
