"""What ckptd knows and keeps across restarts: the store (memory + SQLite), its writer thread,
serialization, and derived names (what an instance serves, layouts)."""
