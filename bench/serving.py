"""The loraplex server under test: a real `python -m server` process on 127.0.0.1, started by the bench.

Reuses the integration tests' ServerProcess (free loopback port, health polling, clean stop).
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import psutil

from bench.fixtures import folder_files
from tests.integration.server_process import ServerProcess


class BenchServer:
    def __init__(self, store_dir: Path, lora_mode: str, max_batch: int = 64, log_dir: Path | None = None,
                 extra_args: tuple[str, ...] = (), label: str | None = None):
        self.lora_mode = lora_mode
        self.label = label or lora_mode
        log_path = (log_dir or store_dir.parent) / f"server-{self.label}-{store_dir.name}.log"
        self.process = ServerProcess(store_dir, "--lora-mode", lora_mode, "--max-batch", str(max_batch),
                                     *extra_args, log_path=log_path)
        self.start_s = float("nan")

    @property
    def url(self) -> str:
        return self.process.url

    @property
    def pid(self) -> int:
        return self.process.proc.pid

    def __enter__(self) -> BenchServer:
        started = time.perf_counter()
        self.process.start(timeout=300)
        self.start_s = time.perf_counter() - started
        return self

    def __exit__(self, *exc) -> None:
        self.process.stop()

    def rss_mb(self) -> float:
        return psutil.Process(self.pid).memory_info().rss / 2**20

    def upload(self, name: str, folder: Path) -> float:
        """Uploads a PEFT folder under `name`; returns the seconds until the server answered 201."""
        parts = [("files", (file_name, data)) for file_name, data in folder_files(folder).items()]
        started = time.perf_counter()
        with httpx.Client(base_url=self.url, timeout=120) as client:
            response = client.post("/adapters", data={"name": name}, files=parts)
        if response.status_code != 201:
            raise RuntimeError(f"upload of {name} failed: {response.status_code} {response.text[:300]}")
        return time.perf_counter() - started
