"""GET /health: liveness plus what is loaded."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.schemas import Health

router = APIRouter()


@router.get("/health", response_model=Health)
async def health(request: Request):
    rt = request.app.state.runtime
    scheduler = rt.engine.scheduler
    return Health(status="ok", model=rt.model_id, device=str(rt.device), dtype=str(rt.dtype).removeprefix("torch."),
                  lora_mode=rt.settings.lora_mode, adapters=len(rt.registry),
                  resident_adapters=len(rt.adapter_slots.resident()), running=len(scheduler.running),
                  waiting=len(scheduler.waiting))
