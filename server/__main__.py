"""`python -m server`: serve the API. Flags override LORAPLEX_* environment variables."""

from __future__ import annotations

import argparse
import logging

import uvicorn

from server.app import create_app
from server.settings import Settings


def parse_settings(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(prog="python -m server", description="loraplex: one base model, many LoRA adapters")
    flags = {"model": "model_path", "host": "host", "port": "port", "device": "device", "dtype": "dtype",
             "lora-mode": "lora_mode", "store-dir": "store_dir", "threads": "threads", "max-batch": "max_batch",
             "max-seq-len": "max_seq_len", "lora-slots": "lora_slots", "linear-backend": "linear_backend",
             "preload-dir": "preload_dir", "prefix-cache-mb": "prefix_cache_mb",
             "max-prefill-tokens": "max_prefill_tokens", "admission-wait-ms": "admission_wait_ms",
             "admission-wait-fraction": "admission_wait_fraction"}
    for flag, field in flags.items():
        info = Settings.model_fields[field]
        parser.add_argument(f"--{flag}", dest=field, default=None, help=(info.description or "").replace("%", "%%"))
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    return Settings(**args)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = parse_settings(argv)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")


if __name__ == "__main__":
    main()
