"""adapter_config.json: the subset of PEFT's LoraConfig that loraplex understands.

Only what changes the math is kept (r, alpha, per-module patterns, rsLoRA, which modules are targeted).
Options that would make our side branch compute something other than PEFT does (fan_in_fan_out, DoRA,
trained biases, extra trained modules) are refused here, so an uploader learns it at upload time
instead of from subtly wrong outputs.

Module paths are the Linear's name inside a Hugging Face Llama-style model, e.g.
"model.layers.3.self_attn.q_proj", because that is what PEFT matches its patterns against.
"""

import json
import math
import re
from dataclasses import dataclass, field

from server.errors import AdapterInvalid

CONFIG_FILE = "adapter_config.json"

_REFUSED = {
    "fan_in_fan_out": "fan_in_fan_out (Conv1D-style transposed weights) is not supported",
    "use_dora": "DoRA adapters are not supported",
    "modules_to_save": "modules_to_save (fully trained extra modules) is not supported",
    "lora_bias": "LoRA bias terms are not supported",
}


@dataclass(frozen=True)
class AdapterConfig:
    r: int
    alpha: float
    target_modules: tuple[str, ...] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False

    def rank_for(self, path: str) -> int:
        return self.rank_pattern.get(_pattern_key(self.rank_pattern, path), self.r)

    def alpha_for(self, path: str) -> float:
        return float(self.alpha_pattern.get(_pattern_key(self.alpha_pattern, path), self.alpha))

    def scale_for(self, path: str) -> float:
        r = self.rank_for(path)
        return self.alpha_for(path) / (math.sqrt(r) if self.use_rslora else r)

    def targets(self, path: str) -> bool:
        """PEFT's rule: a string is a full-match regex, a list entry matches the path or a dotted suffix."""
        if self.target_modules is None:
            return True
        if isinstance(self.target_modules, str):
            if self.target_modules.lower() == "all-linear":
                return True
            return _regex(self.target_modules, "target_modules").fullmatch(path) is not None
        return any(path == t or path.endswith("." + t) for t in self.target_modules)


def _pattern_key(patterns: dict, path: str) -> str | None:
    # Same as peft.utils.other.get_pattern_key: the first key (a regex) matching a dotted suffix wins.
    for key in patterns:
        if _regex(rf"(.*\.)?({key})$", "rank_pattern/alpha_pattern").match(path):
            return key
    return None


def _regex(pattern: str, what: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise AdapterInvalid(f"{CONFIG_FILE}: {what} has an invalid regex {pattern!r} ({e})") from e


def parse_config(raw: bytes) -> AdapterConfig:
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterInvalid(f"{CONFIG_FILE} is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise AdapterInvalid(f"{CONFIG_FILE} must be a JSON object, got {type(data).__name__}")
    _refuse_unsupported(data)
    return AdapterConfig(
        r=_positive_int(data.get("r"), "r"),
        alpha=_number(data.get("lora_alpha"), "lora_alpha"),
        target_modules=_target_modules(data.get("target_modules")),
        rank_pattern={k: _positive_int(v, f"rank_pattern[{k!r}]") for k, v in _dict(data, "rank_pattern").items()},
        alpha_pattern={k: _number(v, f"alpha_pattern[{k!r}]") for k, v in _dict(data, "alpha_pattern").items()},
        use_rslora=_bool(data.get("use_rslora", False), "use_rslora"),
    )


def _refuse_unsupported(data: dict) -> None:
    if data.get("peft_type", "LORA") != "LORA":
        raise AdapterInvalid(f"{CONFIG_FILE}: peft_type {data['peft_type']!r} is not supported; only LORA is")
    for key, reason in _REFUSED.items():
        if data.get(key):
            raise AdapterInvalid(f"{CONFIG_FILE}: {reason}")
    if data.get("bias") not in (None, "none"):
        raise AdapterInvalid(f"{CONFIG_FILE}: bias={data['bias']!r} is not supported; only 'none' is")


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AdapterInvalid(f"{CONFIG_FILE}: {name} must be a positive integer, got {value!r}")
    return value


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AdapterInvalid(f"{CONFIG_FILE}: {name} must be a finite number, got {value!r}")
    return float(value)


def _bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise AdapterInvalid(f"{CONFIG_FILE}: {name} must be true or false, got {value!r}")
    return value


def _dict(data: dict, name: str) -> dict:
    value = data.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise AdapterInvalid(f"{CONFIG_FILE}: {name} must be an object, got {value!r}")
    return value


def _target_modules(value) -> tuple[str, ...] | str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise AdapterInvalid(f"{CONFIG_FILE}: target_modules must be a string or a list of strings, got {value!r}")


def config_json(r: int, alpha: float, target_modules: list[str],
                rank_pattern: dict[str, int], alpha_pattern: dict[str, float]) -> bytes:
    """A config `peft.PeftModel.from_pretrained` loads as a causal-LM LoRA adapter."""
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": target_modules,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
    }
    return json.dumps(config, indent=2).encode()
