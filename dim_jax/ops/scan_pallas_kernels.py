"""Pallas kernels of the fused selective scan: forward and backward, one program per channel block.

Design (`.notes/scan.md` has the counts behind it). Each program owns one sample and `block_d`
channels and keeps their (block_d, N) float32 state in registers while it walks the whole sequence.
The work is bound by one exp per (t, d, n), not by bytes, and the only serial dependency per step
is one multiply-add on the state, so the program walks time sequentially and the parallelism
comes from the batch x channel-block grid (the exps of a step are independent of the state).
Time is walked in chunks of `chunk` steps unrolled at trace time: the rows of chunk c + 1 are loaded
before chunk c is computed (software prefetch carried through the loop), so memory latency is
paid once per chunk and overlapped with arithmetic, not once per step.

The forward writes y once and the state at the start of every chunk (the only residual besides the
inputs). The backward walks chunks in reverse: it reloads a chunk's start state, recomputes the
chunk's decays and states in registers, then runs the adjoint recurrence
  dh_t = C_t gy_t + exp(Δ_{t+1} A) dh_{t+1}
backwards through the chunk, producing every input's gradient. dB and dC are sums over channels:
each program writes its block's partial sum, and the caller adds the blocks.

Refs carry the batch and channel-block dimensions squeezed: per-step rows are `ref[t]`. State
tiles are (N, bd), channels last: on GPU consecutive lanes then hold consecutive channels (the rows
are loaded coalesced) and each thread holds several states of one channel, so the sum over states
that forms y is mostly inside a thread.
"""

import jax
import jax.numpy as jnp

LOG2_E = 1.4426950408889634
LN_2 = 0.6931471805599453


def stable_softplus(x):
  """log(1 + e^x), stable for large |x| (Mamba applies it to δ + bias)."""
  return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


def sigmoid(x):
  return 1.0 / (1.0 + jnp.exp(-x))


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


def _row_loader(refs):
  """load_rows(start, count) -> list over steps of tuples of float32 rows, one per ref."""

  def load_rows(start, count):
    return [tuple(r[start + i].astype(jnp.float32) for r in refs) for i in range(count)]

  return load_rows


def forward_kernel(*refs, length, chunk, softplus, has_z, prefetch):
  """Refs: u, delta, [z], B, C (rows per step), Aᵀ·log2(e) (N, bd), D, bias (bd,).

  Outputs: y (rows), the state entering each chunk (num_chunks, N, bd)."""
  if has_z:
    u_ref, dt_ref, z_ref, b_ref, c_ref, a_ref, d_ref, bias_ref, y_ref, s_ref = refs
    row_refs = (u_ref, dt_ref, b_ref, c_ref, z_ref)
  else:
    u_ref, dt_ref, b_ref, c_ref, a_ref, d_ref, bias_ref, y_ref, s_ref = refs
    row_refs = (u_ref, dt_ref, b_ref, c_ref)
  a2 = a_ref[...]  # (N, bd) float32, Aᵀ in base-2 exponent units
  d_skip = d_ref[...].astype(jnp.float32)  # (bd,)
  bias = bias_ref[...].astype(jnp.float32)

  def body(index, start, count, rows, h):
    s_ref[index] = h  # state entering this chunk: the backward restarts here
    # Written in phases over the whole chunk, not step by step: the GPU issues in order, so the
    # independent work of all steps (softplus, exps, reductions) sits side by side and only the
    # state update h = a h + b stays serial. Step by step was latency bound (~600 cycles/step).
    us, bs, cs = [r[0] for r in rows], [r[2] for r in rows], [r[3] for r in rows]
    dts = [stable_softplus(r[1] + bias) if softplus else r[1] + bias for r in rows]  # (bd,) each
    decays = [jnp.exp2(dt[None, :] * a2) for dt in dts]  # (N, bd) each
    drives = [(dt * u)[None, :] * b[:, None] for dt, u, b in zip(dts, us, bs, strict=True)]
    states = []
    for decay, drive in zip(decays, drives, strict=True):
      h = decay * h + drive
      states.append(h)
    for i in range(count):
      y = jnp.sum(states[i] * cs[i][:, None], axis=0) + d_skip * us[i]  # (bd,)
      if has_z:
        z = rows[i][4]
        y = y * z * sigmoid(z)
      y_ref[start + i] = y.astype(y_ref.dtype)
    return h

  h0 = jnp.zeros(a2.shape, jnp.float32)
  chunk_loop(length, chunk, False, prefetch, _row_loader(row_refs), body, h0)


