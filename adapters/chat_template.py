"""An adapter's own chat template, used for its chat requests instead of the base model's.

Found where `tokenizer.save_pretrained` leaves it beside the adapter: `chat_template.jinja`, or the
`chat_template` of `tokenizer_config.json` (the file wins, as transformers loads them). It is checked by
rendering a short conversation with the renderer `apply_chat_template` uses, so a template that cannot
serve a chat is refused when the adapter is registered rather than on its first request, and it is kept in
the store as `chat_template.jinja`.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

from adapters.errors import AdapterInvalid, AdapterTooLarge

log = logging.getLogger(__name__)

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
MAX_TEMPLATE_BYTES = 64 * 1024
MAX_TOKENIZER_CONFIG_BYTES = 4 * 1024 * 1024  # a tokenizer's added-token table can take a few MB
_SAMPLE = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hello"},
           {"role": "assistant", "content": "Hi there."}, {"role": "user", "content": "How are you?"}]


def template_from_files(files: dict[str, bytes]) -> str | None:
    """The chat template among a folder's files (by name), checked; None when they carry none."""
    if TEMPLATE_FILE in files:
        template = utf8_text(TEMPLATE_FILE, files[TEMPLATE_FILE], MAX_TEMPLATE_BYTES)
    elif TOKENIZER_CONFIG in files:
        template = _from_tokenizer_config(files[TOKENIZER_CONFIG])
    else:
        return None
    if template is not None:
        check_template(template)
    return template


def read_template(folder: Path) -> str | None:
    """The chat template in `folder`, read only from regular files in the folder itself (a link is logged and
    passed over, as a card is: a folder named by a server-side path is confined only as far as its adapter
    files)."""
    files = {}
    for name, limit in ((TEMPLATE_FILE, MAX_TEMPLATE_BYTES), (TOKENIZER_CONFIG, MAX_TOKENIZER_CONFIG_BYTES)):
        try:
            data = read_regular_file(Path(folder) / name, limit)
        except AdapterInvalid as e:
            log.warning("%s: %s not read for the adapter's chat template: %s", folder, name, e)
            continue
        if data is not None:
            files[name] = data
    return template_from_files(files)


def check_template(template: str) -> None:
    """Raises AdapterInvalid, with the renderer's reason, unless `template` renders a short conversation."""
    from transformers.utils.chat_template_utils import render_jinja_template

    if len(template.encode()) > MAX_TEMPLATE_BYTES:
        raise AdapterTooLarge(f"the chat template is larger than the limit of {MAX_TEMPLATE_BYTES} bytes")
    try:
        rendered, _ = render_jinja_template([_SAMPLE], chat_template=template, add_generation_prompt=True,
                                            bos_token="", eos_token="")
    except Exception as e:  # whatever the template's own code raises: it is the uploader's to fix
        raise AdapterInvalid(f"the chat template does not render a conversation: {type(e).__name__}: {e}") from None
    if not rendered[0].strip():
        raise AdapterInvalid("the chat template renders a conversation as nothing")


def _from_tokenizer_config(data: bytes) -> str | None:
    if len(data) > MAX_TOKENIZER_CONFIG_BYTES:
        raise AdapterTooLarge(f"{TOKENIZER_CONFIG} is larger than the limit of {MAX_TOKENIZER_CONFIG_BYTES} bytes")
    try:
        config = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise AdapterInvalid(f"{TOKENIZER_CONFIG} is not valid JSON ({e})") from None
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):  # named templates, as transformers saves several: "default" serves chats
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise AdapterInvalid(f"{TOKENIZER_CONFIG}: chat_template names templates but none is 'default'")
        template = named["default"]
    if template is not None and not isinstance(template, str):
        raise AdapterInvalid(f"{TOKENIZER_CONFIG}: chat_template must be a string")
    return template


def utf8_text(name: str, data: bytes, limit: int) -> str:
    """The text of the file `name` of an adapter's folder, refused past `limit` bytes or if not UTF-8."""
    if len(data) > limit:
        raise AdapterTooLarge(f"{name} is larger than the limit of {limit} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise AdapterInvalid(f"{name} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_regular_file(path: Path, limit: int) -> bytes | None:
    """The bytes of `path` if it is a regular file (not a link) within `limit`; None if it is not there."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise AdapterInvalid(f"{path.name} is not a regular file in the adapter's folder") from e
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise AdapterInvalid(f"{path.name} is not a regular file in the adapter's folder")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise AdapterTooLarge(f"{path.name} is larger than the limit of {limit} bytes")
    return data
