"""Pallas-Triton kernels of `impl="pallas_gpu"`: the selective scan with lanes = channels.

One program owns one sample, one segment of time and `block_d` channels; every tensor in the kernel
is a (block_d,) vector over channels, so a GPU lane owns whole channels: the per-(t, d) work
(softplus, SiLU, converts, stores) is done once per channel, not once per (channel, state), and y's
sum over the N states stays inside the lane. The state is N separate (block_d,) float32 vectors (a
Python list unrolled at trace time), so the N recurrences of a channel are N independent
multiply-add chains. B[t, n] and C[t, n] are the same for every channel: a chunk's values are
gathered one per lane and each is broadcast to the warp by one shuffle where it is used (`Loader`),
which keeps them out of the registers.

Time is walked in chunks of `chunk` steps unrolled at trace time (`chunk_loop`); each chunk body is
written in phases (loads, softplus, exps, the serial chains, outputs) so that the independent work
of the chunk's steps sits side by side for the GPU's in-order issue.

Segments: a program walks `seg_len` steps starting from a given state (zero, or the true state at
the segment start computed from `segment_end_kernel`'s results), so a long sequence can be split
over S programs per channel block. The backward mirrors it: a program starts its reverse walk from
a given adjoint (zero, or the one flowing in from later segments, from `segment_adjoint_kernel`).

On the GPU (`native`; else the interpreter runs the same maths in plain jnp):
  * exponentials as one `ex2.approx.ftz` instruction each (`fast_exp2`); softplus and sigmoid
    from ex2, lg2 and rcp (`activation_softplus`, `activation_sigmoid`); multiply-adds as `fma.rn`
    (XLA's Triton build leaves them unfused);
  * the backward's sums over channels (dB, dC: 2N per step) as one butterfly over the warp that
    returns all 2N sums in one vector (`lane_sums`) and is stored as one row, instead of 2N
    separate five-level shuffle trees and 2N scalar stores. This needs one channel per lane
    (the backward's block_d = 32), so that element i of a (block_d,) vector sits in lane i % 32.

Refs carry the batch, segment and channel-block dimensions squeezed: rows are `ref[t]` (block_d,),
B and C are flat (seg_len·N,), Aᵀ·log2(e) is (N, block_d).
"""

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as pltriton

F32 = jnp.float32
LANES = 32  # threads of a warp
LOG2_E = 1.4426950408889634  # exp(x) = exp2(x log2 e): the GPU's exponential unit computes 2^x
LN_2 = 0.6931471805599453


def chunk_loop(length, chunk, reverse, prefetch, load_rows, body, carry):
  """Runs `body(index, start, count, rows, carry) -> carry` over chunks of time.

  Full chunks go through a `fori_loop` (forward or reverse order); with `prefetch` its carry holds
  the rows of the chunk it computes next (loaded one iteration ahead: latency hidden, registers
  spent), else each iteration loads its own rows first. A shorter last chunk (length % chunk
  steps) runs unrolled, after the full chunks in forward order and before them in reverse order.
  """
  num_full, tail = divmod(length, chunk)

  def run_full(carry):
    if num_full == 0:
      return carry
    first = num_full - 1 if reverse else 0

    def step_loading(i, carry):
      c = num_full - 1 - i if reverse else i
      return body(c, c * chunk, chunk, load_rows(c * chunk, chunk), carry)

    if not prefetch:
      return jax.lax.fori_loop(0, num_full, step_loading, carry)

    def step(i, state):
      carry, rows = state
      c = num_full - 1 - i if reverse else i
      nxt = jnp.maximum(c - 1, 0) if reverse else jnp.minimum(c + 1, num_full - 1)
      next_rows = load_rows(nxt * chunk, chunk)  # issued before this chunk's arithmetic
      return body(c, c * chunk, chunk, rows, carry), next_rows

    carry, _ = jax.lax.fori_loop(0, num_full, step, (carry, load_rows(first * chunk, chunk)))
    return carry

  def run_tail(carry):
    if tail == 0:
      return carry
    start = num_full * chunk
    return body(num_full, start, tail, load_rows(start, tail), carry)

  if reverse:
    return run_full(run_tail(carry))
  return run_tail(run_full(carry))


