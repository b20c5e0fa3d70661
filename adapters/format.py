"""Adapter weights: reading PEFT folders and raw safetensors, writing PEFT folders, validating against the base.

Only safetensors is ever read: a pickle (.bin/.pt) runs code when loaded, and adapters come from users.
Every way a file can be wrong ends in AdapterInvalid or AdapterTooLarge naming the module, because that
message is all the uploader gets to see.
"""

import logging
import math
import re
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from adapters.chat_template import TEMPLATE_FILE, read_regular_file, read_template, utf8_text
from adapters.errors import AdapterInvalid, AdapterTooLarge, LoraplexError
from adapters.peft_config import CONFIG_FILE, MAX_CONFIG_BYTES, AdapterConfig, config_json, parse_config

log = logging.getLogger(__name__)

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WEIGHTS_FILE = "adapter_model.safetensors"
CARD_FILE = "README.md"  # the model card `save_pretrained` writes beside the two files
MAX_CARD_BYTES = 64 * 1024
_GROUP = {p: "self_attn" for p in PROJECTIONS[:4]} | {p: "mlp" for p in PROJECTIONS[4:]}

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# PEFT writes "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"; some tools drop the
# wrapper prefixes, and older PEFT keeps the adapter name as an infix ("lora_A.default.weight").
# ASCII: int() reads other scripts' digits too, so "layers.٣" would alias "layers.3".
_KEY = re.compile(
    r"(?:base_model\.model\.)?(?:model\.)?layers\.(0|[1-9]\d*)\.(self_attn|mlp)\.(\w+)"
    r"\.lora_([AB])(?:\.[\w-]+)?\.weight",
    re.ASCII,
)
# Refused past this: |scale|·r·max|A|·max|B| bounds every entry of scale·B·A; a trained adapter's is far below 1.
_MAX_UPDATE = 1e3

BaseShapes = dict[str, tuple[int, int]]  # "layers.{i}.{proj}" -> (out_features, in_features)


# Held as stored: widening in memory would double a 16-bit adapter's bytes for no gain, since whoever
# computes with the weights (device slots, merges, mixes) converts them once anyway. FP8 becomes bfloat16,
# which holds every fp8 value exactly and which every CPU op takes; anything else becomes float32.
HELD_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FP8_DTYPES = {d for d in (getattr(torch, n, None) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                                              "float8_e5m2fnuz")) if d is not None}


@dataclass(frozen=True, eq=False)  # eq=False: comparing tensors with == has no single truth value
class LoraWeights:
    A: torch.Tensor  # [r, in_features], on CPU in one of HELD_DTYPES
    B: torch.Tensor  # [out_features, r], on CPU in one of HELD_DTYPES
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]


@dataclass(frozen=True, eq=False)
class Adapter:
    name: str
    rank: int
    alpha: float
    weights: dict[str, LoraWeights]  # "layers.{i}.{proj}"
    target_modules: tuple[str, ...]
    size_bytes: int  # tensor bytes as stored in the file
    card: str | None = None  # the folder's README.md, as its author wrote it
    chat_template: str | None = None  # its own, for its chat requests (adapters.chat_template); None: the base's

    @cached_property
    def held_bytes(self) -> int:
        """Bytes the weights take in memory (as stored; fp8 as bfloat16): what limits count."""
        return sum(t.numel() * t.element_size() for w in self.weights.values() for t in (w.A, w.B))

    @property
    def layer_indices(self) -> tuple[int, ...]:
        return tuple(sorted({_layer(key) for key in self.weights}))


@dataclass(frozen=True)
class AdapterLimits:
    max_rank: int = 64
    max_bytes: int = 64 * 1024 * 1024
    max_adapters: int = 1000
    max_total_bytes: int = 4096 * 1024 * 1024  # all adapters in memory, their held_bytes together
    max_resident: int | None = None  # adapters kept in memory (the most recently used); None: every one


def validate_name(name: str) -> str:
    # The name becomes a directory under the store root, so this is the path-traversal guard.
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise AdapterInvalid(
            f"invalid adapter name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, and no '..'"
        )
    return name


