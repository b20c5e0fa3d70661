"""FastAPI app factory; the lifespan builds the runtime (model, registry, engine) and stops it."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from server.routes import adapters, errors, generate, health, openai
from server.runtime import Runtime
from server.settings import Settings

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.runtime = await asyncio.to_thread(Runtime, settings)
        try:
            yield
        finally:
            await asyncio.to_thread(app.state.runtime.stop)

    app = FastAPI(title="loraplex", version="0.1.0", lifespan=lifespan,
                  description="One frozen base LLM, many LoRA adapters.")
    errors.install(app)
    for module in (generate, adapters, health, openai):
        app.include_router(module.router)
    return app
