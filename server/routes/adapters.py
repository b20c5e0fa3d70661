"""Adapter upload, listing, inspection and deletion."""

from __future__ import annotations

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from starlette.concurrency import run_in_threadpool

from server.auth import Principal
from server.errors import AdapterInvalid
from server.routes.security import admin, caller, check_may_manage, check_may_see
from server.schemas import AdapterDetail, AdapterInfo, AdapterList

router = APIRouter(prefix="/adapters")


def adapter_info(adapter) -> AdapterInfo:
    return AdapterInfo(name=adapter.name, rank=adapter.rank, alpha=adapter.alpha,
                       target_modules=list(adapter.target_modules), size_bytes=adapter.size_bytes)


@router.post("", status_code=201, response_model=AdapterInfo,
             responses={409: {"description": "name taken"}, 413: {"description": "too large"},
                        422: {"description": "invalid adapter"}})
async def upload_adapter(request: Request, name: str = Form(...), files: list[UploadFile] = File(...),
                         rank: int | None = Form(None), alpha: float | None = Form(None),
                         replace: bool = Form(False, description="swap an existing adapter of this name atomically"),
                         principal: Principal = Depends(admin)):
    check_may_manage(principal, name)
    rt = request.app.state.runtime
    contents: dict[str, bytes] = {}  # the whole body is within the upload limit already (server.gate)
    for upload in files:
        if not upload.filename:
            raise AdapterInvalid("every file part needs a file name")
        if upload.filename in contents:
            raise AdapterInvalid(f"file {upload.filename!r} sent twice")
        contents[upload.filename] = await upload.read()
    adapter = await run_in_threadpool(rt.registry.register_upload, name, contents, rank, alpha, replace)
    return adapter_info(adapter)


@router.get("", response_model=AdapterList)
async def list_adapters(request: Request, principal: Principal = Depends(caller)):
    adapters = request.app.state.runtime.registry.list()
    return AdapterList(adapters=[adapter_info(a) for a in adapters if principal.may_use(a.name)])


@router.get("/{name}", response_model=AdapterDetail, responses={404: {"description": "unknown adapter"}})
async def get_adapter(name: str, request: Request, principal: Principal = Depends(caller)):
    check_may_see(principal, name)
    adapter = request.app.state.runtime.registry.describe(name)
    return AdapterDetail(**adapter_info(adapter).model_dump(), card=adapter.card, chat_template=adapter.chat_template)


@router.delete("/{name}", status_code=204, responses={404: {"description": "unknown adapter"}})
async def delete_adapter(name: str, request: Request, principal: Principal = Depends(admin)):
    check_may_see(principal, name)
    # Requests already running hold the Adapter object and finish with it; new ones get 404.
    await run_in_threadpool(request.app.state.runtime.registry.remove, name)
