"""Keeping the archive's bytes: storage tiers with verified moves, a replica, a fixity sweep.

- :mod:`.tiers` — rules move blobs between named stores (hot filesystem → S3 → cold S3): copy,
  re-read and verify SHA-256, switch ``blob.store`` in one transaction, delete the source later.
- :mod:`.replication` — every new blob is copied to the ``replica_store`` (asynchronously,
  verified), following the archive's change feed.
- :mod:`.fixity` — a sweep re-hashes blobs oldest-verified first, alarms on a mismatch and repairs
  from the replica.
- :mod:`.background` — the serving process's loop that drives the three.
"""
