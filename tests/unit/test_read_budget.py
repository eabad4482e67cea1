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


def test_whole_results_share_the_budget(tmp_path):
    """A read without "chunk" is answered whole: it may build MAX_RESULT_BYTES only while the
    budget has room, else what is left (at least MIN_CHUNK), and gives it back like a chunk."""
    svc = _service(tmp_path)
    full = clients.READ_BUDGET // clients.MAX_RESULT_BYTES
    conns = [clients._Cursors(svc, f"c{i}") for i in range(full + 2)]
    read = Execute([("SELECT * FROM t", ())])
    limits = [svc._whole(read, c) for c in conns]
    assert limits[:full] == [clients.MAX_RESULT_BYTES] * full
    assert limits[full:] == [clients.MIN_CHUNK] * 2
    for c in conns:
        svc._release(c)
    assert svc._read_inflight == 0
    assert svc._whole(read, conns[0]) == clients.MAX_RESULT_BYTES
    # Neither a streamed read (its chunk is granted instead) nor a write takes a whole grant.
    svc._release(conns[0])
    assert svc._whole(Execute([("SELECT 1", ())], chunk=1 << 20), conns[1]) == clients.MAX_RESULT_BYTES
    assert svc._whole(Execute([("INSERT INTO t VALUES (1)", ())]), conns[1]) == clients.MAX_RESULT_BYTES
    assert conns[1].granted == 0 and svc._read_inflight == 0


def test_whole_result_over_a_short_grant_says_why():
    from raftsql.server.sqlerrors import read_too_big_error

    assert "taken by other reads" in read_too_big_error(clients.MIN_CHUNK)["message"]
    assert "taken by other reads" not in read_too_big_error(clients.MAX_RESULT_BYTES)["message"]


def test_a_whole_read_is_run_within_its_grant(tmp_path):
    """handle() gives the node the whole-result limit it granted, and takes it back with the
    response (serve() calls _release once the answer is sent)."""
    from raftsql.protocol import Result
    from raftsql.server.access import Principal

    seen = []

    def execute(statements, **kw):
        seen.append(kw["whole"])
        return Result(columns=["x"], rows=[[1]])

    svc = _service(tmp_path)
    svc.node.execute = execute
    svc.node.trace = None
    who = Principal("client", "admin", "reader", "01")
    cursors = clients._Cursors(svc, "reader")
    svc._read_inflight = clients.READ_BUDGET - clients.MIN_CHUNK  # nearly all of it is taken
    resp = svc.handle(
        {"op": "execute", "id": 1, "statements": [["SELECT x FROM t", []]]}, None, cursors, who)
    assert resp.get("error") is None, resp
    assert seen == [clients.MIN_CHUNK]
    svc._release(cursors)
    assert svc._read_inflight == clients.READ_BUDGET - clients.MIN_CHUNK
