"""Pure planning: placement of a checkpoint on ranks, update plans (broadcast, P2P), shard-
aware plans. No I/O."""
