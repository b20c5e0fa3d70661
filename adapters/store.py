"""Adapters on disk: each adapter version is one PEFT folder, and each name a link to its live version.

`<root>/<name>` is a symbolic link to `.versions/<uuid>-<name>`, a folder written and fsynced whole before
any link points at it and never changed after. A save creates the name's link, so a racing save of the same
name fails; a replace points a new link at its new version and renames it over the old link. That rename is
the one step readers can see, and it is atomic: a reader in any process finds the old complete version or
the new one, never neither. A delete renames the link away first, for the same reason.

A version is removed only after no link points at it, so a reader that resolved a version and then finds
its files gone was overtaken by a replace, and `read` reads the new version. `clean_leftovers` finishes what
a crash interrupted: it drops unfinished saves and versions no link points at, so the acknowledged version
of every name is what remains, and it turns plain folders (an older layout, or one put there by hand) into
a version and a link.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from adapters.chat_template import TEMPLATE_FILE
from adapters.errors import AdapterExists, AdapterInvalid, AdapterNotFound, LoraplexError
from adapters.format import CARD_FILE, WEIGHTS_FILE, validate_name
from adapters.peft_config import CONFIG_FILE

STORED_FILES = frozenset({CONFIG_FILE, WEIGHTS_FILE, CARD_FILE, TEMPLATE_FILE})
VERSIONS = ".versions"
QUARANTINE = ".quarantine"
_LEFTOVER_PREFIXES = (".tmp-", ".trash-")
_OLD_PREFIX = ".old-"
_UUID_HEX = 32

T = TypeVar("T")


class AdapterStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.root / validate_name(name)

    def names(self) -> list[str]:
        # Adapter names start with a letter or digit, so ".versions", ".tmp-*" and the like never clash; a
        # link whose version is gone is a delete or quarantine in progress, not an adapter.
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def version(self, name: str) -> str | None:
        """The live version of `name`, as a folder relative to the root; None when it is not stored."""
        path, seen = self.path(name), None
        while True:
            try:
                version = os.readlink(path)
            except FileNotFoundError:
                return None
            except OSError:  # not a link: a plain folder is its own version until clean_leftovers adopts it
                return name if path.is_dir() else None
            if (self.root / version).is_dir():
                return version
            if version == seen:  # still pointing at nothing: a delete or quarantine under way
                return None
            seen = version  # a replace removed the version between our two looks: look at the link again

    def read(self, name: str, read_folder: Callable[[Path], T]) -> tuple[str, T] | None:
        """`read_folder` applied to the live version of `name`, with that version; None when it is not stored."""
        version = self.version(name)
        while version is not None:
            try:
                return version, read_folder(self.root / version)
            except (OSError, LoraplexError):
                latest = self.version(name)
                if latest == version:  # nothing replaced it while we read: the version itself is at fault
                    raise
                version = latest
        return None

    def save(self, name: str, files: dict[str, bytes], replace: bool = False) -> Path:
        target = self.path(name)
        unexpected = set(files) - STORED_FILES
        if unexpected:
            raise AdapterInvalid(f"the store keeps only {sorted(STORED_FILES)}, not {sorted(unexpected)}")
        if target.exists() and not replace:
            raise AdapterExists(f"adapter {name!r} is already stored")
        version = self._new_version(name)
        try:
            for file_name, data in files.items():
                _write_synced(self.root / version / file_name, data)
            _fsync_dir(self.root / version)
            _fsync_dir(self.root / VERSIONS)
            previous = self._link_over(target, version) if replace else self._link(target, version)
        except BaseException:
            shutil.rmtree(self.root / version, ignore_errors=True)
            raise
        _fsync_dir(self.root)
        if previous is not None:
            self._remove_version(previous)
        return target

    def delete(self, name: str) -> None:
        target = self.path(name)
        if not target.is_dir():
            raise AdapterNotFound(f"adapter {name!r} is not stored")
        trash = self.root / f".trash-{uuid.uuid4().hex}"
        try:
            os.rename(target, trash)
        except FileNotFoundError as e:  # another process deleted it first
            raise AdapterNotFound(f"adapter {name!r} is not stored") from e
        _fsync_dir(self.root)
        self._remove(trash)

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
        os.rename(self._version_folder(source) or source, dest)
        if source.is_symlink():  # its version moved first, so the name already reads as missing
            source.unlink()
        _fsync_dir(self.root)
        return dest

    def clean_leftovers(self) -> None:
        """At start-up, before any reader: finish or undo whatever a crash interrupted (see the module doc)."""
        for entry in self._entries(lambda p: not p.name.startswith(".") and p.is_symlink() and not p.exists()):
            entry.unlink()  # a delete or quarantine that stopped after moving the version away
        for entry in self._entries(lambda p: p.name.startswith(_OLD_PREFIX)):
            live = self.root / entry.name[len(_OLD_PREFIX) + _UUID_HEX + 1:]
            if os.path.lexists(live):
                shutil.rmtree(entry)
            else:  # an adoption stopped between its renames: the plain folder is the acknowledged version
                os.rename(entry, live)
                _fsync_dir(self.root)
        for entry in self._entries(lambda p: p.name.startswith(_LEFTOVER_PREFIXES)):
            self._remove(entry)
        for entry in self._entries(lambda p: not p.name.startswith(".") and p.is_dir() and not p.is_symlink()):
            self._adopt(entry)
        linked = {os.readlink(p) for p in self._entries(lambda p: not p.name.startswith(".") and p.is_symlink())}
        for version in self._versions():
            if f"{VERSIONS}/{version.name}" not in linked:  # an unfinished save, or one replaced before a crash
                shutil.rmtree(version, ignore_errors=True)

    # ---- versions and links

    def _new_version(self, name: str) -> str:
        version = f"{VERSIONS}/{uuid.uuid4().hex}-{name}"
        (self.root / VERSIONS).mkdir(exist_ok=True)
        (self.root / version).mkdir()
        return version

    def _link(self, target: Path, version: str) -> None:
        try:
            os.symlink(version, target)
        except FileExistsError as e:  # a racing save of the same name got there first
            raise AdapterExists(f"adapter {target.name!r} is already stored") from e

    def _link_over(self, target: Path, version: str) -> str | None:
        """Points `target` at `version` in one rename; returns the version it pointed at before. Two replaces
        of one name racing may both return the same previous version: the other's then waits for
        clean_leftovers."""
        if target.is_dir() and not target.is_symlink():
            self._adopt(target)
        previous = self.version(target.name)
        link = self.root / f".tmp-{uuid.uuid4().hex}"
        os.symlink(version, link)
        try:
            os.replace(link, target)
        except BaseException:
            link.unlink(missing_ok=True)
            raise
        return previous

    def _adopt(self, folder: Path) -> None:
        """A plain folder becomes a version and a link. Readers may find no adapter between the two renames,
        which is why clean_leftovers adopts every such folder at start-up, before any reader runs."""
        version = self._new_version(folder.name)
        for file in folder.iterdir():
            if file.is_file():
                os.link(file, self.root / version / file.name)  # the same bytes, nothing copied
        _fsync_dir(self.root / version)
        old = self.root / f"{_OLD_PREFIX}{uuid.uuid4().hex}-{folder.name}"
        os.rename(folder, old)
        os.symlink(version, folder)
        _fsync_dir(self.root)
        shutil.rmtree(old)

    def _version_folder(self, link: Path) -> Path | None:
        """The version folder a link of ours points at; None for anything else, which the store never removes
        through a link."""
        if not link.is_symlink():
            return None
        version = os.readlink(link)
        head, _, folder = version.partition("/")
        return self.root / version if head == VERSIONS and folder and "/" not in folder else None

    def _remove_version(self, version: str) -> None:
        if version.startswith(f"{VERSIONS}/"):  # never a plain folder, nor one a hand-made link points at
            shutil.rmtree(self.root / version, ignore_errors=True)

    def _remove(self, entry: Path) -> None:
        if (version := self._version_folder(entry)) is not None:
            shutil.rmtree(version, ignore_errors=True)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()

    def _versions(self) -> list[Path]:
        folder = self.root / VERSIONS
        return list(folder.iterdir()) if folder.is_dir() else []

    def _entries(self, keep: Callable[[Path], bool]) -> list[Path]:
        return [entry for entry in self.root.iterdir() if keep(entry)]


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
