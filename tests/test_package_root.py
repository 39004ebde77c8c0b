"""The package root: its lazy names (the sharder and planner helpers among them) and the light
import a server needs (``torchrec_fiited.ops.native`` alone, without torchrec)."""

import subprocess
import sys
import textwrap

import torchrec_fiited


def test_distributed_names_at_the_package_root():
    from torchrec_fiited import (
        FiitedEmbeddingBagCollectionSharder,
        fiited_sharders,
        make_fiited_planner,
    )
    from torchrec_fiited import distributed

    assert FiitedEmbeddingBagCollectionSharder is distributed.FiitedEmbeddingBagCollectionSharder
    assert fiited_sharders is distributed.fiited_sharders
    assert make_fiited_planner is distributed.make_fiited_planner
    assert {"FiitedEmbeddingBagCollectionSharder", "fiited_sharders", "make_fiited_planner"} <= set(
        torchrec_fiited.__all__
    )
    assert any(isinstance(s, FiitedEmbeddingBagCollectionSharder) for s in fiited_sharders())


def test_every_exported_name_resolves():
    for name in torchrec_fiited.__all__:
        assert getattr(torchrec_fiited, name) is not None, name


_FRESH = textwrap.dedent("""
    import sys
    import torchrec_fiited.ops.native
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torchrec", "torchrec_fiited"))
    light = all(m == "torchrec_fiited" or m.startswith("torchrec_fiited.ops") for m in loaded)
    assert light, loaded
    from torchrec_fiited import FiitedEmbeddingBagCollectionSharder  # now it loads, on first use
    assert "torchrec_fiited.distributed" in sys.modules and "torchrec" in sys.modules
    print("ok")
""")


def test_ops_import_alone_loads_neither_torchrec_nor_distributed():
    out = subprocess.run(
        [sys.executable, "-c", _FRESH], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
