"""Property tests: random graphs and random documents never crash validation, and caching never
changes a result."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from executor.executor import Executor
from graph.document import DocumentError, parse_api
from graph.validate import validate
from tests.support_nodes import test_registry

REGISTRY = test_registry()
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=20,
)
class_types = st.sampled_from(["Add", "Scale", "Sink", "IntMath", "PrimitiveInt", "PreviewAny", "Nope", ""])
input_names = st.sampled_from(["a", "b", "value", "factor", "operation", "source", "x"])


@st.composite
def random_documents(draw):
    n = draw(st.integers(1, 8))
    ids = [str(i) for i in range(n)]
    doc = {}
    for nid in ids:
        inputs = {}
        for name in draw(st.lists(input_names, max_size=4, unique=True)):
            if draw(st.booleans()):
                inputs[name] = [draw(st.sampled_from([*ids, "99"])), draw(st.integers(-1, 2))]
            else:
                inputs[name] = draw(json_values)
        doc[nid] = {"class_type": draw(class_types), "inputs": inputs}
    return doc


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_arbitrary_json_never_crashes_parsing(data):
    try:
        graph = parse_api(data)
    except DocumentError:
        return
    validate(graph, REGISTRY)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_documents())
def test_random_graphs_never_crash_validation(doc):
    try:
        graph = parse_api(doc)
    except DocumentError:
        return
    checked = validate(graph, REGISTRY)
    for problem in checked.problems:
        assert problem.type and problem.message
    if checked.ok:
        assert set(checked.order) >= set(checked.outputs)


@st.composite
def runnable_graphs(draw):
    """Valid DAGs of integer nodes: each node links only to earlier ones."""
    n = draw(st.integers(1, 12))
    doc = {}
    for i in range(n):
        def operand(i=i):
            if i and draw(st.booleans()):
                return [str(draw(st.integers(0, i - 1))), 0]
            return draw(st.integers(-50, 50))
        doc[str(i)] = {"class_type": "IntMath",
                       "inputs": {"a": operand(), "b": operand(),
                                  "operation": draw(st.sampled_from(["add", "subtract", "multiply", "max"]))}}
    doc["out"] = {"class_type": "PreviewAny", "inputs": {"source": [str(n - 1), 0]}}
    return doc


@settings(max_examples=100, deadline=None)
@given(st.lists(runnable_graphs(), min_size=2, max_size=4))
def test_cached_runs_equal_uncached_runs(docs):
    shared = Executor(REGISTRY)
    for doc in docs:
        cached = shared.run(parse_api(doc))
        fresh = Executor(REGISTRY).run(parse_api(doc))
        assert cached.ok and fresh.ok
        assert cached.outputs == fresh.outputs
