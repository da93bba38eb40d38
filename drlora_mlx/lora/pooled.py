"""The pooled layout of the expert LoRA: storage that follows the rank budget (docs/METHOD.md, section 10).

Per-layer allocation promises that every MoE layer ends at exactly
N_mod x r_target active ranks (docs/METHOD.md, section 6), so a layer's LoRA
state needs room for that many ranks, not N_mod x r_max. A ``RankPool`` holds
them: S = N_mod x r_target rank slots plus one null slot, each slot one A row
and one B column of some (module, expert, rank). An up (or gate) projection
maps H -> I and a down projection I -> H, so every rank of every target costs
H + I values: a slot is a row of ``hidden`` (S + 1, H) and a row of ``inner``
(S + 1, I), the A row on the module's input side and the B column on its output
side. The up and down modules of all experts draw from the one pool.

Each ``PooledLoRASwitchLinear`` keeps a slot table (E, r_max) int32: entry
(e, j) is the slot of rank j of expert e, or the null slot when the rank is
inactive. The forward gathers every expert's A (E, w, in) and B (E, w, out)
from the pool by the table's first ``width`` columns and computes the same
product as the masked layout, ``y = W x + scale * B (A x)``. The gather runs
under ``mx.checkpoint``: the backward recomputes it rather than keeping every
layer's gathered copy alive, and its gradient flows back into the pool rows.

Invariants that make this exact and cheap:
- the null slot and every slot no table holds are zero in both parts, so a
  gathered inactive rank adds nothing and gets a zero gradient, and an
  optimizer (weight decay, momentum, Muon's orthogonalisation, Adafactor's
  factored moments) leaves them zero: no rank guard is needed;
- growth hands out free slots with a fresh A part (LoRA's uniform init,
  drawn from a key made of the run's seed, the layer and the slot, so every
  data-parallel process and a resumed run draw the same) and a zero B part:
  function-preserving, and values change, never shapes, so nothing retraces;
- each active slot belongs to exactly one (module, expert, rank), so its
  gradient is that rank's gradient and the per-slot importance EMA is the
  masked layout's per-rank EMA.
"""

from __future__ import annotations

import math
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import InputError
from ..method.importance import row_scores
from .masked import ExpertLoRA

SIDES = ("hidden", "inner")


class PoolFullError(InputError):
    """More active ranks in a layer than its pool has slots (ranks from outside
    the run's own growth: a saved adapter or export made with other settings)."""


@mx.custom_function
def gather_slots(pool: mx.array, table: mx.array) -> mx.array:
    """``pool[table]``: every expert's factor rows (E, w, dims) from the pool."""
    return pool[table]


@gather_slots.vjp
def _gather_slots_vjp(primals, cotangent, output):
    # Every held slot appears once in a table, so the gradient of the pool is a
    # permutation of the cotangent's rows, not a sum: gathered through the
    # inverse table (a gather is several times faster than the scatter-add
    # MLX would use). The null slot and the free ones get zero rows.
    pool, table = primals
    n, dims = table.size, pool.shape[1]
    inverse = mx.full((pool.shape[0],), n, dtype=mx.int32)
    inverse = inverse.at[table.reshape(-1)].minimum(mx.arange(n, dtype=mx.int32))
    inverse = mx.where(mx.arange(pool.shape[0]) == pool.shape[0] - 1, n, inverse)
    rows = mx.concatenate([cotangent.reshape(n, dims), mx.zeros((1, dims), cotangent.dtype)])
    return rows[inverse], mx.zeros_like(table)


