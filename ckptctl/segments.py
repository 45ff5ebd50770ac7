"""Moved to ckpt_client.segments (the client is its own package): kept for one release."""

import sys

from ckpt_client import segments as _moved

sys.modules[__name__] = _moved
