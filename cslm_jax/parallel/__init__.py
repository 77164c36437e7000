"""Parallelism: the device mesh and logical-axis sharding rules (sharding), multi-host jobs (distributed)."""
