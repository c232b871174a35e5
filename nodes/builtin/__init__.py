"""Built-in node packs, one module per concern; each lists its node types in `NODES`."""
