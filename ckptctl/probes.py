"""Moved to ckpt_client.probes (the client is its own package): kept for one release."""

import sys

from ckpt_client import probes as _moved

sys.modules[__name__] = _moved