def _inline_ptx(asm, x):
  """One PTX instruction `asm` ($0 = result, $1 = x) applied to every float32 element of x."""
  [y] = pltriton.elementwise_inline_asm(
    asm, args=[x], constraints="=f,f", pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct.like(x)]
  )
  return y


def fast_exp2(x, ptx):
  """2^x. With `ptx` (GPU only) one `ex2.approx.ftz` instruction: libdevice's exp2f adds a
  denormal fix-up of three more instructions per exponential, in loops bound by exponentials. A
  decay below 2^-126 flushed to zero changes no state."""
  return _inline_ptx("ex2.approx.ftz.f32 $0, $1;", x) if ptx else jnp.exp2(x)


def _approx(op, x, ptx, exact):
  """op.approx.ftz (ex2, lg2, rcp) on the GPU with `ptx`, else the exact jnp function."""
  return _inline_ptx(f"{op}.approx.ftz.f32 $0, $1;", x) if ptx else exact(x)


def activation_sigmoid(x, ptx):
  """1 / (1 + e^-x) from one ex2 and one rcp (libdevice: an exp with range reduction and a full
  division, ~20 instructions)."""
  e = _approx("ex2", x * -LOG2_E, ptx, jnp.exp2)
  return _approx("rcp", 1.0 + e, ptx, lambda v: 1.0 / v)


def activation_softplus(x, ptx):
  """log(1 + e^x) = max(x, 0) + log1p(e), e = e^-|x|, with log1p from one ex2 and one lg2
  (libdevice's log1p is a ~15-term polynomial). u = 1 + e rounds: log1p(e) = log(u) - ((u - 1) -
  e) puts the rounding back; below e = 2^-10, e (1 - e/2) is exact to 2^-32."""
  e = _approx("ex2", -jnp.abs(x) * LOG2_E, ptx, jnp.exp2)
  u = 1.0 + e
  log1p = _approx("lg2", u, ptx, jnp.log2) * LN_2 - ((u - 1.0) - e)
  log1p = jnp.where(e < 2.0**-10, e * (1.0 - 0.5 * e), log1p)
  return jnp.maximum(x, 0.0) + log1p


def _shuffle_xor(x, offset, native):
  """x as held by lane (lane XOR offset) of the same warp, for a (32·warps,) vector whose element i
  sits in lane i % 32 of warp i // 32 (one element per thread)."""
  if native:
    return _inline_ptx(f"shfl.sync.bfly.b32 $0, $1, {offset}, 0x1f, 0xffffffff;", x)
  n = x.shape[0]
  return x.reshape(n // (2 * offset), 2, offset)[:, ::-1].reshape(n)


def lane_sums(values, native):
  """32 (bd,) vectors summed over each warp's lanes at once, returned as one (bd,) vector whose
  lane l holds the sum of values[l] over the lanes of its warp (bd = 32 x warps, one channel per
  lane). A butterfly: at each level a lane keeps one vector of a pair and sends the other to its
  partner, halving the list, so 32 sums cost 31 shuffles instead of 32 x 5."""
  assert len(values) == LANES, len(values)
  lane = lax.broadcasted_iota(jnp.int32, values[0].shape, 0) % LANES
  offset = LANES // 2
  while len(values) > 1:
    half = len(values) // 2
    upper = (lane & offset) != 0  # this lane keeps the second vector of each pair
    values = [
      jnp.where(upper, b, a) + _shuffle_xor(jnp.where(upper, a, b), offset, native)
      for a, b in zip(values[:half], values[half:], strict=True)
    ]
    offset //= 2
  return values[0]


def lane_ids(shape, native):
  """The warp lane of each element of a (bd,) vector: %laneid on the GPU; the interpreter's
  stand-in puts element i in lane i % 32, as `_shuffle_xor` does."""
  if native:
    [lane] = pltriton.elementwise_inline_asm(
      "mov.u32 $0, %laneid;", args=[jnp.zeros(shape, jnp.int32)], constraints="=r,r", pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(shape, jnp.int32)],
    )  # fmt: skip
    return lane
  return lax.broadcasted_iota(jnp.int32, shape, 0) % LANES


def lane_broadcast(x, lane, native):
  """Every element <- the value lane `lane` holds, for an x that holds one value per lane (as
  `Loader.values` gathers them): one `shfl.sync.idx`, whatever the channels per lane."""
  if native:
    return _inline_ptx(f"shfl.sync.idx.b32 $0, $1, {lane}, 0x1f, 0xffffffff;", x)
  return jnp.broadcast_to(x[lane], x.shape)


