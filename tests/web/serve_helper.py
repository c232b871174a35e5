"""Runs `main.py serve` with the test node types added to its registry (for the tests that kill a real server)."""

import sys

import main
from tests.web.pack import add_test_nodes

if __name__ == "__main__":
    configure = main.configure_engine
    main.configure_engine = lambda args: add_test_nodes(configure(args))
    sys.exit(main.main(["serve", *sys.argv[1:]]))
