"""Triton's perf_analyzer, unchanged, against a live bdserve over HTTP and gRPC.

perf_analyzer reads the model's config (max_batch_size, inputs) and metadata and builds its own
requests from them, so this checks that bdserve describes itself the way Triton does. It runs
with the tensor input and with encoded images (the BYTES input, [-1, 1] as Triton writes it).
"""

from __future__ import annotations

import base64
import io
import json
import re
import struct

import httpx
import numpy as np
import pytest
from PIL import Image

from serve_helpers import metric

THROUGHPUT = re.compile(r"Concurrency: (\d+), throughput: ([\d.]+) infer/sec")
REQUESTS = 50  # per measurement window (the test server batches with a 20 ms delay: about 1 s each)


@pytest.fixture(scope="module")
def perf_analyzer():
    from bdserve.testing.perf_analyzer import Unavailable, fetch

    try:
        return fetch()
    except Unavailable as why:
        pytest.skip(f"perf_analyzer cannot run here: {why}")


@pytest.fixture(scope="module")
def input_data(tmp_path_factory, rng):
    """perf_analyzer's --input-data files: a float tensor, and a PNG as one BYTES element (perf_analyzer
    sends b64 contents as the raw tensor bytes: a 4-byte length, then the file)."""
    folder = tmp_path_factory.mktemp("perf_analyzer")
    tensor = rng.random((3, 32, 32), dtype=np.float32)
    (folder / "tensor.json").write_text(json.dumps(
        {"data": [{"input": {"content": tensor.ravel().tolist(), "shape": [3, 32, 32]}}]}))
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    blob = struct.pack("<I", len(buf.getvalue())) + buf.getvalue()
    (folder / "image.json").write_text(json.dumps(
        {"data": [{"image": {"b64": base64.b64encode(blob).decode(), "shape": [1]}}]}))
    return folder


def _answered(server) -> tuple[float, float]:
    text = httpx.get(f"{server.http_url}/metrics", timeout=10, trust_env=False).text
    total = metric(text, "bdserve_requests_total", model="tiny")
    return metric(text, "bdserve_requests_total", model="tiny", code="200"), total


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("data", ["tensor", "image"])
def test_perf_analyzer_measures_bdserve(perf_analyzer, input_data, server, protocol, data):
    url = server.http_url.removeprefix("http://") if protocol == "http" else server.grpc_target
    ok_before, all_before = _answered(server)
    r = perf_analyzer.run("-m", "tiny", "-u", url, "-i", protocol, "--input-data", str(input_data / f"{data}.json"),
                          "--concurrency-range", "1:2", "--measurement-mode", "count_windows",
                          "--measurement-request-count", str(REQUESTS), "--stability-percentage", "1000",
                          "--max-trials", "3")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    measured = {int(c): float(t) for c, t in THROUGHPUT.findall(r.stdout)}
    assert set(measured) == {1, 2} and all(t > 0 for t in measured.values()), r.stdout[-2000:]
    ok_after, all_after = _answered(server)
    assert ok_after - ok_before >= 2 * REQUESTS, "perf_analyzer's requests were answered by bdserve"
    assert all_after - all_before == ok_after - ok_before, "and every one of them with success"
