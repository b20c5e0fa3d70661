"""Adapters found by name in folders the operator named (`--adapter-dir`), as vLLM's filesystem resolver.

A request for a name the registry does not hold looks for `<dir>/<name>/` in each dir in turn and registers
the PEFT folder it finds there, read in place (never copied into the store), under the confinement of
`--preload-dir`: the name is a plain adapter name (no '..'), and the folder and its files resolve under the
dir. A name found nowhere, or whose folder leads out of its dir, is unknown like any other
(AdapterNotFound); a folder that is there but holds no valid adapter is refused as an upload would be.
Nothing is ever downloaded.

A dir may also be a Hugging Face hub cache (`~/.cache/huggingface/hub`): a request for `org/name` (or
`org--name`, as the cache spells it) finds `<dir>/models--org--name/snapshots/<commit>/`, the commit that
`refs/main` names, else the only snapshot there, and is served as `org--name` (an adapter name has no '/').
The snapshot's files are links into the cache's `blobs/`, which lie inside the dir.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from adapters.confined import check_adapter_folder
from adapters.errors import AdapterExists, AdapterInvalid, AdapterNotFound
from adapters.format import Adapter, read_peft_folder, validate_name
from adapters.peft_config import CONFIG_FILE
from adapters.registry import NameLocks

log = logging.getLogger(__name__)

HUB_PREFIX = "models--"  # a hub cache's folder of a model repository: models--<org>--<name>


def served_name(name: str) -> str:
    """The name an adapter requested as a hub repository (`org/name`) is registered under: `org--name`."""
    return name.replace("/", "--", 1) if name.count("/") == 1 else name


class AdapterDirs:
    def __init__(self, registry, dirs: list[Path], max_bytes: int):
        self.registry = registry
        self.dirs = [Path(d) for d in dirs]
        self.max_bytes = max_bytes
        self._loading = NameLocks()
        for folder in self.dirs:
            if not folder.is_dir():
                log.warning("--adapter-dir %s is not a folder (yet): names are looked up there as requested", folder)

    def resolve(self, name: str) -> Adapter:
        """The adapter registered under `name`, registering it from a dir if it is not yet. Reads files:
        call it off the event loop. Concurrent calls for one name read and register it once."""
        not_found = AdapterNotFound(f"adapter {name!r} is not registered")
        name = served_name(name)
        try:
            validate_name(name)
        except AdapterInvalid:
            raise not_found from None
        with self._loading.one_at_a_time(name):
            if name in self.registry:  # registered while this call waited for the one before it
                return self.registry.get(name)
            folder = self._find(name)
            if folder is None:
                raise not_found
            adapter = read_peft_folder(folder, name)
            try:
                self.registry.add(adapter, persist=False)
            except AdapterExists:  # an upload of that name won the race: it is the one served
                return self.registry.get(name)
            log.info("adapter %r registered from %s", name, folder)
            return adapter

    def _find(self, name: str) -> Path | None:
        """The real path of `<dir>/<name>`, else of its hub cache snapshot, in the first dir that has either
        as a confined PEFT folder."""
        for root in self.dirs:
            for folder in (root / name, hub_snapshot(root / f"{HUB_PREFIX}{name}")):
                if folder is None or not os.path.lexists(folder / CONFIG_FILE):
                    continue
                try:
                    return check_adapter_folder(folder, [root], self.max_bytes)
                except AdapterInvalid:  # leads out of the dir, or a file is missing or not a regular file
                    log.warning("adapter dir %s: %r is not a PEFT folder inside it; not served", root, name)
        return None


def hub_snapshot(repo: Path) -> Path | None:
    """The snapshot of a hub cache's repository folder that `refs/main` names, else its only one; None when
    there is neither (several snapshots and no ref: which one is meant is not ours to guess)."""
    try:
        commit = (repo / "refs" / "main").read_text().strip()
    except (OSError, UnicodeDecodeError):
        commit = None
    if commit:
        return repo / "snapshots" / commit if _is_commit_hash(commit) else None
    try:
        snapshots = [entry for entry in os.scandir(repo / "snapshots") if entry.is_dir()]
    except OSError:
        return None
    return Path(snapshots[0].path) if len(snapshots) == 1 else None


def _is_commit_hash(commit: str) -> bool:
    # a ref's content becomes a path component: a hex commit hash only, so it cannot walk elsewhere
    return 7 <= len(commit) <= 64 and all(c in "0123456789abcdef" for c in commit)
