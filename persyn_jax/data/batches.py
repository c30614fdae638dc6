"""SFT batches: records -> tokenized examples -> packed (or padded) [B, T] batches.

A grain `MapDataset` over our shards (or an in-memory record list) is shuffled with a seed derived
from (seed, epoch), and each record is tokenized with the student's own chat template
(chat.pair_ids). Examples are packed first-fit into the B rows of the batch being built; when an
example fits in no row the batch is emitted. With several processes every process builds the same
global batches and its devices take their rows (to_device), so packing never depends on the number
of hosts (host_records splits records across hosts for readers that want per-host streams).
Every batch follows the SFT batch contract (common.md):

  input_ids, segment_ids (0 = padding), positions (restart per segment), targets (next token of
  the same segment, 0 elsewhere), loss_mask (1 where the target is a response token).

The token sequence of every example, and so every per-token target, is the same packed and
unpacked; only the layout differs. Everything is a pure function of (data, tokenizer, config,
seed, epoch), so resuming at step s replays the same stream and drops the first s batches.
"""
from __future__ import annotations

import dataclasses
import glob
import os
from collections import Counter
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, TypeVar

import numpy as np

from persyn_jax import fs
from persyn_jax.data import chat
from persyn_jax.data import records as rec
from persyn_jax.data import shards

T = TypeVar("T")
KEYS = ("input_ids", "segment_ids", "positions", "targets", "loss_mask")


@dataclasses.dataclass(frozen=True)
class SFTDataConfig:
  seq_len: int = 1024
  batch_size: int = 8            # global rows per step (each process' devices take their rows)
  packing: bool = True
  overlong: str = "truncate"     # "truncate" (keep the first seq_len tokens) or "skip"
  shuffle: bool = True
  system: str | None = None      # system prompt given to the chat template
  drop_remainder: bool = False   # drop the last, partly filled batch of an epoch
  unfinished: str = "keep"       # a response cut by max_new_tokens: "keep" it or "drop" it

  def __post_init__(self):
    if self.overlong not in ("truncate", "skip"):
      raise ValueError(f"overlong={self.overlong!r}: 'truncate' or 'skip'")
    check_unfinished(self.unfinished)
    if self.seq_len < 2 or self.batch_size < 1:
      raise ValueError(f"seq_len={self.seq_len}, batch_size={self.batch_size}: seq_len >= 2, "
                       "batch_size >= 1")


# -- sources -------------------------------------------------------------------------------------

def _infer_stage(data_dir: str) -> str:
  found = [p.rsplit("/", 1)[-1].rsplit(os.sep, 1)[-1]
           for p in fs.glob(fs.join(glob.escape(data_dir), "*.manifest.json"))]
  if len(found) != 1:
    raise shards.ShardError(f"{data_dir}: expected one <stage>.manifest.json, found {found}; "
                            "pass stage=")
  return found[0][:-len(".manifest.json")]


def record_dataset(data: str | Sequence[Mapping[str, Any]], stage: str | None = None):
  """A grain MapDataset of decoded records: from a shard directory (manifest-checked) or a list."""
  import grain

  if isinstance(data, (str, os.PathLike)):
    data = str(data)
    paths = shards.shard_paths(data, stage or _infer_stage(data))
    src = grain.sources.ArrayRecordDataSource(paths)
    return grain.MapDataset.source(src).map(lambda b: rec.decode(b, where=data))
  return grain.MapDataset.source(list(data))


def epoch_seed(seed: int, epoch: int) -> int:
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def host_records(data, *, seed: int, epoch: int, host: int, num_hosts: int, shuffle: bool = True,
                 stage: str | None = None):
  """This host's records for one epoch: a seeded permutation of all records, every H-th one."""
  if not 0 <= host < num_hosts:
    raise ValueError(f"host={host} out of range for num_hosts={num_hosts}")
  ds = record_dataset(data, stage)
  if shuffle:
    ds = ds.shuffle(seed=epoch_seed(seed, epoch))
  return ds[host::num_hosts]


