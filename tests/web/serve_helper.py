"""Runs `main.py serve` with the test node types registered (for the tests that kill a real server)."""

import sys

import main
import nodes.registry
from tests.web.pack import web_registry

if __name__ == "__main__":
    nodes.registry.builtin_registry = lambda *a, **k: web_registry()
    sys.exit(main.main(["serve", *sys.argv[1:]]))
