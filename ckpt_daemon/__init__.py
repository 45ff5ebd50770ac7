"""ckptd: the coordinator. Imports neither torch nor vLLM."""

__version__ = "0.1.0"
