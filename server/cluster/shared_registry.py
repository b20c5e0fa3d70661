"""A cluster replica's adapter registry: the shared store is the truth, memory holds a bounded cache of it.

Every replica reads and writes one store directory. A replica keeps in memory only the adapters its router
asked it to hold (`hold`/`release`, driven by Ray Serve's multiplexing LRU) and the pinned ones registered
at start-up (the shipped adapters, `persist=False`). Every lookup reads which version of the adapter the
store holds: the store publishes each save and replace as a new version folder and points the name at it
in one rename, and deletes by taking the name away, so a changed version means another replica changed the
adapter and no version means it was deleted. A replica therefore notices every upload, replace and delete
on its next request, with no messages between replicas, and never misses an adapter while it is replaced.
"""

from __future__ import annotations

import dataclasses
import logging

from adapters import Adapter, AdapterRegistry, peft_folder_files, read_peft_folder, validate
from server.errors import AdapterExists, AdapterInvalid, AdapterNotFound, AdapterTooLarge, LoraplexError

log = logging.getLogger(__name__)

Stamp = str  # the store's version of an adapter: a folder name no other save ever gets


class SharedStoreRegistry(AdapterRegistry):
    def __init__(self, store, base, limits):
        super().__init__(store, base, limits)
        self._pinned: dict[str, Adapter] = {}
        # held names -> stamp of their copy in self._adapters (None: no copy yet); self._adapters holds only those
        self._stamps: dict[str, Stamp | None] = {}
        self._catalogue: dict[str, tuple[Stamp, Adapter]] = {}  # weight-free entries for listings

    def load_stored(self) -> list[str]:
        # Adapters load on demand. Leftovers of interrupted saves are cleaned once by the launcher: a
        # replica cleaning at start-up could delete another replica's upload in progress.
        return []

    # ---- what the router asks this replica to hold

    def hold(self, name: str) -> None:
        """Keep a current copy of `name` in memory from now on (a name not stored yet is simply tracked)."""
        with self._lock:
            self._stamps.setdefault(name, None)
        try:
            self.get(name)
        except LoraplexError:
            pass  # unknown, deleted or invalid: the request itself gets the error

    def release(self, name: str) -> None:
        with self._lock:
            if self._stamps.pop(name, False) is not False:
                self._retire(self._adapters.pop(name, None))

    # ---- the AdapterRegistry interface the routes use

    def get(self, name: str) -> Adapter:
        stamp = self._stamp(name)
        if stamp is None:
            with self._lock:
                self._forget_copy(name)
                pinned = self._pinned.get(name)
            if pinned is None:
                raise AdapterNotFound(f"adapter {name!r} is not registered")
            return pinned
        with self._lock:
            if self._stamps.get(name) == stamp:
                return self._adapters[name]
        stamp, adapter = self._read(name)
        with self._lock:
            if name in self._stamps:
                self._retire(self._adapters.get(name))
                self._adapters[name], self._stamps[name] = adapter, stamp
        return adapter

    def list(self) -> list[Adapter]:
        """Every stored and pinned adapter, without weights (listings need only the metadata)."""
        stored = self.store.names()
        entries = []
        for name in sorted(set(stored) | set(self._pinned)):
            try:
                entries.append(self._describe(name))
            except (LoraplexError, OSError) as e:  # deleted meanwhile, or a broken entry
                log.warning("stored adapter %r not listed: %s", name, e)
        with self._lock:
            for gone in set(self._catalogue) - set(stored):
                del self._catalogue[gone]
        return entries

    def add(self, adapter: Adapter, persist: bool = True) -> None:
        validate(adapter, self.base, self.limits)
        with self._lock:
            self._check_room(adapter.name)
            self._check_memory(adapter)
            if persist:
                self.store.save(adapter.name, peft_folder_files(adapter))
            else:
                self._pinned[adapter.name] = adapter

    def _held(self) -> list[Adapter]:
        # the pinned adapters and the copies the router asked for (at most --adapters-per-replica)
        return [*self._pinned.values(), *self._adapters.values()]

    def register_upload(self, name, files, rank=None, alpha=None, replace=False) -> Adapter:
        adapter = super().register_upload(name, files, rank, alpha, replace)
        with self._lock:  # the store has it now; a held name is re-read, in case another replica replaces it
            self._forget_copy(name)
        return adapter

    def remove(self, name: str) -> Adapter:
        with self._lock:
            if name in self._pinned and not self.store.path(name).is_dir():
                raise AdapterInvalid(f"adapter {name!r} was registered at start-up on every replica (--preload-dir); "
                                     "remove it from that folder and restart instead")
            self.store.delete(name)  # AdapterNotFound when it is not stored
            removed = self._adapters.get(name)
            self._forget_copy(name)
            self._catalogue.pop(name, None)
        return removed

    def __contains__(self, name) -> bool:
        return name in self._pinned or self._stamp(name) is not None

    def __len__(self) -> int:
        return len(set(self.store.names()) | set(self._pinned))

    def _check_room(self, name: str, replace: bool = False) -> None:
        # Called under self._lock. Counts the whole store, so max_adapters holds across replicas (up to
        # uploads racing on different replicas).
        if name in self._pinned or self.store.path(name).is_dir():
            if replace:
                return
            raise AdapterExists(f"adapter {name!r} is already registered (upload with replace=true to swap it)")
        count = len(set(self.store.names()) | set(self._pinned))
        if count >= self.limits.max_adapters:
            raise AdapterTooLarge(f"registry full: {count} adapters registered (max_adapters="
                                  f"{self.limits.max_adapters}); remove one first")

    # ---- store access

    def _stamp(self, name: str) -> Stamp | None:
        try:
            return self.store.version(name)
        except AdapterInvalid:  # a name the store could never hold
            return None

    def _read(self, name: str) -> tuple[Stamp, Adapter]:
        """The live version's stamp and adapter; a replace while reading yields the new version."""
        found = self.store.read(name, lambda folder: read_peft_folder(folder, name))
        if found is None:
            raise AdapterNotFound(f"adapter {name!r} is not registered")
        validate(found[1], self.base, self.limits)
        return found

    def _describe(self, name: str) -> Adapter:
        stamp = self._stamp(name)
        if stamp is None:
            return self.get(name)  # pinned, or AdapterNotFound
        with self._lock:
            cached = self._catalogue.get(name)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        stamp, adapter = self._read(name)
        entry = dataclasses.replace(adapter, weights={})
        with self._lock:
            self._catalogue[name] = (stamp, entry)
        return entry

    def _forget_copy(self, name: str) -> None:
        """Under self._lock: drops the copy in memory; a held name is read from the store again on next use."""
        self._retire(self._adapters.pop(name, None))
        if name in self._stamps:
            self._stamps[name] = None
