"""The model's forward over a paged KV cache: one flat batch of tokens that mixes the decode
tokens of running requests with prefill chunks of new ones (the serving engine's step).

Layout of one step (shapes bucketed by the engine, so a few programs serve every step):

* ``T`` flat tokens (``tokens``, ``positions``): everything but attention runs on them (the
  embedding, norms, dense MLPs and the MoE layers, which choose their schedule from ``T``);
* a grid of ``S`` sequence slots x ``Q`` query rows for attention (``grid_index [S, Q]``: the
  flat token in each cell, ``T`` for padding; ``flat_cell [T]``: each token's cell);
* the cache: per layer a pool of ``N`` pages of ``page_size`` rows (GQA: keys and values ``[N,
  page, kv, hd]``; MLA: the latent ``[N, page, kv_lora]`` and its rope key ``[N, page, rope]``),
  and ``page_table [S, P]``: the pages each slot holds, in position order (position ``p`` of
  slot ``s`` is row ``p % page`` of page ``page_table[s, p // page]``). Page 0 is scratch: the
  padding cells write there and padding table entries read it, always behind the mask.

Attention reads only the pages a sequence holds (``P`` bucketed to the step's longest
sequence), so a request of 100 tokens costs ``ceil(100 / page)`` pages whatever the longest
request allows. Exactness: a query at position ``p`` sees the keys at positions ``<= p`` of its
own sequence (the earlier steps' and this step's, written before attention), the mask the
static path uses; the tests compare tokens with :func:`moe_relayfree_models.generation.generate`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from moe_relayfree_models.config import ModelConfig

_I32 = jnp.int32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKV:
    """Per layer, the page pools: GQA keys ``k[i] [N, page, kv, hd]`` and values ``v[i]``; MLA
    the latent ``k[i] [N, page, kv_lora]`` and the rope key ``v[i] [N, page, rope]``. bf16
    pools are kept as their uint16 bits (:func:`storage_dtype`)."""

    k: list
    v: list

    @property
    def num_pages(self) -> int:
        return self.k[0].shape[0]

    @property
    def page_size(self) -> int:
        return self.k[0].shape[1]


def storage_dtype(dtype):
    """What a page pool of ``dtype`` values is stored as: bf16 as its uint16 bits. XLA:CPU
    widens a bf16 scatter or gather to f32 (the whole pool, every layer, every step), and a
    bitcast of the pool to uint16 at each step was a full copy too; rows are converted as they
    are written and read (a bf16 <-> uint16 bitcast: the same bits)."""
    return jnp.dtype(jnp.uint16) if jnp.dtype(dtype) == jnp.bfloat16 else jnp.dtype(dtype)


def init_pages(cfg: ModelConfig, num_pages: int, page_size: int, dtype) -> PagedKV:
    """Zeroed page pools for every layer (page 0 included: the scratch page), stored as
    :func:`storage_dtype` of ``dtype``."""
    dtype = storage_dtype(dtype)
    if cfg.is_mla:
        shapes = ((num_pages, page_size, cfg.kv_lora_rank), (num_pages, page_size, cfg.qk_rope_head_dim))
    else:
        shapes = ((num_pages, page_size, cfg.n_kv_heads, cfg.head_dim),) * 2
    return PagedKV([jnp.zeros(shapes[0], dtype) for _ in range(cfg.n_layers)],
                   [jnp.zeros(shapes[1], dtype) for _ in range(cfg.n_layers)])


def _to_storage(rows: jax.Array, pool_dtype) -> jax.Array:
    if pool_dtype == jnp.uint16:
        return jax.lax.bitcast_convert_type(rows.astype(jnp.bfloat16), jnp.uint16)
    return rows.astype(pool_dtype)


def _from_storage(rows: jax.Array, dtype) -> jax.Array:
    if rows.dtype == jnp.uint16:
        return jax.lax.bitcast_convert_type(rows, jnp.bfloat16).astype(dtype)
    return rows.astype(dtype)


def write_pages(pool: jax.Array, rows: jax.Array, positions: jax.Array, valid: jax.Array,
                page_table: jax.Array) -> jax.Array:
    """Writes ``rows [S, Q, ...]`` (the grid's new keys) at their positions ``[S, Q]`` into
    ``pool [N, page, ...]``; invalid cells (``valid [S, Q]`` False) go to the scratch page 0."""
    page = pool.shape[1]
    slot = jnp.minimum(positions // page, page_table.shape[1] - 1)
    pages = jnp.where(valid, jnp.take_along_axis(page_table, slot, axis=1), 0)
    within = jnp.where(valid, positions % page, 0)
    rows = _to_storage(rows, pool.dtype)
    return pool.at[pages, within].set(rows, mode="promise_in_bounds")


def read_pages(pool: jax.Array, page_table: jax.Array, dtype) -> jax.Array:
    """The rows of each slot's pages in position order: ``[S, P * page, ...]`` in ``dtype``."""
    s, p = page_table.shape
    got = pool[page_table]  # [S, P, page, ...]
    return _from_storage(got.reshape((s, p * pool.shape[1]) + pool.shape[2:]), dtype)


def paged_mask(positions: jax.Array, valid: jax.Array, length: int,
               window: int | None = None) -> jax.Array:
    """``[S, Q, L]``: a query at position ``p`` sees the keys at positions ``<= p`` (and, with a
    sliding ``window``, ``> p - window``); padding queries see nothing."""
    j = jnp.arange(length, dtype=_I32)[None, None, :]
    p = positions[..., None]
    visible = (j <= p) & valid[..., None]
    if window is not None:
        visible = visible & (p - j < window)
    return visible


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepBatch:
    """One engine step's token layout (see the module docstring). tokens, positions ``[T]
    int32``; grid_index ``[S, Q] int32`` (``T``: padding); flat_cell ``[T] int32``; page_table
    ``[S, P] int32``; last ``[S] int32`` the flat index of each slot's last token this step
    (its logits are the ones computed)."""

    tokens: jax.Array
    positions: jax.Array
    grid_index: jax.Array
    flat_cell: jax.Array
    page_table: jax.Array
    last: jax.Array


def slots_split(a: jax.Array, lay) -> jax.Array:
    """``a [S, ...]`` split by slot over the token shards of ``lay`` (the model's
    :class:`~moe_relayfree.MeshLayout`; when ``S`` divides): each device attends for its own
    sequences, reading their pages from its copy of the pools, instead of every device
    attending for all of them."""
    if a.shape[0] % lay.num_token_shards:
        return a
    spec = jax.sharding.PartitionSpec(lay.batch_axes)
    return jax.lax.with_sharding_constraint(a, jax.sharding.NamedSharding(lay.mesh, spec))


def _attention(layer, lay, h_flat, batch: StepBatch, k_pool, v_pool, dtype):
    """One layer's attention over the pages: ``[T, d]`` -> (``[T, d]``, pools)."""
    attn, cfg = layer.attn, layer.attn.cfg
    t, d = h_flat.shape
    s, q = batch.grid_index.shape
    # A decode step laid out one token per slot (T == S, token i in slot i): the grid is the
    # flat tokens themselves, split alike, so no gather (and no collective) goes between them.
    aligned = q == 1 and t == s
    valid = batch.grid_index < t
    if aligned:
        grid = h_flat[:, None, :]
        positions = batch.positions[:, None]
    else:
        padded = jnp.concatenate([h_flat, jnp.zeros((1, d), h_flat.dtype)])
        grid = slots_split(padded[batch.grid_index], lay)  # [S, Q, d]
        positions = jnp.concatenate([batch.positions, jnp.zeros((1,), _I32)])[batch.grid_index]
    length = batch.page_table.shape[1] * k_pool.shape[1]
    if cfg.is_mla:
        q_nope, q_rope, latent, k_rope = attn.project(grid, positions)
        k_pool = write_pages(k_pool, latent, positions, valid, batch.page_table)
        v_pool = write_pages(v_pool, k_rope, positions, valid, batch.page_table)
        mask = paged_mask(positions, valid, length)
        out = attn.attend(q_nope, q_rope, read_pages(k_pool, batch.page_table, dtype),
                          read_pages(v_pool, batch.page_table, dtype), mask)
    else:
        qs, ks, vs = attn.project(grid, positions)
        k_pool = write_pages(k_pool, ks, positions, valid, batch.page_table)
        v_pool = write_pages(v_pool, vs, positions, valid, batch.page_table)
        mask = paged_mask(positions, valid, length, attn.window)
        out = attn.attend(qs, read_pages(k_pool, batch.page_table, dtype),
                          read_pages(v_pool, batch.page_table, dtype), mask)
    flat = out.reshape(s, d) if aligned else out.reshape(s * q, d)[batch.flat_cell]
    return flat, k_pool, v_pool


def paged_forward(model, batch: StepBatch, pages: PagedKV, dtype=None):
    """The model over one step's flat tokens -> (logits ``[S, V] float32`` at each slot's last
    token, the updated pages)."""
    from moe_relayfree.ffn import dense_dot

    dtype = model.compute_dtype if dtype is None else dtype
    x = jnp.take(model.embed[...], batch.tokens, axis=0).astype(dtype)  # [T, d]
    new_k, new_v = [], []
    for layer, kp, vp in zip(model.layers, pages.k, pages.v):
        h, kp, vp = _attention(layer, model.dispatch.layout, layer.attn_norm(x), batch, kp, vp,
                               dtype)
        x = x + h
        x = x + layer.mlp(layer.mlp_norm(x))  # MoE: the schedule from this step's T tokens
        new_k.append(kp)
        new_v.append(vp)
    x = model.norm(x[batch.last])  # [S, d]
    head = model.embed[...].T if model.lm_head is None else model.lm_head[...]
    logits = dense_dot(x, head.astype(dtype), min_rows=model.dispatch.lowering.dense_min_rows)
    return logits, PagedKV(new_k, new_v)


__all__ = ["PagedKV", "StepBatch", "init_pages", "paged_forward", "paged_mask", "read_pages",
           "write_pages"]
