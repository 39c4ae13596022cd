"""The FedPipe coordinator: registry, planning, round loop, aggregation and the gRPC edge."""
