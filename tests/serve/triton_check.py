"""Run in its own process by test_serve_cli.py: tritonclient's http and grpc modules,
unchanged, against a bdserve started by the CLI (test_protos.py also runs them in-process).

usage: triton_check.py HTTP_HOST:PORT GRPC_HOST:PORT INPUT.npy  -> prints JSON
"""

import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

http_target, grpc_target, npy = sys.argv[1:4]
x = np.load(npy)
images = np.load(npy.replace(".npy", "_images.npy"), allow_pickle=False)  # fixed-width bytes
out = {}

hc = httpclient.InferenceServerClient(http_target)
out["http_live"] = hc.is_server_live()
out["http_ready"] = hc.is_model_ready("tiny")
out["http_server"] = hc.get_server_metadata()["name"]
out["http_model_inputs"] = hc.get_model_metadata("tiny")["inputs"]
inp = httpclient.InferInput("input", list(x.shape), "UINT8")
inp.set_data_from_numpy(x, binary_data=True)
res = hc.infer("tiny", [inp], outputs=[httpclient.InferRequestedOutput("probabilities", binary_data=True),
                                       httpclient.InferRequestedOutput("label", binary_data=True)])
out["http_probs"] = res.as_numpy("probabilities").tolist()
out["http_labels"] = [v.decode() for v in res.as_numpy("label")]
out["http_defense"] = res.get_response()["parameters"]["defense"]
img = httpclient.InferInput("image", [len(images)], "BYTES")
img.set_data_from_numpy(np.array([bytes(b) for b in images], dtype=np.object_), binary_data=True)
res = hc.infer("tiny", [img])  # no outputs named: tritonclient asks for all, binary
out["http_image_labels"] = [v.decode() for v in res.as_numpy("label")]
try:
    hc.get_model_metadata("nosuch")
    out["http_unknown"] = "no error"
except Exception as e:  # InferenceServerException
    out["http_unknown"] = str(e)

gc = grpcclient.InferenceServerClient(grpc_target)
out["grpc_live"] = gc.is_server_live()
out["grpc_ready"] = gc.is_model_ready("tiny")
out["grpc_server"] = gc.get_server_metadata().name
out["grpc_model_platform"] = gc.get_model_metadata("tiny").platform
inp = grpcclient.InferInput("input", list(x.shape), "UINT8")
inp.set_data_from_numpy(x)
res = gc.infer("tiny", [inp])
out["grpc_probs"] = res.as_numpy("probabilities").tolist()
out["grpc_labels"] = [v.decode() for v in res.as_numpy("label")]
bad = grpcclient.InferInput("input", [1, 3, 8, 8], "UINT8")
bad.set_data_from_numpy(np.zeros((1, 3, 8, 8), np.uint8))
try:
    gc.infer("tiny", [bad])
    out["grpc_bad"] = "no error"
except Exception as e:
    out["grpc_bad"] = str(e)
print(json.dumps(out))
