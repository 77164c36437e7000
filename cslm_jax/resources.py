"""Files shipped with the package: the bundled YAML configs.

The repository keeps them in its top-level `configs/`; installed, they are package data of
`cslm_jax.configs` (pyproject.toml maps the folder there), so `config_path` finds them the same
way from a wheel, an editable install or a git URL install, wherever the command runs from.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def config_path(*parts: str) -> Path:
    """The bundled config `parts` (e.g. `config_path("data", "demo.yaml")`), as a file path.

    A real path, not a resource handle: configs name others by relative path (`base: demo.yaml`,
    `data: {config: data/demo.yaml}`), which the loaders resolve against the file's folder.
    """
    path = files("cslm_jax.configs").joinpath(*parts)
    if not isinstance(path, Path):
        raise RuntimeError(
            f"cslm_jax's bundled configs are not files on disk ({path!r}); "
            f"install the package unzipped (pip does)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"no bundled config {'/'.join(parts)} in {path.parent}")
    return path
