"""FastAPI app factory; the lifespan builds the runtime (model, registry, engine) and stops it."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from server.auth import KeyRing
from server.edge import EdgeGuard, is_loopback_name
from server.gate import Gate
from server.heap import CollectionTimer, freeze_startup_objects
from server.request_log import RequestLogMiddleware
from server.routes import adapters, errors, generate, health, metrics, openai, tokenize
from server.runtime import Runtime
from server.settings import Settings

log = logging.getLogger(__name__)
WEB_DIR = Path(__file__).resolve().parent.parent / "clients" / "web"  # the chat page, no build step


class InsecureBind(Exception):
    pass


def check_security(settings: Settings, keyring: KeyRing) -> None:
    if keyring.enabled:
        return
    if not is_loopback_name(settings.host):
        raise InsecureBind(f"no API keys are configured, so loraplex only binds to loopback, not {settings.host}: "
                           "set LORAPLEX_ADMIN_KEYS / LORAPLEX_USER_KEYS or LORAPLEX_KEYS_FILE")
    log.warning("*** DEVELOPMENT MODE: no API keys configured; every caller is admin. Bound to %s only. ***",
                settings.host)


def create_app(settings: Settings | None = None, load_now: bool = False) -> FastAPI:
    """`load_now` builds the runtime here, so a model that cannot be served fails the call with its own error,
    before a server starts; otherwise the lifespan builds it."""
    settings = settings or Settings()
    gate = Gate.from_settings(settings)
    keyring = gate.keys
    check_security(settings, keyring)
    runtime = Runtime(settings) if load_now else None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.runtime = runtime or await asyncio.to_thread(Runtime, settings)
        freeze_startup_objects()
        collections = CollectionTimer(app.state.runtime.metrics.observe_gc).install()
        try:
            yield
        finally:
            collections.remove()
            await asyncio.to_thread(app.state.runtime.stop)

    app = FastAPI(title="loraplex", version="0.1.0", lifespan=lifespan,
                  description="One frozen base LLM, many LoRA adapters.")
    app.state.keyring = keyring
    app.add_middleware(EdgeGuard, gate=gate)
    app.add_middleware(RequestLogMiddleware)  # outermost: refusals at the edge are logged too
    errors.install(app)
    for module in (generate, adapters, health, metrics, openai, tokenize):
        app.include_router(module.router)

    @app.get("/", include_in_schema=False)
    async def chat_page():
        return FileResponse(WEB_DIR / "index.html")

    app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")
    return app