def module_key(layer: int, proj: str) -> str:
    return f"layers.{layer}.{proj}"


def _layer(key: str) -> int:
    return int(key.split(".")[1])


def _module_path(key: str) -> str:
    _, layer, proj = key.split(".")
    return f"model.layers.{layer}.{_GROUP[proj]}.{proj}"


def _parse_key(key: str) -> tuple[str, str]:
    """A tensor key -> ("layers.{i}.{proj}", "A" | "B")."""
    match = _KEY.fullmatch(key)
    if not match or _GROUP.get(match[3]) != match[2]:
        raise AdapterInvalid(
            f"unsupported tensor {key!r}: loraplex reads only lora_A/lora_B weights of "
            f"layers.N.self_attn/mlp.{{{','.join(PROJECTIONS)}}}; embeddings, DoRA magnitudes, "
            "biases and modules_to_save are not supported"
        )
    return module_key(int(match[1]), match[3]), match[4]


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise AdapterInvalid(f"missing {path.name}")
    try:
        return load_file(path)
    except SafetensorError as e:
        raise AdapterInvalid(f"{path.name} is not a valid safetensors file ({e})") from e


def _pairs(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, half = _parse_key(key)
        if half in halves.setdefault(module, {}):
            raise AdapterInvalid(f"{module}: lora_{half} appears twice (again as {key!r})")
        halves[module][half] = tensor
    if not halves:
        raise AdapterInvalid("the file holds no LoRA tensors")
    for module, found in halves.items():
        if len(found) != 2:
            have, lack = ("A", "B") if "A" in found else ("B", "A")
            raise AdapterInvalid(f"{module}: has lora_{have} but no lora_{lack}")
    return {m: (h["A"], h["B"]) for m, h in halves.items()}


def _held(module: str, half: str, tensor: torch.Tensor) -> torch.Tensor:
    if not tensor.is_floating_point():
        raise AdapterInvalid(f"{module}: lora_{half} has dtype {tensor.dtype}; a float type is required")
    if tensor.ndim != 2:
        raise AdapterInvalid(f"{module}: lora_{half} must be 2-D, got shape {list(tensor.shape)}")
    dtype = tensor.dtype if tensor.dtype in HELD_DTYPES else torch.bfloat16 if tensor.dtype in _FP8_DTYPES \
        else torch.float32
    # copy=True: detach from the file's memory map, which the store may delete later.
    return tensor.to(dtype, copy=True)


def in_float32(adapter: Adapter) -> Adapter:
    """The adapter with float32 weights, for computing with them (the same object if they are float32)."""
    if all(t.dtype == torch.float32 for w in adapter.weights.values() for t in (w.A, w.B)):
        return adapter
    weights = {m: LoraWeights(w.A.float(), w.B.float(), w.scale) for m, w in adapter.weights.items()}
    return replace(adapter, weights=weights)


def parse_card(data: bytes) -> str:
    return utf8_text(CARD_FILE, data, MAX_CARD_BYTES)


def read_card(folder: Path) -> str | None:
    """The folder's README.md, if it is a regular file (not a link: a folder named by a server-side path is
    confined only as far as its two adapter files) within the size limit; else no card, logged."""
    try:
        data = read_regular_file(Path(folder) / CARD_FILE, MAX_CARD_BYTES)
        return None if data is None else parse_card(data)
    except (OSError, LoraplexError) as e:
        log.warning("%s: %s not read as the adapter's card: %s", folder, CARD_FILE, e)
        return None


def _build(name: str, alpha: float, pairs: dict, rank_of, scale_of, card: str | None = None,
           chat_template: str | None = None) -> Adapter:
    weights, size = {}, 0
    for module, (a, b) in sorted(pairs.items(), key=lambda kv: (_layer(kv[0]), kv[0])):
        A, B = _held(module, "A", a), _held(module, "B", b)
        if A.shape[0] != rank_of(module):
            raise AdapterInvalid(f"{module}: lora_A has r={A.shape[0]} rows, but the config says r={rank_of(module)}")
        size += a.numel() * a.element_size() + b.numel() * b.element_size()
        weights[module] = LoraWeights(A, B, scale_of(module))
    return Adapter(
        name=name,
        rank=max(w.rank for w in weights.values()),
        alpha=float(alpha),
        weights=weights,
        target_modules=tuple(sorted({k.split(".")[2] for k in weights})),
        size_bytes=size,
        card=card,
        chat_template=chat_template,
    )


def read_peft_folder(path: Path, name: str) -> Adapter:
    """adapter_config.json + adapter_model.safetensors, as `peft.PeftModel.save_pretrained` writes them, the
    README.md it writes beside them as the adapter's card, and a tokenizer's chat template saved there."""
    validate_name(name)
    config_path = Path(path) / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterInvalid(f"missing {CONFIG_FILE}")
    with config_path.open("rb") as f:
        config = parse_config(f.read(MAX_CONFIG_BYTES + 1))  # one byte past the limit is enough to refuse it
    pairs = _pairs(_read_safetensors(Path(path) / WEIGHTS_FILE))
    _check_targeted(config, pairs)
    return _build(
        name, config.alpha, pairs,
        rank_of=lambda m: config.rank_for(_module_path(m)),
        scale_of=lambda m: config.scale_for(_module_path(m)),
        card=read_card(path),
        chat_template=read_template(path),
    )


def _check_targeted(config: AdapterConfig, pairs: dict) -> None:
    # PEFT silently drops weights for modules it does not target; serving them would disagree with PEFT.
    for module in pairs:
        if not config.targets(_module_path(module)):
            raise AdapterInvalid(f"{module}: has weights but is not in target_modules {config.target_modules!r}")


def read_raw_safetensors(path: Path, name: str, rank: int, alpha: float) -> Adapter:
    """One .safetensors with PEFT-style keys and no config; the uploader supplies rank and alpha."""
    validate_name(name)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise AdapterInvalid(f"rank must be a positive integer, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise AdapterInvalid(f"alpha must be a finite number, got {alpha!r}")
    pairs = _pairs(_read_safetensors(Path(path)))
    return _build(name, alpha, pairs, rank_of=lambda m: rank, scale_of=lambda m: alpha / rank)


def _peft_key(module: str, half: str) -> str:
    return f"base_model.model.{_module_path(module)}.lora_{half}.weight"


def _config_for(adapter: Adapter) -> bytes:
    # Patterns are regexes matched against a dotted suffix; escaping pins each one to a single module.
    rank_pattern, alpha_pattern = {}, {}
    for module, w in adapter.weights.items():
        key = re.escape(_module_path(module).removeprefix("model."))
        if w.rank != adapter.rank:
            rank_pattern[key] = w.rank
        if w.scale != adapter.alpha / w.rank:
            alpha_pattern[key] = w.scale * w.rank
    return config_json(adapter.rank, adapter.alpha, list(adapter.target_modules), rank_pattern, alpha_pattern)


def peft_folder_files(adapter: Adapter) -> dict[str, bytes]:
    """The files of a PEFT folder, as bytes (tensors in their held dtypes), with the card and the chat template
    if the adapter has them."""
    tensors = {}
    for module, w in adapter.weights.items():
        tensors[_peft_key(module, "A")] = w.A.contiguous()
        tensors[_peft_key(module, "B")] = w.B.contiguous()
    card = {} if adapter.card is None else {CARD_FILE: adapter.card.encode()}
    template = {} if adapter.chat_template is None else {TEMPLATE_FILE: adapter.chat_template.encode()}
    return {CONFIG_FILE: _config_for(adapter), WEIGHTS_FILE: save(tensors), **card, **template}


def raw_to_peft_files(raw_path: Path, adapter: Adapter) -> dict[str, bytes]:
    """A raw upload re-keyed into PEFT folder form, keeping its stored dtype (so size_bytes survives a restart)."""
    tensors = {}
    for key, tensor in _read_safetensors(Path(raw_path)).items():
        module, half = _parse_key(key)
        tensors[_peft_key(module, half)] = tensor
    return {CONFIG_FILE: _config_for(adapter), WEIGHTS_FILE: save(tensors)}


def write_peft_folder(adapter: Adapter, path: Path) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for file_name, data in peft_folder_files(adapter).items():
        (path / file_name).write_bytes(data)


def validate(adapter: Adapter, base: BaseShapes, limits: AdapterLimits) -> None:
    validate_name(adapter.name)
    if not adapter.weights:
        raise AdapterInvalid(f"adapter {adapter.name!r} has no LoRA weights")
    if adapter.held_bytes > limits.max_bytes:
        raise AdapterTooLarge(
            f"adapter {adapter.name!r} holds {adapter.held_bytes} bytes of weights in memory; "
            f"the limit is {limits.max_bytes}"
        )
    for module, weights in adapter.weights.items():
        _validate_module(module, weights, base, limits)


def _validate_module(module: str, w: LoraWeights, base: BaseShapes, limits: AdapterLimits) -> None:
    if module not in base:
        raise AdapterInvalid(_unknown_module(module, base))
    out_features, in_features = base[module]
    if w.A.ndim != 2 or w.B.ndim != 2:
        raise AdapterInvalid(f"{module}: lora_A and lora_B must be 2-D, got {list(w.A.shape)} and {list(w.B.shape)}")
    r = w.A.shape[0]
    if w.B.shape[1] != r:
        raise AdapterInvalid(f"{module}: lora_A has r={r} but lora_B has r={w.B.shape[1]}")
    if r < 1:
        raise AdapterInvalid(f"{module}: rank must be at least 1")
    if r > limits.max_rank:
        raise AdapterTooLarge(f"{module}: rank {r} exceeds this server's max_rank {limits.max_rank}")
    _expect_shape(module, "lora_A", w.A, (r, in_features), "[r, in_features]")
    _expect_shape(module, "lora_B", w.B, (out_features, r), "[out_features, r]")
    for half, tensor in (("lora_A", w.A), ("lora_B", w.B)):
        if tensor.dtype not in HELD_DTYPES or tensor.device.type != "cpu":
            raise AdapterInvalid(f"{module}: {half} must be float32, float16 or bfloat16 on cpu, got {tensor.dtype} "
                                 f"on {tensor.device}")
        if not torch.isfinite(tensor).all():
            raise AdapterInvalid(f"{module}: {half} contains NaN or inf")
    if not math.isfinite(w.scale):
        raise AdapterInvalid(f"{module}: scale {w.scale} is not finite")
    _check_magnitude(module, w)


def _check_magnitude(module: str, w: LoraWeights) -> None:
    a_max, b_max = w.A.abs().max().item(), w.B.abs().max().item()
    bound = abs(w.scale) * w.rank * a_max * b_max
    if bound > _MAX_UPDATE:
        raise AdapterInvalid(f"{module}: scale {w.scale:g}, r={w.rank}, max|lora_A| {a_max:g} and max|lora_B| "
                             f"{b_max:g} could change a weight by up to {bound:g}; the limit is {_MAX_UPDATE:g}")
    # Alone too: B·scale is formed in float32 or less, where a huge scale turns an all-zero B into NaN.
    if abs(w.scale) > _MAX_UPDATE:
        raise AdapterInvalid(f"{module}: scale {w.scale:g} (alpha / r) is beyond the limit of {_MAX_UPDATE:g}")


def _expect_shape(module: str, half: str, tensor: torch.Tensor, expected: tuple[int, int], meaning: str) -> None:
    if tuple(tensor.shape) != expected:
        raise AdapterInvalid(f"{module}: {half} has shape {list(tensor.shape)}, expected {list(expected)} {meaning}")


def _unknown_module(module: str, base: BaseShapes) -> str:
    layers = sorted({_layer(k) for k in base})
    match = re.fullmatch(r"layers\.(\d+)\.\w+", module)
    if layers and match and int(match[1]) not in layers:
        return f"{module}: layer {match[1]} is out of range; the base model has layers {layers[0]}..{layers[-1]}"
    return f"{module}: the base model has no such module"
