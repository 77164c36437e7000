"""Output paths: checked before any work, never overlapping an input, replaced only where ours.

Every command that writes calls `check_output_dir` (a folder it replaces), `check_output_file`
(one file) or `check_output_place` (a folder it resumes into) with its inputs before it loads a
model, reads a corpus or compiles anything. They refuse, with exit 2 and a message naming the
flag:

* an output that is, contains or lies inside an input (`--out .` beside the manifest, an export
  into the checkpoint's own folder, a tokenizer folder inside `--out`; inside an input folder is
  allowed for a new file or a folder nothing replaces: `evaluate --output RUN/eval.json`,
  `decode --output-dir RUN/answers`), or that is or contains the current folder, the home
  folder, a repository root (a folder holding `.git`) or `/`: no `--force` replaces those;
* a file where a folder is meant and a folder where a file is meant;
* an output whose parent cannot be created or written (a file on the way, a read-only file
  system), found by creating and removing a probe file in its nearest existing folder;
* an existing output without `--force`.

`--force` replaces only what the same command wrote. A folder a command writes carries a
marker, `.cslm_jax_output.json`, naming the command and the entries it wrote (`entries: null`
while the command is still writing: everything there is its own). `--force` onto a folder
without the marker, holding entries the marker does not name, or written by another command
(`export-hf --force` onto a training run's `model/`), is refused with what it holds named;
nothing is deleted. `owned=True` is for a folder the caller itself manages (a run folder's
`model/`), which need not carry a marker.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from cslm_jax.errors import OutputExistsError
from cslm_jax.storage import fs

MARKER = ".cslm_jax_output.json"


class OutputPathError(OutputExistsError):
    """An output path overlaps an input, cannot be created, or is the wrong kind of path."""


def _where(flag: str | None, p) -> str:
    return f"{flag} {p}" if flag else str(p)


def _key(p) -> tuple[str, ...]:
    """Path parts to compare: symlinks resolved for local paths, the URL's for remote ones."""
    if fs.is_remote(p):
        scheme, rest = str(p).split("://", 1)
        return (scheme + "://",) + tuple(x for x in rest.split("/") if x)
    return Path(os.path.realpath(os.fspath(p))).parts


def _within(inner: tuple, outer: tuple) -> bool:
    return len(inner) >= len(outer) and inner[: len(outer)] == outer


def _protected() -> list[tuple[str, tuple]]:
    """Folders no output may be or contain: the current folder, home, the root, and the
    repository roots around the current folder."""
    found = [
        ("the current folder", _key(os.getcwd())),
        ("your home folder", _key(Path.home())),
        ("the file system root", _key("/")),
    ]
    here = Path(os.getcwd())
    for d in (here, *here.parents):
        if (d / ".git").exists():
            found.append((f"the repository root {d}", _key(d)))
    return found


def check_disjoint(out, inputs=(), flag: str | None = "--out", inside_ok: bool = False) -> None:
    """Refuse an output that is, contains or (unless `inside_ok`) lies inside any input
    (`inputs`: (flag, path) pairs; None paths are skipped), or that is or contains a protected
    folder. `inside_ok` is for outputs that only add a new file or folder and never replace
    (a decode folder or an evaluation file inside a run folder)."""
    okey = _key(out)
    where = _where(flag, out)
    for what, key in sorted(_protected(), key=lambda x: x[1] != okey):  # "is" before "contains"
        if _within(key, okey):
            verb = "is" if key == okey else "contains"
            raise OutputPathError(
                f"{where}: {verb} {what}; an output gets a folder of its own "
                f"(e.g. {Path(os.fspath(out)) / 'out'}), never one that "
                f"holds other files"
            )
    for iflag, ip in inputs:
        if ip is None or ip == "":
            continue
        ikey = _key(fs.path(ip))
        if okey == ikey:
            rel = "is"
        elif _within(ikey, okey):
            rel = "contains"
        elif _within(okey, ikey) and not inside_ok:
            rel = "lies inside"
        else:
            continue
        raise OutputPathError(
            f"{where}: {rel} the input {_where(iflag, ip)}; give an output "
            f"path apart from every input (nothing was written or deleted)"
        )


