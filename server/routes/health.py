"""GET /health: liveness for anyone; what is loaded and how busy, for a caller with a key."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.schemas import Health

router = APIRouter()


@router.get("/health", response_model=Health, response_model_exclude_none=True)
async def health(request: Request):
    rt = request.app.state.runtime
    known = not request.app.state.keyring.enabled or getattr(request.state, "principal", None) is not None
    if not known:  # an anonymous caller learns only that the server is up, not what it serves or how busy
        return Health(status="ok")
    scheduler = rt.engine.scheduler
    return Health(status="ok", model=rt.model_id, device=str(rt.device), dtype=str(rt.dtype).removeprefix("torch."),
                  lora_mode=rt.lora_mode, weight_format=rt.weight_format, base_weight_bytes=rt.base_weight_bytes,
                  adapters=len(rt.registry),
                  resident_adapters=len(rt.adapter_slots.resident()), running=len(scheduler.running),
                  waiting=len(scheduler.waiting))
