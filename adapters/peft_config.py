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
import time
from dataclasses import dataclass, field

import regex

from adapters.errors import AdapterInvalid

CONFIG_FILE = "adapter_config.json"
MAX_CONFIG_BYTES = 64 * 1024  # a real config is under a KiB, some tens of KiB with a pattern for every module
_MAX_RANK = 1 << 16  # far beyond any hidden size; keeps alpha / r a float

# A user's regex must not hold the server, so each config's patterns share two budgets. Characters as if
# counted repeats were written out: the `regex` module expands them when compiling, so "(?:a{3000}){3000}"
# would be compiled as nine million copies of "a". Thread CPU time for matching: "(?:.|.)*\d\d" backtracks exponentially
# on a module path; `regex` stops at a timeout where `re` cannot be stopped.
_MAX_WRITTEN_OUT_CHARS = MAX_CONFIG_BYTES
_MATCH_BUDGET_S = 1.0
_COUNTED_REPEAT = re.compile(r"\{(\d*),?(\d*)\}")

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
    _regexes: "_Regexes" = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_regexes", _Regexes(self))

    def rank_for(self, path: str) -> int:
        return self.rank_pattern.get(self._regexes.first_key(self.rank_pattern, path), self.r)

    def alpha_for(self, path: str) -> float:
        return float(self.alpha_pattern.get(self._regexes.first_key(self.alpha_pattern, path), self.alpha))

    def scale_for(self, path: str) -> float:
        r = self.rank_for(path)
        return self.alpha_for(path) / (math.sqrt(r) if self.use_rslora else r)

    def targets(self, path: str) -> bool:
        """PEFT's rule: a string is a full-match regex, a list entry matches the path or a dotted suffix."""
        if self.target_modules is None:
            return True
        if isinstance(self.target_modules, str):
            return self._regexes.targets(path)
        return any(path == t or path.endswith("." + t) for t in self.target_modules)


class _Regexes:
    """A config's patterns, compiled once and matched within the config's budgets (see above)."""

    def __init__(self, config: AdapterConfig):
        self._chars_left = _MAX_WRITTEN_OUT_CHARS
        self._seconds_left = _MATCH_BUDGET_S
        # Same as peft.utils.other.get_pattern_key: a key is a regex matched against a dotted suffix.
        self._suffix = {
            key: self._compile(rf"(.*\.)?({key})$", key, what)
            for what, patterns in (("rank_pattern", config.rank_pattern), ("alpha_pattern", config.alpha_pattern))
            for key in patterns
        }
        target = config.target_modules
        self._target = None
        if isinstance(target, str) and target.lower() != "all-linear":
            self._target = self._compile(target, target, "target_modules")

    def first_key(self, patterns: dict, path: str) -> str | None:
        """The first key of `patterns` whose regex matches `path` (PEFT's order), or None."""
        for key in patterns:
            if self._match(self._suffix[key].match, path, key):
                return key
        return None

    def targets(self, path: str) -> bool:
        return self._target is None or self._match(self._target.fullmatch, path, self._target.pattern)

    def _compile(self, source: str, key: str, what: str) -> regex.Pattern:
        self._chars_left -= _written_out(source, self._chars_left)
        if self._chars_left < 0:
            raise AdapterInvalid(f"{CONFIG_FILE}: {what} {_short(key)} makes the patterns too large: together they "
                                 f"may take {_MAX_WRITTEN_OUT_CHARS} characters with counted repeats written out")
        try:
            re.compile(source)  # the syntax PEFT accepts, which `regex` would widen
            return regex.compile(source)
        except (re.error, regex.error, RecursionError, OverflowError) as e:
            raise AdapterInvalid(f"{CONFIG_FILE}: {what} has an invalid regex {_short(key)} ({e})") from e

    def _match(self, match, path: str, key: str) -> bool:
        if self._seconds_left <= 0:
            raise self._too_slow(key)
        start = time.thread_time()  # this thread's CPU: waiting for the GIL or a busy machine costs nothing
        try:
            return match(path, timeout=self._seconds_left) is not None
        except TimeoutError as e:
            raise self._too_slow(key) from e
        finally:
            self._seconds_left -= time.thread_time() - start

    def _too_slow(self, key: str) -> AdapterInvalid:
        return AdapterInvalid(f"{CONFIG_FILE}: matching the regex {_short(key)} against module paths took too long "
                              f"(a config's patterns get {_MATCH_BUDGET_S:g} s in all); use simpler patterns")


