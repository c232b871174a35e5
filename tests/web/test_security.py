"""Token, Origin and Host checks: a non-loopback server needs the token; other sites' pages are refused."""

import pytest

from tests.web.conftest import ADD


@pytest.fixture
async def exposed(make_app, aiohttp_client):
    return await aiohttp_client(make_app(listen="0.0.0.0", token="s3cret"))


async def test_every_route_needs_the_token(exposed):
    for method, url in [("GET", "/"), ("GET", "/prompt"), ("GET", "/api/queue"), ("GET", "/object_info"),
                        ("GET", "/view?filename=x.png"), ("POST", "/prompt"), ("GET", "/ws"),
                        ("GET", "/static/app.js"), ("GET", "/no/such/route")]:
        resp = await exposed.request(method, url)
        assert resp.status == 401, (method, url)
        assert (await resp.json())["error"]["type"] == "unauthorized"
    wrong = await exposed.get("/prompt", headers={"Authorization": "Bearer nope"})
    assert wrong.status == 401


async def test_token_by_header_query_or_cookie(exposed):
    assert (await exposed.get("/prompt", headers={"Authorization": "Bearer s3cret"})).status == 200
    assert (await exposed.get("/prompt?token=s3cret")).status == 200
    page = await exposed.get("/?token=s3cret")
    assert page.status == 200 and "loom_token" in page.cookies
    assert (await exposed.get("/prompt")).status == 200  # the cookie now carries it
    async with exposed.ws_connect("/ws?clientId=a") as ws:
        assert (await ws.receive_json())["type"] == "status"


async def test_non_loopback_host_name_is_allowed_when_exposed(exposed):
    resp = await exposed.get("/prompt?token=s3cret", headers={"Host": "my-box.lan:8188"})
    assert resp.status == 200


async def test_loopback_server_refuses_other_host_names(client):
    resp = await client.get("/prompt", headers={"Host": "attacker.example:8188"})
    assert resp.status == 403 and (await resp.json())["error"]["type"] == "forbidden_host"
    assert (await client.get("/prompt", headers={"Host": "localhost:8188"})).status == 200


async def test_cross_origin_requests_are_refused(client):
    host = f"{client.server.host}:{client.server.port}"
    same = await client.post("/prompt", json={"prompt": ADD}, headers={"Origin": f"http://{host}"})
    assert same.status == 200
    for origin in ("http://evil.example", "null", f"http://{host}.evil.example", "file://"):
        resp = await client.post("/prompt", json={"prompt": ADD}, headers={"Origin": origin})
        assert resp.status == 403, origin
        assert (await resp.json())["error"]["type"] == "forbidden_origin"
    resp = await client.get("/view?filename=x.png", headers={"Sec-Fetch-Site": "cross-site"})
    assert resp.status == 403
    with pytest.raises(Exception):  # noqa: B017 - the handshake is refused
        await client.ws_connect("/ws", headers={"Origin": "http://evil.example"})


async def test_allowed_origin_option(make_app, aiohttp_client):
    client = await aiohttp_client(make_app(allowed_origins=["https://tool.example"]))
    resp = await client.get("/prompt", headers={"Origin": "https://tool.example"})
    assert resp.status == 200
