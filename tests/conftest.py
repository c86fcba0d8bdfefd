"""Shared pytest configuration: the swtpm / SoftHSM2 fixtures live in simulator.fixtures."""

pytest_plugins = ["simulator.fixtures"]
