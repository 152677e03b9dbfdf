"""Uploads: POST /v1/naturalize (events -> images) and POST /v1/events (events -> packets)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncGenerator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from starlette.formparsers import MultiPartException, MultiPartParser

from events import EventLimitError

from ..deps import AuthDep, MetricsDep, RegistryDep, SettingsDep, UploadSlotDep, run_budgeted
from ..guard import Budget, estimate_bins
from ..pipeline import RunOptions, naturalize
from ..protocol import encode_events, parse_emit
from ..registry import ModelEntry, NoDefaultModelError, RoiError, UnknownModelError
from ..render import UPLOAD_MEDIA, upload_body
from ..settings import Settings

# auth first, then one of max_concurrent_uploads slots (503 when none is free), before the body is read
router = APIRouter(prefix="/v1", tags=["naturalize"], dependencies=[AuthDep, UploadSlotDep])

_413 = status.HTTP_413_CONTENT_TOO_LARGE


async def _limited(request: Request, limit: int) -> AsyncGenerator[bytes, None]:
    """The request body, chunk by chunk, failing with 413 as soon as it passes ``limit`` bytes."""
    n = 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise HTTPException(_413, f"request body exceeds the upload limit of {limit} bytes")
        yield chunk


async def read_upload(request: Request, settings: Settings) -> tuple[bytes, str]:
    """The event file of a raw or multipart body and its file name; 408 when the body takes
    longer than ``body_timeout_s`` to arrive (a slow-body client holds no slot for longer)."""
    try:
        async with asyncio.timeout(settings.body_timeout_s):
            return await _read_upload(request, settings)
    except TimeoutError:
        raise HTTPException(
            status.HTTP_408_REQUEST_TIMEOUT, f"request body not received within {settings.body_timeout_s:g} s"
        ) from None


async def _read_upload(request: Request, settings: Settings) -> tuple[bytes, str]:
    """The event file of a raw or multipart body, and its file name (a format hint)."""
    limit = settings.max_upload_bytes
    length = request.headers.get("content-length")
    if length is not None:
        try:
            if int(length) > limit:
                raise HTTPException(
                    _413,
                    f"Content-Length {length} exceeds the upload limit of {limit} bytes",
                    headers={"Connection": "close"},
                )  # the body is not read (nor drained)
        except ValueError as exc:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, "invalid Content-Length") from exc
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        parser = MultiPartParser(request.headers, _limited(request, limit), max_files=1, max_fields=16)
        try:
            form = await parser.parse()
        except MultiPartException as exc:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT, f"bad multipart body: {exc.message}"
            ) from exc
        for _, value in form.multi_items():
            if not isinstance(value, str):
                data = await value.read()
                name = value.filename or ""
                await form.close()
                return data, name
        await form.close()
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "multipart body holds no file part")
    buf = bytearray()
    async for chunk in _limited(request, limit):
        buf += chunk
    return bytes(buf), request.query_params.get("filename", "")


def read_recording(data: bytes, name: str, settings: Settings) -> Any:
    """Decode an event file; 415 for an unknown format, 422 for a bad file, 413 for limits."""
    from events import EventFormatError, read, sniff_format

    if not data:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "empty body: send an event file")
    try:
        fmt = sniff_format(data, name)
    except EventFormatError as exc:
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, str(exc)) from exc
    try:
        rec = read(
            data,
            format=fmt,
            max_bytes=settings.max_upload_bytes,
            max_events=settings.max_events,
            max_decompressed=settings.max_decompressed_bytes,
        )
    except EventLimitError as exc:
        raise HTTPException(_413, str(exc)) from exc
    except EventFormatError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from exc
    if rec.duration_us > settings.max_duration_s * 1e6:
        raise HTTPException(
            _413,
            f"recording lasts {rec.duration_us / 1e6:.1f} s, over the limit of {settings.max_duration_s} s",
        )
    return rec


def _entry(registry: Any, name: str | None) -> ModelEntry:
    ok, reason = registry.ready
    if name is None and not ok:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"no model loaded: {reason}")
    try:
        return registry.get(name)
    except UnknownModelError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, exc.args[0]) from None


def _pick(registry: Any, name: str | None, rec: Any) -> tuple[ModelEntry, str]:
    """The model for this recording (the default-model rule, ``ModelRegistry.pick``) and why."""
    try:
        return registry.pick(name, rec.width, rec.height)  # type: ignore[no-any-return]
    except NoDefaultModelError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, exc.args[0]) from None
    except UnknownModelError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, exc.args[0]) from None


#: largest |time| a timestamp may name (bin arithmetic stays inside int64)
MAX_TIMESTAMP_US = 1 << 62


def parse_timestamps(text: str | None, limit: int) -> tuple[int, ...] | None:
    """``timestamps=t1,t2,...`` (integer µs on the recording's clock, at most ``limit``); 422 else."""
    if text is None:
        return None
    if text.count(",") >= limit:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"timestamps names more than {limit} times (max_timestamps)",
        )
    try:
        times = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            "timestamps must be comma-separated integers (microseconds)",
        ) from None
    if any(abs(t) > MAX_TIMESTAMP_US for t in times):
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, f"timestamps must lie within +-{MAX_TIMESTAMP_US}"
        )
    return times