def _probe(folder: Path, where: str) -> None:
    """Create and remove a file in `folder`: can this process write there?"""
    try:
        fd, probe = tempfile.mkstemp(prefix=".cslm_jax-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputPathError(f"{where}: cannot write in {folder} ({e.strerror or e})") from None


def check_writable(p, flag: str | None = None, folder: bool = True) -> None:
    """A folder output that exists can be written in; otherwise the nearest existing ancestor
    of `p` is a folder we can create files in (probed by creating and removing a file)."""
    if fs.is_remote(p):
        return  # the bucket was checked; objects need no parent
    where = _where(flag, p)
    path = Path(os.path.abspath(os.fspath(p)))
    if folder and path.is_dir():
        _probe(path, where)
        return
    anc = path.parent
    while not anc.exists() and not anc.is_symlink():
        anc = anc.parent
    if not anc.is_dir():
        raise OutputPathError(
            f"{where}: {anc} is a file, so the {'folder' if folder else 'file'}"
            f" cannot be created under it"
        )
    _probe(anc, where)


def check_output_place(
    p, *, inputs=(), flag: str | None = "--out", folder: bool = True, inside_ok: bool = False
):
    """What every output path needs, whatever it holds: apart from every input and protected
    folder (`check_disjoint`), the right kind (a folder where a folder is meant, a file where a
    file is), and writable (`check_writable`). Returns it as a path. On its own, for commands
    that resume into an existing output (decode, extract-units, train) and so decide about its
    contents themselves."""
    path = fs.path(p, flag)
    fs.check_bucket(path, flag)
    where = _where(flag, path)
    if folder and path.exists() and not path.is_dir():
        raise OutputPathError(f"{where}: is a file, not a folder; give a folder path")
    if not folder and path.is_dir():
        raise OutputPathError(f"{where}: is a folder; {flag or 'the output'} names a file")
    check_disjoint(path, inputs, flag, inside_ok)
    check_writable(path, flag, folder)
    return path


def read_marker(p) -> dict | None:
    m = fs.path(p) / MARKER
    try:
        return json.loads(m.read_text()) if m.exists() else None
    except (OSError, ValueError):
        return None


def write_marker(p, tool: str, entries: list[str] | None = None) -> None:
    """Mark folder `p` as written by `tool`: `entries=None` claims everything in it (while the
    tool is still writing), a list the names it wrote."""
    (fs.path(p) / MARKER).write_text(json.dumps({"tool": tool, "entries": entries}) + "\n")


def mark_entries(p, tool: str) -> None:
    """Write the marker naming every entry `p` holds now (a finished output)."""
    folder = fs.path(p)
    names = sorted(x.name for x in folder.iterdir() if x.name != MARKER)
    write_marker(folder, tool, names)


def foreign_entries(p) -> list[str]:
    """Entries of folder `p` that cslm-jax did not write: all of them without a marker."""
    folder = fs.path(p)
    names = sorted(x.name for x in folder.iterdir() if x.name != MARKER)
    marker = read_marker(folder)
    if marker is None:
        return names
    owned = marker.get("entries")
    if owned is None:
        return []
    return [n for n in names if n not in set(owned)]


def _shown(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def check_output_dir(
    p,
    force: bool,
    *,
    inputs=(),
    flag: str | None = "--out",
    tool: str | None = None,
    owned: bool = False,
):
    """Check folder output `p` (see the module docstring) and return it as a path. A non-empty
    folder is refused unless `force` and it is an output of `tool` (its marker says so and names
    every entry it holds); `owned`: the caller manages the folder and replaces it regardless."""
    path = fs.path(p, flag)
    if path.exists() and not path.is_dir():
        raise OutputPathError(
            f"{_where(flag, path)}: is a file, not a folder; give a folder "
            f"path (--force replaces folders only)"
        )
    check_output_place(path, inputs=inputs, flag=flag)
    where = _where(flag, path)
    if owned or not path.exists() or not any(path.iterdir()):
        return path
    marker = read_marker(path)
    foreign = foreign_entries(path)
    if marker is None:
        raise OutputPathError(
            f"{where}: exists and is not empty ({_shown(foreign)}) and has no "
            f"{MARKER}: written by another program, or by cslm-jax before it "
            f"marked its outputs; --force replaces only what cslm-jax marked as "
            f"its own, so delete it yourself or give another path (nothing was "
            f"deleted)"
        )
    if foreign:
        raise OutputPathError(
            f"{where}: holds files cslm-jax did not write: {_shown(foreign)}; "
            f"--force replaces only what cslm-jax wrote, so move them away or "
            f"give another path (nothing was deleted)"
        )
    if tool is not None and marker.get("tool") != tool:
        raise OutputPathError(
            f"{where}: holds the output of `cslm-jax {marker.get('tool')}`; "
            f"{tool} replaces only its own outputs (--force or not): give "
            f"another path, or delete it yourself (nothing was deleted)"
        )
    if not force:
        raise OutputExistsError(
            f"{where}: exists and is not empty (the output of `cslm-jax "
            f"{marker.get('tool')}`); pass --force to replace it"
        )
    return path


def clear_output(p) -> None:
    """Remove what the marker of folder `p` names (everything, while it claims all), then the
    marker; foreign entries were refused by `check_output_dir` and are left."""
    folder = fs.path(p)
    marker = read_marker(folder)
    if marker is None:
        return
    owned = marker.get("entries")
    for x in list(folder.iterdir()):
        if x.name == MARKER or (owned is not None and x.name not in owned):
            continue
        if x.is_dir() and not os.path.islink(os.fspath(x)):
            fs.rmtree(x)
        else:
            x.unlink()
    (folder / MARKER).unlink()


def check_output_file(p, force: bool, *, inputs=(), flag: str | None = "--output"):
    """Check file output `p`: not a folder, neither an input nor a folder holding one (inside
    an input folder is fine: a new file replaces nothing there), its folder creatable, and not
    an existing file unless `force`. Returns it as a path."""
    path = check_output_place(p, inputs=inputs, flag=flag, folder=False, inside_ok=True)
    if path.exists() and not force:
        raise OutputExistsError(f"{_where(flag, path)}: exists; pass --force to replace it")
    return path
