"""Snowflake-style 64-bit task ids: unique across clients, sortable by time.

Layout (most significant first): 41 bits of milliseconds since 2024-01-01 UTC,
12 bits chosen at random once per process, 10 bits of a per-process counter.
Two processes share an id only if they draw the same 12 random bits and submit
in the same millisecond with the same counter value; a process that needs more
than 1024 ids in one millisecond waits for the next one.
"""

import os
import threading
import time

EPOCH_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z
# 12 bits from the OS's random source (as random.SystemRandom would draw them, without
# importing random, hashlib and bisect into every command-line invocation)
_PROCESS_BITS = int.from_bytes(os.urandom(2), "big") >> 4
_lock = threading.Lock()
_last_ms = 0
_counter = 0


def new_id() -> int:
    global _last_ms, _counter
    with _lock:
        now = int(time.time() * 1000) - EPOCH_MS
        if now <= _last_ms:
            now = _last_ms
            _counter += 1
            if _counter >= 1024:
                now += 1
                _counter = 0
        else:
            _counter = 0
        _last_ms = now
        return (now << 22) | (_PROCESS_BITS << 10) | _counter