# -- examples ------------------------------------------------------------------------------------

def _check_response(record: Mapping[str, Any]) -> None:
  if not isinstance(record.get("response"), str):
    raise rec.RecordError(f"record {record.get('id')!r}: no 'response' to train on "
                          f"(response = {record.get('response')!r})")


def check_unfinished(value: str, name: str = "unfinished") -> None:
  if value not in ("drop", "keep"):
    raise ValueError(f"{name}={value!r}: 'drop' or 'keep'")


def unfinished_response(record: Mapping[str, Any]) -> bool:
  """Whether the teacher stopped at max_new_tokens, not at its own end (finish_reason "length"):
  trained as it is, the template's end-of-turn token would teach the student to stop mid-answer."""
  return record.get("finish_reason") == "length"


def tokenize(record: Mapping[str, Any], tokenizer, system: str | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
  """(ids, response_mask) of a record's prompt (its messages if any) and response."""
  _check_response(record)
  prompt = record.get("messages") or record["prompt"]
  ids, mask = chat.pair_ids(tokenizer, prompt, record["response"], system)
  return np.asarray(ids, np.int32), np.asarray(mask, np.int8)


def fit_length(ids: np.ndarray, mask: np.ndarray, seq_len: int, overlong: str, stats: Counter):
  """(ids, mask) cut to seq_len, or None (skipped); the reason is counted in stats."""
  cut = len(ids) > seq_len
  if cut:
    if overlong == "skip":
      stats["skipped_overlong"] += 1
      return None
    ids, mask = ids[:seq_len], mask[:seq_len]
  if not mask[1:].any():  # no response token left to predict (the prompt fills seq_len)
    stats["skipped_no_response"] += 1
    return None
  stats["truncated"] += cut
  return ids, mask


def first_fit(items: Iterable[T], rows: int, seq_len: int, size: Callable[[T], int] = len
              ) -> Iterator[list[list[T]]]:
  """Batches of `rows` rows of items, placed first-fit by size(item) into rows of seq_len.

  An item goes into the first row with room; when none has room, the batch is emitted and a new
  one started (so every emitted batch but the last has no empty row). Every item appears exactly
  once, in stream order within each row. Works on a lazy stream: items are held only until their
  batch is emitted.
  """
  bins: list[list[T]] = [[] for _ in range(rows)]
  free = [seq_len] * rows
  for i, item in enumerate(items):
    n = size(item)
    if n > seq_len:
      raise ValueError(f"item {i} has size {n} > seq_len={seq_len}")
    r = next((r for r in range(rows) if free[r] >= n), None)
    if r is None:
      yield bins
      bins, free, r = [[] for _ in range(rows)], [seq_len] * rows, 0
    bins[r].append(item)
    free[r] -= n
  if any(bins):
    yield bins


def pack_decreasing(lengths: Sequence[int], row_lengths: Sequence[int], min_row: int = 0
                    ) -> list[tuple[int, list[int]]]:
  """Best-fit-decreasing packing of items (by index) into rows: [(row length, item indices)].

  Scoring may reorder its pairs freely (SFT's first_fit must keep the shuffled stream order), so
  items go in longest first, each into the open row with the least room that still holds it; an
  item that fits nowhere opens a row of the smallest of `row_lengths` that holds it and is at
  least `min_row` long (short items share such rows). Long items thus open long rows whose tails
  the short items fill, and every row length is one of a few shapes. Within a row, items are in placement order. Deterministic (ties go to the older row).
  """
  import bisect
  sizes = sorted(row_lengths)
  lengths = np.asarray(lengths, np.int64)
  rows: list[tuple[int, list[int]]] = []
  free: list[tuple[int, int]] = []  # (room left, row number), sorted
  for i in np.argsort(-lengths, kind="stable").tolist():
    n = int(lengths[i])
    if n < 1 or n > sizes[-1]:
      raise ValueError(f"item {i} has length {n}: expected 1..{sizes[-1]}")
    j = bisect.bisect_left(free, (n, -1))
    if j < len(free):
      room, r = free.pop(j)
    else:
      r = len(rows)
      rows.append((sizes[min(bisect.bisect_left(sizes, max(n, min_row)), len(sizes) - 1)], []))
      room = rows[r][0]
    rows[r][1].append(i)
    if room - n:
      bisect.insort(free, (room - n, r))
  return rows


def empty_batch(rows: int, seq_len: int) -> dict[str, np.ndarray]:
  batch = {k: np.zeros((rows, seq_len), np.int32) for k in KEYS}
  batch["loss_mask"] = batch["loss_mask"].astype(np.float32)
  return batch


def build_batch(rows: Sequence[Sequence[tuple[np.ndarray, np.ndarray]]], seq_len: int,
                num_rows: int | None = None) -> dict[str, np.ndarray]:
  """The SFT batch of `rows` (each a list of (ids, response_mask) examples laid end to end)."""
  batch = empty_batch(num_rows or len(rows), seq_len)
  for r, examples in enumerate(rows):
    off = 0
    for s, (ids, mask) in enumerate(examples, 1):
      n = len(ids)
      if off + n > seq_len:
        raise ValueError(f"row {r}: {off + n} tokens > seq_len={seq_len}")
      sl = slice(off, off + n)
      batch["input_ids"][r, sl] = ids
      batch["segment_ids"][r, sl] = s
      batch["positions"][r, sl] = np.arange(n)
      batch["targets"][r, off:off + n - 1] = ids[1:]
      batch["loss_mask"][r, off:off + n - 1] = mask[1:]
      off += n
  return batch


def pack(examples: Sequence[tuple[np.ndarray, np.ndarray]], rows: int, seq_len: int
         ) -> Iterator[dict[str, np.ndarray]]:
  """Packed batches of a list of examples (first-fit, see first_fit)."""
  for group in first_fit(examples, rows, seq_len, size=lambda ex: len(ex[0])):
    yield build_batch(group, seq_len)


def tokenize_records(ds, tokenizer, seq_len: int, overlong: str, system: str | None,
                     chunk: int = 64, unfinished: str = "keep"
                     ) -> Iterator[tuple[tuple[np.ndarray, np.ndarray] | None, Counter]]:
  """Per record of `ds` (in order): its example cut to seq_len, or None when skipped, and the
  stats it adds (examples, truncated, skipped_overlong, skipped_no_response, and
  skipped_unfinished: a response cut by max_new_tokens, with unfinished="drop")."""
  # indexing, not iter(): grain's prefetch threads cost more than they give on a few cores, and
  # tokenization (batched: the Rust tokenizer encodes a chunk in parallel) is the bottleneck
  for start in range(0, len(ds), chunk):
    recs = [ds[i] for i in range(start, min(len(ds), start + chunk))]
    for record in recs:
      _check_response(record)
    dropped = [unfinished == "drop" and unfinished_response(r) for r in recs]
    kept = [r for r, d in zip(recs, dropped) if not d]
    pairs = iter(chat.pair_ids_batch(tokenizer, [r.get("messages") or r["prompt"] for r in kept],
                                     [r["response"] for r in kept], system))
    for d in dropped:
      if d:
        yield None, Counter(skipped_unfinished=1)
        continue
      ids, mask = next(pairs)
      outcome: Counter = Counter()
      ex = fit_length(np.asarray(ids, np.int32), np.asarray(mask, np.int8), seq_len, overlong,
                      outcome)
      if ex is not None:
        outcome["examples"] += 1
      yield ex, +outcome


# -- the SFT stream ------------------------------------------------------------------------------

class SFTBatches:
  """Iterator of the global SFT batches (numpy, [batch_size, seq_len]) of one epoch.

  Every process builds the same batches from all records (the seeded shuffle and first-fit
  packing see the whole dataset), and each process' devices take their rows of them (see
  to_device), so the batches, and so the losses, do not depend on the number of processes.
  `stats` counts examples, tokens, truncated and skipped examples, batches, and padding slots.
  With num_batches, exactly that many batches come out (empty all-padding batches after the data
  runs out).
  """

  def __init__(self, data, tokenizer, cfg: SFTDataConfig, *, seed: int = 0, epoch: int = 0,
               start_step: int = 0, num_batches: int | None = None, stage: str | None = None,
               tokenized: "TokenizedRecords | None" = None):
    self.cfg, self.tokenizer = cfg, tokenizer
    self.rows = cfg.batch_size
    self.tokenized = tokenized
    if tokenized is not None:
      tokenized.check(cfg)
      data = range(len(tokenized))  # record indices, shuffled like the records themselves
    self.records = host_records(data, seed=seed, epoch=epoch, host=0, num_hosts=1,
                                shuffle=cfg.shuffle, stage=stage if tokenized is None else None)
    self.start_step, self.num_batches = start_step, num_batches
    self.stats: Counter = Counter()
    self._it = self._batches()

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._it)

  def examples(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    ds = self.records
    if self.tokenized is not None:  # tokenized once: replay each record's example and outcome
      outcomes = (self.tokenized[ds[i]] for i in range(len(ds)))
    else:
      outcomes = tokenize_records(ds, self.tokenizer, self.cfg.seq_len, self.cfg.overlong,
                                  self.cfg.system, unfinished=self.cfg.unfinished)
    for ex, outcome in outcomes:
      self.stats.update(outcome)
      if ex is not None:
        yield ex

  def _groups(self) -> Iterator[list[list[tuple[np.ndarray, np.ndarray]]]]:
    seq_len = self.cfg.seq_len
    # unpacked: every example takes a whole row (padded), in stream order
    size = (lambda ex: len(ex[0])) if self.cfg.packing else (lambda ex: seq_len)
    yield from first_fit(self.examples(), self.rows, seq_len, size)

  def _batches(self) -> Iterator[dict[str, np.ndarray]]:
    step = 0
    limit = self.num_batches
    for group in self._groups():
      full = all(group) and len(group) == self.rows
      if limit is not None and step >= limit:
        return
      if self.cfg.drop_remainder and not full:
        self.stats["dropped_partial_batches"] += 1
        break
      if step >= self.start_step:
        batch = build_batch(group, self.cfg.seq_len, self.rows)
        real = int((batch["segment_ids"] > 0).sum())
        self.stats["tokens"] += real
        self.stats["padding"] += batch["segment_ids"].size - real
        self.stats["loss_tokens"] += int(batch["loss_mask"].sum())
        self.stats["batches"] += 1
        yield batch
      step += 1
    while limit is not None and step < limit:
      if step >= self.start_step:
        self.stats["empty_batches"] += 1
        yield empty_batch(self.rows, self.cfg.seq_len)
      step += 1


def sft_batches(data, tokenizer, *, seq_len: int, batch_size: int, seed: int = 0, epoch: int = 0,
                packing: bool = True, overlong: str = "truncate", shuffle: bool = True,
                system: str | None = None, drop_remainder: bool = False, start_step: int = 0,
                num_batches: int | None = None, stage: str | None = None,
                tokenized: "TokenizedRecords | None" = None, unfinished: str = "keep"
                ) -> SFTBatches:
  """The SFT batches of one epoch of `data` (a shard directory or a list of records).

  Deterministic in (data, tokenizer, seed, epoch); `start_step` skips that many batches for an
  exact resume. `batch_size` is the global batch: every process gets the same batches. With
  `tokenized` (TokenizedRecords of the same data), no record is tokenized again: the batches are
  the same, epoch after epoch, without the chat template's cost (`data` is then unused).
  """
  cfg = SFTDataConfig(seq_len=seq_len, batch_size=batch_size, packing=packing, overlong=overlong,
                      shuffle=shuffle, system=system, drop_remainder=drop_remainder,
                      unfinished=unfinished)
  return SFTBatches(data, tokenizer, cfg, seed=seed, epoch=epoch, start_step=start_step,
                    num_batches=num_batches, stage=stage, tokenized=tokenized)


class TokenizedRecords:
  """Every record of `data` tokenized once, in dataset order: per record its example
  (ids, response mask, cut to seq_len) or None when skipped, and the stats it adds. Shared by all
  epochs of a run (sft_batches(tokenized=...)); about 5 bytes per token of host memory."""

  def __init__(self, data, tokenizer, *, seq_len: int, overlong: str = "truncate",
               system: str | None = None, stage: str | None = None, unfinished: str = "keep"):
    check_unfinished(unfinished)
    self.seq_len, self.overlong, self.system, self.unfinished = seq_len, overlong, system, unfinished
    self._items = list(tokenize_records(record_dataset(data, stage), tokenizer, seq_len,
                                        overlong, system, unfinished=unfinished))

  def __len__(self) -> int:
    return len(self._items)

  def __getitem__(self, i: int):
    return self._items[i]

  def check(self, cfg: SFTDataConfig) -> None:
    got = (self.seq_len, self.overlong, self.system, self.unfinished)
    want = (cfg.seq_len, cfg.overlong, cfg.system, cfg.unfinished)
    if got != want:
      raise ValueError(f"tokenized with (seq_len, overlong, system, unfinished) = {got}, batches "
                       f"ask {want}")


def to_device(batch: Mapping[str, np.ndarray], mesh) -> dict:
  """A global batch (the same on every process) -> jax.Arrays sharded over the mesh's batch axes
  (data, fsdp); each process' devices take their rows."""
  from persyn_jax.sharding import batch_sharding, put_global
  return {k: put_global(v, batch_sharding(mesh, np.shape(v))) for k, v in batch.items()}


def device_batches(batches: Iterable[Mapping[str, np.ndarray]], mesh) -> Iterator[dict]:
  for batch in batches:
    yield to_device(batch, mesh)


def epoch_batches(data_dir: str, tokenizer, c) -> tuple[Callable, int]:
  """(start -> microbatches from index `start` on, across epochs; microbatches of epoch 0) of the
  records in `data_dir`, for the SFT config `c` (seq_len, batch_size, seed). The records are
  tokenized once, for the counts and every epoch.

  Each epoch is shuffled, then packed first-fit, so epochs may differ by a batch or so: a resumed
  position is walked through each epoch's own count (counted once, when a resume first needs it),
  never divided by epoch 0's, so `batches(p)` is the uninterrupted stream from microbatch p on.
  `batches.stats` holds epoch 0's counts (examples, truncated, skipped_* by reason)."""
  tokenized = TokenizedRecords(data_dir, tokenizer, seq_len=c.seq_len, stage="data",
                               unfinished=c.unfinished)
  kw = dict(seq_len=c.seq_len, batch_size=c.batch_size, seed=c.seed, tokenized=tokenized,
            unfinished=c.unfinished)
  first = sft_batches(data_dir, tokenizer, epoch=0, **kw)
  counts = [sum(1 for _ in first)]
  if counts[0] == 0:
    hint = ("; every response was cut by max_new_tokens (sft.unfinished: drop): raise "
            "sampling.max_new_tokens or set sft.unfinished: keep"
            if first.stats.get("skipped_unfinished") == len(tokenized) else "")
    raise ValueError(f"{data_dir}: no SFT examples to train on ({len(tokenized)} records; "
                     f"{dict(first.stats) or 'none tokenized'}); check sft.seq_len and the "
                     f"data{hint}")

  def count(epoch: int) -> int:
    while len(counts) <= epoch:
      counts.append(sum(1 for _ in sft_batches(data_dir, tokenizer, epoch=len(counts), **kw)))
    return counts[epoch]

  def batches(start: int):
    epoch, skip = 0, start
    while skip >= count(epoch):
      skip, epoch = skip - count(epoch), epoch + 1
    while True:
      yield from sft_batches(data_dir, tokenizer, epoch=epoch, start_step=skip, **kw)
      epoch, skip = epoch + 1, 0

  batches.stats = dict(first.stats)  # epoch 0's counts: examples, truncated, skipped_*
  return batches, counts[0]
