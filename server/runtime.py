"""Assembles the serving stack from Settings: model, tokenizer, adapter registry and store, engine.

Used by the HTTP app's lifespan, the benchmarks and the tests, so all of them run the same engine.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
import time

import torch

from adapters import AdapterLimits, AdapterRegistry, AdapterStore, read_peft_folder
from adapters.confined import check_adapter_folder
from adapters.mix import MixCache
from adapters.resolver import AdapterDirs
from server.engine.admission import AdmissionWait
from server.engine.constraint import Grammars
from server.engine.engine import Engine
from server.engine.kv_cache import KVCache
from server.engine.prefix_cache import PrefixCache
from server.engine.runner import ModelRunner
from server.engine.scheduler import Scheduler
from server.errors import InvalidRequest
from server.heap import back_with_huge_pages, huge_page_bytes, keep_freed_memory
from server.lora import policy
from server.lora.layers import LoraSlots
from server.lora.manager import AdapterSlots
from server.lora.mode_switch import ModeSwitch
from server.metrics import Metrics
from server.model.config import ModelConfig
from server.model.backend import gguf_by_default, resolve_backend, serves_quantized
from server.model.geometry import site_layouts
from server.model.gguf_blocks import serves_model_type
from server.model.loader import ModelFolder, load_tokenizer, resolve_model, served_names
from server.model.weights import LoadedModel
from server.settings import Settings
from server.tool_calls import for_template, tool_formats

log = logging.getLogger(__name__)


class Runtime:
    """Owns the engine thread. All model work, loading included, happens on that one thread: with torch's
    OpenMP pool, a model loaded on one thread and run on another decodes slower (two thread teams contend
    for the cores; docs/decisions.md)."""

    def __init__(self, settings: Settings, registry_type: type[AdapterRegistry] = AdapterRegistry):
        self.settings = settings
        self.registry_type = registry_type  # a cluster replica passes a registry that caches a shared store
        self.started_at = time.time()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._engine_thread, name="loraplex-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def _engine_thread(self) -> None:
        try:
            self._build(self.settings)
        except BaseException as exc:  # surfaced to the constructor's caller
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.engine.run()

    def _build(self, settings: Settings) -> None:
        keep_freed_memory()
        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.device = settings.torch_device()
        self.dtype = settings.torch_dtype()
        self.folder = resolve_model(settings.model_path)
        ModelConfig.from_hf(self.folder.config)  # an unsupported family is refused before anything loads
        self.model_names = served_names(settings.served_model_name, self.folder)
        self.model_id = self.model_names[0]
        self.tokenizer = load_tokenizer(self.folder, settings.chat_template)  # before the weights: fails sooner
        self.grammars = Grammars(self.tokenizer)
        self.renders_tools = tool_formats(self.tokenizer)  # per template: an adapter may bring its own
        quantization = resolve_quantization(settings.quantization, self.device, self.folder)
        self.backend = backend = resolve_backend(self.device, self.dtype, settings.linear_backend, quantization)
        self.loaded = LoadedModel(self.folder, backend, quantization, settings.max_seq_len)
        self.weight_format = self.loaded.weight_format
        weights = self.loaded.transformer.linear_tensors()
        self.base_weight_bytes = sum(t.numel() * t.element_size() for t in weights)
        if self.device.type == "cpu":
            back_with_huge_pages(weights)
        cfg = self.loaded.config
        self.max_seq_len = cfg.max_position_embeddings  # settings.max_seq_len, or less where the model is
        self.registry = self.registry_type(
            AdapterStore(settings.store_dir), self.loaded.transformer.lora_target_shapes(),
            AdapterLimits(max_rank=settings.max_lora_rank, max_bytes=settings.max_adapter_bytes,
                          max_adapters=settings.max_adapters,
                          max_total_bytes=settings.max_adapter_memory_mb * 2**20,
                          max_resident=settings.max_resident_adapters))
        loaded_names = self.registry.load_stored()
        if settings.preload_dir is not None:
            loaded_names += preload(self.registry, settings.preload_dir, settings.max_adapter_bytes)
        self.adapter_dirs = AdapterDirs(self.registry, settings.adapter_dirs, settings.max_adapter_bytes)
        self.mixes = MixCache(self.registry.retired, settings.mix_cache_mb * 2**20, self.registry.is_current)
        self.lora = LoraSlots(cfg.num_layers, site_layouts(cfg), settings.lora_slots, backend)
        self.adapter_slots = AdapterSlots(self.lora, self.registry.retired)
        kv = KVCache(cfg, settings.max_batch, self.max_seq_len, self.device, self.dtype, settings.max_prefill_tokens)
        if kv.smallest_ring is not None:
            rings = [r for r in kv.rings if r is not None]
            log.info("KV cache %d MiB: %d of %d layers keep a ring of their window + a prompt chunk (%s positions), "
                     "%d MiB less than every position", kv.nbytes >> 20, len(rings), cfg.num_layers,
                     "/".join(map(str, sorted(set(rings)))), (kv.flat_nbytes - kv.nbytes) >> 20)
        prefix_cache = PrefixCache(kv, settings.prefix_block_tokens, settings.prefix_cache_mb * 2**20) \
            if settings.prefix_cache_mb else None
        # merging into a quantized base computes the adapter's projections from a full-precision scratch:
        # not measured faster than the side branch yet, so auto keeps such a base unmerged
        lora_mode = "unmerged" if quantization != "none" and settings.lora_mode == "auto" else settings.lora_mode
        self.lora_mode = lora_mode
        scheduler = Scheduler(kv, self.adapter_slots, settings.max_prefill_tokens, policy.admits_mixed(lora_mode),
                              prefix_cache)
        self.metrics = Metrics()
        self.metrics.base_weight_bytes.set(self.base_weight_bytes)
        self.metrics.memory_adapters.set_function(lambda: self.registry.memory()[0])
        self.metrics.memory_adapter_bytes.set_function(lambda: self.registry.memory()[1])
        modes = ModeSwitch(self.loaded.transformer, self.loaded.checkpoint, lora_mode)
        self.engine = Engine(ModelRunner(self.loaded.transformer, kv, self.lora), scheduler,
                             self.tokenizer, modes, eos_ids(self.folder.config, self.tokenizer),
                             metrics=self.metrics, max_pending=settings.max_pending,
                             timeout_s=settings.request_timeout_s,
                             admission=AdmissionWait(settings.admission_wait_ms / 1e3,
                                                     settings.admission_wait_fraction))
        huge = huge_page_bytes()
        log.info("model %s on %s/%s (%s, base weights %s: %d MiB), %d stored adapters loaded; %s MiB of "
                 "memory in huge pages", self.model_id, self.device, str(self.dtype).removeprefix("torch."),
                 backend.describe(quantization), self.weight_format, self.base_weight_bytes >> 20, len(loaded_names),
                 "?" if huge is None else huge >> 20)

    def encode(self, prompt: str | None = None, messages: list[dict] | None = None,
               tools: list[dict] | None = None, chat_template: str | None = None) -> list[int]:
        """`chat_template` is an adapter's own, used instead of the base model's. `messages` carry earlier tool
        calls structured; the template that renders them decides how they and `tools` are shown: in its own
        tool format where it has one, else written into the text (server.tool_calls.for_template)."""
        if messages is not None:
            chat_template = chat_template or getattr(self.tokenizer, "chat_template", None)
            if not chat_template:
                raise InvalidRequest("this model has no chat template; send `prompt` instead of `messages`")
            messages, tools = for_template(messages, tools, bool(tools) and self.renders_tools(chat_template))
            ids = self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True,
                                                     chat_template=chat_template)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        else:
            ids = self.tokenizer(prompt or "").input_ids
        if not ids:
            raise InvalidRequest("the prompt is empty")
        return list(ids)

    def check_length(self, prompt_tokens: int, max_new_tokens: int) -> None:
        if prompt_tokens > self.settings.max_prompt_tokens:
            raise InvalidRequest(f"the prompt has {prompt_tokens} tokens; the limit is {self.settings.max_prompt_tokens}")
        if max_new_tokens > self.settings.max_new_tokens:
            raise InvalidRequest(f"max_new_tokens {max_new_tokens} exceeds the server limit {self.settings.max_new_tokens}")
        if prompt_tokens + max_new_tokens > self.max_seq_len:
            raise InvalidRequest(f"prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                                 f"the context length {self.max_seq_len}")

    def stop(self) -> None:
        self.engine.stop()
        self._thread.join(timeout=60)


def resolve_quantization(name: str, device: torch.device, folder: ModelFolder) -> str:
    """auto serves a folder converted from a GGUF file (of an architecture in gguf_blocks.ARCHITECTURES) in
    that file's own blocks where the backend says that is the faster (`gguf_by_default`), anything else in
    --dtype. A named format must run on `device` (`serves_quantized`)."""
    if name == "auto":
        native = folder.gguf is not None and gguf_by_default(device)
        return "gguf" if native and serves_model_type(folder.config.get("model_type")) else "none"
    if name == "none":
        return "none"
    if not serves_quantized(name, device):
        raise ValueError(f"--quantization {name} does not run on {device} so far (int4 does on CUDA); serve in "
                         "--dtype")
    return name


def preload(registry, folder, max_bytes: int) -> list[str]:
    """Registers every PEFT folder under `folder` by its folder name, unless the store already has that name.
    A folder whose files lead out of `folder` (symlinks) or are over the size limit stops the start."""
    names = []
    for path in sorted(p for p in Path(folder).iterdir() if (p / "adapter_config.json").is_file()):
        if path.name in registry:
            continue
        real = check_adapter_folder(path, [Path(folder)], max_bytes)
        registry.add(read_peft_folder(real, path.name), persist=False)
        names.append(path.name)
    return names


def eos_ids(hf_config: dict, tokenizer) -> set[int]:
    ids = hf_config.get("eos_token_id")
    found = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        found.add(tokenizer.eos_token_id)
    return found
