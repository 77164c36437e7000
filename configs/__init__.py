"""The bundled YAML configs. Installed as package data of `cslm_jax.configs` (pyproject.toml maps
this folder there); `cslm_jax.resources.config_path("data", "demo.yaml")` finds a file here."""
