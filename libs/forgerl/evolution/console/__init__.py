"""The operator console: static pages (vendored, no network at run time) and their JSON API under /api/v1."""

from forgerl.evolution.console.api import ConsoleApp

__all__ = ["ConsoleApp"]
