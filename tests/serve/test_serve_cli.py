"""The real command line: ``bdserve import`` for a foreign classifier, ``bdserve serve`` in a
subprocess, tritonclient (http and grpc) unchanged against it, and SIGTERM -> exit 0 after
finishing the request in flight."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from bdserve.testing import ServeProcess, bdserve_command
from serve_helpers import FOREIGN_CLASSES, encode, random_image

BDSERVE = bdserve_command()
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def cli_store(store, foreign_onnx, tmp_path_factory) -> Path:
    s = tmp_path_factory.mktemp("cli") / "model_store"
    shutil.copytree(store / "tiny", s / "tiny")
    classes = s.parent / "classes.txt"
    classes.write_text("\n".join(FOREIGN_CLASSES) + "\n")
    r = subprocess.run([*BDSERVE, "import", str(foreign_onnx), "--model-store", str(s), "--name", "foreign",
                        "--classes", str(classes), "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225",
                        "--defense", "flip"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    card = json.loads((s / "foreign" / "card.json").read_text())
    assert card["input_shape"] == [3, 64, 64] and card["classes"] == FOREIGN_CLASSES
    assert card["normalization_in_graph"] is False and card["defense"] == "flip"
    return s


@pytest.fixture(scope="module")
def cli_server(cli_store):
    srv = ServeProcess(cli_store, [], "--max-queue-delay-ms", "500", "--threads", "1").start()
    yield srv.proc, {"http": srv.http_url, "grpc": srv.grpc_target}, srv.banner, srv.output
    srv.stop(grace_s=0)


def test_import_refuses_a_wrong_class_count(foreign_onnx, tmp_path):
    r = subprocess.run([*BDSERVE, "import", str(foreign_onnx), "--model-store", str(tmp_path), "--classes", "a,b"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "2 class names but the model outputs 7" in r.stderr


def test_tritonclient_http_and_grpc_unchanged(cli_server, tmp_path, rng):
    from bdserve.serve.pipeline import DefendedModel

    proc, addr, lines, _ = cli_server
    assert any("model foreign v1" in line and "defense flip" in line for line in lines), lines
    x = rng.integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    imgs = [encode(random_image(rng, 40, 60), "PNG"), encode(random_image(rng, 90, 30), "JPEG")]
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "x_images.npy", np.array(imgs, dtype=np.bytes_))
    assert all(bytes(b) == i for b, i in zip(np.load(tmp_path / "x_images.npy"), imgs))  # no trailing NULs lost
    http_target = addr["http"].removeprefix("http://")
    r = subprocess.run([sys.executable, str(HERE / "triton_check.py"), http_target, addr["grpc"], str(tmp_path / "x.npy")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])

    m = DefendedModel.load(proc_store(cli_server) / "tiny", threads=1)
    expect = m.predict(torch.from_numpy(x))
    assert out["http_live"] and out["http_ready"] and out["grpc_live"] and out["grpc_ready"]
    assert out["http_server"] == out["grpc_server"] == "bdserve"
    assert out["grpc_model_platform"] == "onnxruntime_onnx"
    assert out["http_model_inputs"][0]["shape"] == [-1, 3, 32, 32]
    assert out["http_defense"] == "flip"
    for door in ("http", "grpc"):
        assert np.allclose(out[f"{door}_probs"], expect.probs, atol=1e-5), door
        assert out[f"{door}_labels"] == expect.labels
    assert out["http_image_labels"] == m.predict(m.decode(imgs)).labels
    assert "unknown model" in out["http_unknown"]
    assert "INVALID_ARGUMENT" in out["grpc_bad"] and "expected shape" in out["grpc_bad"]


def proc_store(cli_server) -> Path:
    args = cli_server[0].args
    return Path(args[args.index("--model-store") + 1])


def test_sigterm_finishes_in_flight_requests_and_exits_0(cli_store, rng):
    # Its own server, with batches of one image: each request of 1,024 images then runs as
    # 1,024 batches, so both are in flight together for a while (a lone small request is
    # answered at once), and both clients are connected before either sends.
    srv = ServeProcess(cli_store, ["tiny"], "--max-batch-size", "1", "--threads", "1").start()
    proc, rest = srv.proc, srv.output
    addr = {"http": srv.http_url, "grpc": srv.grpc_target}
    try:
        log = _sigterm_with_two_requests_in_flight(proc, addr, rest, rng)
    finally:
        srv.stop(grace_s=0)
    assert "stopped" in log  # the graceful shutdown ran to its end


def _sigterm_with_two_requests_in_flight(proc, addr, rest, rng):
    import grpc

    from bdserve.serve.protos import grpc_predict_v2_pb2 as pb
    from bdserve.serve.protos import grpc_predict_v2_pb2_grpc as pb_grpc

    assert proc.poll() is None
    x = rng.integers(0, 256, (1024, 3, 32, 32), dtype=np.uint8)
    head = json.dumps({"inputs": [{"name": "input", "datatype": "UINT8", "shape": list(x.shape),
                                   "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    body = head + x.tobytes()  # both requests built before either is sent
    req = pb.ModelInferRequest(model_name="tiny")
    req.inputs.add(name="input", datatype="UINT8", shape=list(x.shape))
    req.raw_input_contents.append(x.tobytes())
    result = {}
    client = httpx.Client(timeout=120)
    client.get(f"{addr['http']}/v2/health/ready").raise_for_status()  # connected (and TLS setup done) before sending
    channel = grpc.insecure_channel(addr["grpc"], options=[("grpc.max_receive_message_length", 1 << 26)])
    grpc.channel_ready_future(channel).result(timeout=60)

    def call():
        result["r"] = client.post(f"{addr['http']}/v2/models/tiny/infer", content=body,
                                  headers={"Inference-Header-Content-Length": str(len(head))})

    def call_grpc():
        result["g"] = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=120)

    threads = [threading.Thread(target=call_grpc), threading.Thread(target=call)]
    for t in threads:
        t.start()
    # SIGTERM once both requests are inside the server (the in-flight gauge says so).
    deadline = time.time() + 30
    while time.time() < deadline:
        text = client.get(f"{addr['http']}/metrics").text
        if 'bdserve_inflight_requests{model="tiny"} 2.0' in text:
            break
        time.sleep(0.01)
    else:
        pytest.fail("the two requests were never in flight together")
    proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(120)
    client.close()
    channel.close()
    assert proc.wait(120) == 0, "".join(rest)
    assert result["r"].status_code == 200, result["r"].text
    assert {o["name"]: o for o in result["r"].json()["outputs"]}["probabilities"]["shape"][0] == 1024
    assert len(result["g"].outputs) == 2
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{addr['http']}/v2/health/live", timeout=2)
    time.sleep(0.2)
    return "".join(rest)