def _slot_key(seed: int, layer: int, slot: int) -> mx.array:
    """The random key of one slot's A initialisation."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, layer, slot]).generate_state(1)[0]
    return mx.random.key(int(state))


class RankPool(nn.Module):
    """The rank slots of one MoE layer, shared by its expert modules."""

    def __init__(self, capacity: int, hidden: int, inner: int, layer: int = 0, seed: int = 0):
        super().__init__()
        self.hidden = mx.zeros((capacity + 1, hidden))
        self.inner = mx.zeros((capacity + 1, inner))
        # Per-slot EMA of the rank importance s_j (Eq. 7), updated by the trainer.
        self.importance = mx.zeros((capacity + 1,))
        self.freeze(keys=["importance"], recurse=False)
        # Plain attributes, not children: the modules are the experts', the pool only serves them.
        object.__setattr__(self, "members", [])
        object.__setattr__(self, "layer", layer)
        object.__setattr__(self, "seed", seed)

    @property
    def capacity(self) -> int:
        return self.hidden.shape[0] - 1

    @property
    def null(self) -> int:
        """The always-zero slot that inactive ranks point to."""
        return self.capacity

    def side_dims(self, side: str) -> int:
        return self[side].shape[1]

    def write(self, name: str, slots, values) -> None:
        """``name``'s rows ``slots`` set to ``values``, in a new array: whoever holds
        the old one (a checkpoint being written, a step's snapshot) keeps its values."""
        array = mx.array(self[name])
        array[mx.array(np.asarray(slots, dtype=np.int32))] = values
        self[name] = array

    def update_importance(self, grad_hidden: mx.array, grad_inner: mx.array, beta: float) -> None:
        """One EMA step of every slot's importance (inside the compiled step)."""
        # s_j (Eq. 6) of every slot: the product is the same whichever part holds A, so it needs no table.
        scores = row_scores(self.hidden, self.inner, grad_hidden, grad_inner)
        self.importance = beta * self.importance + (1.0 - beta) * scores

    # ----- handing out slots (between steps, on the host) ---------------------------

    def set_ranks(self, new_ranks: list) -> None:
        """Give each module in ``new_ranks`` ((module, ranks (E,)) pairs) exactly
        those ranks: a module keeps the slots of the ranks it keeps, gives back
        those above its new rank, and takes free slots for those it gains (fresh
        A, zero B)."""
        tables = {id(m): np.array(m.slots) for m in self.members}
        released = []
        for module, ranks in new_ranks:
            table, ranks = tables[id(module)], np.asarray(ranks, dtype=np.int64)
            for e in np.flatnonzero(ranks < (table != self.null).sum(1)):
                released.extend(table[e, ranks[e]:][table[e, ranks[e]:] != self.null].tolist())
                table[e, ranks[e]:] = self.null
        held = np.concatenate([t.ravel() for t in tables.values()])
        free = np.setdiff1d(np.arange(self.capacity), held)
        wanted = sum(int(np.maximum(np.asarray(r) - (tables[id(m)] != self.null).sum(1), 0).sum())
                     for m, r in new_ranks)
        if wanted > len(free):
            total = sum(int((t != self.null).sum()) for t in tables.values()) + wanted
            raise PoolFullError(
                f"MoE layer {self.layer} would hold {total} active expert ranks; its pooled LoRA state has room "
                f"for {self.capacity} (experts x targets x r_target): keep every layer's ranks within that budget, "
                "or use lora_layout masked"
            )
        fresh = []  # (module, slots) for the A initialisation
        cursor = 0
        for module, ranks in new_ranks:
            table, ranks = tables[id(module)], np.asarray(ranks, dtype=np.int64)
            have = (table != self.null).sum(1)
            taken = []
            for e in np.flatnonzero(ranks > have):
                n = int(ranks[e] - have[e])
                table[e, have[e]:ranks[e]] = free[cursor:cursor + n]
                taken.extend(free[cursor:cursor + n].tolist())
                cursor += n
            fresh.append((module, taken))
            module.slots = mx.array(table, dtype=mx.int32)
        self._clear(released)
        for module, taken in fresh:
            self._initialise(module, taken)

    def set_tables(self, tables: list) -> None:
        """Put saved slot tables ((module, (E, r_max) ints) pairs) back as they
        were; slots no table holds are cleared, so they stay zero."""
        for module, table in tables:
            module.slots = mx.array(np.asarray(table), dtype=mx.int32)
        held = np.concatenate([np.array(m.slots).ravel() for m in self.members])
        self._clear(np.setdiff1d(np.arange(self.capacity), held).tolist())

    def _clear(self, slots: list) -> None:
        if slots:
            for name in (*SIDES, "importance"):
                self.write(name, slots, 0.0)

    def _initialise(self, module: "PooledLoRASwitchLinear", slots: list) -> None:
        """LoRA's init for new ranks: A uniform in +-1/sqrt(in), B zero."""
        if not slots:
            return
        in_dims = self.side_dims(module.a_side)
        bound = 1 / math.sqrt(in_dims)
        key = _slot_key(self.seed, self.layer, int(slots[0]))
        values = mx.random.uniform(low=-bound, high=bound, shape=(len(slots), in_dims), key=key)
        self.write(module.a_side, slots, values.astype(self[module.a_side].dtype))
        self.write(module.b_side, slots, 0.0)
        self.write("importance", slots, 0.0)


class PooledLoRASwitchLinear(ExpertLoRA):
    """LoRA on every expert of a switch layer, each with its own active rank,
    its ranks held in the layer's ``RankPool``."""

    def __init__(self, linear: nn.Module, pool: RankPool, r_max: int, scale: float):
        super().__init__(linear, r_max, scale)
        sides = sorted(pool.side_dims(s) for s in SIDES)
        if sorted((self.input_dims, self.output_dims)) != sides:
            raise ValueError(f"a pooled rank holds {sides[0]} + {sides[1]} values; this projection maps "
                             f"{self.input_dims} -> {self.output_dims}")
        self.a_side = "hidden" if pool.side_dims("hidden") == self.input_dims else "inner"
        self.b_side = "inner" if self.a_side == "hidden" else "hidden"
        self.slots = mx.full((self.num_experts, r_max), pool.null, dtype=mx.int32)
        self.freeze(keys=["slots"], recurse=False)
        object.__setattr__(self, "pool", pool)  # not a child: the pool lives beside the experts
        pool.members.append(self)

    def ranks(self) -> np.ndarray:
        """The active rank of every expert."""
        return (np.array(self.slots) != self.pool.null).sum(axis=1).astype(np.int64)

    def set_ranks(self, ranks) -> None:
        """Activate the first ranks[e] ranks of every expert e (new ones start as LoRA starts)."""
        self.pool.set_ranks([(self, ranks)])
        self._widen_for(ranks)

    def rank_importance(self) -> mx.array:
        """The importance EMA of every expert's ranks: (E, r_max), zero where inactive."""
        return self.pool.importance[self.slots]

    def set_rank_importance(self, importance: mx.array) -> None:
        table = np.array(self.slots)
        held = table != self.pool.null
        self.pool.write("importance", table[held], mx.array(np.asarray(importance)[held]))

    def reset_importance(self, experts) -> None:
        """Zero the importance EMAs of the experts marked in ``experts`` (E,) bool."""
        table = np.array(self.slots)[np.asarray(experts, dtype=bool)]
        slots = table[table != self.pool.null]
        if slots.size:
            self.pool.write("importance", slots, 0.0)

    def __call__(self, x, indices, sorted_indices=False):
        y = self.linear(x, indices, sorted_indices=sorted_indices)
        table = self.slots if self.width == self.r_max else self.slots[:, : self.width]

        def project(x, pool, table, indices, transpose):
            # Integer inputs pass stop_gradient: the checkpoint's backward asks every input for a VJP.
            table, indices = mx.stop_gradient(table), mx.stop_gradient(indices)
            factor = gather_slots(pool, table)  # (E, w, dims)
            factor = factor.swapaxes(-1, -2) if transpose else factor
            return mx.gather_mm(x, factor, rhs_indices=indices, sorted_indices=sorted_indices)

        # Two checkpoints, so the backward regathers the factors but keeps z = A x (small) rather than
        # computing it again.
        z = mx.checkpoint(partial(project, transpose=True))(x, self.pool[self.a_side], table, indices)
        z = mx.checkpoint(partial(project, transpose=False))(z, self.pool[self.b_side], table, indices)
        return y + (self.scale * z).astype(x.dtype)

    def masked_factors(self) -> tuple[mx.array, mx.array]:
        """(A (E, r_max, in), B (E, out, r_max)) with inactive ranks zero: the
        adapter as mlx-lm's ``LoRASwitchLinear`` at rank r_max would hold it."""
        return self.pool[self.a_side][self.slots], self.pool[self.b_side][self.slots].swapaxes(1, 2)

    def load_factors(self, lora_a: mx.array, lora_b: mx.array, ranks) -> None:
        """Set the active ranks and their A, B (e.g. from a saved adapter)."""
        self.set_ranks(ranks)
        table = np.array(self.slots)
        experts, ranks_at = np.nonzero(table != self.pool.null)
        if experts.size == 0:
            return
        e, j, slots = mx.array(experts), mx.array(ranks_at), table[experts, ranks_at]
        self.pool.write(self.a_side, slots, lora_a[e, j].astype(self.pool[self.a_side].dtype))
        self.pool.write(self.b_side, slots, lora_b[e, :, j].astype(self.pool[self.b_side].dtype))
