"""The engine's paged key/value cache (vLLM's PagedAttention layout, Kwon et al., arXiv 2309.06180): a
pool of fixed-size blocks per layer, (blocks, kv_heads, block_size, head_dim) for keys and for values,
handed to sequences on demand. A sequence's block table lists the blocks holding its positions 0..n-1
in order (position p lives in block table[p // block_size] at offset p % block_size), so memory
follows the tokens a sequence holds, not the longest it may grow to. Block 0 is never handed out:
unused table entries point at it, so every entry is a valid index (the fixed-shape CUDA-graph step
reads whole tables; what it reads there is masked).

`BlockPool` keeps the host-side books: free blocks, reference counts, and for prefix caching (vLLM's
automatic prefix caching) the content digest of every full block: a block's digest chains the
digest of the blocks before it with its own tokens, so equal digests mean an equal token prefix, and
so equal keys and values (causal attention: a position's keys depend on the tokens up to it alone).
A block no sequence holds any more keeps its digest and content on a least-recently-used list and is
reused by a request whose prompt starts with the same tokens, until the pool needs it for new tokens.

`quantized=True` stores keys and values as symmetric int8 with one scale per (block, head, position),
the per-token scheme of KIVI-style and vLLM's int8/fp8 KV caches (e.g. Hooper et al., "KVQuant",
arXiv 2401.18079, and Liu et al., "KIVI", arXiv 2402.02750, which study per-channel keys; per-token
scales are what a cache that is appended one token at a time can compute without a calibration
pass). It halves the cache against bfloat16 (quarters it against float32) plus 2/head_dim for the
float16 scales; reads return the compute dtype.
"""

from __future__ import annotations

import array
import collections
import hashlib

import torch
from torch import Tensor

from slimlm.core.errors import SlimError
from slimlm.core.memory import check_fits, hugepage_zeros

DEFAULT_BLOCK_SIZE = 16  # tokens per block, as vLLM's default


class CacheFull(SlimError):
    """The KV cache has no free block for the tokens asked for (nothing was changed)."""


def quantize_heads(x: Tensor) -> tuple[Tensor, Tensor]:
    """int8 codes (..., D) and float16 scales (..., 1) of x (..., D), one scale per vector; the codes
    are computed with the rounded scale, so codes · scale is the stored value."""
    scale = (x.float().abs().amax(-1, keepdim=True) / 127).clamp(min=1e-6).to(torch.float16)
    return torch.round(x.float() / scale.float()).clamp(-127, 127).to(torch.int8), scale


def block_digest(parent: bytes, tokens: list[int]) -> bytes:
    """The digest of a full block holding `tokens` after the blocks whose digest is `parent`."""
    return hashlib.blake2b(parent + array.array("q", tokens).tobytes(), digest_size=16).digest()


