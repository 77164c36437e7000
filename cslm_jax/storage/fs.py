"""Paths that may be local or in a Google Cloud Storage bucket (`gs://bucket/path`).

Every path a user gives (run folders, checkpoints, data configs and their files, outputs) goes
through `path()`: a local path becomes an absolute `etils.epath.Path` on the local file system,
`gs://bucket/path` an `epath.Path` on GCS, and any other `scheme://` is refused, as is a local path
that is a mangled URL (`gs:/bucket`, what `pathlib` makes of `gs://bucket`): such a path must
never silently become a local folder named `gs:`.

One client for GCS: `epath` through `fsspec`/`gcsfs` (we set `EPATH_USE_TF=false` unless the user
set it; TensorFlow's own GCS file system ignores `STORAGE_EMULATOR_HOST`, so it could not be
tested against a local server, and one client means one set of credentials). Orbax writes array
data through TensorStore's GCS driver (`TENSORSTORE_GCS_HTTP_URL` for another endpoint). With
`STORAGE_EMULATOR_HOST` set (a local fake-gcs-server, as the tests use), `configure_gcs`
points TensorStore at it too and turns off what an emulator lacks (gcsfs' gRPC bucket-layout
probe, real credentials).

Atomicity (`commit_file_mode`): on a local disk a folder is written under a temporary name and
renamed into place. On GCS a "rename" is a copy and delete of every object, and so it is on a
bucket mounted with gcsfuse; there the folder is written in place and a commit marker is written
last, and a folder without its marker is never read as whole. `CSLM_JAX_ATOMICITY=rename|commit_file`
overrides the detection (gcsfuse mounts are found in /proc/mounts).
"""

from __future__ import annotations

import atexit
import contextlib
import fnmatch
import glob as _glob
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import fsspec.config
from etils import epath
from etils.epath import gpath

from cslm_jax.errors import CslmError

REMOTE_SCHEMES = ("gs",)
_ENV_DONE = False


class StorageError(CslmError):
    """A path names unsupported storage, a bucket is missing or not accessible, or a transfer
    failed; the message names the path."""


def configure_gcs() -> None:
    """Set up GCS access once, before the first remote path is used (not on import): epath on
    gcsfs, no listing cache, and with STORAGE_EMULATOR_HOST the emulator defaults. Environment
    variables are only defaults: one the user set is kept."""
    global _ENV_DONE
    if _ENV_DONE:
        return
    _ENV_DONE = True
    os.environ.setdefault("EPATH_USE_TF", "false")
    # epath caches its reading of EPATH_USE_TF on first use of any path, local ones included
    getattr(gpath._is_tf_installed, "cache_clear", lambda: None)()
    # gcsfs caches folder listings per process: another host's (or Orbax's TensorStore) writes
    # would stay invisible (process 1 not seeing process 0's files). Every lookup asks GCS.
    for proto in ("gs", "gcs"):
        fsspec.config.conf.setdefault(proto, {}).setdefault("use_listings_cache", False)
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if emulator:
        url = emulator if "://" in emulator else f"http://{emulator}"
        os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", url)
        # An emulator takes any bearer token; TensorStore would otherwise look for credentials.
        os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
        # gcsfs probes bucket layout over gRPC (Storage Control API), which emulators lack.
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def scheme_of(p) -> str | None:
    s = os.fspath(p) if not isinstance(p, str) else p
    if "://" in s:
        return s.split("://", 1)[0].lower()
    return None


def is_remote(p) -> bool:
    return scheme_of(str(p)) in REMOTE_SCHEMES


def path(p, flag: str | None = None):
    """An `epath.Path` for `p` (str, pathlib.Path or epath.Path): absolute if local. Raises
    StorageError for a scheme we do not support or a mangled URL, naming `flag` if given."""
    if isinstance(p, epath.Path) and not isinstance(p, Path):
        return p
    s = os.fspath(p)
    where = f"{flag} {s}" if flag else s
    scheme = scheme_of(s)
    if scheme is not None:
        if scheme not in REMOTE_SCHEMES:
            raise StorageError(
                f"{where}: {scheme}:// paths are not supported; use a local path or "
                f"gs://bucket/path"
            )
        bucket = s.split("://", 1)[1].split("/", 1)[0]
        if not bucket:
            raise StorageError(f"{where}: no bucket name; write gs://BUCKET/path")
        configure_gcs()
        return epath.Path(s.rstrip("/") if s.count("/") > 3 else s)
    first = s.split("/", 1)[0].lower()
    if first.endswith(":") and first[:-1] in ("gs", "s3", "az", "hf", "http", "https"):
        raise StorageError(
            f"{where}: looks like a URL that lost a slash ({first}//...); write "
            f"{first}//bucket/path"
        )
    return epath.Path(os.path.abspath(s))


