"""Reading an upload (multipart field `file`, or a raw body with an audio content type) without
ever holding more than the size limit: the body is counted as it arrives and reading stops at the
limit with 413, so an oversized upload costs at most `limit` bytes of memory."""

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
                         f"upload is larger than the limit of {limit:,} bytes")


def limited_receive(receive, limit: int):
    """An ASGI `receive` that raises 413 as soon as more than `limit` body bytes have arrived."""
    received = 0

    async def receive_within_limit():
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise too_large(limit)
        return message

    return receive_within_limit


async def read_upload(request: Request, limit: int) -> bytes:
    """The uploaded file's bytes, or an HTTPException saying what is wrong with the request."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(limit)  # refuse before reading anything
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = Request(request.scope, limited_receive(request.receive, limit))
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
