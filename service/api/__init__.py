"""The service's two faces, gRPC (api/grpc) and HTTP (api/http), and what they share: request
validation, the error vocabulary (problems) and API keys. Each face only translates between
its wire form and the pipeline."""
