"""Frozen, versioned assets shipped inside the package, and the atomic file writes that build them.

The micro world's tokenizer, SFT policy (= the reference policy pi_ref) and, later, its reward model
are built once by ``rlhf-zoo build-assets`` and then *frozen*: every result in the zoo is measured
against them, so they must be bit-identical on every machine. They live in
``envs/assets/<version>/`` (installed as ``rlhfgym/envs/assets/<version>/``) next to a
``manifest.json`` that records the sha256 and size of every file, the command and seed that built
them, and the package version. Loading verifies the checksums once per process, so a truncated
download or a hand-edited file fails loudly instead of silently shifting every number.

A version never changes meaning: a new tokenizer or policy is a new version (``micro-v1``).

Layout of one version::

    micro-v0/
      manifest.json        written last by write_manifest(); lists every other file
      tokenizer/           PreTrainedTokenizerFast files
      sft/                 causal LM in save_pretrained format (pi_ref)
      reward/ reward_fact/ preference/ judge/   feedback models (envs/build/feedback.py); may be absent

Writes are atomic (temp file or temp dir in the same directory, then rename), so an interrupted
build leaves either the old asset or the new one, never half of each.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

__all__ = [
    "ASSETS_ROOT",
    "DEFAULT_VERSION",
    "KNOWN_VERSIONS",
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "COMPONENTS",
    "FEEDBACK_COMPONENTS",
    "AssetError",
    "MicroAssets",
    "asset_dir",
    "atomic_save_dir",
    "atomic_write_bytes",
    "atomic_write_text",
    "available_versions",
    "clear_cache",
    "device_string",
    "load_micro_assets",
    "sha256_file",
    "verify_manifest",
    "write_manifest",
]

#: where versions live inside the installed package
ASSETS_ROOT = Path(__file__).resolve().parent / "assets"
DEFAULT_VERSION = "micro-v0"
#: versions this release knows how to build; listed as available even before they are built
KNOWN_VERSIONS = ("micro-v0",)
MANIFEST_NAME = "manifest.json"
#: bump when the manifest's layout changes; readers refuse other formats
MANIFEST_FORMAT = 1
#: the sub-directories an asset version may hold
#: the feedback models (built by envs/build/feedback.py), in build order
FEEDBACK_COMPONENTS = ("reward", "reward_fact", "preference", "judge")
COMPONENTS = ("tokenizer", "sft", *FEEDBACK_COMPONENTS)

_CHUNK = 1 << 20


class AssetError(RuntimeError):
    """A frozen asset is missing, corrupted, of another format, or was asked for under an unknown version."""


def _fix_hint(version: str) -> str:
    return f"reinstall rlhf-gym or rebuild with `rlhf-zoo build-assets --version {version}`"


# --------------------------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    """Persist a rename: on POSIX the directory entry is only durable once the directory is synced."""
    if os.name != "posix":
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (e.g. certain network mounts) refuse fsync on directories
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _umask_modes(root: Path) -> None:
    """Give ``root`` and everything under it the modes ``mkdir``/``open`` would (0777/0666 less the umask;
    files with an owner execute bit keep it)."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(Path(dirpath) / name, 0o777 & ~mask)
        for name in filenames:
            p = Path(dirpath) / name
            if not p.is_symlink():
                os.chmod(p, (0o777 if p.stat().st_mode & 0o100 else 0o666) & ~mask)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` so readers see either the old file or the complete new one.

    The bytes go to a temp file in the same directory (same filesystem, so the final ``os.replace``
    is atomic), are fsynced, and then renamed over ``path``. Parent directories are created.
    Returns ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o777  # keep the permissions of the file we replace
    except FileNotFoundError:
        mode = 0o666 & ~_umask()  # mkstemp creates 0600; a new file gets the mode open() would give it
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """:func:`atomic_write_bytes` for text (UTF-8 by default; newlines are written as given)."""
    return atomic_write_bytes(path, text.encode(encoding))


@contextlib.contextmanager
def atomic_save_dir(target_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Build a directory in a temp dir next to ``target_dir`` and move it into place only on success.

    ::

        with atomic_save_dir(out / "sft") as tmp:
            model.save_pretrained(tmp)

    If the body raises, the temp dir is deleted and ``target_dir`` is left exactly as it was.
    On success an existing ``target_dir`` is renamed aside, the new one renamed in, and the old one
    deleted; if the second rename fails the old directory is put back. (Two renames are not one
    atomic step, but no reader ever sees a half-written directory.)
    """
    target = Path(target_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old: Path | None = None
    try:
        _umask_modes(tmp)  # mkdtemp creates 0700 and some writers (safetensors) 0600 files
        if target.exists() or target.is_symlink():
            old = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.old"
            os.rename(target, old)
        try:
            os.rename(tmp, target)
        except BaseException:
            if old is not None:
                os.rename(old, target)  # put the previous version back
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(target.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# manifests
# --------------------------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _listed_files(root: Path) -> list[str]:
    """Relative POSIX paths of every file under ``root`` except the top-level manifest, sorted.

    Hidden names (``.sft.x1y2.tmp`` left by a killed build, ``.DS_Store``) and ``__pycache__`` are
    skipped: the wheel's package-data globs do not ship them either, so listing them would make
    every installed copy fail verification.
    """
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for name in filenames:
            if name.startswith("."):
                continue
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel != MANIFEST_NAME:
                out.append(rel)
    return sorted(out)


def _dist_version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def device_string() -> str:
    """A human-readable description of the machine, e.g. ``cuda:NVIDIA H100 80GB HBM3`` or ``cpu:x86_64``."""
    torch = sys.modules.get("torch")  # only ask torch if the builder already imported it
    if torch is not None:
        try:
            if torch.cuda.is_available():
                return f"cuda:{torch.cuda.get_device_name(torch.cuda.current_device())}"
        except Exception:  # a broken driver must not stop a CPU build from writing its manifest
            pass
    return f"cpu:{platform.machine() or 'unknown'}"


def write_manifest(
    asset_dir: str | os.PathLike[str],
    command: str | Sequence[str],
    seed: int | None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``asset_dir/manifest.json`` describing every other file in the directory; return it.

    Records ``format``, ``package``/``package_version``, ``asset_version`` (the directory name),
    ``command`` (a string; a list is shell-quoted), ``seed``, ``created`` (UTC ISO 8601),
    ``built_on`` (device string), ``python`` and the versions of torch/transformers/tokenizers,
    then ``files``: ``{relative/posix/path: {"sha256": ..., "size": ...}}``. Keys of ``extra`` are
    added at the top level and may override the defaults above, except ``format`` and ``files``.
    Call it last, after every file is in place.
    """
    root = Path(asset_dir)
    if not root.is_dir():
        raise AssetError(f"cannot write a manifest: {root} is not a directory; build the assets into it first.")
    extra = dict(extra or {})
    reserved = {"format", "files"} & extra.keys()
    if reserved:
        raise ValueError(f"write_manifest(extra=...) may not set {sorted(reserved)}; they are computed from the files.")
    if not isinstance(command, str):
        command = shlex.join(str(c) for c in command)
    files = {}
    for rel in _listed_files(root):
        p = root / rel
        files[rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "package": "rlhf-gym",
        "package_version": _dist_version("rlhf-gym"),
        "asset_version": root.name,
        "command": command,
        "seed": seed,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "built_on": device_string(),
        "python": platform.python_version(),
        "libraries": {name: _dist_version(name) for name in ("torch", "transformers", "tokenizers")},
    }
    manifest.update(extra)
    manifest["files"] = files
    atomic_write_text(root / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def _read_manifest(root: Path, version: str) -> dict[str, Any]:
    path = root / MANIFEST_NAME
    if not path.is_file():
        what = "directory does not exist" if not root.exists() else f"{MANIFEST_NAME} is missing"
        raise AssetError(f"assets {version!r} at {root} are not usable: {what}; {_fix_hint(version)}.")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AssetError(f"{path} is corrupted (not valid JSON: {e}); {_fix_hint(version)}.") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise AssetError(f"{path} is corrupted (no 'files' table); {_fix_hint(version)}.")
    fmt = manifest.get("format")
    if fmt != MANIFEST_FORMAT:
        direction = (
            "upgrade rlhf-gym to read it, or rebuild"
            if isinstance(fmt, int) and fmt > MANIFEST_FORMAT
            else "rebuild it"
        )
        raise AssetError(
            f"{path} has manifest format {fmt!r} but this rlhf-gym reads format {MANIFEST_FORMAT}; "
            f"{direction} with `rlhf-zoo build-assets --version {version}`."
        )
    return manifest


def verify_manifest(asset_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Check every file listed in ``asset_dir/manifest.json`` (size, then sha256); return the manifest.

    Raises :class:`AssetError` naming each missing or corrupted file and how to fix it. Files that
    are present but not listed are ignored (they are simply not part of the frozen asset).
    """
    root = Path(asset_dir)
    version = root.name
    manifest = _read_manifest(root, version)
    missing, corrupted = [], []
    for rel, entry in manifest["files"].items():
        rel_path = Path(rel)
        if rel_path.is_absolute() or ".." in rel_path.parts:
            raise AssetError(f"{root / MANIFEST_NAME} lists an unsafe path {rel!r}; {_fix_hint(version)}.")
        p = root / rel_path
        if not p.is_file():
            missing.append(rel)
        elif p.stat().st_size != entry.get("size") or sha256_file(p) != entry.get("sha256"):
            corrupted.append(rel)
    if missing or corrupted:
        parts = []
        for label, names in (("missing", missing), ("corrupted (checksum mismatch)", corrupted)):
            if names:
                shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
                parts.append(f"{label}: {shown}")
        raise AssetError(f"assets {version!r} at {root} failed verification: {'; '.join(parts)}; {_fix_hint(version)}.")
    return manifest


# --------------------------------------------------------------------------------------------
# locating and loading versions
# --------------------------------------------------------------------------------------------


def available_versions() -> list[str]:
    """Versions this install knows: the built-in ones plus any version directory present."""
    found = set(KNOWN_VERSIONS)
    if ASSETS_ROOT.is_dir():
        found.update(p.name for p in ASSETS_ROOT.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    return sorted(found)


def asset_dir(version: str = DEFAULT_VERSION, *, must_exist: bool = True) -> Path:
    """Directory of asset ``version`` inside the installed package.

    An unknown version raises :class:`AssetError` listing the available ones. With
    ``must_exist=False`` (for builders) a known version that has not been built yet is fine.
    """
    versions = available_versions()
    if version not in versions or not version or "/" in version or "\\" in version:
        raise AssetError(f"unknown asset version {version!r}; available: {', '.join(versions)}.")
    path = ASSETS_ROOT / version
    if must_exist and not path.is_dir():
        raise AssetError(f"assets {version!r} are not built (no directory {path}); {_fix_hint(version)}.")
    return path


@dataclass(frozen=True)
class MicroAssets:
    """Verified paths of one asset version. Components that were never built keep their path but
    :meth:`require` refuses them."""

    version: str
    root: Path
    tokenizer_dir: Path
    sft_dir: Path
    reward_dir: Path
    judge_dir: Path
    preference_dir: Path
    #: components with at least one file listed in the (verified) manifest
    components: frozenset[str] = field(default_factory=frozenset)
    manifest: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False, hash=False)

    def has(self, name: str) -> bool:
        """Whether component ``name`` (e.g. ``"reward"``) was built and verified."""
        return name in self.components

    def require(self, name: str) -> Path:
        """Path of component ``name``; :class:`AssetError` if it is not part of this version."""
        if name not in COMPONENTS:
            raise AssetError(f"unknown asset component {name!r}; components are {', '.join(COMPONENTS)}.")
        if name not in self.components:
            raise AssetError(
                f"asset component {name!r} is not built in {self.version!r} at {self.root}; build it with "
                f"`rlhf-zoo build-assets --version {self.version} --only {name}`."
            )
        return self.root / name


_cache: dict[tuple[str, int, int], MicroAssets] = {}
_cache_lock = threading.Lock()


def clear_cache() -> None:
    """Forget which asset directories were verified (the next load re-hashes them)."""
    with _cache_lock:
        _cache.clear()


def load_micro_assets(version: str = DEFAULT_VERSION, *, root: str | os.PathLike[str] | None = None) -> MicroAssets:
    """Verify asset ``version`` (once per process) and return its paths.

    ``root`` loads a version directory somewhere else (e.g. one built with ``--out``); its name is
    then taken as the version. Verification is cached per directory and manifest, so rebuilding in
    the same process (a new manifest) triggers a fresh check.
    """
    if root is None:
        base = asset_dir(version, must_exist=False)  # verify_manifest explains a missing directory
    else:
        base = Path(root)
        version = base.name
    base = base.resolve()
    try:
        st = (base / MANIFEST_NAME).stat()
        key = (str(base), st.st_ino, st.st_mtime_ns)
    except FileNotFoundError:
        key = None  # verify_manifest raises the explanatory error below
    with _cache_lock:
        if key is not None and key in _cache:
            return _cache[key]
        manifest = verify_manifest(base)
        components = frozenset(rel.split("/", 1)[0] for rel in manifest["files"] if "/" in rel)
        assets = MicroAssets(
            version=version,
            root=base,
            tokenizer_dir=base / "tokenizer",
            sft_dir=base / "sft",
            reward_dir=base / "reward",
            judge_dir=base / "judge",
            preference_dir=base / "preference",
            components=components & frozenset(COMPONENTS),
            manifest=manifest,
        )
        if key is not None:
            _cache[key] = assets
        return assets
