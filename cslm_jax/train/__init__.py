"""Training: optimizer and the accumulated step (step), the resumable run (loop), glibc tuning for XLA:CPU (cpu_malloc)."""