def backward_kernel(*refs, length, chunk, softplus, has_z, prefetch):
  """Refs: u, delta, [z], B, C, g (rows), A·log2(e), D, bias, states; out: du, dδ, [dz], dB, dC
  (this block's partial sums), dAᵀ (N, bd), dD, dbias (bd,)."""
  if has_z:
    (u_ref, dt_ref, z_ref, b_ref, c_ref, g_ref, a_ref, d_ref, bias_ref, s_ref,
     du_ref, ddt_ref, dz_ref, db_ref, dc_ref, da_ref, dd_ref, dbias_ref) = refs  # fmt: skip
    row_refs = (u_ref, dt_ref, b_ref, c_ref, g_ref, z_ref)
  else:
    (u_ref, dt_ref, b_ref, c_ref, g_ref, a_ref, d_ref, bias_ref, s_ref,
     du_ref, ddt_ref, db_ref, dc_ref, da_ref, dd_ref, dbias_ref) = refs  # fmt: skip
    row_refs = (u_ref, dt_ref, b_ref, c_ref, g_ref)
  a2 = a_ref[...]  # (N, bd)
  a_nat = a2 * LN_2  # A itself, for d(decay)/dΔ = A·decay
  d_skip = d_ref[...].astype(jnp.float32)
  bias = bias_ref[...].astype(jnp.float32)

  def body(index, start, count, rows, carry):
    dh, d_a, d_d, d_bias = carry  # (N, bd), (N, bd), (bd,), (bd,)
    # Phases over the whole chunk, as in the forward: only the two recurrences are serial.
    us, bs, cs, gs = ([r[k] for r in rows] for k in (0, 2, 3, 4))
    pres = [r[1] + bias for r in rows]
    dts = [stable_softplus(p) if softplus else p for p in pres]
    # Recompute the chunk from its saved start state: decays and states stay in registers.
    h_prev = s_ref[index]
    decays = [jnp.exp2(dt[None, :] * a2) for dt in dts]
    drives = [(dt * u)[None, :] * b[:, None] for dt, u, b in zip(dts, us, bs, strict=True)]
    states, h = [], h_prev
    for decay, drive in zip(decays, drives, strict=True):
      h = decay * h + drive
      states.append(h)
    befores = [h_prev, *states[:-1]]
    gys = []
    for i in range(count):
      if has_z:
        z = rows[i][5]
        sig = sigmoid(z)
        y = jnp.sum(states[i] * cs[i][:, None], axis=0) + d_skip * us[i]  # output before gate
        dz_ref[start + i] = (gs[i] * y * sig * (1.0 + z * (1.0 - sig))).astype(dz_ref.dtype)
        gys.append(gs[i] * z * sig)
      else:
        gys.append(gs[i])
    # Adjoint recurrence, last step first: dh_t = C_t gy_t + exp(Δ_{t+1} A) dh_{t+1}.
    dhs = [None] * count
    for i in reversed(range(count)):
      dh = dh + gys[i][None, :] * cs[i][:, None]  # d loss / d h_t
      dhs[i] = dh
      dh = dh * decays[i]  # carried to h_{t-1}
    for i in range(count):
      dh_i, dt, u, gy = dhs[i], dts[i], us[i], gys[i]
      dc_ref[start + i] = jnp.sum(gy[None, :] * states[i], axis=1)
      d_log_decay = dh_i * befores[i] * decays[i]  # d loss / d(Δ_t A)
      d_a = d_a + d_log_decay * dt[None, :]
      dh_b = jnp.sum(dh_i * bs[i][:, None], axis=0)  # (bd,)
      d_dt = jnp.sum(d_log_decay * a_nat, axis=0) + u * dh_b
      db_ref[start + i] = jnp.sum(dh_i * (dt * u)[None, :], axis=1)
      du_ref[start + i] = (dt * dh_b + d_skip * gy).astype(du_ref.dtype)
      d_pre = d_dt * sigmoid(pres[i]) if softplus else d_dt
      ddt_ref[start + i] = d_pre.astype(ddt_ref.dtype)
      d_d = d_d + gy * u
      d_bias = d_bias + d_pre
    return dh, d_a, d_d, d_bias

  zeros = jnp.zeros(a2.shape, jnp.float32)
  zeros_d = jnp.zeros(d_skip.shape, jnp.float32)
  _, d_a, d_d, d_bias = chunk_loop(
    length, chunk, True, prefetch, _row_loader(row_refs), body, (zeros, zeros, zeros_d, zeros_d)
  )
  da_ref[...] = d_a
  dd_ref[...] = d_d
  dbias_ref[...] = d_bias
