"""KV block bookkeeping: the block pool and the per-sequence block tables.

`BlockPool` owns every block's state: reference count, free queue (LRU order,
so cached blocks are evicted oldest first and blocks without a hash are reused
before any cached one) and the prefix-cache map from chained block hashes to
blocks. `KVCacheManager` is the only writer of `Seq.block_ids`. Both deal in
block ids on the CPU; the KV tensors themselves belong to the model runner.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from .request import Seq
from .utils import cdiv


class KVBlock:
    __slots__ = ("block_id", "ref_cnt", "block_hash")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: int | None = None


class BlockPool:
    """Free queue + ref counts + prefix-hash index over a fixed number of blocks."""

    def __init__(self, num_blocks: int):
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # Blocks with ref_cnt == 0, least recently used first; cached ones stay findable until reused.
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[int, KVBlock] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> KVBlock:
        _, blk = self._free.popitem(last=False)
        if blk.block_hash is not None:  # evict its cached content
            if self._cached.get(blk.block_hash) is blk:
                del self._cached[blk.block_hash]
            blk.block_hash = None
        blk.ref_cnt = 1
        return blk

    def touch(self, blk: KVBlock) -> None:
        if blk.ref_cnt == 0:
            del self._free[blk.block_id]
        blk.ref_cnt += 1

    def release(self, blk: KVBlock) -> None:
        assert blk.ref_cnt > 0, f"double free of block {blk.block_id}"
        blk.ref_cnt -= 1
        if blk.ref_cnt == 0:
            self._free[blk.block_id] = blk
            if blk.block_hash is None:  # nothing worth keeping: reuse it first
                self._free.move_to_end(blk.block_id, last=False)

    def lookup(self, block_hash: int) -> KVBlock | None:
        return self._cached.get(block_hash)

    def register(self, blk: KVBlock, block_hash: int) -> None:
        if blk.block_hash is None and block_hash not in self._cached:
            blk.block_hash = block_hash
            self._cached[block_hash] = blk


class KVCacheManager:
    """Allocates, shares (fork / prefix cache), copies-on-write and frees sequences' blocks."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self.prefix_cache_queries = 0  # tokens looked up in the prefix cache
        self.prefix_cache_hits = 0  # of those, tokens found

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free / self.pool.num_blocks

    def _block_hashes(self, seq: Seq, num_blocks: int) -> list[int]:
        """Chained hashes of seq's first num_blocks full blocks (token content is append-only, so memoised)."""
        hashes, bs = seq.block_hashes, self.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else 0
            hashes.append(hash((parent, tuple(seq.token_ids[i * bs : (i + 1) * bs]))))
        return hashes[:num_blocks]

    def find_cached_prefix(self, seq: Seq) -> list[KVBlock]:
        """Longest run of cached full blocks matching seq's tokens, leaving >= 1 token to compute."""
        if not self.enable_prefix_caching or seq.block_ids or seq.params.prompt_logprobs is not None:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        found = []
        for h in self._block_hashes(seq, max_blocks):
            blk = self.pool.lookup(h)
            if blk is None:
                break
            found.append(blk)
        self.prefix_cache_queries += seq.num_tokens
        self.prefix_cache_hits += len(found) * self.block_size
        return found

    def allocate_slots(
        self, seq: Seq, num_new_tokens: int, cached_blocks: Iterable[KVBlock] = ()
    ) -> list[tuple[int, int]] | None:
        """Make room for num_new_tokens more tokens after the computed (and cached) ones.

        Returns the (src, dst) block copies the runner must do first (copy-on-write of
        a shared, partly filled block), or None when there are not enough free blocks;
        on None nothing changed.
        """
        bs = self.block_size
        if not cached_blocks:  # the decode fast path: room left in an unshared last block
            start = seq.num_computed_tokens
            blocks = seq.block_ids
            if (
                start + num_new_tokens <= len(blocks) * bs
                and self.pool.blocks[blocks[start // bs]].ref_cnt == 1
            ):
                return []
        cached_blocks = list(cached_blocks)
        start = seq.num_computed_tokens + len(cached_blocks) * bs
        have = len(seq.block_ids) + len(cached_blocks)
        need = cdiv(start + num_new_tokens, bs)
        num_new_blocks = max(0, need - have)
        cow_idx = start // bs
        cow = cow_idx < len(seq.block_ids) and self.pool.blocks[seq.block_ids[cow_idx]].ref_cnt > 1
        revived = sum(1 for b in cached_blocks if b.ref_cnt == 0)
        if num_new_blocks + int(cow) + revived > self.pool.num_free:
            return None
        for blk in cached_blocks:  # before allocating, so eviction can't take them
            self.pool.touch(blk)
            seq.block_ids.append(blk.block_id)
        copies = []
        if cow:
            old = self.pool.blocks[seq.block_ids[cow_idx]]
            new = self.pool.allocate()
            copies.append((old.block_id, new.block_id))
            self.pool.release(old)
            seq.block_ids[cow_idx] = new.block_id
        for _ in range(num_new_blocks):
            seq.block_ids.append(self.pool.allocate().block_id)
        return copies

    def cache_full_blocks(self, seq: Seq) -> None:
        """Offer seq's newly full blocks (all tokens known and scheduled) to the prefix cache.

        A block registered while the step computing it is still on the device is safe:
        any later reader runs after that step in stream order.
        """
        if not self.enable_prefix_caching:
            return
        first = seq.num_registered_blocks
        last = (
            min(seq.num_computed_tokens, seq.num_tokens, len(seq.block_ids) * self.block_size)
            // self.block_size
        )
        if last <= first:
            return
        hashes = self._block_hashes(seq, last)
        for i in range(first, last):
            self.pool.register(self.pool.blocks[seq.block_ids[i]], hashes[i])
        seq.num_registered_blocks = last

    def fork(self, parent: Seq, child: Seq, num_tokens: int) -> None:
        """Let child share the blocks holding parent's first num_tokens tokens (ref-counted)."""
        assert not child.block_ids
        k = cdiv(num_tokens, self.block_size)
        for bid in parent.block_ids[:k]:
            self.pool.touch(self.pool.blocks[bid])
        child.block_ids = list(parent.block_ids[:k])
        child.block_hashes = list(parent.block_hashes[: num_tokens // self.block_size])
        child.num_registered_blocks = min(parent.num_registered_blocks, num_tokens // self.block_size)

    def free(self, seq: Seq) -> None:
        # Tail first: released blocks go to the back of the LRU queue, so the end of a
        # sequence is evicted before its (more shareable) beginning.
        for bid in reversed(seq.block_ids):
            self.pool.release(self.pool.blocks[bid])
        seq.block_ids = []
        seq.num_registered_blocks = 0