class BlockPool:
    """Which blocks are free, how many sequences hold each one, and the digests of cached full blocks."""

    def __init__(self, blocks: int, caching: bool) -> None:
        self.caching = caching
        self.refs = [0] * blocks
        self.free = collections.deque(range(1, blocks))  # block 0: the null block
        self.idle: collections.OrderedDict[int, None] = collections.OrderedDict()  # cached, held by none: LRU first
        self.block_of: dict[bytes, int] = {}
        self.digest_of: dict[int, bytes] = {}
        self.evicted = 0

    def available(self) -> int:
        """Blocks that can be handed out: free ones and cached ones no sequence holds."""
        return len(self.free) + len(self.idle)

    def used(self) -> int:
        return len(self.refs) - 1 - self.available()

    def allocate(self) -> int:
        """A block for new tokens: a free one, else the least recently used idle cached one."""
        if self.free:
            block = self.free.popleft()
        elif self.idle:
            block, _ = self.idle.popitem(last=False)
            self.uncache(block)
            self.evicted += 1
        else:
            raise CacheFull("the KV cache is full")
        self.refs[block] = 1
        return block

    def hold(self, block: int) -> None:
        if self.refs[block] == 0:
            del self.idle[block]
        self.refs[block] += 1

    def drop(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if block in self.digest_of:
                self.idle[block] = None  # the most recently used end
            else:
                self.free.append(block)

    def register(self, block: int, digest: bytes) -> None:
        """Offer a full block's content to later requests (unless a block with that content is offered)."""
        if self.caching and digest not in self.block_of and block not in self.digest_of:
            self.block_of[digest] = block
            self.digest_of[block] = digest

    def uncache(self, block: int) -> None:
        digest = self.digest_of.pop(block, None)
        if digest is not None:
            del self.block_of[digest]

    def clear_cache(self) -> None:
        """Forget every cached block (held ones stay with their sequences; idle ones become free)."""
        for block in list(self.digest_of):
            self.uncache(block)
        self.free.extend(self.idle)
        self.idle.clear()


class KVCache:
    def __init__(self, n_layers: int, blocks: int, block_size: int, kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", quantized: bool = False) -> None:
        """blocks: the pool's size including the null block; max_len: the longest sequence (positions)."""
        self.n_layers, self.block_size, self.max_len, self.dtype, self.quantized = n_layers, block_size, max_len, dtype, quantized
        self.blocks = blocks
        self.max_blocks = -(-max_len // block_size)  # table entries per sequence
        shape = (blocks, kv_heads, block_size, head_dim)
        store = torch.int8 if quantized else dtype
        per_token = 2 * n_layers * kv_heads * (head_dim * store.itemsize + (2 if quantized else 0))
        check_fits(per_token * blocks * block_size, f"a KV cache of {(blocks - 1) * block_size} tokens",
                   "hold fewer tokens (--kv-tokens, --slots) or shorter sequences (--max-len)", torch.device(device))
        def zeros():  # on the host in huge pages, as the weights (`core/memory.py`): steps read it all
            cpu = torch.device(device).type == "cpu"
            return hugepage_zeros(shape, store) if cpu else torch.zeros(shape, dtype=store, device=device)

        self.k = [zeros() for _ in range(n_layers)]
        self.v = [zeros() for _ in range(n_layers)]
        if quantized:
            scale_shape = (blocks, kv_heads, block_size, 1)
            self.k_scale = [torch.zeros(scale_shape, dtype=torch.float16, device=device) for _ in range(n_layers)]
            self.v_scale = [torch.zeros(scale_shape, dtype=torch.float16, device=device) for _ in range(n_layers)]

    def tensors(self) -> list[Tensor]:
        return self.k + self.v + (self.k_scale + self.v_scale if self.quantized else [])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def token_bytes(self) -> int:
        """Bytes one token's keys and values take (all layers, scales included)."""
        return self.nbytes() // (self.blocks * self.block_size)

    def check_room(self, length: int) -> None:
        """Refuse a sequence of `length` tokens where a sequence may hold fewer (the one bounds check:
        callers know their lengths on the host, so writes never read positions back from the device)."""
        if length > self.max_len:
            raise SlimError(f"sequence of {length} tokens is longer than the KV cache ({self.max_len} tokens per "
                            "sequence); raise max_len or shorten the prompt")

    def locate(self, tables: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Block and offset (B, T) of positions (B, T) of the sequences with block tables (B, max_blocks)."""
        return tables.gather(1, positions // self.block_size), positions % self.block_size

    def write(self, layer: int, tables: Tensor, positions: Tensor, k: Tensor, v: Tensor) -> None:
        """Store k, v (B, kv_heads, T, D) at positions (B, T) of the sequences with tables (B, max_blocks)."""
        block, offset = self.locate(tables, positions)
        for store, scales, x in ((self.k, getattr(self, "k_scale", None), k), (self.v, getattr(self, "v_scale", None), v)):
            x = x.transpose(1, 2)  # (B, T, H, D): indexed by (block, offset)
            if self.quantized:
                codes, scale = quantize_heads(x)
                store[layer].transpose(1, 2)[block, offset] = codes
                scales[layer].transpose(1, 2)[block, offset] = scale
            else:
                store[layer].transpose(1, 2)[block, offset] = x.to(self.dtype)

    def copy(self, src: int, dst: int, n: int) -> None:
        """Copy the first `n` positions of block `src` into block `dst` (copy-on-write of a shared block)."""
        for t in self.tensors():
            t[dst, :, :n] = t[src, :, :n]

    def static_index(self, tables: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Indices (block, head, offset) for `write_static` of one token per sequence at positions (B,),
        built on the device: nothing syncs with the host, so a step using them can be captured in a CUDA graph."""
        block, offset = self.locate(tables, positions[:, None])  # (B, 1)
        heads = torch.arange(self.k[0].shape[1], device=positions.device)[None, :]
        return block, heads, offset.expand(-1, heads.shape[1])

    def write_static(self, layer: int, index: tuple[Tensor, Tensor, Tensor], k: Tensor, v: Tensor) -> None:
        """Store one token's k, v (B, kv_heads, 1, D) per sequence at `static_index` (unquantized cache only)."""
        self.k[layer].index_put_(index, k[:, :, 0].to(self.dtype))  # (B, Hkv, D) at each row's position
        self.v[layer].index_put_(index, v[:, :, 0].to(self.dtype))

    def read(self, layer: int, tables: Tensor, length: int) -> tuple[Tensor, Tensor]:
        """Keys and values (B, kv_heads, length, D) at positions 0..length-1 of the sequences with block
        tables (B, >= ceil(length / block_size)), in the compute dtype."""
        blocks = tables[:, : -(-length // self.block_size)]  # (B, nb)

        def take(t: Tensor) -> Tensor:
            x = t[blocks]  # (B, nb, H, bs, D)
            b, nb, h, bs, d = x.shape
            return x.transpose(1, 2).reshape(b, h, nb * bs, d)[:, :, :length]

        k, v = take(self.k[layer]), take(self.v[layer])
        if self.quantized:
            k = (k.to(torch.float32) * take(self.k_scale[layer]).float()).to(self.dtype)
            v = (v.to(torch.float32) * take(self.v_scale[layer]).float()).to(self.dtype)
        return k, v
