"""The registry: which adapters this server can serve, by name.

It owns the in-memory name -> Adapter map and keeps it in step with the store: an adapter is in the
map only after it parsed, validated against the base and (when persisted) reached the disk. Uploads are
parsed outside the lock, so a large upload never blocks lookups from the engine.

Memory is a tier over the store (`AdapterLimits.max_resident`): past that many adapters in memory, or past
max_total_bytes of their weights, the least recently used stored one gives up its weights and keeps only a
weight-free entry (for listings); `get` reads it back from the store, one read per name at a time, outside
the lock. A replace or remove changes the
entry under the lock, and a read back is kept only if the entry is still the one it started from, so a
read overtaken by either is dropped rather than resurrecting or reviving an old version. Adapters
registered without a copy in the store (`persist=False`) stay in memory.
"""

import contextlib
import logging
import tempfile
import threading
import weakref
from collections import OrderedDict, deque
from dataclasses import replace as with_fields
from pathlib import Path

from adapters.chat_template import TEMPLATE_FILE, template_from_files
from adapters.errors import (
    AdapterExists, AdapterInvalid, AdapterNotFound, AdapterTooLarge, AdapterUnreadable, LoraplexError,
)
from adapters.format import (
    CARD_FILE, WEIGHTS_FILE, Adapter, AdapterLimits, BaseShapes, peft_folder_files, raw_to_peft_files,
    parse_card, read_peft_folder, read_raw_safetensors, validate, validate_name,
)
from adapters.peft_config import CONFIG_FILE
from adapters.store import AdapterStore

log = logging.getLogger(__name__)

_PEFT_FILES = {CONFIG_FILE, WEIGHTS_FILE}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# Text that save_pretrained (of an adapter, a tokenizer) writes beside the adapter: uploaded with a folder as
# saved and dropped rather than refused, once README.md is kept as the card and a chat template (in
# chat_template.jinja or tokenizer_config.json) as the adapter's own.
_DROPPED_SUFFIXES = (".md", ".txt", ".json", ".jinja")
# A safetensors header (names, dtypes, offsets) and the JSON config are small next to the weights;
# this slack lets uploads near max_bytes through while refusing huge ones before parsing them.
_HEADER_SLACK_BYTES = 1024 * 1024


