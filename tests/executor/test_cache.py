import subprocess
import sys

import torch

from executor.cache import OutputCache, node_key, sizeof


def test_key_is_stable_across_processes():
    args = ("KSampler", 1, {"seed": 5, "cfg": 7.5, "text": "a cät", "l": [1, 2]}, None, {"model": ("abc", 0)})
    code = ("from executor.cache import node_key; "
            f"print(node_key(*{args!r}))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "123", "PATH": ""}, cwd=".").stdout.strip()
    assert other == node_key(*args)


def test_key_changes_exactly_when_it_should():
    base = node_key("A", 1, {"x": 1, "y": "s"}, None, {"in": ("k1", 0)})
    assert node_key("A", 1, {"y": "s", "x": 1}, None, {"in": ("k1", 0)}) == base  # order does not matter
    for changed in [node_key("B", 1, {"x": 1, "y": "s"}, None, {"in": ("k1", 0)}),
                    node_key("A", 2, {"x": 1, "y": "s"}, None, {"in": ("k1", 0)}),
                    node_key("A", 1, {"x": 2, "y": "s"}, None, {"in": ("k1", 0)}),
                    node_key("A", 1, {"x": 1, "y": "s"}, "mtime", {"in": ("k1", 0)}),
                    node_key("A", 1, {"x": 1, "y": "s"}, None, {"in": ("k2", 0)}),
                    node_key("A", 1, {"x": 1, "y": "s"}, None, {"in": ("k1", 1)}),
                    node_key("A", 1, {"x": 1, "y": "s"}, None, {"other": ("k1", 0)})]:
        assert changed != base


def test_sizeof_counts_tensor_storage():
    t = torch.zeros(1000, dtype=torch.float32)
    assert sizeof(t) == 4000
    assert sizeof(({"samples": t},)) >= 4000
    assert sizeof((t, t)) < 8000  # the same tensor twice is counted once
    assert sizeof((torch.nn.Linear(10, 10),)) >= 440


def test_eviction_is_lru_by_bytes():
    cache = OutputCache(budget_bytes=8_000)
    for name in "abc":
        cache.put(name, (torch.zeros(600),))  # 2400 bytes each
    assert cache.get("a") is not None  # a becomes most recent
    cache.put("d", (torch.zeros(600),))
    cache.put("e", (torch.zeros(600),))
    assert "b" not in cache and "c" not in cache
    assert all(k in cache for k in "ade")
    assert cache.total <= cache.budget


def test_oversized_output_is_not_kept():
    cache = OutputCache(budget_bytes=1000)
    cache.put("small", (1,))
    assert not cache.put("big", (torch.zeros(1000),))
    assert "big" not in cache and "small" in cache
