"""ForgeRL's gRPC services: one subpackage each, holding its servicer, config and entry point."""