class AdapterRegistry:
    def __init__(self, store: AdapterStore, base: BaseShapes, limits: AdapterLimits):
        self.store = store
        self.base = base
        self.limits = limits
        self._adapters: OrderedDict[str, Adapter] = OrderedDict()  # in memory, least recently used first
        self._evicted: dict[str, Adapter] = {}  # registered, weights only in the store: weight-free entries
        self._unstored: set[str] = set()  # registered with persist=False: never evicted, nothing to read back
        self._lock = threading.Lock()
        self._reading = NameLocks()
        # Versions removed or replaced, for whoever holds copies of their weights (the engine's device
        # slots) to drop them; weak, so that nothing is kept alive for a reader that never comes.
        self.retired: deque[weakref.ref] = deque(maxlen=4096)

    def load_stored(self) -> list[str]:
        """Load every stored adapter; one that no longer loads is quarantined rather than stopping start-up."""
        self.store.clean_leftovers()
        loaded = []
        for name in self.store.names():
            if name in self:
                continue
            if len(self) >= self.limits.max_adapters:
                log.warning("registry full (max_adapters=%d): stored adapter %r not loaded",
                            self.limits.max_adapters, name)
                continue
            try:
                self._add(read_peft_folder(self.store.path(name), name), save=False)
            except AdapterTooLarge as e:  # over this server's limits, not broken: kept for a server with room
                log.warning("stored adapter %r not loaded: %s", name, e)
                continue
            except (LoraplexError, OSError) as e:
                dest = self.store.quarantine(name)
                log.warning("stored adapter %r failed to load and was moved to %s: %s", name, dest, e)
                continue
            loaded.append(name)
        return loaded

    def register_upload(self, name: str, files: dict[str, bytes], rank: int | None = None,
                        alpha: float | None = None, replace: bool = False) -> Adapter:
        """Parses, validates, stores and registers an upload. With replace=True an existing adapter of that
        name is swapped for the new version atomically; requests already running keep the old one."""
        validate_name(name)
        files, card, template = _split_upload(files)
        raw = _is_raw_upload(files, rank, alpha)
        with self._lock:
            self._check_room(name, replace)
        if sum(len(data) for data in files.values()) > self.limits.max_bytes + _HEADER_SLACK_BYTES:
            raise AdapterTooLarge(f"upload for {name!r} is larger than the limit of {self.limits.max_bytes} bytes")
        with tempfile.TemporaryDirectory(prefix="loraplex-upload-") as tmp:
            adapter, stored_files = _parse_upload(Path(tmp), name, files, raw, rank, alpha)
        if card is not None:
            adapter, stored_files = with_fields(adapter, card=card), {**stored_files, CARD_FILE: card.encode()}
        if template is not None:
            adapter = with_fields(adapter, chat_template=template)
            stored_files = {**stored_files, TEMPLATE_FILE: template.encode()}
        validate(adapter, self.base, self.limits)
        with self._lock:
            self._check_room(name, replace)
            self._check_memory(adapter)
            self.store.save(name, stored_files, replace=replace)
            self._retire(self._adapters.get(name))
            self._evicted.pop(name, None)
            self._unstored.discard(name)
            self._keep(adapter)
        return adapter

    def add(self, adapter: Adapter, persist: bool = True) -> None:
        """Registers `adapter`, saving it to the store unless persist=False (then it has no copy there)."""
        self._add(adapter, save=persist, stored=persist)

    def _add(self, adapter: Adapter, save: bool, stored: bool = True) -> None:
        validate(adapter, self.base, self.limits)
        with self._lock:
            self._check_room(adapter.name)
            self._check_memory(adapter)
            if save:
                self.store.save(adapter.name, peft_folder_files(adapter))
            if not stored:
                self._unstored.add(adapter.name)
            self._keep(adapter)

    def _keep(self, adapter: Adapter) -> None:
        """Under self._lock: `adapter` in memory as its name's most recent use, evicting past the limits."""
        self._adapters[adapter.name] = adapter
        self._adapters.move_to_end(adapter.name)
        limits = self.limits
        if limits.max_resident is None:
            return
        count, held = len(self._adapters), sum(a.held_bytes for a in self._adapters.values())
        for name in [n for n in self._adapters if n not in self._unstored and n != adapter.name]:
            if count <= limits.max_resident and held <= limits.max_total_bytes:
                break
            old = self._adapters.pop(name)
            self._evicted[name] = with_fields(old, weights={})
            self._retire(old)  # no request can ask for this object again: its device slot may go
            count, held = count - 1, held - old.held_bytes

    def _check_room(self, name: str, replace: bool = False) -> None:
        if name in self._adapters or name in self._evicted:
            if replace:
                return
            raise AdapterExists(f"adapter {name!r} is already registered (upload with replace=true to swap it)")
        if len(self._adapters) + len(self._evicted) >= self.limits.max_adapters:
            raise AdapterTooLarge(
                f"registry full: {len(self._adapters) + len(self._evicted)} adapters registered (max_adapters="
                f"{self.limits.max_adapters}); remove one first"
            )

    def _check_memory(self, adapter: Adapter) -> None:
        """Under self._lock: refuses an adapter that would take the held weights past max_total_bytes. A
        replace counts only the difference: the old version goes once the requests using it finish. With a
        memory tier, the stored adapters in memory make room by leaving it, so only the others count."""
        held = [a for a in self._held() if self.limits.max_resident is None or a.name in self._unstored]
        old = next((a for a in held if a.name == adapter.name), None)
        held = sum(a.held_bytes for a in held) - (old.held_bytes if old else 0)
        if held + adapter.held_bytes > self.limits.max_total_bytes:
            raise AdapterTooLarge(
                f"adapter memory full: {adapter.name!r} needs {adapter.held_bytes} bytes and the registered "
                f"adapters hold {held} of max_total_bytes={self.limits.max_total_bytes}; remove one first"
            )

    def _held(self) -> list[Adapter]:
        """The adapters whose weights this registry holds in memory."""
        return list(self._adapters.values())

    def get(self, name: str) -> Adapter:
        """The adapter with its weights, read back from the store if they are not in memory (file reads: call
        it off the event loop unless `get_resident` said no read is needed)."""
        with self._lock:
            adapter = self._touch(name)
        if adapter is not None:
            return adapter
        with self._reading.one_at_a_time(name):
            while True:  # again under the name's lock: another call may have read it back meanwhile
                with self._lock:
                    adapter = self._touch(name)
                    entry = self._evicted.get(name)
                if adapter is not None:
                    return adapter
                if entry is None:
                    raise AdapterNotFound(f"adapter {name!r} is not registered")
                adapter = self._read_back(name)
                with self._lock:
                    if self._evicted.get(name) is entry:  # not replaced or removed while it was read
                        del self._evicted[name]
                        self._keep(adapter)
                        return adapter

    def get_resident(self, name: str) -> Adapter | None:
        """The adapter if its weights are in memory; None if `get` must read them back (a call for the event
        loop: it reads a file only if the adapter is evicted between its look and get's, which is rare)."""
        with self._lock:
            if name in self._evicted:
                return None
        return self.get(name)

    def describe(self, name: str) -> Adapter:
        """The adapter, or its weight-free entry if its weights are not in memory: for showing, not serving."""
        with self._lock:
            entry = self._evicted.get(name)
        return entry if entry is not None else self.get(name)

    def _touch(self, name: str) -> Adapter | None:
        adapter = self._adapters.get(name)
        if adapter is not None:
            self._adapters.move_to_end(name)
        return adapter

    def _read_back(self, name: str) -> Adapter:
        try:
            found = self.store.read(name, lambda folder: read_peft_folder(folder, name))
            if found is not None:
                validate(found[1], self.base, self.limits)
        except (AdapterInvalid, AdapterTooLarge, OSError) as e:  # it was valid when registered: the store broke
            log.error("adapter %r: its stored copy cannot be read back: %s", name, e)
            raise AdapterUnreadable(f"adapter {name!r} is registered but its stored copy cannot be read back: "
                                    f"{getattr(e, 'message', e)}") from e
        if found is None:
            raise AdapterNotFound(f"adapter {name!r} is not registered")
        log.info("adapter %r read back from the store", name)
        return found[1]

    def memory(self) -> tuple[int, int]:
        """Adapters whose weights are in memory, and those weights' bytes."""
        with self._lock:
            return len(self._adapters), sum(a.held_bytes for a in self._adapters.values())

    def is_current(self, adapter: Adapter) -> bool:
        """True while `adapter` is the version registered under its name (not removed, not replaced)."""
        with self._lock:
            return any(held is adapter for held in self._held())

    def remove(self, name: str) -> Adapter:
        with self._lock:
            if name not in self._adapters and name not in self._evicted:
                raise AdapterNotFound(f"adapter {name!r} is not registered")
            try:
                self.store.delete(name)
            except AdapterNotFound:
                pass  # registered with persist=False
            self._unstored.discard(name)
            adapter = self._evicted.pop(name, None) or self._adapters.pop(name)
            self._retire(adapter)
            return adapter

    def _retire(self, adapter: Adapter | None) -> None:
        if adapter is not None:
            self.retired.append(weakref.ref(adapter))

    def list(self) -> list[Adapter]:
        """Every registered adapter; those not in memory as their weight-free entries."""
        with self._lock:
            entries = self._adapters | self._evicted
        return [entries[name] for name in sorted(entries)]

    def __contains__(self, name) -> bool:
        with self._lock:
            return name in self._adapters or name in self._evicted

    def __len__(self) -> int:
        with self._lock:
            return len(self._adapters) + len(self._evicted)


