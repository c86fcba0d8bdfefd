"""Shared pytest configuration: the swtpm / SoftHSM2 fixtures live in simulator.fixtures."""

import importlib
import sys
from types import ModuleType

import pytest

from broker_plugin.build import build_fast_module

pytest_plugins = ["simulator.fixtures"]


@pytest.fixture(scope="module")
def fast(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    """The broker's C fast lane built as the extension ``tessera_fast`` (the plugin has
    it built in), for the tests that compare it with structauth's reference verify."""
    directory = tmp_path_factory.mktemp("fastlane")
    build_fast_module(directory)
    sys.path.insert(0, str(directory))
    try:
        return importlib.import_module("tessera_fast")
    finally:
        sys.path.remove(str(directory))
