"""The gRPC face of the service: request validation, status mapping, the servicer."""
