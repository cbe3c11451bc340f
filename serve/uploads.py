"""The image of a TorchServe-style upload (``POST``/``PUT /predictions/{model}``): the raw
body, or the ``data`` (or ``file``) part of a multipart form.

Parts are read as raw bytes whether or not they carry a filename: a form parser that
decodes filename-less fields as text turns an 800 KB JPEG into 1.2 MB of mojibake.
python-multipart does the parsing; this module only keeps each part's bytes by name.
"""

from __future__ import annotations

from python_multipart.multipart import MultipartParser, parse_options_header

from bdserve.serve.errors import InvalidInput, shown

IMAGE_FIELDS = ("data", "file")  # TorchServe's names for the uploaded payload
_MAX_PARTS = 16


def _part_name(disposition: bytes) -> str | None:
    _, options = parse_options_header(disposition)
    name = options.get(b"name")
    return None if name is None else name.decode("utf-8", "replace")


def multipart_parts(body: bytes, content_type: str) -> dict[str, bytes]:
    """Every part of a multipart/form-data body by name, as bytes; a repeated name is an error."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise InvalidInput("multipart upload without a boundary in its Content-Type")
    parts: dict[str, bytes] = {}
    current: dict = {}

    def on_part_begin():
        current.clear()
        current.update(headers={}, data=bytearray(), field=b"")

    def on_header_field(data, start, end):
        current["field"] += data[start:end]

    def on_header_value(data, start, end):
        key = current["field"].lower()
        current["headers"][key] = current["headers"].get(key, b"") + data[start:end]

    def on_header_end():
        current["field"] = b""

    def on_part_data(data, start, end):
        current["data"] += data[start:end]

    def on_part_end():
        name = _part_name(current["headers"].get(b"content-disposition", b""))
        if name is None:
            raise InvalidInput("multipart part without a name in its Content-Disposition")
        if name in parts:
            raise InvalidInput(f"multipart field {shown(name)} appears more than once; send one image per request")
        if len(parts) >= _MAX_PARTS:
            raise InvalidInput(f"multipart upload with more than {_MAX_PARTS} parts")
        parts[name] = bytes(current["data"])

    parser = MultipartParser(boundary, callbacks={
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_part_data": on_part_data, "on_part_end": on_part_end})
    try:
        parser.write(body)
        parser.finalize()
    except InvalidInput:
        raise
    except Exception as e:  # noqa: BLE001 - python-multipart's parse errors
        raise InvalidInput(f"malformed multipart body: {shown(str(e), 200, quoted=False)}") from None
    return parts


def upload_image(body: bytes, content_type: str) -> bytes:
    """The uploaded image: the raw body, or the multipart ``data`` (or ``file``) part."""
    if not content_type.lower().startswith("multipart/form-data"):
        return body
    parts = multipart_parts(body, content_type)
    images = [parts[name] for name in IMAGE_FIELDS if name in parts]
    if len(images) > 1:  # never a silent "one of them wins"
        raise InvalidInput(f"multipart upload has more than one image field (both {' and '.join(IMAGE_FIELDS)}); "
                           "send one image per request")
    if not images:
        raise InvalidInput("multipart upload needs a field named 'data' holding the image")
    return images[0]