def bucket_of(p) -> str:
    return str(p).split("://", 1)[1].split("/", 1)[0]


def check_bucket(p, flag: str | None = None) -> None:
    """For a gs:// path: the bucket exists and can be listed, else a StorageError before any
    work starts (a missing bucket, no permission or no credentials, each said as such)."""
    if not is_remote(p):
        return
    configure_gcs()
    import gcsfs  # heavy: gcsfs (~1 s), only for a gs:// path

    bucket = bucket_of(p)
    where = f"{flag} {p}" if flag else str(p)
    try:
        fs = gcsfs.GCSFileSystem()
        fs.ls(bucket, detail=False)
    except FileNotFoundError:
        raise StorageError(
            f"{where}: bucket gs://{bucket} does not exist (create it, or check the name)"
        ) from None
    except (PermissionError, OSError, ValueError) as e:
        msg = str(e) or type(e).__name__
        code = getattr(e, "code", None)
        if (
            code in (401, 403)
            or isinstance(e, PermissionError)
            or any(w in msg for w in ("Forbidden", "Unauthorized", "ermission", "403", "401"))
        ):
            raise StorageError(
                f"{where}: no permission to read gs://{bucket} ({msg.splitlines()[0]}); "
                f"check the credentials (gcloud auth application-default login, or "
                f"the TPU VM's service account)"
            ) from None
        raise StorageError(f"{where}: cannot reach gs://{bucket}: {msg.splitlines()[0]}") from None


def _gcsfuse_mounts(mounts_file: str = "/proc/mounts") -> list[str]:
    try:
        lines = Path(mounts_file).read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 3 and parts[2] in ("fuse.gcsfuse", "fuse.gcsfuse-fuse"):
            out.append(parts[1].replace("\\040", " "))
    return out


def commit_file_mode(p, mounts_file: str = "/proc/mounts") -> bool:
    """Whether folders under `p` are committed by a marker file written last (GCS, gcsfuse)
    instead of a rename (local disks). CSLM_JAX_ATOMICITY=rename|commit_file overrides."""
    forced = os.environ.get("CSLM_JAX_ATOMICITY", "auto").lower()
    if forced in ("rename", "commit_file"):
        return forced == "commit_file"
    if forced != "auto":
        raise StorageError(f"CSLM_JAX_ATOMICITY is {forced!r}; use auto, rename or commit_file")
    if is_remote(p):
        return True
    target = os.path.abspath(os.fspath(p))
    return any(
        target == m or target.startswith(m.rstrip("/") + "/") for m in _gcsfuse_mounts(mounts_file)
    )


def rmtree(p) -> None:
    """Remove a folder (local or remote) and everything under it; absent is fine."""
    p = path(p)
    if p.exists():
        if p.is_dir():
            p.rmtree()
        else:
            p.unlink()


def listdir(p) -> set[str]:
    p = path(p)
    return {c.name for c in p.iterdir()} if p.is_dir() else set()


def copytree(src, dst) -> None:
    """Copy a folder file by file (local <-> remote in any direction)."""
    src, dst = path(src), path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for child in src.iterdir():
        if child.is_dir():
            copytree(child, dst / child.name)
        else:
            child.copy(dst / child.name, overwrite=True)


def local_dir(p, what: str = "folder") -> Path:
    """A local folder holding `p`'s files: `p` itself when local, else a fresh copy downloaded
    into a temporary folder removed at exit (for libraries that read local files only, such as
    `transformers`' tokenizers and models). Not cached: a replaced remote folder is read anew."""
    if not is_remote(p):
        return Path(os.fspath(p))
    src = path(p)
    if not src.is_dir():
        raise StorageError(f"{p}: no such {what}")
    tmp = Path(tempfile.mkdtemp(prefix="cslm_jax-staged-"))
    atexit.register(shutil.rmtree, tmp, True)
    copytree(src, tmp)
    return tmp


