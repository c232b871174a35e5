import sys

from executor.executor import Executor
from graph.document import parse_api
from nodes.registry import builtin_registry
from tests.plugins.helpers import load, plugin, write

NATIVE = """
from nodes.node import Node
from nodes.spec import Int, Output

class {name}(Node):
    category = "test/{name}"
    value = Int(1)
    outputs = (Output("INT"),)

    def execute(self, value):
        return (value * {factor},)

NODES = [{name}]
"""


def native(name, factor=2):
    return NATIVE.format(name=name, factor=factor)


def test_loads_files_and_packages_and_skips_disabled_and_private(custom_nodes):
    write(custom_nodes / "single.py", native("Single"))
    write(custom_nodes / "pack" / "__init__.py", "from .impl import NODES\nWEB_DIRECTORY = './js'\n")
    write(custom_nodes / "pack" / "impl.py", native("Packed"))
    write(custom_nodes / "pack" / "js" / "ext.js", "// editor extension\n")
    write(custom_nodes / "off.py.disabled", native("Off"))
    write(custom_nodes / "off_pack.disabled" / "__init__.py", native("OffPack"))
    write(custom_nodes / "_private.py", native("Private"))
    write(custom_nodes / "not_a_package" / "helper.py", native("Helper"))
    registry = load(custom_nodes)
    assert [p.name for p in registry.plugins] == ["pack", "single"]
    assert all(p.loaded and p.error is None for p in registry.plugins)
    assert "Single" in registry and "Packed" in registry
    assert not {"Off", "OffPack", "Private", "Helper"} & set(registry)
    assert plugin(registry, "pack").web_dir == (custom_nodes / "pack" / "js").resolve()
    assert plugin(registry, "single").web_dir is None
    assert plugin(registry, "pack").node_names == ["Packed"]
    info = registry.info("Packed")
    assert "plugin pack" in info.source and str(custom_nodes / "pack") in info.source
    assert registry.object_info("Packed")["Packed"]["python_module"] == "custom_nodes.pack"


def test_package_may_import_itself_by_name(custom_nodes):
    write(custom_nodes / "selfref_pack" / "__init__.py", "from selfref_pack.impl import NODES\n")
    write(custom_nodes / "selfref_pack" / "impl.py", native("SelfRef"))
    registry = load(custom_nodes)
    assert plugin(registry, "selfref_pack").loaded and "SelfRef" in registry


def test_module_names_never_shadow_existing_modules(custom_nodes):
    write(custom_nodes / "json.py", native("JsonNamed"))
    registry = load(custom_nodes)
    assert "JsonNamed" in registry
    assert sys.modules["json"].__name__ == "json" and hasattr(sys.modules["json"], "dumps")


def test_extra_folders_load_in_order(tmp_path, custom_nodes):
    extra = tmp_path / "more"
    write(extra / "extra_one.py", native("ExtraOne"))
    registry = load(custom_nodes, extra, tmp_path / "missing")
    assert [p.name for p in registry.plugins] == ["extra_one"] and "ExtraOne" in registry


def test_broken_plugins_are_recorded_and_the_rest_loads(custom_nodes):
    write(custom_nodes / "a_good.py", native("GoodA"))
    write(custom_nodes / "b_syntax.py", "def broken(:\n")
    write(custom_nodes / "c_missing_dep" / "__init__.py", "import surely_not_installed_pkg\n")
    write(custom_nodes / "d_raises.py", "import time\ntime.sleep(0.02)\nraise RuntimeError('no GPU found')\n")
    write(custom_nodes / "e_exits.py", "import sys\nsys.exit(3)\n")
    write(custom_nodes / "f_empty.py", "X = 1\n")
    write(custom_nodes / "g_good.py", native("GoodG"))
    registry = load(custom_nodes)
    assert "GoodA" in registry and "GoodG" in registry
    by_name = {p.name: p for p in registry.plugins}
    assert len(by_name) == 7
    assert [n for n, p in by_name.items() if not p.loaded] == ["b_syntax", "c_missing_dep", "d_raises",
                                                               "e_exits", "f_empty"]
    assert by_name["b_syntax"].error.startswith("SyntaxError:") and "b_syntax.py" in by_name["b_syntax"].error
    assert "missing dependency" in by_name["c_missing_dep"].error
    assert "surely_not_installed_pkg" in by_name["c_missing_dep"].error
    assert by_name["d_raises"].error.startswith("RuntimeError: no GPU found (at ")
    assert "d_raises.py:3" in by_name["d_raises"].error
    assert by_name["d_raises"].import_s >= 0.02
    assert by_name["e_exits"].error.startswith("SystemExit")
    assert "declares no nodes" in by_name["f_empty"].error
    assert not any(name.startswith(("b_syntax", "c_missing", "d_raises")) for name in sys.modules)


