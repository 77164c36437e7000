"""What a speech tokenizer's units are, from wherever a user names the tokenizer.

The codebook size and the unit rate of the units a corpus holds decide the CSLM vocabulary
(`import-hf --speech-tokenizer`) and how a data config validates and times records
(`format.speech_tokenizer`). They are read from, in this order:

- a version name: `v1`, `v1_25hz`, `v2_25hz` (or the official `speech_tokenizer_v1`, ...);
- a tokenizer folder (`cslm-jax import-speech-tokenizer` output: `speech_tokenizer.json`);
- an extraction folder (`cslm-jax extract-units` output: `extract.json` records the tokenizer).

Nothing here imports JAX (nor do the modules whose tables it reads): data configs are
read in Beam workers and before a job starts.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from cslm_jax.errors import CslmError
from cslm_jax.speech.s3 import ALIASES, VERSIONS  # plain tables: s3 imports JAX lazily

# The files that say what a folder is; defined here, the bottom of the speech modules (weights.py
# writes the first, extract.py the second, and both import them from here).
TOKENIZER_FILE = "speech_tokenizer.json"  # a tokenizer folder's version, sizes and rate
EXTRACTION_FILE = "extract.json"  # an extract-units folder's plan (its tokenizer)

UNITS = {k: (v.codebook_size, float(v.units_per_second)) for k, v in VERSIONS.items()}


class SpeechUnitsError(CslmError):
    """A speech tokenizer named by version or folder cannot be resolved; the message says why."""


@dataclasses.dataclass(frozen=True)
class UnitsInfo:
    version: str  # canonical version name (v1, v1_25hz, v2_25hz)
    codebook_size: int
    units_per_second: float
    source: str  # what it was read from (a version name or a file)


def speech_units_info(spec: str | Path, where: str = "speech tokenizer") -> UnitsInfo:
    """The units of the tokenizer `spec` names (a version, a tokenizer or an extraction folder);
    SpeechUnitsError naming `where` and the file otherwise."""
    text = str(spec)
    name = ALIASES.get(text, text)
    if name in UNITS:
        size, rate = UNITS[name]
        return UnitsInfo(name, size, rate, f"version {name}")
    if "://" in text:
        from cslm_jax.storage import fs

        path = fs.path(text, where)
    else:
        path = Path(text).expanduser()
    if not path.is_dir():
        raise SpeechUnitsError(
            f"{where} {text!r}: neither a version ({', '.join(UNITS)}) nor a "
            f"folder (import-speech-tokenizer or extract-units output)"
        )
    for fname, key in ((TOKENIZER_FILE, None), (EXTRACTION_FILE, "tokenizer")):
        f = path / fname
        if not f.is_file():
            continue
        try:
            data = json.loads(f.read_text())
            meta = data if key is None else data[key]
            version = ALIASES.get(meta["version"], meta["version"])
            size, rate = int(meta["codebook_size"]), float(meta["units_per_second"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SpeechUnitsError(
                f"{where}: {f}: cannot read the tokenizer's version, "
                f"codebook_size and units_per_second ({type(e).__name__}: "
                f"{e})"
            ) from None
        if version in UNITS and UNITS[version] != (size, rate):
            raise SpeechUnitsError(
                f"{where}: {f}: version {version} has {UNITS[version][0]} "
                f"codes at {UNITS[version][1]:g}/s, the file says {size} "
                f"at {rate:g}/s"
            )
        return UnitsInfo(version, size, rate, str(f))
    raise SpeechUnitsError(
        f"{where}: {path} holds neither {TOKENIZER_FILE} (a tokenizer folder) "
        f"nor {EXTRACTION_FILE} (an extract-units output folder)"
    )