def fma(a, b, c, native):
  """a·b + c in one rounding on the GPU: the Triton build XLA uses leaves a multiply and an add
  unfused (a profile of the forward counted 6x more unfused than fused FP32 instructions)."""
  if not native:
    return a * b + c
  shape = jnp.broadcast_shapes(jnp.shape(a), jnp.shape(b), jnp.shape(c))
  [y] = pltriton.elementwise_inline_asm(
    "fma.rn.f32 $0, $1, $2, $3;", args=[jnp.broadcast_to(x, shape) for x in (a, b, c)],
    constraints="=f,f,f,f", pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct(shape, F32)],
  )  # fmt: skip
  return y


class Loader:
  """Reads a chunk of time: per step the rows (bd,) of `row_refs` and, from each flat (L_s·N,)
  ref of B or C, N values that are the same for every channel.

  The B/C values of a chunk are gathered once, one value per lane (count·N / 32 vectors), and
  each is broadcast from its lane at use (`lane_broadcast`): 2 registers per lane instead of the
  2·N·count that scalar loads held, and no per-value global load for the step to wait on."""

  def __init__(self, row_refs, scalar_refs, state, native):
    self.row_refs, self.scalar_refs, self.state, self.native = row_refs, scalar_refs, state, native

  def rows(self, start, count):
    """Per step the rows of `row_refs`, as stored (converted in `steps`)."""
    return tuple(tuple(r[start + i] for r in self.row_refs) for i in range(count))

  def values(self, start, count):
    """Per scalar ref: the chunk's values gathered one per lane, ceil(count·N / 32) vectors."""
    n = self.state
    lane = lane_ids((self.row_refs[0].shape[-1],), self.native)
    last = self.scalar_refs[0].shape[0] - 1
    groups = -(-count * n // LANES)
    return tuple(
      tuple(r[jnp.minimum(start * n + g * LANES + lane, last)] for g in range(groups))
      for r in self.scalar_refs
    )  # fmt: skip

  def steps(self, rows, vals):
    """Per step: the rows in float32, then per scalar ref a list of N values."""
    n = self.state

    def value(vecs, i, k):
      flat = i * n + k
      return lane_broadcast(vecs[flat // LANES], flat % LANES, self.native)

    return [
      tuple(r.astype(F32) for r in row) + tuple([value(v, i, k) for k in range(n)] for v in vals)
      for i, row in enumerate(rows)
    ]

  def walk(self, length, chunk, reverse, prefetch, body, carry, offset=0):
    """`chunk_loop` from step `offset`, its body given the chunk's steps (`steps`). `prefetch`
    loads the next chunk's rows a chunk ahead (u, δ, z: read once, from HBM); B and C are
    loaded in the chunk that uses them (read by every channel block: from L2)."""

    def run(index, start, count, rows, carry):
      steps = self.steps(rows, self.values(offset + start, count))
      return body(index, start, count, steps, carry)

    load_rows = lambda s, c: self.rows(offset + s, c)  # noqa: E731
    return chunk_loop(length, chunk, reverse, prefetch, load_rows, run, carry)


def _deltas(pres, softplus, native):
  return [activation_softplus(p, native) if softplus else p for p in pres]


def _decays(dts, a2, native):
  """exp(Δ_t A_n) = exp2(Δ_t · A_n log2 e): per step a list of N (block_d,) vectors."""
  return [[fast_exp2(dt * a, native) for a in a2] for dt in dts]


def _store_state(ref, row, h):
  for n, h_n in enumerate(h):
    ref[row, n] = h_n


def _advance(steps, h, a2, bias, softplus, native):
  """The state after the steps (rows u, δ and N values of B each) from h; also their Δs."""
  dts = _deltas([s[1] + bias for s in steps], softplus, native)
  decays = _decays(dts, a2, native)
  h = list(h)
  for i, step in enumerate(steps):
    du = dts[i] * step[0]
    for n in range(len(h)):
      h[n] = fma(decays[i][n], h[n], du * step[2][n], native)
  return h, dts


def saved_state_groups(seg_len, chunk, save_every, reverse, loader, body, carry, enter_group):
  """`chunk_loop` over groups of `save_every` chunks (seg_len a multiple of the group), for a
  state saved once per group instead of once per chunk: `enter_group(g, start, carry) -> carry`
  opens group g, then `body` runs over its chunks with absolute starts and, as index, the chunk's
  place in the group."""
  group = save_every * chunk

  def group_body(g, start, count, rows, carry):
    del rows
    carry = enter_group(g, start, carry)
    in_group = lambda i, s, c, steps, carry: body(i, start + s, c, steps, carry)  # noqa: E731
    return loader.walk(count, chunk, reverse, False, in_group, carry, offset=start)

  return chunk_loop(seg_len, group, reverse, False, lambda s, c: None, group_body, carry)


def forward_kernel(*refs, seg_len, chunk, softplus, has_z, save_every, native, keep_states):
  """Refs: u, δ, [z] (L_s, bd); B, C (L_s·N,); Aᵀ·log2 e (N, bd); D, bias (bd,); h0 (N, bd), the
  state entering the segment. Outputs: y (L_s, bd); the state entering each chunk (L_s/chunk, N,
  bd), which the backward restarts from, or with `save_every` = m > 1 only the state entering
  every m-th chunk (L_s/(m·chunk), N, bd). Without `keep_states` (no backward follows: sampling)
  the second output is only the state after the segment (N, bd)."""
  u_ref, dt_ref, *refs = refs
  z_ref = refs.pop(0) if has_z else None
  b_ref, c_ref, a_ref, d_ref, bias_ref, h0_ref, y_ref, s_ref = refs
  state = a_ref.shape[0]
  a2 = [a_ref[n] for n in range(state)]  # N x (bd,)
  d_skip = d_ref[...].astype(F32)
  bias = bias_ref[...].astype(F32)
  row_refs = (u_ref, dt_ref, z_ref) if has_z else (u_ref, dt_ref)

  def body(index, start, count, steps, h):
    if keep_states and save_every == 1:
      _store_state(s_ref, index, h)
    us = [s[0] for s in steps]
    bs, cs = [s[-2] for s in steps], [s[-1] for s in steps]  # count x N values
    dts = _deltas([s[1] + bias for s in steps], softplus, native)
    dus = [dt * u for dt, u in zip(dts, us, strict=True)]
    decays = _decays(dts, a2, native)
    h, ys = list(h), []
    for i in range(count):  # the only serial part: N independent chains through the chunk
      y = d_skip * us[i]
      for n in range(state):
        h[n] = fma(decays[i][n], h[n], dus[i] * bs[i][n], native)
        y = fma(cs[i][n], h[n], y, native)
      ys.append(y)
    for i in range(count):
      y = ys[i]
      if has_z:
        z = steps[i][2]
        y = y * z * activation_sigmoid(z, native)
      y_ref[start + i] = y.astype(y_ref.dtype)
    return h

  h0 = [h0_ref[n] for n in range(state)]
  loader = Loader(row_refs, (b_ref, c_ref), state, native)
  if not keep_states:
    h = loader.walk(seg_len, chunk, False, True, body, h0)
    for n in range(state):
      s_ref[n] = h[n]
    return
  if save_every == 1:
    loader.walk(seg_len, chunk, False, True, body, h0)
    return

  def save(g, start, h):
    del start
    _store_state(s_ref, g, h)
    return h

  saved_state_groups(seg_len, chunk, save_every, False, loader, body, h0, save)


def segment_end_kernel(
  u_ref, dt_ref, b_ref, a_ref, bias_ref, h_ref, sum_ref, *, seg_len, chunk, softplus, native
):  # fmt: skip
  """A segment walked from a zero state. Refs: u, δ (L_s, bd); B (L_s·N,); Aᵀ·log2 e (N, bd);
  bias (bd,). Outputs: the segment's end state (N, bd) and ΣΔ over the segment (bd,), from which
  the caller forms the segment's total decay exp(A ΣΔ)."""
  state = a_ref.shape[0]
  a2 = [a_ref[n] for n in range(state)]
  bias = bias_ref[...].astype(F32)

  def body(index, start, count, steps, carry):
    del index, start, count
    h, dts = _advance(steps, carry[0], a2, bias, softplus, native)
    return h, carry[1] + sum(dts)

  zeros = jnp.zeros(bias.shape, F32)
  loader = Loader((u_ref, dt_ref), (b_ref,), state, native)
  h, dt_sum = loader.walk(seg_len, chunk, False, False, body, ([zeros] * state, zeros))
  for n in range(state):
    h_ref[n] = h[n]
  sum_ref[...] = dt_sum


def _store_channel_sums(ref, t, terms, native):
  """Row t of `ref` (G, 32) <- the sums over the warp's channels of the (32,) vectors `terms`,
  zero-padded to G·32: element l of row g holds the sum of terms[32·g + l]."""
  zeros = jnp.zeros_like(terms[0])
  for g in range(ref.shape[1]):
    group = terms[g * LANES : (g + 1) * LANES]
    ref[t, g] = lane_sums(group + [zeros] * (LANES - len(group)), native)


def _gated_cotangent(g, z, native):
  """d loss / d y before the gate: g ⊙ SiLU(z)."""
  return g * z * activation_sigmoid(z, native)


def segment_adjoint_kernel(*refs, seg_len, chunk, softplus, has_z, native):
  """A segment's adjoint walked in reverse from zero at its end. Refs: δ, g, [z] (L_s, bd);
  C (L_s·N,); Aᵀ·log2 e (N, bd); bias (bd,). Output: d loss / d(state before the segment)
  from this segment's outputs alone (N, bd)."""
  dt_ref, g_ref, *refs = refs
  z_ref = refs.pop(0) if has_z else None
  c_ref, a_ref, bias_ref, dh_ref = refs
  state = a_ref.shape[0]
  a2 = [a_ref[n] for n in range(state)]
  bias = bias_ref[...].astype(F32)
  row_refs = (dt_ref, g_ref, z_ref) if has_z else (dt_ref, g_ref)

  def body(index, start, count, steps, dh):
    del index, start
    dts = _deltas([s[0] + bias for s in steps], softplus, native)
    decays = _decays(dts, a2, native)
    gys = [_gated_cotangent(s[1], s[2], native) if has_z else s[1] for s in steps]
    dh = list(dh)
    for i in reversed(range(count)):
      for n in range(state):
        dh[n] = fma(gys[i], steps[i][-1][n], dh[n], native) * decays[i][n]
    return dh

  zeros = jnp.zeros(bias.shape, F32)
  loader = Loader(row_refs, (c_ref,), state, native)
  dh = loader.walk(seg_len, chunk, True, False, body, [zeros] * state)
  for n in range(state):
    dh_ref[n] = dh[n]


def backward_kernel(*refs, seg_len, chunk, softplus, has_z, native, save_every):
  """Refs: u, δ, [z], g (L_s, bd); B, C (L_s·N,); Aᵀ·log2 e (N, bd); D, bias (bd,); the states
  entering each chunk (L_s/chunk, N, bd); the adjoint entering the segment's end (N, bd).
  Outputs: du, dδ, [dz] (L_s, bd); this block's partial sums of [dB | dC] per step; this program's
  partial dAᵀ (N, bd), dD, dbias (bd,).

  Per chunk: reload its start state, recompute decays and states in registers, then run the
  adjoint dh_t = C_t gy_t + exp(Δ_{t+1} A) dh_{t+1} backwards. dB and dC sum over channels: the
  2N sums of a step (zero-padded to G·32) go through `lane_sums`, one row of 32 per group, so the
  output is (L_s, G, 32), lane l of row g holding the sum of value 32·g + l.

  With `save_every` = m > 1 the forward saved one state per group of m chunks: entering a group
  (in reverse), the kernel first walks the group forward from its saved state and writes the
  state entering each of its chunks to its own scratch rows (a last output, (m, N, bd)), which
  the chunks then restart from: one more pass of exps for m times less kept memory."""
  u_ref, dt_ref, *refs = refs
  z_ref = refs.pop(0) if has_z else None
  (g_ref, b_ref, c_ref, a_ref, d_ref, bias_ref, s_ref, dh_end_ref,
   du_ref, ddt_ref, *refs) = refs  # fmt: skip
  dz_ref = refs.pop(0) if has_z else None
  dbc_ref, da_ref, dd_ref, dbias_ref, *scratch = refs
  starts_ref = scratch[0] if save_every > 1 else s_ref  # rows: the state entering each chunk
  state = a_ref.shape[0]
  a2 = [a_ref[n] for n in range(state)]
  d_skip = d_ref[...].astype(F32)
  bias = bias_ref[...].astype(F32)
  row_refs = (u_ref, dt_ref, g_ref, z_ref) if has_z else (u_ref, dt_ref, g_ref)

  def body(index, start, count, steps, carry):
    dh, d_a, d_d, d_bias = carry  # N x (bd,), N x (bd,), (bd,), (bd,)
    dh, d_a = list(dh), list(d_a)
    us, gs = [s[0] for s in steps], [s[2] for s in steps]
    bs, cs = [s[-2] for s in steps], [s[-1] for s in steps]
    pres = [s[1] + bias for s in steps]
    dts = _deltas(pres, softplus, native)
    dus = [dt * u for dt, u in zip(dts, us, strict=True)]
    decays = _decays(dts, a2, native)
    # Recompute the chunk's states from its saved start state: states[i + 1] is h after step i.
    states = [[starts_ref[index, n] for n in range(state)]]
    for i in range(count):
      states.append(
        [fma(decays[i][n], states[i][n], dus[i] * bs[i][n], native) for n in range(state)]
      )
    gys = []
    for i in range(count):
      if has_z:
        z, sig = steps[i][3], activation_sigmoid(steps[i][3], native)
        y = d_skip * us[i]
        for n in range(state):
          y = fma(cs[i][n], states[i + 1][n], y, native)  # output before the gate
        dz_ref[start + i] = (gs[i] * y * sig * (1.0 + z * (1.0 - sig))).astype(dz_ref.dtype)
        gys.append(gs[i] * z * sig)
      else:
        gys.append(gs[i])
    for i in reversed(range(count)):
      t = start + i
      dh_b = jnp.zeros_like(d_skip)  # Σ_n dh_n B_n
      d_log2 = jnp.zeros_like(d_skip)  # Σ_n d loss/d(Δ A_n) · A_n log2 e
      db_terms, dc_terms = [], []  # N x (bd,) each: summed over channels below
      for n in range(state):
        dh[n] = fma(gys[i], cs[i][n], dh[n], native)  # d loss / d h_t
        dc_terms.append(gys[i] * states[i + 1][n])
        db_terms.append(dh[n] * dus[i])
        d_log_decay = dh[n] * states[i][n] * decays[i][n]  # d loss / d(Δ_t A_n)
        d_a[n] = fma(d_log_decay, dts[i], d_a[n], native)
        d_log2 = fma(d_log_decay, a2[n], d_log2, native)
        dh_b = fma(dh[n], bs[i][n], dh_b, native)
        dh[n] = dh[n] * decays[i][n]  # carried to h_{t-1}
      _store_channel_sums(dbc_ref, t, db_terms + dc_terms, native)
      d_dt = d_log2 * LN_2 + us[i] * dh_b
      du_ref[t] = (dts[i] * dh_b + d_skip * gys[i]).astype(du_ref.dtype)
      d_pre = d_dt * activation_sigmoid(pres[i], native) if softplus else d_dt
      ddt_ref[t] = d_pre.astype(ddt_ref.dtype)
      d_d = d_d + gys[i] * us[i]
      d_bias = d_bias + d_pre
    return dh, d_a, d_d, d_bias

  zeros = jnp.zeros(d_skip.shape, F32)
  carry = ([dh_end_ref[n] for n in range(state)], [zeros] * state, zeros, zeros)
  loader = Loader(row_refs, (b_ref, c_ref), state, native)
  if save_every == 1:
    _, d_a, d_d, d_bias = loader.walk(seg_len, chunk, True, False, body, carry)
  else:
    state_loader = Loader((u_ref, dt_ref), (b_ref,), state, native)

    def restore_chunk_starts(g, start, carry):
      def advance(index, step, count, steps, h):
        del step, count
        _store_state(starts_ref, index, h)
        return _advance(steps, h, a2, bias, softplus, native)[0]

      h = [s_ref[g, n] for n in range(state)]
      state_loader.walk(save_every * chunk, chunk, False, False, advance, h, offset=start)
      return carry

    _, d_a, d_d, d_bias = saved_state_groups(
      seg_len, chunk, save_every, True, loader, body, carry, restore_chunk_starts
    )
  for n in range(state):
    da_ref[n] = d_a[n]
  dd_ref[...] = d_d
  dbias_ref[...] = d_bias
