"""Shared by the command-table tests: the generator script as a module, and which servers to ask."""

import importlib.util
import os
import shutil

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE_PATH = os.path.join(ROOT, "proxy", "data", "commands.json")


def load_generator():
    path = os.path.join(ROOT, "scripts", "gen_command_table.py")
    spec = importlib.util.spec_from_file_location("gen_command_table", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


GEN = load_generator()


def table_server_kinds() -> list[str]:
    """Valkey always; Redis when on PATH, and with CI=true its absence fails the run."""
    kinds = ["valkey"]
    if shutil.which("redis-server"):
        kinds.append("redis")
    elif os.environ.get("CI") == "true":
        pytest.fail("CI=true but redis-server is not on PATH: the Redis table checks must run")
    return kinds
