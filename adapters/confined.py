"""Reading an adapter folder named by a path on the server, only under the folders the operator allowed.

Server-side loads (`/v1/load_lora_adapter`, `--preload-dir`) take a path from a caller or a config. The
path and each file are resolved with their symlinks and must stay under an allowed root; sizes are checked
before a byte is read; and every way a path can be wrong gets the same message, so a caller cannot probe
which paths exist or what they hold.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from adapters.chat_template import TEMPLATE_FILE, read_template
from adapters.errors import AdapterInvalid, AdapterTooLarge
from adapters.format import CARD_FILE, WEIGHTS_FILE, read_card
from adapters.peft_config import CONFIG_FILE, MAX_CONFIG_BYTES

FILES = (CONFIG_FILE, WEIGHTS_FILE)


def read_adapter_folder(path: str | Path, roots: list[Path], max_bytes: int) -> dict[str, bytes]:
    """The two files of the PEFT folder at `path`, which must resolve under one of `roots`, and its card and
    chat template if it has them (read only from regular files in the folder itself: see format.read_card)."""
    folder = check_adapter_folder(path, roots, max_bytes)
    files = {name: _read_at_most(folder / name, _limit(name, max_bytes)) for name in FILES}
    card, template = read_card(folder), read_template(folder)
    extra = {CARD_FILE: card, TEMPLATE_FILE: template}
    return files | {name: text.encode() for name, text in extra.items() if text is not None}


def check_adapter_folder(path: str | Path, roots: list[Path], max_bytes: int) -> Path:
    """The folder's real path, once it and its two files are known to lie under a root within their size
    limits; raises otherwise, without saying which part failed."""
    not_found = AdapterInvalid("the path is not a PEFT adapter folder (adapter_config.json and "
                               "adapter_model.safetensors) under an allowed adapter root")
    real_roots = [Path(os.path.realpath(root)) for root in roots]
    folder = Path(os.path.realpath(path))
    for real in (folder, *(Path(os.path.realpath(folder / name)) for name in FILES)):
        if not any(real.is_relative_to(root) for root in real_roots):
            raise not_found
    for name in FILES:
        try:
            info = os.stat(folder / name)
        except OSError:
            raise not_found from None
        if not stat.S_ISREG(info.st_mode):
            raise not_found
        if info.st_size > _limit(name, max_bytes):
            raise AdapterTooLarge(f"{name} is larger than the limit of {_limit(name, max_bytes)} bytes")
    return folder


def _limit(name: str, max_bytes: int) -> int:
    return MAX_CONFIG_BYTES if name == CONFIG_FILE else max_bytes


def _read_at_most(path: Path, limit: int) -> bytes:
    # the file may grow between the stat and the read
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise AdapterTooLarge(f"{path.name} is larger than the limit of {limit} bytes")
    return data
