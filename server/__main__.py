"""`python -m server`: serve the API. Flags override LORAPLEX_* environment variables."""

from __future__ import annotations

import argparse
import logging
import sys

import uvicorn
from uvicorn.config import STARTUP_FAILURE

from server.app import InsecureBind, create_app
from server.connections import uvicorn_config
from server.model.checkpoint_layout import CheckpointMismatch
from server.model.config import ModelNotSupported
from server.model.loader import ModelNotFound
from server.settings import Settings

# what a user can fix (the folder, the flags): one line naming it, no traceback
STARTUP_ERRORS = (ModelNotFound, ModelNotSupported, CheckpointMismatch, InsecureBind)


def parse_settings(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(prog="python -m server", description="loraplex: one base model, many LoRA adapters")
    flags = {"model": "model_path", "host": "host", "port": "port", "device": "device", "dtype": "dtype",
             "lora-mode": "lora_mode", "store-dir": "store_dir", "threads": "threads", "max-batch": "max_batch",
             "max-seq-len": "max_seq_len", "lora-slots": "lora_slots", "linear-backend": "linear_backend",
             "quantization": "quantization",
             "preload-dir": "preload_dir", "prefix-cache-mb": "prefix_cache_mb",
             "max-prefill-tokens": "max_prefill_tokens", "admission-wait-ms": "admission_wait_ms",
             "admission-wait-fraction": "admission_wait_fraction", "header-timeout-s": "header_timeout_s",
             "body-timeout-s": "body_timeout_s", "max-connections": "max_connections",
             "max-json-bytes": "max_json_bytes", "max-messages": "max_messages",
             "max-prompt-chars": "max_prompt_chars", "max-stop-chars": "max_stop_chars",
             "max-adapter-memory-mb": "max_adapter_memory_mb", "adapter-root": "adapter_roots",
             "adapter-dir": "adapter_dirs",
             "served-model-name": "served_model_name", "chat-template": "chat_template",
             "max-adapters-per-request": "max_adapters_per_request", "max-adapter-weight": "max_adapter_weight",
             "mix-cache-mb": "mix_cache_mb", "max-resident-adapters": "max_resident_adapters"}
    for flag, field in flags.items():
        info = Settings.model_fields[field]
        # a list setting takes its flag once per item (--adapter-root A --adapter-root B), or, as vLLM's
        # --served-model-name, several items after one flag
        kind = {"adapter_roots": {"action": "append"}, "adapter_dirs": {"action": "append"},
                "served_model_name": {"nargs": "+"}}.get(field, {})
        parser.add_argument(f"--{flag}", dest=field, default=None, **kind,
                            help=(info.description or "").replace("%", "%%"))
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    return Settings(**args)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = parse_settings(argv)
    try:
        app = create_app(settings, load_now=True)
    except STARTUP_ERRORS as exc:
        print(f"loraplex: cannot start: {exc}", file=sys.stderr)
        sys.exit(STARTUP_FAILURE)
    server = uvicorn.Server(uvicorn_config(app, settings))
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    # as uvicorn.run does: a failed start-up (the model or the store did not load) exits non-zero
    if not server.started:
        sys.exit(STARTUP_FAILURE)


if __name__ == "__main__":
    main()
