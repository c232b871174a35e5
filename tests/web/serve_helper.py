"""Runs `main.py serve` with the test node types added to its registry (for the tests that kill a real server),
in the server's process and in its worker process."""

import functools
import sys

import main
from tests.web.pack import add_test_nodes


def with_test_nodes(factory):
    """The registry `factory` builds, plus the test nodes (module-level, so a worker process can unpickle it)."""
    return add_test_nodes(factory())


if __name__ == "__main__":
    configure, worker_registry = main.configure_engine, main._registry_factory
    main.configure_engine = lambda args: add_test_nodes(configure(args))
    main._registry_factory = lambda args, paths: functools.partial(with_test_nodes, worker_registry(args, paths))
    sys.exit(main.main(["serve", *sys.argv[1:]]))
