"""Moved to ckpt_client.direct_push (the client is its own package): kept for one release."""

import sys

from ckpt_client import direct_push as _moved

sys.modules[__name__] = _moved
