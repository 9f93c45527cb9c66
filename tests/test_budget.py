"""The ledger behind every per-connection and per-service cap."""

from __future__ import annotations

import pytest

from rpyc_host.budget import Cap, Ledger, LimitExceeded


def test_connection_cap_refuses_and_names_the_limit() -> None:
    ledger = Ledger("files", {"open_transfers": Cap(10, 2)}, {"open_transfers": "open transfers"})
    account = ledger.open_account("files-1")
    account.acquire("open_transfers")
    account.acquire("open_transfers")
    with pytest.raises(LimitExceeded) as caught:
        account.acquire("open_transfers")
    assert caught.value.limit == "max_open_transfers_per_connection"
    assert caught.value.value == 2
    assert "limits.max_open_transfers_per_connection: 2" in str(caught.value)
    assert account.held("open_transfers") == 2  # the refused one took nothing
    assert ledger.refusal_counts() == {"max_open_transfers_per_connection": 1}


def test_service_cap_is_shared_and_closing_gives_everything_back() -> None:
    ledger = Ledger("files", {"upload_bytes": Cap(100, 0)})
    first, second = ledger.open_account("a"), ledger.open_account("b")
    first.acquire("upload_bytes", 70)
    with pytest.raises(LimitExceeded) as caught:
        second.acquire("upload_bytes", 31)
    assert caught.value.limit == "max_upload_bytes"
    second.acquire("upload_bytes", 30)
    first.close()
    assert ledger.held("upload_bytes") == 30
    with pytest.raises(LimitExceeded):
        first.acquire("upload_bytes", 1)  # a closed connection takes nothing more
    second.release("upload_bytes", 1000)  # never more than it holds
    assert ledger.held("upload_bytes") == 0
