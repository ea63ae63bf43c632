// Fused single-token Mamba2 step: causal conv1d + SiLU, dt softplus/clamp,
// state update and readout, in one launch per layer per token.
//
// Not a standalone header: this text is the *body* of a kernel function.
// ssm_step.py pastes it after a backend's entry lines (prelude.metal,
// prelude.cu or prelude_cpu.h), which define gk_tid (thread index in the
// 1-D threadgroup), gk_group_x/y/z (threadgroup position), GK_SIMD,
// GK_SHARED, GK_BARRIER, GK_SIMD_SUM and the gk_f/gk_exp/gk_log1p/gk_fmin/
// gk_fmax helpers. Everything else here is plain C++ that Metal, CUDA and g++
// all accept.
//
// Template constants: T (activation dtype), WT (weight dtype), NHEADS,
// HEADDIM, DSTATE, NGROUPS, DCONV, NSIMD (simdgroups per threadgroup), ROWS
// (head_dim rows per simdgroup).
// Inputs:  xBC (B, CONV_DIM) T, conv_state (B, DCONV-1, CONV_DIM) T,
//          conv_w (CONV_DIM, DCONV) WT, conv_b (CONV_DIM,) f32, dt (B, NHEADS) T,
//          dt_bias (NHEADS,) f32, A (NHEADS,) f32, D (NHEADS,) f32,
//          state (B, NHEADS, HEADDIM, DSTATE) f32, dt_limits (2,) f32.
// Outputs: y (B, NHEADS, HEADDIM) f32, new_conv_state (B, DCONV-1, CONV_DIM) T,
//          new_state (B, NHEADS, HEADDIM, DSTATE) f32.
//
// Grid: one threadgroup per (p-block, head, batch row) = (gk_group_x, _y, _z);
// NSIMD simdgroups of GK_SIMD threads. The state is the only large traffic
// (HEADDIM * DSTATE floats per head, read once and written once), so lanes
// walk DSTATE contiguously (coalesced) and each simdgroup owns ROWS rows of
// head_dim, reducing y over DSTATE with one simd sum per row, no threadgroup
// round trip.
//
// The conv is cheap (DCONV taps per channel), so each threadgroup computes the
// channels it needs itself: its P_BLOCK x channels plus its group's DSTATE B
// and DSTATE C channels, cooperatively into threadgroup memory. B and C are
// recomputed by every tile of the group (a few KB of cached reads); that beats
// a second launch or a grid-wide sync on the decode path.
// new_conv_state is written once per channel: x channels by the tile that owns
// them, B/C channels by tile 0 of the first head of their group.
constexpr int D_INNER = NHEADS * HEADDIM;
constexpr int CONV_DIM = D_INNER + 2 * NGROUPS * DSTATE;
constexpr int HEADS_PER_GROUP = NHEADS / NGROUPS;
constexpr int P_BLOCK = NSIMD * ROWS;
constexpr int N_THREADS = NSIMD * GK_SIMD;
constexpr int N_PER_LANE = (DSTATE + GK_SIMD - 1) / GK_SIMD;

const int p_blk = gk_group_x;
const int h = gk_group_y;
const int b = gk_group_z;
const int g = h / HEADS_PER_GROUP;
const int p0 = p_blk * P_BLOCK;
const int lane = gk_tid % GK_SIMD;
const int sg = gk_tid / GK_SIMD;
const bool owns_bc = (h % HEADS_PER_GROUP == 0) && (p_blk == 0);

// At function scope: Metal wants threadgroup arrays declared at kernel scope.
GK_SHARED(float, s_x, P_BLOCK);
GK_SHARED(float, s_B, DSTATE);
GK_SHARED(float, s_C, DSTATE);