def parse_roi(roi: str | None) -> Any:
    if roi is None or roi in ("default", "centre", "center", "full"):
        return roi
    parts = roi.split(",")
    if len(parts) != 4:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"roi must be 'x,y,w,h', 'centre', 'full' or 'default', got {roi!r}",
        )
    try:
        return [int(p) for p in parts]
    except ValueError as exc:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, f"roi values must be integers, got {roi!r}"
        ) from exc


#: the request body as OpenAPI declares it (``read_upload`` parses it by hand), so "Try it out"
#: in /docs can send a file: raw bytes, or one part of a multipart form
_FILE = {"type": "string", "format": "binary", "contentMediaType": "application/octet-stream"}
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "description": "an event file in any format events.read reads",
        "content": {
            "application/octet-stream": {"schema": _FILE},
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"file": _FILE}, "required": ["file"]}
            },
        },
    }
}


@router.post(
    "/naturalize",
    openapi_extra=UPLOAD_BODY,
    responses={
        200: {
            "content": {
                "application/json": {},
                "image/png": {},
                "image/gif": {},
                "application/octet-stream": {},
            }
        },
        413: {"description": "body, events or duration over a limit"},
        415: {"description": "unknown event-file format"},
        422: {"description": "the file or a parameter cannot be used"},
    },
)
async def naturalize_upload(
    request: Request,
    settings: SettingsDep,
    registry: RegistryDep,
    metrics: MetricsDep,
    model: Annotated[
        str | None, Query(description="model name (default: by the recording's sensor, see docs/service.md)")
    ] = None,
    roi: Annotated[str | None, Query(description="'x,y,w,h', 'centre', 'full' or 'default'")] = None,
    dt_us: Annotated[
        int | None, Query(gt=0, le=10_000_000, description="bin width (default: the model's)")
    ] = None,
    emit: Annotated[
        str | None, Query(description="a frame every k bins, or 'last' (default: ~30 frames/s)")
    ] = None,
    spikes: Literal["none", "bitpacked"] = "none",
    seed: Annotated[int, Query(ge=0, lt=2**63)] = 0,
    format: Literal["json", "png", "gif", "npz"] = "json",
    inputs: Annotated[bool, Query(description="json: add the event image of each frame")] = False,
    filename: Annotated[str | None, Query(description="raw body: a file name hinting the format")] = None,
    timestamps: Annotated[
        str | None,
        Query(
            description="scene models: comma-separated times (us, the recording's clock); the images at exactly "
            "those times instead of every emit-th bin"
        ),
    ] = None,
) -> Response:
    """Naturalize an uploaded event file (raw body or multipart) into frames."""
    if model:
        _entry(registry, model)  # an unknown name: 404 before the body is read
    else:
        _entry(registry, None)  # nothing loaded: 503 before the body; the model follows the sensor
    t = time.perf_counter()
    data, name = await read_upload(request, settings)
    rec = await run_in_threadpool(read_recording, data, filename or name, settings)
    t_read = time.perf_counter() - t
    metrics.upload_events.inc(len(rec.events))
    entry, reason = _pick(registry, model, rec)
    stamps = parse_timestamps(timestamps, settings.max_timestamps)
    budget = Budget(settings.max_upload_cpu_s)
    opts = _run_options(
        entry, rec, settings, roi, dt_us, emit, format, spikes == "bitpacked", seed, inputs, budget
    )
    if entry.family == "scene":  # full-resolution frames, no spike raster (docs/service.md)
        if stamps is not None and opts.dt_us != entry.dt_us:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                f"timestamps run at the model's dt_us ({entry.dt_us}), not {opts.dt_us}",
            )
        opts = dataclasses.replace(
            opts,
            spikes=False,
            timestamps=stamps,
            max_output_pixels=settings.max_output_pixels,
            max_bins=settings.max_upload_bins,
        )
    elif stamps is not None:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"timestamps are served by scene-family models; {entry.name!r} is a {entry.family} model",
        )
    # checked before any binning: the bins the recording would step (then CPU seconds, as it runs)
    bins = await run_in_threadpool(
        estimate_bins, rec.events["t"], opts.dt_us, max(settings.max_gap_us, opts.dt_us)
    )
    if bins > settings.max_upload_bins:
        raise HTTPException(
            _413,
            f"the recording would step {bins} bins of {opts.dt_us} us, over the limit of "
            f"{settings.max_upload_bins}: use a larger dt_us",
        )
    try:
        res = await run_budgeted(request, budget, naturalize, entry, rec.events, opts)
    except EventLimitError as exc:
        raise HTTPException(_413, str(exc)) from exc
    engine = entry.engine_for(
        (entry.input_shape[0], opts.roi.height // opts.pool, opts.roi.width // opts.pool)
    )
    head = {
        "model": entry.name,
        "model_reason": reason,
        "family": entry.family,
        "sensor": {"width": rec.width, "height": rec.height},
        "file_format": rec.format,
        "roi": list(opts.roi),
        "pool": opts.pool,
        "dt_us": opts.dt_us,
        "emit": opts.emit or "last",
        "seed": seed,
        "image_shape": list(engine.image_shape),
    }
    if stamps is not None:
        head["timestamps_us"] = list(stamps)
    frame_ms = (opts.emit or 1) * opts.dt_us / 1000.0
    # PNG/GIF/npz encoding of up to max_frames frames costs real CPU: off the event loop
    body, headers = await run_in_threadpool(
        upload_body, format, res, head, frame_ms, engine.n_readout, {"read": t_read}
    )
    headers |= {
        "X-Events": str(len(rec.events)),
        "X-Bins": str(res.stats["bins"]),
        "X-VDIB-Model": entry.name,
        "X-VDIB-Model-Reason": reason,
    }
    return Response(body, media_type=UPLOAD_MEDIA[format], headers=headers)


def _run_options(
    entry: ModelEntry,
    rec: Any,
    settings: Settings,
    roi: str | None,
    dt_us: int | None,
    emit: str | None,
    fmt: str,
    spikes: bool,
    seed: int,
    inputs: bool,
    budget: Budget,
) -> RunOptions:
    """The upload's run options from its query (422 for a ROI, ``dt_us`` or ``emit`` it cannot use)."""
    try:
        roi_v, pool = entry.resolve_roi(rec.width, rec.height, parse_roi(roi))
    except RoiError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from exc
    dt = dt_us or entry.dt_us
    if dt < settings.min_dt_us:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"dt_us {dt} is below the service's min_dt_us of {settings.min_dt_us}",
        )
    try:
        k = None if fmt == "png" else parse_emit(emit, dt)  # png: the last frame only
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    return RunOptions(
        roi=roi_v,
        pool=pool,
        dt_us=dt,
        emit=k,
        spikes=spikes,
        seed=seed,
        inputs=inputs and fmt == "json",
        max_gap_us=settings.max_gap_us,
        max_frames=settings.max_frames,
        check=budget.check,
    )


@router.post(
    "/events", openapi_extra=UPLOAD_BODY, responses={200: {"content": {"application/octet-stream": {}}}}
)
async def convert_events(
    request: Request,
    settings: SettingsDep,
    filename: Annotated[str | None, Query()] = None,
) -> Response:
    """Decode an event file into one protocol event packet (used by the viewer to replay files).

    The sensor size and format come back in the ``X-Sensor-Width``, ``X-Sensor-Height`` and
    ``X-Format`` headers.
    """
    data, name = await read_upload(request, settings)
    rec = await run_in_threadpool(read_recording, data, filename or name, settings)
    body = await run_in_threadpool(encode_events, rec.events)
    return Response(
        body,
        media_type="application/octet-stream",
        headers={
            "X-Sensor-Width": str(rec.width),
            "X-Sensor-Height": str(rec.height),
            "X-Format": rec.format,
            "X-Events": str(len(rec.events)),
            "Access-Control-Expose-Headers": "X-Sensor-Width, X-Sensor-Height, X-Format, X-Events",
        },
    )
