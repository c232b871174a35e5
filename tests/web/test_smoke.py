from tests.web.conftest import ADD


async def test_prompt_runs(client):
    resp = await client.post("/prompt?wait=true", json={"prompt": ADD})
    body = await resp.json()
    assert resp.status == 200, body
    assert body["status"] == "success"
    assert body["outputs"]["3"] == {"text": ["42"]}
