"""Adapters found by name in folders the operator named (`--adapter-dir`), as vLLM's filesystem resolver.

A request for a name the registry does not hold looks for `<dir>/<name>/` in each dir in turn and registers
the PEFT folder it finds there, read in place (never copied into the store), under the confinement of
`--preload-dir`: the name is a plain adapter name (no '/', no '..'), and the folder and its files resolve
under the dir. A name found nowhere, or whose folder leads out of its dir, is unknown like any other
(AdapterNotFound); a folder that is there but holds no valid adapter is refused as an upload would be.
Nothing is ever downloaded.
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
        """The real path of `<dir>/<name>` in the first dir that has it as a confined PEFT folder."""
        for root in self.dirs:
            if not os.path.lexists(root / name / CONFIG_FILE):
                continue
            try:
                return check_adapter_folder(root / name, [root], self.max_bytes)
            except AdapterInvalid:  # leads out of the dir, or a file is missing or not a regular file
                log.warning("adapter dir %s: %r is not a PEFT folder inside it; not served", root, name)
        return None
