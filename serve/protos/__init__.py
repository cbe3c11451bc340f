"""Generated gRPC stubs for the Open Inference Protocol (grpc_predict_v2.proto)."""
