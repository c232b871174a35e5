"""Hypothesis fuzz: malformed POST /prompt bodies always get a 4xx JSON answer, never a 500."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from tests.web.conftest import ADD

scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=8)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                           max_size=4), max_leaves=12)
class_types = st.sampled_from(["PrimitiveInt", "IntMath", "PreviewAny", "SaveTestImage", "Nope", "", "Slow"])
inputs = st.dictionaries(st.sampled_from(["a", "b", "value", "source", "operation", "x"]),
                         values | st.tuples(st.text(max_size=3), st.integers(-2, 5)).map(list), max_size=4)
nodes = st.fixed_dictionaries({"class_type": class_types, "inputs": inputs}) | values
workflows = st.dictionaries(st.text(max_size=3), nodes, max_size=4) | values
ui_like = st.fixed_dictionaries({"nodes": st.lists(st.dictionaries(
    st.sampled_from(["id", "type", "mode", "inputs", "outputs", "widgets_values"]), values, max_size=6), max_size=3),
    "links": values})
bodies = (st.fixed_dictionaries({"prompt": workflows | ui_like},
                                optional={"client_id": values, "extra_data": values, "front": values,
                                          "number": values, "partial_execution_targets": values})
          | values)


# One server for all examples: bodies that validate only add to a queue that never runs.
ONE_SERVER = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture
async def idle_client(make_app, aiohttp_client):
    return await aiohttp_client(make_app(run_worker=False))


@ONE_SERVER
@given(body=bodies)
async def test_malformed_prompt_bodies_get_4xx(idle_client, body):
    resp = await idle_client.post("/prompt", data=json.dumps(body), headers={"Content-Type": "application/json"})
    assert resp.status < 500, (body, await resp.text())
    answer = await resp.json()
    if resp.status != 200:
        assert 400 <= resp.status < 500 and answer["error"]["message"]


@ONE_SERVER
@given(raw=st.binary(max_size=64))
async def test_raw_bytes_get_4xx(idle_client, raw):
    resp = await idle_client.post("/prompt", data=raw, headers={"Content-Type": "application/json"})
    assert 400 <= resp.status < 500


async def test_valid_body_still_passes(client):
    assert (await client.post("/prompt", json={"prompt": ADD})).status == 200


@ONE_SERVER
@given(filename=st.text(max_size=20), subfolder=st.text(max_size=12),
       kind=st.sampled_from(["output", "input", "x", ""]))
async def test_view_never_fails_on_odd_names(idle_client, filename, subfolder, kind):
    resp = await idle_client.get("/view", params={"filename": filename, "subfolder": subfolder, "type": kind})
    assert resp.status in (400, 404), (filename, subfolder, await resp.text())


@ONE_SERVER
@given(raw=st.binary(min_size=1, max_size=24))
async def test_view_with_raw_percent_encoded_bytes(idle_client, raw):
    encoded = "".join(f"%{b:02X}" for b in raw)
    resp = await idle_client.get(URL(f"/view?filename={encoded}&subfolder={encoded}", encoded=True))
    assert resp.status in (400, 404)
