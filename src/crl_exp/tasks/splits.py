"""Deterministic, seeded train/validation/test assignment that never depends on row order.

Each example id is hashed with the seed to a number in [0, 1); the fractions cut that interval. The same id
therefore always lands in the same split (for a given seed), the splits are disjoint by construction, and
adding rows to a file does not reshuffle existing ones. Tasks whose upstream data has a test split keep it as
the test split (see each task's ``assign_split``).
"""

from __future__ import annotations

import hashlib

SPLITS = ("train", "validation", "test")


def unit_hash(key: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign(key: str, seed: int, fractions: dict[str, float]) -> str:
    """Split name for ``key`` given ``fractions`` (in SPLITS order, summing to 1)."""
    u = unit_hash(key, seed)
    edge = 0.0
    names = [s for s in SPLITS if fractions.get(s, 0) > 0]
    for name in names:
        edge += fractions[name]
        if u < edge:
            return name
    return names[-1]


def subsample(keys: list[str], n: int | None, seed: int) -> list[int]:
    """Indices of a seeded, order-independent subset of size ``n`` (all if None), in hash order."""
    if n is None or n >= len(keys):
        return list(range(len(keys)))
    order = sorted(range(len(keys)), key=lambda i: unit_hash("sub:" + keys[i], seed))
    return sorted(order[:n])


def stratified_order(keys: list[str], groups: list[str], seed: int) -> list[int]:
    """Every index once, round robin over groups (each group and its members in hash order): any prefix of it is a
    stratified sample, every group present before any group gets a second member."""
    members: dict[str, list[int]] = {}
    for i in sorted(range(len(keys)), key=lambda i: unit_hash("strat:" + keys[i], seed)):
        members.setdefault(groups[i], []).append(i)
    queues = [members[g] for g in sorted(members, key=lambda g: unit_hash("group:" + g, seed))]
    order: list[int] = []
    for depth in range(max((len(q) for q in queues), default=0)):
        order += [q[depth] for q in queues if depth < len(q)]
    return order


def stratified_subsample(keys: list[str], groups: list[str], n: int | None, seed: int) -> list[int]:
    """Indices of a seeded subset of size ``n`` that covers every group before any group gets a second member
    (``stratified_order``'s first ``n``), in file order: a representative subset of a split whose file order is
    grouped (MMLU subjects, BBQ categories), where the first rows would be one group."""
    if n is None or n >= len(keys):
        return list(range(len(keys)))
    return sorted(stratified_order(keys, groups, seed)[:n])
