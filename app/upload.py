"""Reading an upload (multipart field `file`, or a raw body with an audio content type) without
ever holding more than the size limit: the body is counted as it arrives and reading stops at the
limit with 413, so an oversized upload costs at most `limit` bytes of memory.

Reading has a deadline (408 when it passes) and takes no worker slot: a client that sends a byte
a second holds its own connection and the bytes it sent, nothing more. The bytes of all bodies
being read or worked on share one `BodyBudget`, so memory stays bounded however many clients
upload at once."""

import asyncio
from contextlib import asynccontextmanager

from fastapi import HTTPException, Request, status
from starlette.datastructures import UploadFile  # what the form parser builds

# The request body /predict accepts, for the OpenAPI schema (the endpoint reads it itself).
REQUEST_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"file": {"type": "string", "format": "binary"}},
                "required": ["file"],
            }
        },
        "audio/*": {"schema": {"type": "string", "format": "binary"}},
    },
}


def too_large(limit: int) -> HTTPException:
    return HTTPException(status.HTTP_413_CONTENT_TOO_LARGE,
                         f"upload is larger than the limit of {limit:,} bytes",
                         headers={"Connection": "close"})  # the rest of the body is not read


class BodyBudget:
    """Request-body bytes held in memory at once, across requests. A reader that would pass the
    budget waits (under its read deadline) until others finish."""

    def __init__(self, limit: int):
        self.limit, self.held, self.waiting = limit, 0, 0
        self._changed = asyncio.Condition()

    async def take(self, n: int):
        async with self._changed:
            self.waiting += 1
            try:
                await self._changed.wait_for(lambda: self.held + n <= self.limit)
            finally:
                self.waiting -= 1
            self.held += n

    async def give_back(self, n: int):
        async with self._changed:
            self.held -= n
            self._changed.notify_all()


@asynccontextmanager
async def upload_body(request: Request, limit: int, budget: BodyBudget, deadline_s: float):
    """The uploaded file's bytes, held against `budget` until the block ends; or an
    HTTPException saying what is wrong with the request (408 when the body is not read by
    `deadline_s`). A client that disconnects raises starlette's ClientDisconnect."""
    taken = 0

    async def take(n: int):
        nonlocal taken
        await budget.take(n)
        taken += n

    try:
        try:
            async with asyncio.timeout(deadline_s):
                data = await read_upload(request, limit, take)
        except TimeoutError:
            raise HTTPException(status.HTTP_408_REQUEST_TIMEOUT,
                                f"the request body was not received within {deadline_s:g} s",
                                headers={"Connection": "close"}) from None
        yield data
    finally:
        await budget.give_back(taken)


def limited_receive(receive, limit: int, take):
    """An ASGI `receive` that raises 413 as soon as more than `limit` body bytes have arrived,
    and awaits `take(n)` for every n bytes that do."""
    received = 0

    async def receive_within_limit():
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            size = len(message.get("body", b""))
            received += size
            if received > limit:
                raise too_large(limit)
            await take(size)
        return message

    return receive_within_limit


async def read_upload(request: Request, limit: int, take) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(limit)  # refuse before reading anything
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = Request(request.scope, limited_receive(request.receive, limit, take))
    if media_type == "multipart/form-data":
        data = await _form_file(body)
    elif media_type.startswith("audio/"):
        data = await body.body()
    else:
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            f"unsupported content type {media_type or '(none)'!r}: send multipart/form-data "
            "with a 'file' field, or the file itself with an audio/* content type")
    if not data:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "the uploaded audio is empty (0 bytes)")
    return data


async def _form_file(body: Request) -> bytes:
    async with body.form(max_files=1, max_fields=16) as form:
        upload = form.get("file")
        if upload is None:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                                "the multipart form has no 'file' field")
        if not isinstance(upload, UploadFile):
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                                "the form field 'file' must be a file upload, not text")
        return await upload.read()