// 1-2. conv over the window [conv_state rows..., xBC] + SiLU, one channel
// per thread per pass. Local index i: [0, P_BLOCK) x, then B, then C.
for (int i = gk_tid; i < P_BLOCK + 2 * DSTATE; i += N_THREADS) {
  int ch;
  bool owner;
  if (i < P_BLOCK) {
    if (p0 + i >= HEADDIM) {
      continue;  // last p-block of a head_dim that P_BLOCK does not divide
    }
    ch = h * HEADDIM + p0 + i;
    owner = true;
  } else if (i < P_BLOCK + DSTATE) {
    ch = D_INNER + g * DSTATE + (i - P_BLOCK);
    owner = owns_bc;
  } else {
    ch = D_INNER + (NGROUPS + g) * DSTATE + (i - P_BLOCK - DSTATE);
    owner = owns_bc;
  }
  const int x_idx = b * CONV_DIM + ch;
  const int cs_idx = b * (DCONV - 1) * CONV_DIM + ch;  // row 0 of this channel

  float acc = gk_f(conv_b[ch]);
  for (int k = 0; k < DCONV - 1; ++k) {
    acc += gk_f(conv_state[cs_idx + k * CONV_DIM]) * gk_f(conv_w[ch * DCONV + k]);
  }
  acc += gk_f(xBC[x_idx]) * gk_f(conv_w[ch * DCONV + DCONV - 1]);
  const float c = acc / (1.0f + gk_exp(-acc));

  if (i < P_BLOCK) {
    s_x[i] = c;
  } else if (i < P_BLOCK + DSTATE) {
    s_B[i - P_BLOCK] = c;
  } else {
    s_C[i - P_BLOCK - DSTATE] = c;
  }
  if (owner) {
    // Shift the window by one: raw values, no rounding.
    for (int k = 0; k < DCONV - 2; ++k) {
      new_conv_state[cs_idx + k * CONV_DIM] = conv_state[cs_idx + (k + 1) * CONV_DIM];
    }
    new_conv_state[cs_idx + (DCONV - 2) * CONV_DIM] = xBC[x_idx];
  }
}
GK_BARRIER();

// 3. dt for this head; every thread derives it (four scalar loads) rather
// than waiting on another barrier.
const float v = gk_f(dt[b * NHEADS + h]) + gk_f(dt_bias[h]);
float dt_h = v > 20.0f ? v : gk_log1p(gk_exp(v));
dt_h = gk_fmin(gk_fmax(dt_h, dt_limits[0]), dt_limits[1]);
const float dA = gk_exp(dt_h * A[h]);
const float d_skip = gk_f(D[h]);

// This lane's share of B and C, reused across its ROWS rows.
float B_r[N_PER_LANE];
float C_r[N_PER_LANE];
for (int j = 0; j < N_PER_LANE; ++j) {
  const int n = lane + j * GK_SIMD;
  B_r[j] = n < DSTATE ? s_B[n] : 0.0f;
  C_r[j] = n < DSTATE ? s_C[n] : 0.0f;
}

// 4-5. state update and y, rows interleaved across simdgroups so a partial
// last p-block still spreads over all of them.
for (int r = 0; r < ROWS; ++r) {
  const int pl = r * NSIMD + sg;
  const int p = p0 + pl;
  // p depends only on the simdgroup, so all its lanes reach the simd sum.
  if (p < HEADDIM) {
    const float xv = s_x[pl];
    const float dtx = dt_h * xv;
    const size_t row = ((size_t(b) * NHEADS + h) * HEADDIM + p) * DSTATE;
    float part = 0.0f;
    for (int j = 0; j < N_PER_LANE; ++j) {
      const int n = lane + j * GK_SIMD;
      if (n < DSTATE) {
        const float s = dA * state[row + n] + dtx * B_r[j];
        new_state[row + n] = s;
        part += s * C_r[j];
      }
    }
    const float total = GK_SIMD_SUM(part);
    if (lane == 0) {
      y[(b * NHEADS + h) * HEADDIM + p] = total + d_skip * xv;
    }
  }
}
