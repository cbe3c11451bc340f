"""bdserve's Python client: the one the CLI's evaluation uses, for any bdserve (or TorchServe) endpoint.

    from bdserve.client import Client

    with Client("http://127.0.0.1:8080", "badnets") as c:      # or grpc://..., torchserve+http://...
        r = c.predict(["photo.jpg", "other.png"])              # paths, bytes, PIL images, HWC arrays
        r.labels, r.probabilities, r.defense, r.fit, r.suspected_trigger, r.trigger_score, r.request_id
        r = c.infer(batch_uint8_nchw, top_k=3)                 # r.top[i] = [ClassScore(label, index, p), ...]

``AsyncClient`` has the same methods as coroutines. Modules:

    client.py      AsyncClient, Client (sync twin), retries and timeouts, tokens
    transports.py  one attempt over OIP HTTP, OIP gRPC or TorchServe /predictions
    results.py     Result, ClassScore: answers read with the server's protocol code (bdserve.serve.oip)
    inputs.py      paths, bytes, PIL images, arrays and tensors to what goes on the wire
    retry.py       the error classes, RetryPolicy and backoff, the circuit breaker
"""

from bdserve.client.client import AsyncClient, Client, auth_headers, token_from_file
from bdserve.client.results import ClassScore, Result
from bdserve.client.retry import (CircuitBreaker, CircuitOpen, ClientError, PermanentError, RequestRejected,
                                  RetriesExhausted, RetryPolicy, TransientError, Unreachable)
from bdserve.client.transports import ModelInfo

__all__ = ["AsyncClient", "CircuitBreaker", "CircuitOpen", "Client", "ClassScore", "ClientError", "ModelInfo",
           "PermanentError", "RequestRejected", "Result", "RetriesExhausted", "RetryPolicy", "TransientError",
           "Unreachable", "auth_headers", "token_from_file"]
