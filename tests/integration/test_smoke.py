from tests.farm import submit


def test_submit_and_claim(server, keys):
    with server.client(keys["submit"]) as c:
        r = submit(c, b"RIFF....", language="en")
        assert r.status_code == 201, r.text
    with server.client(keys["worker"]) as w:
        reg = w.post("/v1/workers", json={"name": "w1", "models": ["tiny.en"]})
        assert reg.status_code == 201, reg.text
        claim = w.post("/v1/jobs/claim", json={"worker_id": reg.json()["worker_id"], "max_jobs": 5})
        assert claim.status_code == 200, claim.text
        jobs = claim.json()["jobs"]
        assert len(jobs) == 1
        media = w.get(jobs[0]["source_url"])
        assert media.content == b"RIFF...."