class NameLocks:
    """One holder per name at a time, for work on a name (reading it) that must not run twice at once; the
    lock of a name lives only while someone holds or waits for it."""

    def __init__(self):
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    @contextlib.contextmanager
    def one_at_a_time(self, name: str):
        with self._guard:
            lock, users = self._locks.get(name, (threading.Lock(), 0))
            self._locks[name] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._guard:
                lock, users = self._locks[name]
                if users == 1:
                    del self._locks[name]
                else:
                    self._locks[name] = (lock, users - 1)


def _split_upload(files: dict[str, bytes]) -> tuple[dict[str, bytes], str | None, str | None]:
    """Check the uploaded file names; returns the adapter's own files, its card and its chat template, the
    other text files dropped."""
    for file_name in files:
        if not file_name or "/" in file_name or "\\" in file_name or ".." in file_name or "\0" in file_name:
            raise AdapterInvalid(f"file name {file_name!r} must be a plain name without path separators or '..'")
        if file_name.lower().endswith(_PICKLE_SUFFIXES):
            raise AdapterInvalid(f"{file_name}: pickle-based files are not accepted; use safetensors")
    card = parse_card(files[CARD_FILE]) if CARD_FILE in files else None
    kept = {f: data for f, data in files.items() if f in _PEFT_FILES or not f.lower().endswith(_DROPPED_SUFFIXES)}
    return kept, card, template_from_files(files)


def _is_raw_upload(files: dict[str, bytes], rank: int | None, alpha: float | None) -> bool:
    """True for one raw .safetensors, False for a PEFT folder."""
    if set(files) == _PEFT_FILES:
        return False
    if len(files) == 1 and next(iter(files)).endswith(".safetensors"):
        if rank is None or alpha is None:
            raise AdapterInvalid("a single .safetensors upload has no config: give rank and alpha with it")
        return True
    raise AdapterInvalid(
        f"unexpected files {sorted(files)}: upload {CONFIG_FILE} + {WEIGHTS_FILE} (a PEFT folder), "
        "or one .safetensors file together with rank and alpha"
    )


def _parse_upload(tmp: Path, name: str, files: dict[str, bytes], raw: bool,
                  rank: int | None, alpha: float | None) -> tuple[Adapter, dict[str, bytes]]:
    """Parse uploaded bytes from files in `tmp`; returns the adapter and the PEFT folder files to store."""
    if raw:
        # Written under our own name: the client's file name never reaches the file system.
        raw_path = tmp / "upload.safetensors"
        raw_path.write_bytes(next(iter(files.values())))
        adapter = read_raw_safetensors(raw_path, name, rank, alpha)
        return adapter, raw_to_peft_files(raw_path, adapter)
    for file_name in _PEFT_FILES:
        (tmp / file_name).write_bytes(files[file_name])
    return read_peft_folder(tmp, name), {f: files[f] for f in _PEFT_FILES}
