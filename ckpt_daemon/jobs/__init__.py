"""A job's life: resolve (version, targets) -> choose the plan (shard-aware, P2P, broadcast,
streamed) -> execute on the agents -> settle (instances, restore)."""
