"""The node process: gRPC services, replica management, composition root."""
