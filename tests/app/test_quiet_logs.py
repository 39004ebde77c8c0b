"""The app keeps third-party INFO dumps (FBGEMM's TBE arguments) off the console."""

import logging
import os

from torchrec_fiited.train import quiet_third_party_logs


def _record(path, level):
    return logging.LogRecord("root", level, path, 1, "msg", None, None)


def test_fbgemm_info_is_dropped_and_warnings_kept():
    quiet_third_party_logs()
    quiet_third_party_logs()  # idempotent: one filter
    root = logging.getLogger()
    fbgemm = os.path.join("site-packages", "fbgemm_gpu", "split_table_batched_embeddings_ops_training.py")
    assert sum(type(f).__name__ == "_DropThirdPartyInfo" for f in root.filters) == 1
    assert not root.filter(_record(fbgemm, logging.INFO))
    assert root.filter(_record(fbgemm, logging.WARNING))
    assert root.filter(_record(os.path.join("torchrec_fiited", "app", "recipe.py"), logging.INFO))
