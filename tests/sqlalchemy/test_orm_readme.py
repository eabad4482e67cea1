"""The README's ORM example (declarative models, a session, a query, a relationship) runs as
written against a real cluster; only its URL is replaced by the test cluster's."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
URL_IN_README = "raftsql:///127.0.0.1:4001,127.0.0.1:4002,127.0.0.1:4003?certs=cluster-data/certs/client"


def test_readme_orm_example_runs_against_a_cluster(sa_cluster, tmp_path):
    pytest.importorskip("sqlalchemy")
    from raftsql.sqla_dialect import sqlalchemy_url

    blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
              if "DeclarativeBase" in b]
    assert len(blocks) == 1
    code = blocks[0]
    assert URL_IN_README in code  # what `raftsql cluster up` prints, in SQLAlchemy's URL form
    url = sqlalchemy_url(sa_cluster.dsn).render_as_string(hide_password=False)
    script = tmp_path / "orm_example.py"
    script.write_text(code.replace(URL_IN_README, url))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "The Dispossessed by Ursula K. Le Guin",
        "The Lathe of Heaven by Ursula K. Le Guin",
        "Ursula K. Le Guin has 2 books",
    ]
