"""The defended pipeline and its transports (HTTP, gRPC, TorchServe) and the evaluation client."""
