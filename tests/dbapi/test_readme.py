"""The README's Python example runs as written, against a real cluster's DSN."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SNIPPET = Path(__file__).resolve().parents[2] / "README.md"
DSN_IN_SNIPPET = "raftsql://127.0.0.1:4001,127.0.0.1:4002,127.0.0.1:4003/?certs=cluster-data/certs/client"


def test_readme_snippet_runs_against_a_cluster(cluster, tmp_path):
    text = SNIPPET.read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "raftsql.connect(" in b]
    assert len(blocks) == 1
    code = blocks[0]
    assert len(code.strip().splitlines()) <= 11  # "a 10-line example" (plus its import line)
    assert DSN_IN_SNIPPET in code  # what `raftsql cluster up` prints by default (relative certs)
    code = code.replace(DSN_IN_SNIPPET, cluster.dsn)
    script = tmp_path / "example.py"
    script.write_text(code)
    for run in (1, 2):  # runs again as written: CREATE TABLE IF NOT EXISTS, more rows
        out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                             timeout=60, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[:2] == ["1 hello", "2 world"]
        assert len(lines) == 2 * run
