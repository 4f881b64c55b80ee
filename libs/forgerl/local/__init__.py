"""Local mode: every service and a Tansu broker as processes on loopback (`forgerl up`)."""

from forgerl.local.topology import SERVICES, LocalTopology

__all__ = ["SERVICES", "LocalTopology"]