def size_and_mtime(p) -> tuple[int, float]:
    """(bytes, modification time) of a local or gs:// file: what a cache key needs to notice a
    changed input."""
    if not is_remote(p):
        st = os.stat(os.fspath(p))
        return st.st_size, st.st_mtime
    st = path(p).stat()
    return int(st.length), float(st.mtime)


def upload_dir(local_src, dst) -> None:
    """Copy a local folder's files to `dst` (local or remote)."""
    copytree(path(local_src), path(dst))


# -- data files: the data-preparation path's reads, writes, listings and atomic writes ------------
# Paths are strings: a local path, a `file://` URL (a local file, what `prepare-data` has always
# accepted for inputs, tokenizer and --out) or a `gs://` object. Local paths (and file://) stay on
# plain `open` / `os` (the speed-critical path); gs:// goes through the one client above.


def local_file(p) -> str | None:
    """The local path of `p` (a `file://` URL's path), or None for a gs:// path; another scheme
    is refused (StorageError)."""
    s = os.fspath(p) if not isinstance(p, str) else p
    scheme = scheme_of(s)
    if scheme is None:
        return s
    if scheme == "file":
        return s[len("file://") :]
    path(s)  # gs:// set up, any other scheme refused
    return None


def open_file(p, mode: str = "rb"):
    """`open(p, mode)` for a local path or file:// URL; the GCS client's file object for gs://
    (written objects appear whole when closed)."""
    local = local_file(p)
    if local is not None:
        return open(local, mode, **({} if "b" in mode else {"encoding": "utf-8"}))
    return path(p).open(mode)


def exists(p) -> bool:
    local = local_file(p)
    return os.path.exists(local) if local is not None else path(p).exists()


def makedirs(p) -> None:
    """A local folder and its parents (gs:// has no folders: nothing to do)."""
    local = local_file(p)
    if local is not None:
        os.makedirs(local, exist_ok=True)


def file_size(p) -> int:
    local = local_file(p)
    return os.path.getsize(local) if local is not None else int(path(p).stat().length)


def glob(pattern: str) -> list[str]:
    """The paths matching `pattern` (wildcards in its last part only), sorted, spelled as the
    pattern is (gs://..., file://...). A plain local pattern is Python's glob (dot files only by
    an explicit dot); a URL's lists the folder (dot files included)."""
    local = local_file(pattern)
    if "://" not in pattern:
        return sorted(_glob.glob(pattern))
    folder, name = pattern.rsplit("/", 1)
    if local is not None:
        base = local_file(folder)
        names = os.listdir(base) if os.path.isdir(base) else []
    else:
        d = path(folder)
        names = [c.name for c in d.iterdir()] if d.is_dir() else []
    return sorted(f"{folder}/{n}" for n in names if fnmatch.fnmatchcase(n, name))


def remove(p) -> None:
    """Remove a file or a folder and everything under it; absent is fine."""
    local = local_file(p)
    if local is None:
        rmtree(p)
    elif os.path.isdir(local):
        shutil.rmtree(local)
    elif os.path.lexists(local):
        os.unlink(local)


@contextlib.contextmanager
def atomic_open(p, mode: str = "w", tmp_name=None):
    """A file `p` written whole or not at all. Local: written to a sibling (`tmp_name(name)`, by
    default `name.tmp-XXXXXXXX`), flushed to disk (fsync) and renamed over `p`; on an error the
    sibling is removed. gs://: one object upload (atomic already: the object appears when the
    file is closed); on an error the object is removed."""
    local = local_file(p)
    if local is None:
        f = path(p).open(mode)
        try:
            yield f
        except BaseException:
            with contextlib.suppress(Exception):
                f.close()
                path(p).unlink()
            raise
        f.close()
        return
    folder, name = os.path.split(local)
    tmp = os.path.join(folder, tmp_name(name) if tmp_name else f"{name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, local)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text_atomic(p, text: str, tmp_name=None) -> None:
    """`text` (UTF-8) into `p`, whole or not at all (`atomic_open`)."""
    with atomic_open(p, "w", tmp_name) as f:
        f.write(text)


def stage_files(src, names, dst) -> None:
    """Copy the files `names` of the folder `src` (local, file:// or gs://) into the local
    folder `dst`, each written whole (for readers of local files only, such as tf.data)."""
    os.makedirs(dst, exist_ok=True)
    for n in names:
        with open_file(f"{src}/{n}", "rb") as f, atomic_open(os.path.join(dst, n), "wb") as g:
            shutil.copyfileobj(f, g, 8 << 20)