def _written_out(pattern: str, limit: int) -> int:
    """Length with counted repeats written out, over-counted as if each one nested all the rest; stops past limit."""
    size = len(pattern)
    for counts in _COUNTED_REPEAT.findall(pattern):
        size *= max([1] + [int(n) if len(n) <= 9 else limit + 1 for n in counts if n])
        if size > limit:
            break
    return size


def _short(value) -> str:
    """repr(value), cut to a length an error message can carry."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def parse_config(raw: bytes) -> AdapterConfig:
    if len(raw) > MAX_CONFIG_BYTES:
        raise AdapterInvalid(f"{CONFIG_FILE} is {len(raw)} bytes; the limit is {MAX_CONFIG_BYTES}")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterInvalid(f"{CONFIG_FILE} is not valid JSON ({e})") from e
    except ValueError as e:  # Python's int digit limit, the only other ValueError json raises
        raise AdapterInvalid(f"{CONFIG_FILE} holds a number with too many digits") from e
    except RecursionError as e:
        raise AdapterInvalid(f"{CONFIG_FILE} nests arrays or objects too deeply") from e
    if not isinstance(data, dict):
        raise AdapterInvalid(f"{CONFIG_FILE} must be a JSON object, got {type(data).__name__}")
    _refuse_unsupported(data)
    return AdapterConfig(
        r=_positive_int(data.get("r"), "r"),
        alpha=_number(data.get("lora_alpha"), "lora_alpha"),
        target_modules=_target_modules(data.get("target_modules")),
        rank_pattern=_patterns(data, "rank_pattern", _positive_int),
        alpha_pattern=_patterns(data, "alpha_pattern", _number),
        use_rslora=_bool(data.get("use_rslora", False), "use_rslora"),
    )


def _refuse_unsupported(data: dict) -> None:
    if data.get("peft_type", "LORA") != "LORA":
        raise AdapterInvalid(f"{CONFIG_FILE}: peft_type {_short(data['peft_type'])} is not supported; only LORA is")
    for key, reason in _REFUSED.items():
        if data.get(key):
            raise AdapterInvalid(f"{CONFIG_FILE}: {reason}")
    if data.get("bias") not in (None, "none"):
        raise AdapterInvalid(f"{CONFIG_FILE}: bias={_short(data['bias'])} is not supported; only 'none' is")


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_RANK:
        raise AdapterInvalid(f"{CONFIG_FILE}: {name} must be a positive integer up to {_MAX_RANK}, got {_short(value)}")
    return value


def _number(value, name: str) -> float:
    try:
        number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    except OverflowError:  # an int too large for any float
        number = math.inf
    if not math.isfinite(number):
        raise AdapterInvalid(f"{CONFIG_FILE}: {name} must be a finite number, got {_short(value)}")
    return number


def _bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise AdapterInvalid(f"{CONFIG_FILE}: {name} must be true or false, got {_short(value)}")
    return value


def _dict(data: dict, name: str) -> dict:
    value = data.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise AdapterInvalid(f"{CONFIG_FILE}: {name} must be an object, got {_short(value)}")
    return value


def _patterns(data: dict, name: str, check) -> dict:
    return {key: check(value, f"{name}[{_short(key)}]") for key, value in _dict(data, name).items()}


def _target_modules(value) -> tuple[str, ...] | str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise AdapterInvalid(f"{CONFIG_FILE}: target_modules must be a string or a list of strings, got {_short(value)}")


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
