"""The episode store: one ``ep_NNNNNN.npz`` per episode, checked, listed and loaded by name.

Generic in the keys it reads, so the same helpers serve collected episodes (frames, actions,
rewards, dones, seed) and encoded latents (mu, logvar, actions, rewards, dones).
"""
from __future__ import annotations

import ast
import dataclasses
import logging
import os
import re
import struct
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from extensions.serializers import NpzLoadError, SafeNpz

from ..base.errors import UserError
from ..base.storage import atomic_savez

log = logging.getLogger(__name__)

EPISODE_KEYS: tuple[str, ...] = ("frames", "actions", "rewards", "dones", "seed")
_NAME = re.compile(r"^ep_(\d{6,})\.npz$")
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # zip local file header, 30 bytes


class CorruptEpisode(UserError):
    """An episode file that cannot be read: truncated, not an npz, or missing a key."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"corrupt episode file {self.path}: {reason}")


@dataclasses.dataclass(frozen=True)
class Member:
    """Where one array of an npz lives: shape, dtype and, when stored uncompressed, its byte offset."""

    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int | None  # None when the member is compressed (no direct reads)

    @property
    def nbytes(self) -> int:
        """Size of the array's data in bytes."""
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def episode_name(index: int) -> str:
    """File name of episode ``index``."""
    return f"ep_{index:06d}.npz"


def episode_path(folder: str | os.PathLike, index: int) -> Path:
    """Path of episode ``index`` in ``folder``."""
    return Path(folder) / episode_name(index)


def episode_index(path: str | os.PathLike) -> int:
    """The index encoded in an episode file's name."""
    m = _NAME.match(Path(path).name)
    if m is None:
        raise ValueError(f"not an episode file name: {path}")
    return int(m.group(1))


def list_episodes(folder: str | os.PathLike) -> list[Path]:
    """Episode files in ``folder``, sorted by index (temp files of unfinished writes excluded)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    paths = [p for p in folder.iterdir() if _NAME.match(p.name)]
    return sorted(paths, key=episode_index)


def save_episode(path: str | os.PathLike, compress: bool = False, **arrays: np.ndarray) -> Path:
    """Write one episode atomically; uncompressed by default, so readers can read members in place."""
    return atomic_savez(path, compress=compress, **arrays)


def _parse_npy_header(raw: bytes, path: Path, name: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, header length) of a .npy member from its first bytes."""
    if raw[:6] != b"\x93NUMPY":
        raise CorruptEpisode(path, f"member {name!r} is not a .npy array")
    major = raw[6]
    if major == 1:
        (hlen,) = struct.unpack("<H", raw[8:10])
        start = 10
    elif major in (2, 3):
        (hlen,) = struct.unpack("<I", raw[8:12])
        start = 12
    else:
        raise CorruptEpisode(path, f"member {name!r} has unknown .npy version {major}")
    text = raw[start:start + hlen]
    if len(text) < hlen:
        raise CorruptEpisode(path, f"member {name!r} has a truncated .npy header")
    try:
        header = ast.literal_eval(text.decode("latin1"))
        dtype = np.dtype(header["descr"])
        shape = tuple(int(s) for s in header["shape"])
    except (ValueError, SyntaxError, KeyError, TypeError) as e:
        raise CorruptEpisode(path, f"member {name!r} has an unreadable .npy header ({e})") from None
    if header.get("fortran_order"):
        raise CorruptEpisode(path, f"member {name!r} is Fortran-ordered (not written by wm-trainer)")
    if dtype.hasobject:
        raise CorruptEpisode(path, f"member {name!r} holds Python objects")
    return shape, dtype, start + hlen


def scan_episode(path: str | os.PathLike, keys: Sequence[str] | None = None) -> dict[str, Member]:
    """Check an episode file's structure without reading its data; raise CorruptEpisode if broken.

    Verifies the zip directory (lost when a file is truncated), that every requested key is
    present, and that each member's data lies inside the file. Returns each member's layout.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as raw, zipfile.ZipFile(raw) as zf:
            infos = {info.filename[:-4]: info for info in zf.infolist() if info.filename.endswith(".npy")}
            missing = [k for k in (keys or ()) if k not in infos]
            if missing:
                raise CorruptEpisode(path, f"missing key(s) {', '.join(missing)} (has {', '.join(sorted(infos))})")
            members = {}
            for name in (keys if keys is not None else sorted(infos)):
                info = infos[name]
                if info.compress_type == zipfile.ZIP_STORED:
                    raw.seek(info.header_offset)
                    fields = _LOCAL_HEADER.unpack(raw.read(_LOCAL_HEADER.size))
                    if fields[0] != b"PK\x03\x04":
                        raise CorruptEpisode(path, f"member {name!r} has a damaged zip header")
                    data_start = info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10]
                    raw.seek(data_start)
                    shape, dtype, hlen = _parse_npy_header(raw.read(256), path, name)
                    offset = data_start + hlen
                    member = Member(shape, dtype, offset)
                    if offset + member.nbytes > size or hlen + member.nbytes != info.file_size:
                        raise CorruptEpisode(path, f"member {name!r} is truncated")
                else:
                    with zf.open(info) as f:
                        shape, dtype, _ = _parse_npy_header(f.read(256), path, name)
                    member = Member(shape, dtype, None)
                members[name] = member
            return members
    except CorruptEpisode:
        raise
    except FileNotFoundError:
        raise CorruptEpisode(path, "file not found") from None
    except (zipfile.BadZipFile, OSError, EOFError, struct.error, ValueError) as e:
        raise CorruptEpisode(path, f"not a readable npz ({type(e).__name__}: {e})") from None


def load_episode(path: str | os.PathLike, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Load an episode's arrays (all, or only ``keys``); CorruptEpisode names a bad file."""
    path = Path(path)
    if not path.is_file():
        raise CorruptEpisode(path, "file not found")
    try:
        with SafeNpz(path) as z:
            names = list(z.files)
            wanted = list(keys) if keys is not None else names
            missing = [k for k in wanted if k not in names]
            if missing:
                raise CorruptEpisode(path, f"missing key(s) {', '.join(missing)} (has {', '.join(sorted(names))})")
            return {k: z[k] for k in wanted}
    except NpzLoadError as e:
        raise CorruptEpisode(path, f"key {e.key!r}: {e.reason}" if e.key else e.reason) from None


def warn_corrupt(err: CorruptEpisode) -> None:
    """Tell the user, by file name, that a corrupt episode is being skipped."""
    msg = f"skipping {err}"
    log.warning(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def iter_valid_episodes(folder: str | os.PathLike | Iterable[str | os.PathLike],
                        keys: Sequence[str] | None = None) -> Iterator[tuple[Path, dict[str, np.ndarray]]]:
    """Yield ``(path, arrays)`` for each readable episode; corrupt files are warned about by name and skipped."""
    paths = list_episodes(folder) if isinstance(folder, (str, os.PathLike)) else [Path(p) for p in folder]
    for path in paths:
        try:
            data = load_episode(path, keys)
        except CorruptEpisode as e:
            warn_corrupt(e)
            continue
        yield path, data
