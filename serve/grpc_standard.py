"""The standard gRPC services beside inference: health checking and server reflection.

Kubernetes gRPC probes and grpc_health_probe ask ``grpc.health.v1.Health``: the
whole server under the empty service name, each model under its own name. Both turn
NOT_SERVING the moment shutdown begins, so a load balancer stops sending new calls
while the accepted ones drain. Reflection lets grpcurl and similar tools call bdserve
without the .proto.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from bdserve.serve.protos import grpc_predict_v2_pb2 as pb

SERVER = ""  # the health service name that stands for the whole server


def _reflection_pool() -> descriptor_pool.DescriptorPool:
    """The inference messages live in a private pool (see serve/protos); reflection needs one
    pool that also describes the health and reflection services, so build it here."""
    pool = descriptor_pool.DescriptorPool()
    for file in (pb.DESCRIPTOR, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
        pool.AddSerializedFile(file.serialized_pb)
    return pool


class StandardServices:
    """Adds health and reflection to a grpc.aio server; reports serving / draining."""

    def __init__(self, server: grpc.aio.Server, model_names: Iterable[str]):
        self.model_names = list(model_names)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = [pb.SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, server, pool=_reflection_pool())

    async def serving(self) -> None:
        for name in (SERVER, *self.model_names):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def draining(self) -> None:
        await self.health.enter_graceful_shutdown()  # every service NOT_SERVING, and stays so
