"""The agents' attach streams: the hub that tracks them and sends their commands."""
