"""Every knob of the server, in one place. Environment variables (LORAPLEX_*) and CLI flags map onto it."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORAPLEX_", protected_namespaces=())

    model_path: str | None = Field(None, description="local Hugging Face model folder; default: SmolLM2-135M-Instruct")
    served_model_name: list[str] = Field(default_factory=list, description="names the base model answers to in "
                                         "`model` and lists under in /v1/models, the first one leading (default: a "
                                         "Hugging Face cache snapshot's hub id, else the model folder's name)")
    chat_template: Path | None = Field(None, description="a Jinja chat template file used instead of the "
                                       "tokenizer's own")
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = Field("auto", description="auto (cuda when present), cpu, cuda, cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    linear_backend: Literal["auto", "torch", "mkldnn", "panel"] = "auto"
    quantization: Literal["auto", "none", "gguf", "int8", "int4"] = Field(
        "auto", description="base weights held quantized, LoRA in full precision (QLoRA): gguf serves a "
        "model converted from a GGUF file in that file's blocks as they ship (Q4_0, Q4_1, Q4_K, Q8_0; other types "
        "requantized to 8-bit blocks at load); int8 per output "
        "channel and int4 in groups of 32 inputs with a scale and offset each quantize the checkpoint at load "
        "(CPU); none: the checkpoint's weights in --dtype; auto: gguf where it applies (a GGUF-converted folder "
        "on CPU, the default model), else none")
    threads: int | None = Field(None, description="torch intra-op threads on CPU (default: all cores)")
    lora_mode: Literal["auto", "merged", "unmerged"] = "auto"
    max_batch: int = Field(64, ge=1, description="sequences decoded together (KV-cache slots)")
    max_seq_len: int = Field(2048, ge=16, description="prompt + generated tokens per sequence")
    max_prefill_tokens: int = Field(512, ge=16, description="prompt tokens computed per step; a longer prompt "
                                    "is split over steps so running streams keep getting tokens")
    admission_wait_ms: float = Field(30.0, ge=0, description="after a step that finished requests, wait up to "
                                     "this long (and at most --admission-wait-fraction of that step) for their "
                                     "clients' next requests, so those join the next step instead of waiting a "
                                     "whole one; skipped while such waits do not pay (0: off)")
    admission_wait_fraction: float = Field(0.4, ge=0, le=1, description="the most of a step's time one such "
                                           "wait may take; a wait ends when the awaited requests are in, so "
                                           "it costs only what they take to come")
    max_new_tokens: int = Field(1024, ge=1, description="upper bound a request may ask for")
    prefix_cache_mb: int = Field(256, ge=0, description="memory for KV of prompt prefixes reused across "
                                                         "requests (0: off)")
    prefix_block_tokens: int = Field(16, ge=1, description="tokens per prefix-cache block")
    lora_slots: int = Field(64, ge=1, description="adapters resident on the compute device at once (as many as "
                                                  "the default --max-batch: distinct adapters never wait for a slot)")
    max_lora_rank: int = Field(64, ge=1)
    max_adapter_bytes: int = Field(64 * 1024 * 1024, ge=1)
    max_adapters: int = Field(1000, ge=1)
    store_dir: Path = Path("store")
    preload_dir: Path | None = Field(None, description="folder of PEFT adapter folders registered at start-up "
                                                       "(read-only; not copied into the store)")
    adapter_dirs: list[Path] = Field(default_factory=list, description="folders where a request for an unknown "
                                     "adapter name looks for <dir>/<name>/ as a PEFT folder and registers it in "
                                     "place (not copied into the store; never a download); a Hugging Face hub "
                                     "cache serves org/name from models--org--name/snapshots/<commit>/")
    # security and limits
    admin_keys: str = Field("", description="comma-separated API keys that may change adapters")
    user_keys: str = Field("", description="comma-separated API keys that may generate and list")
    keys_file: Path | None = Field(None, description='JSON list of {"key", "role", "adapters"?}')
    max_prompt_tokens: int = Field(4096, ge=1)
    max_pending: int = Field(256, ge=1, description="requests queued or running; more get 429")
    request_timeout_s: float = Field(300.0, gt=0, description="deadline of one generation request")
    metrics_keys: str = Field("", description="comma-separated API keys that may read /metrics and nothing else")
    adapter_roots: list[Path] = Field(default_factory=list, description="folders /v1/load_lora_adapter may read "
                                      "adapters from (none: loading from server-side paths is off)")
    # what a request may cost before and while it is read: checked before any expensive work
    max_json_bytes: int = Field(1 << 20, ge=1024, description="largest JSON request body (uploads: "
                                "--max-adapter-bytes); a larger Content-Length is refused before reading")
    header_timeout_s: float = Field(10.0, gt=0, description="time a new connection has to send its headers")
    body_timeout_s: float = Field(60.0, gt=0, description="time a request has to send its whole body")
    max_connections: int = Field(1024, ge=1, description="open HTTP connections and requests; more get 503")
    max_messages: int = Field(1024, ge=1, description="chat messages per request")
    max_prompt_chars: int = Field(1 << 18, ge=1, description="characters of prompt or message text per request, "
                                  "checked before templating and tokenizing")
    max_stop_chars: int = Field(128, ge=1, description="characters per stop string")
    max_adapter_memory_mb: int = Field(4096, ge=1, description="memory the adapters' weights held in memory "
                                       "may take together, in the dtypes they were stored in (fp8 as bf16)")
    max_resident_adapters: int | None = Field(None, ge=1, description="adapters whose weights stay in memory, "
                                              "the most recently used; the others are read back from the store "
                                              "on their next request (default: every adapter stays)")
    max_adapters_per_request: int = Field(4, ge=1, description="adapters one request may mix (`adapters`)")
    max_adapter_weight: float = Field(2.0, gt=0, description="largest |weight| of an adapter in a request's mix")
    mix_cache_mb: int = Field(256, ge=0, description="memory for the concatenated weights of recent adapter "
                              "mixes; beyond it the least recently used are dropped and rebuilt when asked again")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device().type == "cuda" else torch.float32
        return getattr(torch, self.dtype)
