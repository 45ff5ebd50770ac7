"""ckptctl: the operator CLI and the Python client of ckptd's API. No torch at import."""
