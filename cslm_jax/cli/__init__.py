"""The cslm-jax command line (main)."""
