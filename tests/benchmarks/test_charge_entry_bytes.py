"""benchmarks/charge_entry_bytes.py: the what-if sizing charges exactly today's entry at today's
layout, and a cheaper charge buys more entries and slots from the same budget."""

import pytest

from tests.scripts import load_script
from torchrec_fiited.store import sizing


def _load():
    return load_script("benchmarks/charge_entry_bytes.py")  # sizing stays unpatched


@pytest.mark.parametrize("num_chunks", [1, 2, 4])
@pytest.mark.parametrize("slots", [None, 100, 1 << 20])
def test_todays_layout_charges_what_the_store_holds(num_chunks, slots):
    charged = _load()._charged("8,4,4")  # int64 key, fp32 score, fp32 utilities
    assert charged(num_chunks, slots) == sizing.entry_bytes(num_chunks, slots)


def test_a_cheaper_entry_buys_more_entries_and_slots(monkeypatch):
    tables = [sizing.TableSpec("t", 100_000, 16)]
    today = sizing.size_pool(tables, 0.001, 2, "rowwise_adagrad", sketch_width=1)
    monkeypatch.setattr(sizing, "entry_bytes", _load()._charged("4,0,2"))
    cheaper = sizing.size_pool(tables, 0.001, 2, "rowwise_adagrad", sketch_width=1)
    assert cheaper.entries > today.entries and cheaper.slots > today.slots
