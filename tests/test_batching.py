"""The host's batch policy (hakuriver.host.service.batch_gap): what silence closes a ledger batch.

A busy fabric's events come a few milliseconds apart; a batch closed by a 2 ms silence then
held one event and paid a whole transaction for it. While the last batch closed within the
window the gap is the window itself; after a quiet spell a lone event is stored after one gap.
"""

from __future__ import annotations

from hakuriver.host.service import BATCH_GAP, BATCH_WINDOW, batch_gap


def test_after_a_quiet_spell_a_short_gap_closes_the_batch():
    assert batch_gap(float("inf")) == BATCH_GAP  # the first batch
    assert batch_gap(BATCH_WINDOW) == BATCH_GAP
    assert batch_gap(60.0) == BATCH_GAP


def test_while_busy_the_batch_collects_for_the_whole_window():
    assert batch_gap(0.0) == BATCH_WINDOW
    assert batch_gap(BATCH_WINDOW / 2) == BATCH_WINDOW
    assert BATCH_GAP < BATCH_WINDOW  # no event waits longer than the window either way
