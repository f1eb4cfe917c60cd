"""Object storage misbehaving: the S3 endpoint answers 500/503 for a while and drops connections.

A fault-injecting proxy (s3proxy.FlakyProxy) sits in front of the loopback S3 server; vidgen's storage layer and
the clip reader go through it (driver-side: Ray workers started before the test would not see the endpoint) and
must get every byte and every clip through, with the faults counted.
"""

from __future__ import annotations

import os

import pytest
from s3proxy import FlakyProxy

from vidgen import storage
from vidgen.data.pipeline import read_clips
from vidgen.data.synth import make_moving_shapes


@pytest.fixture
def proxy(s3_server, monkeypatch):
    p = FlakyProxy(s3_server.endpoint)
    monkeypatch.setenv("VIDGEN_S3_ENDPOINT_URL", p.url)
    yield p
    p.close()


def test_s3_error_windows_and_dropped_connections_are_retried_through(s3_server, proxy, faults):
    root = f"{s3_server.bucket()}/faults"
    make_moving_shapes(f"{root}/clips", 3, 4, 32, 32)  # written before any fault
    payloads = {f"{root}/objects/{i}.bin": os.urandom(3000 + i) for i in range(6)}

    proxy.fail_for(1.5, 503)  # throttling for 1.5 s while writing
    for uri, data in payloads.items():
        storage.write_bytes(uri, data)
    proxy.drop_next(3)  # connections reset while reading
    got = {uri: storage.read_bytes(uri) for uri in payloads}
    proxy.fail_for(1.0, 500)  # internal errors while listing
    listed = storage.walk_files(f"{root}/objects")
    proxy.drop_next(2)  # and while the clip reader lists and decodes frames
    stream = read_clips(f"{root}/clips", num_frames=4, height=32, width=32, train=False)
    rows = list(stream.iter_local())

    assert got == payloads and sorted(listed) == sorted(payloads)
    assert len(rows) == 3 and stream.report()["skipped"] == 0
    assert proxy.injected >= 5, proxy.statuses()
    lost = sum(got.get(u) != d for u, d in payloads.items()) + (3 - len(rows))
    faults.record("S3 503 for 1.5 s, 500 for 1 s, 5 dropped connections (write, read, list, read_clips)",
                  injected=proxy.injected, survived=True, lost=lost, detail=f"{len(payloads)} objects, 3 clips")
