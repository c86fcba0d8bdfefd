"""broker_plugin package."""
