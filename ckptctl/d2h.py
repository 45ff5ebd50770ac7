"""Moved to ckpt_client.d2h (the client is its own package): kept for one release."""

import sys

from ckpt_client import d2h as _moved

sys.modules[__name__] = _moved
