"""Generated protobuf and gRPC modules. Do not edit: run scripts/gen-proto."""
