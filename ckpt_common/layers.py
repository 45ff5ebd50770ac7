"""Which module (layer) a tensor belongs to, as engines group tensors for loading."""

from __future__ import annotations

import re

_LAYER_RE = re.compile(r"^(.*?\.(?:layers|layer|h|blocks|block)\.\d+)\.")


def layer_key(name: str) -> str:
    """'model.layers.12.mlp.up_proj.weight' -> 'model.layers.12';
    'model.norm.weight' -> 'model.norm'."""
    m = _LAYER_RE.match(name)
    if m:
        return m.group(1)
    return name.rsplit(".", 1)[0] if "." in name else name
