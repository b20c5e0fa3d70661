"""Adapters on disk: one PEFT folder per adapter under a root directory.

Saves are atomic: files go into a ".tmp-<uuid>" directory, are fsynced, and the directory is renamed
into place, so a crash leaves either the old state or the new one, plus a leftover that
`clean_leftovers` removes on the next start. Deletes rename first for the same reason.

A replace moves the live folder aside to ".old-<uuid>-<name>" and renames the new one into place. A crash
between the two renames leaves no live folder; `clean_leftovers` then moves the old one back, so the last
acknowledged version survives.
"""

import errno
import os
import shutil
import uuid
from pathlib import Path

from adapters.format import WEIGHTS_FILE, validate_name
from adapters.peft_config import CONFIG_FILE
from server.errors import AdapterExists, AdapterInvalid, AdapterNotFound

STORED_FILES = frozenset({CONFIG_FILE, WEIGHTS_FILE})
_LEFTOVER_PREFIXES = (".tmp-", ".trash-")
_OLD_PREFIX = ".old-"
_UUID_HEX = 32
QUARANTINE = ".quarantine"


class AdapterStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.root / validate_name(name)

    def names(self) -> list[str]:
        # Adapter names start with a letter or digit, so ".tmp-*", ".trash-*" and ".quarantine" never clash.
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def save(self, name: str, files: dict[str, bytes], replace: bool = False) -> Path:
        target = self.path(name)
        unexpected = set(files) - STORED_FILES
        if unexpected:
            raise AdapterInvalid(f"the store keeps only {sorted(STORED_FILES)}, not {sorted(unexpected)}")
        if target.exists() and not replace:
            raise AdapterExists(f"adapter {name!r} is already stored")
        tmp = self.root / f".tmp-{uuid.uuid4().hex}"
        try:
            tmp.mkdir()
            for file_name, data in files.items():
                _write_synced(tmp / file_name, data)
            _fsync_dir(tmp)
            if replace and target.exists():
                self._swap_in(tmp, target)
            else:
                os.rename(tmp, target)
        except OSError as e:
            # Renaming onto a non-empty directory fails, so a racing save of the same name cannot clobber.
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise AdapterExists(f"adapter {name!r} is already stored") from e
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _fsync_dir(self.root)
        return target

    def _swap_in(self, tmp: Path, target: Path) -> None:
        old = self.root / f"{_OLD_PREFIX}{uuid.uuid4().hex}-{target.name}"
        os.rename(target, old)
        os.rename(tmp, target)
        _fsync_dir(self.root)
        shutil.rmtree(old, ignore_errors=True)

    def delete(self, name: str) -> None:
        target = self.path(name)
        if not target.is_dir():
            raise AdapterNotFound(f"adapter {name!r} is not stored")
        trash = self.root / f".trash-{uuid.uuid4().hex}"
        os.rename(target, trash)
        _fsync_dir(self.root)
        shutil.rmtree(trash)

    def quarantine(self, name: str) -> Path:
        """Move a stored entry that failed to load out of the way, keeping it for a human to inspect."""
        source = self.root / name
        if "/" in name or name.startswith(".") or not source.exists():
            raise AdapterNotFound(f"adapter {name!r} is not stored")
        folder = self.root / QUARANTINE
        folder.mkdir(exist_ok=True)
        dest = folder / name
        if dest.exists():
            dest = folder / f"{name}-{uuid.uuid4().hex[:8]}"
        os.rename(source, dest)
        _fsync_dir(self.root)
        return dest

    def clean_leftovers(self) -> None:
        for entry in self.root.iterdir():
            if entry.name.startswith(_OLD_PREFIX):
                live = self.root / entry.name[len(_OLD_PREFIX) + _UUID_HEX + 1:]
                if live.exists():
                    shutil.rmtree(entry)
                else:  # a replace stopped between its two renames: the old version is the acknowledged one
                    os.rename(entry, live)
                    _fsync_dir(self.root)
                continue
            if entry.name.startswith(_LEFTOVER_PREFIXES):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    # A rename is durable only once the directory holding the entry is synced.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
