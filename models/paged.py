"""The model's forward over a paged KV cache: one flat batch of tokens that mixes the decode
tokens of running requests with prefill chunks of new ones (the serving engine's step).

Layout of one step (shapes bucketed by the engine, so a few programs serve every step):

* ``T = n R`` flat rows (``tokens``, ``positions``, ``valid``), ``R`` on each of the mesh's
  ``n`` token shards: everything but attention runs on them (the embedding, norms, dense MLPs
  and the MoE layers, which choose their schedule from ``T``);
* a shard's ``R = D + C Q`` rows are, in place, its ``D`` decode slots (one row each: a running
  request's next token) and then its ``C`` chunk slots of ``Q`` rows (a prefill chunk each);
  attention views them as ``[n D, 1]`` and ``[n C, Q]`` grids, so no row leaves its device;
* the cache: per layer a pool of ``N`` pages of ``page_size`` rows (GQA: keys and values ``[N,
  page, kv, hd]``; MLA: the latent ``[N, page, kv_lora]`` and its rope key ``[N, page, rope]``),
  split over the shards (shard ``j`` holds pages ``[j N/n, (j+1) N/n)``), and per slot a page
  table row of local page ids in position order (position ``p`` is row ``p % page`` of page
  ``table[s, p // page]``). Local page 0 is scratch: padding rows write there and padding
  table entries read it, always behind the mask.

A request lives on one shard (the engine's
:class:`~moe_relayfree_models.serving.scheduler.PagePool`), its slot in that shard's block, so
writing and reading its pages is local to that device (:func:`sharded_pages`): a replicated
pool needed every layer's new rows gathered to every device (two collectives per layer, most
of a small decode step), and a grid gathered from the flat tokens moved them across devices
twice per layer.

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
    """One engine step's layout (see the module docstring), over ``n`` token shards, each with
    ``D`` decode slots and ``C`` chunk slots of ``Q`` rows (``R = D + C Q`` rows per shard,
    ``T = n R``): tokens, positions ``[T] int32``; valid ``[T] bool`` (False: padding);
    decode_table ``[n D, P] int32`` and chunk_table ``[n C, P] int32`` (local page ids);
    last ``[n (D + C)] int32``: the row, within its shard's ``R``, whose logits each slot
    takes (a decode slot's own row, a chunk's last fed token)."""

    tokens: jax.Array
    positions: jax.Array
    valid: jax.Array
    decode_table: jax.Array
    chunk_table: jax.Array
    last: jax.Array


def sharded_pages(lay, fn, *args):
    """``fn(*args)`` on each device's own shard of every argument (split on dim 0 over the
    token shards of ``lay``: page pools ``[N, ...]``, ``[S, ...]`` slot arrays and ``[T, ...]``
    rows alike), its result split the same way: page writes and reads stay on the device that
    holds the pages."""
    spec = lay.tokens
    return jax.shard_map(fn, mesh=lay.mesh, in_specs=(spec,) * len(args), out_specs=spec)(*args)


def _split(a: jax.Array, lay) -> jax.Array:
    """``a`` split on dim 0 over the token shards (what each device holds)."""
    return jax.lax.with_sharding_constraint(a, jax.sharding.NamedSharding(lay.mesh, lay.tokens))


def _attend_slots(attn, lay, rows, positions, valid, table, k_pool, v_pool, dtype):
    """Attention for ``S'`` slots of ``Q'`` rows (``rows [S', Q', d]``, split by slot):
    their keys written into their pages, then their pages read -> (``[S', Q', d]``, pools)."""
    length = table.shape[1] * k_pool.shape[1]

    def write(pool, new):
        return sharded_pages(lay, write_pages, pool, new, positions, valid, table)

    def read(pool):
        return sharded_pages(lay, lambda p, t: read_pages(p, t, dtype), pool, table)

    if attn.cfg.is_mla:
        q_nope, q_rope, latent, k_rope = attn.project(rows, positions)
        k_pool, v_pool = write(k_pool, latent), write(v_pool, k_rope)
        mask = paged_mask(positions, valid, length)
        out = attn.attend(q_nope, q_rope, read(k_pool), read(v_pool), mask)
    else:
        qs, ks, vs = attn.project(rows, positions)
        k_pool, v_pool = write(k_pool, ks), write(v_pool, vs)
        mask = paged_mask(positions, valid, length, attn.window)
        out = attn.attend(qs, read(k_pool), read(v_pool), mask)
    return out, k_pool, v_pool


def _attention(layer, lay, h, batch: StepBatch, k_pool, v_pool, dtype):
    """One layer's attention over the pages: ``[T, d]`` -> (``[T, d]``, pools). Each shard's
    rows are viewed in place as its decode slots and its chunk slots: no row leaves its
    device."""
    n = lay.num_token_shards
    t, d = h.shape
    r = t // n
    nd, nc = batch.decode_table.shape[0], batch.chunk_table.shape[0]
    dn = nd // n
    q = (r - dn) // (nc // n) if nc else 0
    rows = _split(h.reshape(n, r, d), lay)
    pos = batch.positions.reshape(n, r)
    valid = batch.valid.reshape(n, r)
    parts = []
    if nd:
        out, k_pool, v_pool = _attend_slots(
            layer.attn, lay, _split(rows[:, :dn].reshape(nd, 1, d), lay),
            pos[:, :dn].reshape(nd, 1), valid[:, :dn].reshape(nd, 1), batch.decode_table,
            k_pool, v_pool, dtype)
        parts.append(out.reshape(n, dn, d))
    if nc:
        out, k_pool, v_pool = _attend_slots(
            layer.attn, lay, _split(rows[:, dn:].reshape(nc, q, d), lay),
            pos[:, dn:].reshape(nc, q), valid[:, dn:].reshape(nc, q), batch.chunk_table,
            k_pool, v_pool, dtype)
        parts.append(out.reshape(n, r - dn, d))
    out = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
    return _split(out, lay).reshape(t, d), k_pool, v_pool


def paged_forward(model, batch: StepBatch, pages: PagedKV, dtype=None):
    """The model over one step's flat tokens -> (logits ``[n (D + C), V] float32``, one row per
    slot, the updated pages; pools, slots and rows split over the token shards, see the module
    docstring)."""
    from moe_relayfree.ffn import dense_dot

    lay = model.dispatch.layout
    n = lay.num_token_shards
    if batch.tokens.shape[0] % n or pages.num_pages % n:
        raise ValueError(f"rows ({batch.tokens.shape[0]}) and pages ({pages.num_pages}) must "
                         f"split evenly over the {n} token shards")
    dtype = model.compute_dtype if dtype is None else dtype
    x = jnp.take(model.embed[...], batch.tokens, axis=0).astype(dtype)  # [T, d]
    new_k, new_v = [], []
    for layer, kp, vp in zip(model.layers, pages.k, pages.v):
        h, kp, vp = _attention(layer, lay, layer.attn_norm(x), batch, kp, vp, dtype)
        x = x + h
        x = x + layer.mlp(layer.mlp_norm(x))  # MoE: the schedule from this step's T tokens
        new_k.append(kp)
        new_v.append(vp)
    # each slot's row, taken where it lives (a global gather would gather x over devices)
    x = model.norm(sharded_pages(lay, lambda rows, i: rows[i], x, batch.last))  # [n (D + C), d]
    head = model.embed[...].T if model.lm_head is None else model.lm_head[...]
    logits = dense_dot(x, head.astype(dtype), min_rows=model.dispatch.lowering.dense_min_rows)
    return logits, PagedKV(new_k, new_v)


__all__ = ["PagedKV", "StepBatch", "init_pages", "paged_forward", "paged_mask", "read_pages",
           "sharded_pages", "write_pages"]
