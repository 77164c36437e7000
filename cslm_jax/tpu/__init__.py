"""TPU: ahead-of-time compiles of the train step for a slice (aot)."""
