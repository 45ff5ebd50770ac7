"""Moved to ckpt_client.client (the client is its own package): kept for one release."""

import sys

from ckpt_client import client as _moved

sys.modules[__name__] = _moved
