"""The standard gRPC health service (grpc.health.v1), what orchestrators probe.

NOT_SERVING while loading and warming up, SERVING once ready, NOT_SERVING for good once draining
(a load balancer stops sending new work while accepted work finishes). Answered for the whole
server ("") and for the inference service by name. Open without the worker token (see auth.py).
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from engine.worker import inference_pb2

SERVICES = ("", inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name)


class Health:
    def __init__(self, server: grpc.aio.Server):
        self._servicer = health_aio.HealthServicer()  # answers SERVING for "" until told otherwise
        health_pb2_grpc.add_HealthServicer_to_server(self._servicer, server)

    async def loading(self) -> None:
        for service in SERVICES:
            await self._servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def serving(self) -> None:
        for service in SERVICES:
            await self._servicer.set(service, health_pb2.HealthCheckResponse.SERVING)

    async def draining(self) -> None:
        await self._servicer.enter_graceful_shutdown()  # every service NOT_SERVING; later sets ignored
