"""What a replica holds, from its object names: chunks, bases, and the restorable ranges.

A complete base at LSN C (its manifest exists) followed by the chunks C+1..E without a gap can
be restored to any LSN in [C, E]. Names carry the LSNs, so one listing tells the ranges; times
need the manifests and the chunks' timelines (``range_times``, ``timeline``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from razorfs.storage import replica_formats as rf
from razorfs.storage.formats import FormatError
from razorfs.storage.objectstore import MissingObject, ObjectStore


@dataclass
class Range:
    """Restorable: the base at ``base`` and the chunks after it up to ``end``."""

    base: int
    end: int
    chunks: list[tuple[int, int]] = field(default_factory=list)  # (first, last)


@dataclass
class Catalog:
    uuid: bytes | None
    chunks: list[tuple[int, int]]  # (first, last), by first LSN
    chunk_sizes: dict[tuple[int, int], int]
    bases: list[int]  # complete bases (manifest present), by LSN
    incomplete_bases: dict[int, list[str]]  # LSN -> its object names (no manifest)
    base_objects: dict[int, list[str]]  # complete base LSN -> its object names
    base_sizes: dict[int, int]  # complete base LSN -> bytes of its objects

    @property
    def newest_lsn(self) -> int | None:
        candidates = [last for _, last in self.chunks] + self.bases
        return max(candidates) if candidates else None

    def ranges(self) -> list[Range]:
        """Each complete base with the gap-free chunk chain after it; a base that another
        range already covers up to its end is folded into it (the earlier base serves)."""
        by_first = {}
        for first, last in self.chunks:
            by_first.setdefault(first, (first, last))
        result: list[Range] = []
        for base in self.bases:
            if result and result[-1].base < base <= result[-1].end:
                continue  # reachable from the earlier base's chain: same moments
            current = Range(base, base)
            while (chunk := by_first.get(current.end + 1)) is not None:
                current.chunks.append(chunk)
                current.end = chunk[1]
            result.append(current)
        return result

    def range_for(self, lsn: int) -> Range | None:
        """The range that restores ``lsn`` starting from the newest base at or before it."""
        by_first = {first: (first, last) for first, last in self.chunks}
        for base in reversed(self.bases):
            if base > lsn:
                continue
            chain = Range(base, base)
            while chain.end < lsn and (chunk := by_first.get(chain.end + 1)) is not None:
                chain.chunks.append(chunk)
                chain.end = chunk[1]
            if chain.end >= lsn:
                return chain
        return None


def read_catalog(store: ObjectStore) -> Catalog:
    try:
        uuid = rf.decode_identity(store.get(rf.IDENTITY_KEY), f"{store.url}/{rf.IDENTITY_KEY}")
    except MissingObject:
        uuid = None
    chunks, sizes = [], {}
    for name, size in store.list(rf.CHUNK_DIR + "/"):
        span = rf.parse_chunk_key(name[len(rf.CHUNK_DIR) + 1:])
        if span is not None:
            chunks.append(span)
            sizes[span] = size
    objects: dict[int, list[str]] = {}
    sizes_of_bases: dict[int, int] = {}
    for name, size in store.list(rf.BASE_DIR + "/"):
        lsn = rf.parse_base_name(name[len(rf.BASE_DIR) + 1:].partition("/")[0])
        if lsn is not None:
            objects.setdefault(lsn, []).append(name)
            sizes_of_bases[lsn] = sizes_of_bases.get(lsn, 0) + size
    complete = {lsn: names for lsn, names in objects.items()
                if rf.base_manifest_key(lsn) in names}
    return Catalog(uuid, sorted(chunks), sizes, sorted(complete),
                   {lsn: names for lsn, names in objects.items() if lsn not in complete},
                   complete, {lsn: sizes_of_bases[lsn] for lsn in complete})


def timeline(store: ObjectStore, span: tuple[int, int]) -> list[tuple[int, int]]:
    """The (lsn, ns) timeline of chunk ``span``, read from its head only."""
    name = rf.chunk_key(*span)
    where = f"{store.url}/{name}"
    head = store.get_range(name, 0, rf.chunk_head_size(64))
    first, last, entries = rf.read_chunk_head(head, where)
    needed = rf.chunk_head_size(len(entries))
    if needed > len(head):
        head = store.get_range(name, 0, needed)
        first, last, entries = rf.read_chunk_head(head, where)
    if (first, last) != span:
        raise FormatError(f"{where}: holds LSN {first}..{last}, its name says otherwise")
    return entries


def base_time(store: ObjectStore, uuid: bytes, lsn: int) -> int:
    name = rf.base_manifest_key(lsn)
    return rf.decode_manifest(store.get(name), uuid, f"{store.url}/{name}").time_ns


def range_times(store: ObjectStore, catalog: Catalog, span: Range) -> tuple[int, int]:
    """(ns of the base, ns of the range's last LSN)."""
    start = base_time(store, catalog.uuid, span.base)
    end = timeline(store, span.chunks[-1])[-1][1] if span.chunks else start
    return start, end
