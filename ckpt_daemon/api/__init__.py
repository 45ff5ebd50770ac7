"""The edge of the process: the gRPC servicer and server, authentication and TLS, request
admission (bounds, precise statuses) and conversion to and from protobuf. Protobuf types
live here and in agents/ only."""
