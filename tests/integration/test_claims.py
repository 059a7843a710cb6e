"""Claims under contention, with leases long enough that none expires mid-test."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from tests.farm import ProtocolWorker, chunk_plan, submit


# queued -> leased (claim), under contention
def test_fifty_concurrent_claimers_claim_each_of_500_jobs_exactly_once(server, keys):
    worker = ProtocolWorker(server, keys["worker"])
    with server.client(keys["submit"]) as submitter:
        tid = submit(submitter, b"audio").json()["id"]
    [chunk] = worker.claim()
    assert worker.complete(chunk, chunk_plan(500)).status_code == 200
    claimed: list[str] = []
    lock = threading.Lock()

    def claimer(n: int) -> None:
        w = ProtocolWorker(server, keys["worker"], name=f"claimer-{n}")
        try:
            while jobs := w.claim(max_jobs=1 + n % 5):
                with lock:
                    claimed.extend(j["id"] for j in jobs)
        finally:
            w.close()

    with ThreadPoolExecutor(50) as pool:
        list(pool.map(claimer, range(50)))

    assert len(claimed) == 500
    assert len(set(claimed)) == 500
    rows = server.sql("SELECT * FROM jobs WHERE transcription_id = $1 AND seq > 0", tid)
    assert {str(r["id"]) for r in rows} == set(claimed)
    assert all(r["state"] == "leased" and r["attempts"] == 1 for r in rows)
