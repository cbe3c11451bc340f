"""Run in its own process by test_protos.py: KServe's InferenceRESTClient and
InferenceGRPCClient (v2), unchanged, against a running bdserve, with bdserve's own
gRPC stubs imported beside kserve's.

usage: kserve_check.py HTTP_URL GRPC_HOST:PORT INPUT.npy  -> prints JSON
"""

import asyncio
import importlib.metadata
import json
import sys

import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig

from bdserve.serve.protos import grpc_predict_v2_pb2  # noqa: F401  (must import beside kserve's stubs)

http_url, grpc_target, npy = sys.argv[1:4]
x = np.load(npy)


def request() -> InferRequest:
    inp = InferInput(name="input", shape=list(x.shape), datatype="UINT8")
    inp.set_data_from_numpy(x, binary_data=False)
    return InferRequest(model_name="tiny", infer_inputs=[inp], request_id="kserve-1")


def outputs(resp) -> tuple[list[str], list]:
    by_name = {o.name: o for o in resp.outputs}
    labels = [v.decode() if isinstance(v, bytes) else str(v) for v in by_name["label"].as_numpy().tolist()]
    return labels, by_name["probabilities"].as_numpy().tolist()


async def main() -> dict:
    out = {"kserve_version": importlib.metadata.version("kserve")}
    rest = InferenceRESTClient(RESTConfig(protocol="v2", timeout=30))
    try:
        resp = await rest.infer(http_url, request(), model_name="tiny")
    finally:
        await rest.close()
    out["rest_labels"], out["rest_probs"] = outputs(resp)
    out["rest_id"] = resp.id
    client = InferenceGRPCClient(grpc_target, timeout=30)
    try:
        resp = await client.infer(request())
    finally:
        await client.close()
    out["grpc_labels"], out["grpc_probs"] = outputs(resp)
    out["grpc_id"] = resp.id
    return out


print(json.dumps(asyncio.run(main())))
