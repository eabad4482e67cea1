"""The node-wide read budget (server/clients.py, READ_BUDGET): chunks of streamed results are
granted what is left of it, at least MIN_CHUNK, and give it back once their response is sent,
so many readers asking for the largest chunks at once cannot take a node's memory with them
(30 readers of 32 MiB chunks took a leader to 2.7 GB and cost an election)."""

from types import SimpleNamespace

from raftsql.protocol import Execute
from raftsql.server import clients


def _service(tmp_path):
    cfg = SimpleNamespace(max_frame_size=64 << 20, data_dir=str(tmp_path))
    return clients.ClientService(SimpleNamespace(cfg=cfg))


def test_chunks_share_the_budget_and_give_it_back(tmp_path):
    svc = _service(tmp_path)
    conns = [clients._Cursors(svc, f"c{i}") for i in range(12)]
    read = Execute([("SELECT * FROM t", ())], chunk=1 << 40)
    grants = [svc._chunk(read, c) for c in conns]
    assert grants[0] == 32 << 20  # the frame limit's half
    assert sum(grants[:8]) == clients.READ_BUDGET
    assert grants[8:] == [clients.MIN_CHUNK] * 4  # the budget is used up: the smallest chunks
    assert svc._read_inflight <= clients.READ_BUDGET + 4 * clients.MIN_CHUNK
    for c in conns:
        svc._release(c)
    assert svc._read_inflight == 0
    assert svc._chunk(read, conns[0]) == 32 << 20
    # A write's chunk is not a streamed read: it takes nothing from the budget.
    write = Execute([("INSERT INTO t VALUES (1) RETURNING *", ())], chunk=1 << 20)
    assert svc._chunk(write, conns[1]) == 1 << 20 and conns[1].granted == 0
