"""A weighted mix of adapters as one adapter: h = W0·x + sum_i w_i·(alpha_i/r_i)·B_i(A_i·x).

Per module the members' ranks are concatenated: A stacked [sum r_i, in], B side by side [out, sum r_i]
with w_i·alpha_i/r_i folded in, scale 1. That is PEFT's `add_weighted_adapter(combination_type="cat")`
and exact: B_cat·A_cat·x is the sum of the members' branches, so a mix is served by every LoRA path as
any adapter is, with nothing merged into the base. One member with a weight is a per-request scale.

Merging a mix into the base would be exact too, but it is built per request and switching away costs a
restore, so mixes always run as side branches (`is_mix`, read by server.lora.policy).
"""

from __future__ import annotations

import math
import threading
import weakref
from collections import OrderedDict, deque
from dataclasses import dataclass

import torch

from adapters.errors import InvalidRequest
from adapters.format import Adapter, LoraWeights


@dataclass(frozen=True, eq=False)
class AdapterMix(Adapter):
    members: tuple[tuple[Adapter, float], ...] = ()  # (adapter, weight) in request order

    @property
    def adapters(self) -> tuple[Adapter, ...]:
        return tuple(adapter for adapter, _ in self.members)


def is_mix(adapter) -> bool:
    return isinstance(adapter, AdapterMix)


def check_weights(weights: list[float], max_members: int, max_abs_weight: float) -> None:
    """The limits a request's mix must keep: raises InvalidRequest (422) naming the first one broken."""
    if not weights:
        raise InvalidRequest("`adapters` is empty: leave it out for the base model")
    if len(weights) > max_members:
        raise InvalidRequest(f"{len(weights)} adapters in one request; the limit is {max_members}")
    for w in weights:
        if not math.isfinite(w) or abs(w) > max_abs_weight:
            raise InvalidRequest(f"adapter weight {w} is outside [-{max_abs_weight}, {max_abs_weight}]")


def mix_name(members: list[tuple[Adapter, float]]) -> str:
    """Names only, no weights: the name labels metrics, whose series must not grow with every weight asked."""
    return "+".join(adapter.name for adapter, _ in members)


def mix_adapters(members: list[tuple[Adapter, float]]) -> AdapterMix:
    """The concatenated adapter of `members`; a module only some members target gets only their ranks."""
    by_module: dict[str, list[tuple[LoraWeights, float]]] = {}
    for adapter, weight in members:
        for module, w in adapter.weights.items():
            by_module.setdefault(module, []).append((w, weight))
    weights = {}
    for module, parts in by_module.items():
        # float32 whatever the members are held in: the weights are scaled here, and rounding them to 16 bits
        # would make the mix differ from the members' branches summed
        A = torch.cat([w.A.float() for w, _ in parts], dim=0)
        B = torch.cat([w.B.float() * (weight * w.scale) for w, weight in parts], dim=1)
        weights[module] = LoraWeights(A, B, 1.0)
    rank = max(w.rank for w in weights.values())
    return AdapterMix(
        name=mix_name(members),
        rank=rank,
        alpha=float(rank),  # with scale 1 in every module, as PEFT's cat sets lora_alpha = r
        weights=weights,
        target_modules=tuple(sorted({m for adapter, _ in members for m in adapter.target_modules})),
        size_bytes=sum(adapter.size_bytes for adapter, _ in members),
        chat_template=_shared_template(members),
        members=tuple(members),
    )


def _shared_template(members: list[tuple[Adapter, float]]) -> str | None:
    """The members' chat template if they all have the same one (a lone scaled adapter has its own); else the
    base's, as no one member's template speaks for the others."""
    templates = {adapter.chat_template for adapter, _ in members}
    return templates.pop() if len(templates) == 1 else None


class MixCache:
    """The mixes built for recent requests, keyed by their members (the very Adapter objects) and weights.

    One object per distinct mix, so requests asking for the same mix share its device slot and prefix-cache
    entries (both key adapters by identity). Bounded by the bytes of the mixes' weights; a mix dropped here
    goes to `retired`, the registry's feed of versions whose device slots should be freed once unused.
    """

    def __init__(self, retired: deque[weakref.ref], max_bytes: int, is_current=lambda adapter: True):
        self._retired = retired
        self._max_bytes = max_bytes
        self._is_current = is_current  # False for a member removed or replaced in the registry since
        self._mixes: OrderedDict[tuple, AdapterMix] = OrderedDict()
        self._lock = threading.Lock()
        self.builds = 0

    @staticmethod
    def _key(members: list[tuple[Adapter, float]]) -> tuple:
        # ids are safe as keys: a cached mix holds its members, so their ids are not reused meanwhile
        return tuple((id(adapter), float(weight)) for adapter, weight in members)

    def find(self, members: list[tuple[Adapter, float]]) -> Adapter | None:
        """The adapter serving `members` if no build is needed: a lone member at weight 1 is itself."""
        if len(members) == 1 and members[0][1] == 1.0:
            return members[0][0]
        key = self._key(members)
        with self._lock:
            mix = self._mixes.get(key)
            if mix is not None:
                self._mixes.move_to_end(key)
            return mix

    def get(self, members: list[tuple[Adapter, float]]) -> Adapter:
        found = self.find(members)
        if found is not None:
            return found
        mix, key = mix_adapters(members), self._key(members)  # built outside the lock: copies every weight
        with self._lock:
            if key in self._mixes:  # another request built it meanwhile
                return self._mixes[key]
            self._mixes[key] = mix
            self.builds += 1
            for stale in [k for k, m in self._mixes.items() if not all(map(self._is_current, m.adapters))]:
                self._retire(stale)
            held = sum(m.held_bytes for m in self._mixes.values())
            for old in list(self._mixes)[:-1]:  # least recent first; the newest always stays
                if held <= self._max_bytes:
                    break
                held -= self._mixes[old].held_bytes
                self._retire(old)
        return mix

    def _retire(self, key: tuple) -> None:
        self._retired.append(weakref.ref(self._mixes.pop(key)))

    def __len__(self) -> int:
        with self._lock:
            return len(self._mixes)
