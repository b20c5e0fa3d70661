"""One engine replica of the cluster: a whole loraplex server (model, registry, engine thread) in a Ray
Serve deployment, answering the HTTP requests the ingress forwards to it.

Ray Serve's model multiplexing does the adapter affinity: the ingress tags each generation request with its
adapter as the multiplexed model id, Serve routes it to a replica that already holds that adapter, and
each replica holds at most `adapters_per_replica` of them (Serve evicts the least recently used).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from ray import serve

from server.app import create_app
from server.cluster.forwarding import BASE_MODEL_ID, ForwardedRequest, Head, call_app
from server.cluster.shared_registry import SharedStoreRegistry
from server.heap import CollectionTimer, freeze_startup_objects
from server.runtime import Runtime
from server.settings import Settings

REPLICA_HEADER = b"x-loraplex-replica"


class HeldAdapter:
    """What Serve's multiplexing cache keeps per adapter id; eviction calls `__del__`, which releases it."""

    def __init__(self, registry: SharedStoreRegistry, name: str):
        self.registry = registry
        self.name = name
        self._released = False

    def __del__(self) -> None:  # Serve calls it on eviction, and the garbage collector once more later
        if not self._released:
            self._released = True
            self.registry.release(self.name)


@serve.deployment
class EngineReplica:
    def __init__(self, settings: Settings, adapters_per_replica: int):
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")  # access log, as in one process
        self.app = create_app(settings)
        self.runtime = Runtime(settings, registry_type=SharedStoreRegistry)
        self.app.state.runtime = self.runtime  # the app's lifespan does not run here: the replica owns the runtime
        freeze_startup_objects()
        self._collections = CollectionTimer(self.runtime.metrics.observe_gc).install()
        self.replica_id = serve.get_replica_context().replica_id.unique_id.encode()
        registry = self.runtime.registry

        async def hold(name: str) -> HeldAdapter | None:
            if name == BASE_MODEL_ID:
                return None
            await asyncio.to_thread(registry.hold, name)
            return HeldAdapter(registry, name)

        # The bound is a deployment argument, so the loader is wrapped here rather than at class level.
        self.hold = serve.multiplexed(max_num_models_per_replica=adapters_per_replica)(hold)

    async def forward(self, request: ForwardedRequest) -> AsyncIterator[Head | bytes]:
        adapter = serve.get_multiplexed_model_id()
        if adapter:
            await self.hold(adapter)
        async for item in call_app(self.app, request):
            if isinstance(item, tuple):
                status, headers = item
                item = status, [*headers, (REPLICA_HEADER, self.replica_id)]
            yield item

    def __del__(self) -> None:
        self._collections.remove()
        self.runtime.stop()