def test_same_node_name_in_two_plugins_refuses_the_second(custom_nodes):
    write(custom_nodes / "first.py", native("Shared", factor=2))
    write(custom_nodes / "second.py", native("Shared", factor=3) + "\n" + native("OnlySecond").split("NODES")[0]
          + "NODES = [Shared, OnlySecond]\n")
    registry = load(custom_nodes)
    second = plugin(registry, "second")
    assert second.loaded and second.node_names == ["OnlySecond"]
    assert "'Shared'" in second.error and "plugin first" in second.error and "plugin second" in second.error
    assert "plugin first" in registry.info("Shared").source


def test_builtin_names_cannot_be_replaced(custom_nodes):
    write(custom_nodes / "hijack.py", native("PrimitiveInt", factor=100))
    registry = load(custom_nodes)
    info = plugin(registry, "hijack")
    assert not info.loaded and "built-in node types cannot be replaced" in info.error
    assert registry.info("PrimitiveInt").source == "builtin"


def test_two_plugins_with_one_name_keep_the_first(tmp_path, custom_nodes):
    write(custom_nodes / "twin.py", native("TwinA"))
    write(tmp_path / "other" / "twin" / "__init__.py", native("TwinB"))
    registry = load(custom_nodes, tmp_path / "other")
    assert "TwinA" in registry and "TwinB" not in registry
    assert "already loaded from" in registry.plugins[1].error


def test_missing_web_directory_is_reported(custom_nodes):
    write(custom_nodes / "webless.py", native("Webless") + "WEB_DIRECTORY = './nowhere'\n")
    info = plugin(load(custom_nodes), "webless")
    assert info.loaded and info.web_dir is None and "nowhere" in info.error


def test_plugin_nodes_run_beside_builtin_ones(custom_nodes):
    write(custom_nodes / "doubler.py", native("Doubler"))
    registry = load(custom_nodes)
    doc = {"1": {"class_type": "PrimitiveInt", "inputs": {"value": 4}},
           "2": {"class_type": "IntMath", "inputs": {"a": ["1", 0], "b": 3, "operation": "add"}},
           "3": {"class_type": "Doubler", "inputs": {"value": 5}},
           "4": {"class_type": "IntMath", "inputs": {"a": ["2", 0], "b": ["3", 0], "operation": "multiply"}},
           "5": {"class_type": "PreviewAny", "inputs": {"source": ["4", 0]}}}
    result = Executor(registry).run(parse_api(doc))
    assert result.ok and result.outputs["5"] == {"text": ["70"]}


def test_entry_point_plugins(tmp_path, monkeypatch):
    site = tmp_path / "site"
    write(site / "ep_pack" / "__init__.py", native("FromEntryPoint") + "WEB_DIRECTORY = 'web'\n")
    write(site / "ep_pack" / "web" / "ext.js", "")
    write(site / "ep_obj.py", native("FromObject").replace("NODES = ", "class Pack:\n    NODES = "))
    write(site / "ep_broken.py", "raise ImportError('needs a newer numpy')\n")
    dist = site / "ep_pack-0.1.dist-info"
    write(dist / "METADATA", "Metadata-Version: 2.1\nName: ep-pack\nVersion: 0.1\n")
    write(dist / "entry_points.txt", "[loom.nodes]\nep_pack = ep_pack\nep_obj = ep_obj:Pack\n"
                                     "ep_broken = ep_broken\n\n[console_scripts]\nx = y:z\n")
    monkeypatch.syspath_prepend(str(site))
    registry = load(entry_points=True)
    by_name = {p.name: p for p in registry.plugins}
    assert set(by_name) == {"ep_pack", "ep_obj", "ep_broken"}
    assert by_name["ep_pack"].loaded and "FromEntryPoint" in registry
    assert by_name["ep_pack"].source == "entry point ep-pack (ep_pack)"
    assert by_name["ep_pack"].web_dir == (site / "ep_pack" / "web").resolve()
    assert by_name["ep_obj"].loaded and "FromObject" in registry
    assert not by_name["ep_broken"].loaded and "needs a newer numpy" in by_name["ep_broken"].error
    assert registry.object_info("FromObject")["FromObject"]["python_module"] == "custom_nodes.ep_obj"


def test_builtin_registry_loads_no_plugins():
    assert builtin_registry().plugins == []
