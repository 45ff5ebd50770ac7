"""Putting a version into the agents' host stores: file pushes, direct pushes from trainers
(parts, checksums, streaming) and the probes that come with them."""
