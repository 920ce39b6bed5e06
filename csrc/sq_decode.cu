// Split-KV decode attention over the packed paged cache (one query token per sequence).
//
//   prep_kernel   (B x H CTAs):  w = scale_K * (q @ U_K), base = q . mean_K (times softmax_scale * log2 e),
//                                stored as fp16 w / max|w| plus (base, sum w, max|w|) per query head.
//   split_kernel  (NS x H x B):  one CTA per KV split of one (sequence, KV head); every query head of the
//                                group shares each decoded element (GQA reuse through tensor-core MMAs).
//   merge_kernel  (B x H CTAs):  combine the splits and the exact sink tokens; rotate back once per query
//                                head: o = (scale_V * acc) @ U_V^T + mass * mean_V + sum_sinks p v.
//
// split_kernel, per warp and 16-token step (4 warps, each its own steps and cp.async double buffer):
//   scores S[q, t] = W[q, :] . K_levels[t, :]  as mma.m16n8k16 with A = W (16 query rows, fp16) and
//   B = K levels (8 tokens x 16 coordinates). Lane (quad, c) decodes for tokens quad and quad + 8 the
//   whole code group  4 p + c  of every stripe p (P = D / 32): its 8 codes are exactly the lane's B
//   elements of k-steps 2p and 2p + 1 under a fixed permutation of the coordinates, which W uses too.
//   Values: O^T[d, q] += V_levels^T[d, t] . (p s_V)^T[t, q]  with A = V levels transposed in registers
//   (movmatrix) from the same per-lane decode, B = probabilities straight from the score accumulators.
//   No per-token D x D work.
//
// Decoding (the instruction budget of the whole kernel): a stripe whose four groups all have <= 4 bits
// (groups are ordered by importance, so wide groups share the first stripes) reads two codes per
// 32-bit shared-memory load from a per-group pair table (kernel_codec.pair_meta / pairs): the entry
// is already the half2 MMA operand, and its address is one shift and one LOP3 (tables are aligned to
// their size). Other stripes look each code up in the fp16 level table.
#include "sq_device.cuh"

namespace sq {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kStep = 16;    // tokens per warp step
constexpr int kStages = 3;   // staging buffers per warp: two steps in flight while one is decoded

// ---- PTX wrappers ---------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ uint32_t lds_u32(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(v) : "r"(addr));
  return v;
}
__device__ __forceinline__ uint32_t lds_u16(uint32_t addr) {
  unsigned short v;
  asm volatile("ld.shared.u16 %0, [%1];\n" : "=h"(v) : "r"(addr));
  return v;
}
__device__ __forceinline__ uint32_t lds_u8(uint32_t addr) {
  unsigned short v;
  asm volatile("ld.shared.u8 %0, [%1];\n" : "=h"(v) : "r"(addr));
  return v;
}
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// D (fp32 16x8) += A (fp16 16x16, row) * B (fp16 16x8, col).
__device__ __forceinline__ void mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
// Transpose an 8x8 fp16 matrix held one row-pair per lane (the MMA fragment layout).
__device__ __forceinline__ uint32_t transpose8x8(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}
__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}
__device__ __forceinline__ float fp16_smem(uint32_t addr) {  // fp16 at any byte address in shared memory
  return __half2float(__ushort_as_half(static_cast<unsigned short>(lds_u8(addr) | (lds_u8(addr + 1) << 8))));
}

// ---- decoding one code group of one staged entry -------------------------------------------------

// Levels of the 8 codes of group `m` (byte offset, LUT offset, bits, mask) of the entry at shared
// address `row`, as 4 half2: codes (0,1), (2,3), (4,5), (6,7), one fp16 LUT lookup per code. Any width
// up to 8 bits: the stripes that hold a group wider than the pair tables take this path.
__device__ __forceinline__ void decode_group(uint32_t row, int4 m, uint32_t lut, uint32_t (&out)[4]) {
  const uint32_t a = row + static_cast<uint32_t>(m.x);
  const uint32_t w = a & ~3u;
  const uint32_t sh = (a & 3u) * 8u;
  const uint32_t x0 = lds_u32(w), x1 = lds_u32(w + 4);
  const uint32_t lo = __funnelshift_r(x0, x1, sh);
  const uint32_t hi = __funnelshift_r(x1, lds_u32(w + 8), sh);
  const uint32_t table = lut + 2u * static_cast<uint32_t>(m.y);
  const uint32_t mask = static_cast<uint32_t>(m.w);
  const int bits = m.z;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    uint32_t code[2];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int s = (2 * k + e) * bits;
      code[e] = (s < 32 ? __funnelshift_r(lo, hi, s) : hi >> (s - 32)) & mask;
    }
    out[k] = lds_u16(table + 2u * code[0]) | (lds_u16(table + 2u * code[1]) << 16);
  }
}

// Levels of the 8 codes of a group of <= 4 bits from its pair table: `lo` holds the group's stream,
// `table` is the table's shared address (aligned to its size), `m4` the pair mask << 2 and `b2` = 2 bits.
__device__ __forceinline__ void decode_pairs(uint32_t lo, uint32_t table, uint32_t m4, uint32_t b2,
                                             uint32_t (&out)[4]) {
  const uint32_t s1 = b2 - 2u, s2 = s1 + b2, s3 = s2 + b2;  // pair k starts at bit k * b2
  out[0] = lds_u32(table | ((lo << 2) & m4));
  out[1] = lds_u32(table | ((lo >> s1) & m4));
  out[2] = lds_u32(table | ((lo >> s2) & m4));
  out[3] = lds_u32(table | ((lo >> s3) & m4));
}

// 32 bits of shared memory from any byte address.
__device__ __forceinline__ uint32_t window32(uint32_t a) {
  const uint32_t w = a & ~3u;
  return __funnelshift_r(lds_u32(w), lds_u32(w + 4), (a & 3u) * 8u);
}

// ---- shared memory layout of split_kernel ----------------------------------------------------------

struct SplitSmem {
  int meta;        // int4 [2][G]: K then V group metadata (fp16 LUT path)
  int pmeta;       // int4 [2][G]: K then V pair-table metadata
  int lut;         // fp16 [k.lut_n + v.lut_n]
  int pairs;       // uint32 [k.pair_n + v.pair_n], 1024 B aligned at run time (+1024 reserved)
  int work;        // raw staging buffers, later the warp-merge scratch
  int raw_buf;     // bytes per staging buffer
  int total;
};

__host__ __device__ inline int round16(int x) { return (x + 15) & ~15; }

__host__ __device__ inline SplitSmem split_smem(int head_dim, int nqt, int k_lut, int v_lut, int k_pairs, int v_pairs,
                                                int pitch) {
  SplitSmem s;
  s.meta = 0;
  s.pmeta = 2 * (head_dim / kGroup) * 16;
  s.lut = 2 * s.pmeta;
  s.pairs = s.lut + round16(2 * (k_lut + v_lut));
  s.work = s.pairs + 1024 + round16(4 * (k_pairs + v_pairs));
  s.raw_buf = round16(kStep * pitch + 16);  // +16: group windows may read past the last entry
  const int raw = kWarps * kStages * s.raw_buf;
  const int merge = kWarps * nqt * 8 * (head_dim + 3) * 4;
  s.total = s.work + (raw > merge ? raw : merge);
  return s;
}

// Stage the entries of the 16 positions of step `k` of KV head h (rows >= seq_len are not read).
__device__ __forceinline__ void stage_step(const DecodeArgs& a, const int* table, int h, int k, int seq_len,
                                           uint32_t dst, int lane) {
  const Cache& c = a.cache;
  const int p0 = k * kStep;
  const int64_t head = static_cast<int64_t>(h) * c.s_head;
  if (a.load_mode == kRegion16) {
    const uint8_t* src = c.data + static_cast<int64_t>(table[p0 / c.block_size]) * c.s_blk + head +
                         static_cast<int64_t>(p0 % c.block_size) * c.s_tok;
    const int chunks = static_cast<int>(c.s_tok);  // 16 entries of s_tok bytes = s_tok chunks of 16 B
    for (int i = lane; i < chunks; i += 32) cp_async16(dst + 16 * i, src + 16 * i);
    return;
  }
  const int words = (c.slot_bytes + 3) / 4;
  for (int r = 0; r < kStep; ++r) {
    const int pos = p0 + r;
    if (pos >= seq_len) break;
    const uint8_t* src = c.data + static_cast<int64_t>(table[pos / c.block_size]) * c.s_blk + head +
                         static_cast<int64_t>(pos % c.block_size) * c.s_tok;
    const uint32_t row = dst + r * a.pitch;
    if (a.load_mode == kRow4) {
      for (int i = lane; i < words; i += 32) cp_async4(row + 4 * i, src + 4 * i);
    } else {
      for (int i = lane; i < c.slot_bytes; i += 32) {
        const unsigned short v = __ldg(src + i);
        asm volatile("st.shared.u8 [%0], %1;\n" ::"r"(row + i), "h"(v));
      }
    }
  }
}

// kFields: the token-scale fields (TQ layout) are read; SpectralQuant slots have none.
template <int D, int NQT, bool kFields>
__global__ void __launch_bounds__(kThreads, (D <= 128 && NQT == 1) ? 4 : 2) split_kernel(const DecodeArgs a) {
  constexpr int G8 = D / kGroup;  // code groups
  constexpr int P = D / 32;       // stripes of 4 groups (one per lane of a quad)
  static_assert(kStripeGroups == 4 && D % (kStripeGroups * kGroup) == 0, "a stripe is one group per lane of a quad");
  extern __shared__ __align__(16) uint8_t smem[];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int quad = lane >> 2, c = lane & 3;
  const int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int H = a.cache.num_kv_heads;
  const int G = a.num_q_heads / H;
  const int pitch = a.pitch;
  const SplitSmem lay = split_smem(D, NQT, a.k.lut_n, a.v.lut_n, a.k.pair_n, a.v.pair_n, pitch);

  const int seq_len = a.seq_lens[b];
  const int n_sink = min(a.cache.sink_tokens, seq_len);
  const int steps = (seq_len + kStep - 1) / kStep;
  const int per = (steps + a.num_splits - 1) / a.num_splits;
  const int s_begin = split * per;
  const int s_end = min(s_begin + per, steps);
  const int* table = a.block_table + static_cast<int64_t>(b) * a.s_bt;
  // Warp w takes steps s_begin + w, + 2w, ...; kStages - 1 of them are always in flight.
  // The first ones are issued before the tables are loaded, so their latency overlaps that work.
  const uint32_t raw0 = smem_addr(smem + lay.work) + (kStages * warp) * lay.raw_buf;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    const int kk = s_begin + warp + s * kWarps;
    if (kk < s_end) stage_step(a, table, h, kk, seq_len, raw0 + s * lay.raw_buf, lane);
    cp_async_commit();
  }
  int4* meta_s = reinterpret_cast<int4*>(smem + lay.meta);
  int4* pmeta_s = reinterpret_cast<int4*>(smem + lay.pmeta);
  __half* lut_s = reinterpret_cast<__half*>(smem + lay.lut);
  // Pair tables need an absolute alignment of their largest size for the OR addressing.
  static_assert(4 * kPairTableAlignEntries == 1024, "the shared-memory layout reserves 1024 B for alignment");
  const uint32_t pairs_k = (smem_addr(smem + lay.pairs) + 1023u) & ~1023u;
  const uint32_t pairs_v = pairs_k + 4u * a.k.pair_n;
  uint32_t* pairs_s = reinterpret_cast<uint32_t*>(smem + lay.pairs + (pairs_k - smem_addr(smem + lay.pairs)));
  for (int i = tid; i < G8; i += kThreads) {
    meta_s[i] = a.k.meta[h * G8 + i];
    meta_s[G8 + i] = a.v.meta[h * G8 + i];
    int4 pk = a.k.pair_meta[h * G8 + i], pv = a.v.pair_meta[h * G8 + i];
    pk.y += static_cast<int>(pairs_k);  // absolute shared addresses of the tables
    pv.y += static_cast<int>(pairs_v);
    pmeta_s[i] = pk;
    pmeta_s[G8 + i] = pv;
  }
  for (int i = tid; i < a.k.lut_n; i += kThreads) lut_s[i] = a.k.lut16[static_cast<int64_t>(h) * a.k.lut_n + i];
  for (int i = tid; i < a.v.lut_n; i += kThreads)
    lut_s[a.k.lut_n + i] = a.v.lut16[static_cast<int64_t>(h) * a.v.lut_n + i];
  for (int i = tid; i < a.k.pair_n; i += kThreads) pairs_s[i] = a.k.pairs[static_cast<int64_t>(h) * a.k.pair_n + i];
  for (int i = tid; i < a.v.pair_n; i += kThreads)
    pairs_s[a.k.pair_n + i] = a.v.pairs[static_cast<int64_t>(h) * a.v.pair_n + i];
  __syncthreads();
  const uint32_t lut_k = smem_addr(lut_s), lut_v = lut_k + 2u * a.k.lut_n;

  // Stripes whose four groups all have <= 4 bits take the pair-table decode (warp-uniform branch).
  uint32_t fast_k = 0, fast_v = 0;
#pragma unroll
  for (int p = 0; p < P; ++p) {
    bool fk = true, fv = true;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      fk &= meta_s[4 * p + q].z <= kPairMaxBits;
      fv &= meta_s[G8 + 4 * p + q].z <= kPairMaxBits;
    }
    fast_k |= static_cast<uint32_t>(fk) << p;
    fast_v |= static_cast<uint32_t>(fv) << p;
  }

  // Query fragments (A of the score MMA): rows quad (+8), this lane's group of each stripe.
  uint32_t wf[P][2][4];
  float base[2], sum_w[2], w_max[2];
#pragma unroll
  for (int ri = 0; ri < 2; ++ri) {
    const int q = quad + 8 * ri;
    const bool live = ri < NQT && q < G;
    const int64_t row = static_cast<int64_t>(b) * a.num_q_heads + h * G + q;
    float4 par = make_float4(0.f, 0.f, 1.f, 0.f);
    if (live) par = reinterpret_cast<const float4*>(a.wpar)[row];
    base[ri] = par.x;
    sum_w[ri] = par.y;
    w_max[ri] = par.z;
#pragma unroll
    for (int p = 0; p < P; ++p) {
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (live) v = *reinterpret_cast<const uint4*>(a.w16 + row * a.padded_dim + 8 * (4 * p + c));
      wf[p][0][ri] = v.x;      // codes 0,1  (k = 2c, 2c+1 of k-step 2p)
      wf[p][0][ri + 2] = v.y;  // codes 2,3  (k = 2c+8, 2c+9)
      wf[p][1][ri] = v.z;      // codes 4,5  (k-step 2p+1)
      wf[p][1][ri + 2] = v.w;  // codes 6,7
    }
  }


  float m_run[2] = {-1e30f, -1e30f}, l_run[2] = {0.f, 0.f}, z_run[2] = {0.f, 0.f};
  float o[P][2][NQT][4];
#pragma unroll
  for (int p = 0; p < P; ++p)
#pragma unroll
    for (int kk = 0; kk < 2; ++kk)
#pragma unroll
      for (int qt = 0; qt < NQT; ++qt)
#pragma unroll
        for (int i = 0; i < 4; ++i) o[p][kk][qt][i] = 0.f;

  int buf = 0;
  for (int k = s_begin + warp; k < s_end; k += kWarps) {
    const int ahead = k + (kStages - 1) * kWarps;
    const int ahead_buf = buf == 0 ? kStages - 1 : buf - 1;  // the buffer freed by the previous step
    if (ahead < s_end) stage_step(a, table, h, ahead, seq_len, raw0 + ahead_buf * lay.raw_buf, lane);
    cp_async_commit();
    cp_async_wait<kStages - 1>();
    __syncwarp();

    const uint32_t rows = raw0 + buf * lay.raw_buf;
    const int p0 = k * kStep;
    // Per-token fields of this lane's 4 score columns: tokens 2c, 2c+1, 8+2c, 9+2c.
    float ks[4], kz[4], vs[4], vz[4];
    bool valid[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int t = (j >> 1) * 8 + 2 * c + (j & 1);
      const int pos = p0 + t;
      valid[j] = pos >= n_sink && pos < seq_len;
      const uint32_t row = rows + t * pitch;
      ks[j] = 1.f;
      kz[j] = 0.f;
      vs[j] = 1.f;
      vz[j] = 0.f;
      if (kFields) {
        ks[j] = a.k.mode >= 1 ? fp16_smem(row + a.k.field_offset) : 1.f;
        kz[j] = a.k.mode == 2 ? fp16_smem(row + a.k.field_offset + 2) : 0.f;
        vs[j] = a.v.mode >= 1 ? fp16_smem(row + a.v.field_offset) : 1.f;
        vz[j] = a.v.mode == 2 ? fp16_smem(row + a.v.field_offset + 2) : 0.f;
      }
      if (!valid[j]) {  // unread or foreign bytes: keep them out of the arithmetic (0 * NaN = NaN)
        ks[j] = 0.f;
        kz[j] = 0.f;
        vs[j] = 0.f;
        vz[j] = 0.f;
      }
    }
    const uint32_t row0 = rows + quad * pitch, row1 = rows + (quad + 8) * pitch;

    // Scores: S[q, t] for tokens 0-7 (sacc[0]) and 8-15 (sacc[1]).
    float sacc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
    for (int p = 0; p < P; ++p) {
      uint32_t k0[4], k1[4];
      if ((fast_k >> p) & 1u) {
        const int4 m = pmeta_s[4 * p + c];  // this lane's key group of stripe p
        decode_pairs(window32(row0 + m.x), m.y, m.w, m.z, k0);
        decode_pairs(window32(row1 + m.x), m.y, m.w, m.z, k1);
      } else {
        const int4 m = meta_s[4 * p + c];
        decode_group(row0, m, lut_k, k0);
        decode_group(row1, m, lut_k, k1);
      }
      mma16816(sacc[0], wf[p][0][0], wf[p][0][1], wf[p][0][2], wf[p][0][3], k0[0], k0[1]);
      mma16816(sacc[1], wf[p][0][0], wf[p][0][1], wf[p][0][2], wf[p][0][3], k1[0], k1[1]);
      mma16816(sacc[0], wf[p][1][0], wf[p][1][1], wf[p][1][2], wf[p][1][3], k0[2], k0[3]);
      mma16816(sacc[1], wf[p][1][0], wf[p][1][1], wf[p][1][2], wf[p][1][3], k1[2], k1[3]);
    }

    // Online softmax (base 2) per query row; the quad's 4 lanes hold the row's 16 tokens.
    uint32_t bp[NQT][2];
    float alpha[2] = {1.f, 1.f};
#pragma unroll
    for (int ri = 0; ri < NQT; ++ri) {
      float sc[4];
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float dot = sacc[j >> 1][2 * ri + (j & 1)];
        sc[j] = valid[j] ? base[ri] + w_max[ri] * (ks[j] * dot) + sum_w[ri] * kz[j] : -INFINITY;
        mx = fmaxf(mx, sc[j]);
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m_run[ri], mx);
      alpha[ri] = exp2f(m_run[ri] - m_new);
      m_run[ri] = m_new;
      float pr[4], psum = 0.f, zsum = 0.f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float pj = exp2f(sc[j] - m_new);
        psum += pj;
        zsum = fmaf(pj, vz[j], zsum);
        pr[j] = pj * vs[j];
      }
      l_run[ri] = fmaf(l_run[ri], alpha[ri], psum);
      z_run[ri] = fmaf(z_run[ri], alpha[ri], zsum);
      bp[ri][0] = pack_half2(pr[0], pr[1]);  // k = tokens 2c, 2c+1; n = query quad + 8 ri
      bp[ri][1] = pack_half2(pr[2], pr[3]);  // k = tokens 8+2c, 9+2c
    }
    // Rescale O^T columns (queries 8qt + 2c, +1) when any running max moved.
    if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
      for (int qt = 0; qt < NQT; ++qt) {
        const float a0 = __shfl_sync(0xffffffffu, alpha[qt], 8 * c);
        const float a1 = __shfl_sync(0xffffffffu, alpha[qt], 8 * c + 4);
#pragma unroll
        for (int p = 0; p < P; ++p)
#pragma unroll
          for (int kk = 0; kk < 2; ++kk) {
            o[p][kk][qt][0] *= a0;
            o[p][kk][qt][1] *= a1;
            o[p][kk][qt][2] *= a0;
            o[p][kk][qt][3] *= a1;
          }
      }
    }

    // Values: O^T[coords, q] += V^T[coords, tokens] (p s_V)^T[tokens, q].
#pragma unroll
    for (int p = 0; p < P; ++p) {
      uint32_t v0[4], v1[4];
      if ((fast_v >> p) & 1u) {
        const int4 m = pmeta_s[G8 + 4 * p + c];
        decode_pairs(window32(row0 + m.x), m.y, m.w, m.z, v0);
        decode_pairs(window32(row1 + m.x), m.y, m.w, m.z, v1);
      } else {
        const int4 m = meta_s[G8 + 4 * p + c];
        decode_group(row0, m, lut_v, v0);
        decode_group(row1, m, lut_v, v1);
      }
#pragma unroll
      for (int kk = 0; kk < 2; ++kk) {
        const uint32_t a0 = transpose8x8(v0[2 * kk]);      // coords of pair 2kk, tokens 2c, 2c+1
        const uint32_t a1 = transpose8x8(v0[2 * kk + 1]);  // coords of pair 2kk+1 (m-tile rows 8-15)
        const uint32_t a2 = transpose8x8(v1[2 * kk]);      // tokens 8+2c, 9+2c
        const uint32_t a3 = transpose8x8(v1[2 * kk + 1]);
#pragma unroll
        for (int qt = 0; qt < NQT; ++qt) mma16816(o[p][kk][qt], a0, a1, a2, a3, bp[qt][0], bp[qt][1]);
      }
    }
    __syncwarp();
    buf = buf + 1 == kStages ? 0 : buf + 1;
  }
  cp_async_wait<0>();

  // Warp partials -> shared memory -> one partial state per (split, query head).
#pragma unroll
  for (int ri = 0; ri < 2; ++ri) {
    l_run[ri] += __shfl_xor_sync(0xffffffffu, l_run[ri], 1);
    l_run[ri] += __shfl_xor_sync(0xffffffffu, l_run[ri], 2);
    z_run[ri] += __shfl_xor_sync(0xffffffffu, z_run[ri], 1);
    z_run[ri] += __shfl_xor_sync(0xffffffffu, z_run[ri], 2);
  }
  __syncthreads();  // every warp is done with its staging buffers
  constexpr int QR = NQT * 8;  // query rows held by the O^T accumulators
  float* osm = reinterpret_cast<float*>(smem + lay.work);  // [kWarps][QR][D]
  float* msm = osm + kWarps * QR * D;                       // [kWarps][QR][3]
#pragma unroll
  for (int p = 0; p < P; ++p)
#pragma unroll
    for (int kk = 0; kk < 2; ++kk)
#pragma unroll
      for (int qt = 0; qt < NQT; ++qt) {
        // m-tile row r < 8 is column r of pair 2kk: group 4p + r/2, code 4kk + r%2; row r+8: code + 2.
        const int coord = 8 * (4 * p + (quad >> 1)) + 4 * kk + (quad & 1);
        const int q = 8 * qt + 2 * c;
        float* dst = osm + (warp * QR + q) * D + coord;
        dst[0] = o[p][kk][qt][0];
        dst[D] = o[p][kk][qt][1];
        dst[2] = o[p][kk][qt][2];
        dst[D + 2] = o[p][kk][qt][3];
      }
  if (c == 0) {
#pragma unroll
    for (int ri = 0; ri < NQT; ++ri) {
      float* dst = msm + (warp * QR + quad + 8 * ri) * 3;
      dst[0] = m_run[ri];
      dst[1] = l_run[ri];
      dst[2] = z_run[ri];
    }
  }
  __syncthreads();
  const int64_t out_row = ((static_cast<int64_t>(b) * H + h) * a.num_splits + split) * a.padded_group;
  for (int i = tid; i < G * D; i += kThreads) {
    const int q = i / D, e = i % D;
    float top = -1e30f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) top = fmaxf(top, msm[(w * QR + q) * 3]);
    float acc = 0.f, mass = 0.f, zacc = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float* st = msm + (w * QR + q) * 3;
      const float f = exp2f(st[0] - top);
      acc = fmaf(osm[(w * QR + q) * D + e], f, acc);
      mass = fmaf(st[1], f, mass);
      zacc = fmaf(st[2], f, zacc);
    }
    a.part_o[(out_row + q) * a.padded_dim + e] = acc + zacc;  // z adds to every coordinate
    if (e == 0) {
      a.part_ml[(out_row + q) * 2] = top;
      a.part_ml[(out_row + q) * 2 + 1] = mass;
    }
  }
}

// ---- query rotation and merge: B x H CTAs of kRotThreads ----------------------------------------------
//
// Both are latency-bound at small batches (one CTA per (sequence, KV head), a D x D fp32 matrix read from
// L2 per CTA): every thread keeps kRotUnroll independent loads in flight and the reduction over the
// rotated dimension is split across thread chunks.

constexpr int kRotThreads = 512;

// out[r][j] = sum_i in[r][i] * m[i * D + j] for r < G. in/out/scratch in shared memory (scratch:
// [rot_chunks(D)][G][D] floats), m row-major D x D in global memory. Ends with __syncthreads().
__host__ __device__ inline int rot_chunks(int D) {  // thread chunks splitting the sum: divides D, D * chunks <= kRotThreads
  int chunks = kRotThreads / D;
  while (D % chunks) --chunks;
  return chunks;
}

__device__ __forceinline__ void rotate_rows(const float* in, const float* __restrict__ m, int D, int G,
                                            float* scratch, float* out) {
  const int tid = threadIdx.x;
  const int chunks = rot_chunks(D);
  const int j = tid % D, chunk = tid / D;
  if (chunk < chunks) {
    const int per = D / chunks;
    float acc[kMaxGroup];
#pragma unroll
    for (int r = 0; r < kMaxGroup; ++r) acc[r] = 0.f;
    column_dots(in, m, D, j, chunk * per, (chunk + 1) * per, G, acc);
#pragma unroll
    for (int r = 0; r < kMaxGroup; ++r)
      if (r < G) scratch[(chunk * G + r) * D + j] = acc[r];
  }
  __syncthreads();
  for (int i = tid; i < G * D; i += kRotThreads) {
    float v = 0.f;
    for (int k = 0; k < chunks; ++k) v += scratch[k * G * D + i];
    out[i] = v;
  }
  __syncthreads();
}

__host__ __device__ inline int rot_scratch_floats(int D, int G) { return rot_chunks(D) * G * D; }

__global__ void __launch_bounds__(kRotThreads) prep_kernel(const DecodeArgs a) {
  extern __shared__ __align__(16) float psm[];
  const int D = a.head_dim, DP = a.padded_dim;
  const int h = blockIdx.y, b = blockIdx.x;
  const int H = a.cache.num_kv_heads, G = a.num_q_heads / H;
  float* qs = psm;                          // [G][D] query
  float* ws = qs + G * D;                   // [G][D] rotated
  float* scale_s = ws + G * D;              // [G] max |w|
  float* scratch = scale_s + kMaxGroup;     // rotate_rows partials
  const int tid = threadIdx.x;
  for (int i = tid; i < G * D; i += kRotThreads) {
    const int r = i / D, d = i % D;
    qs[i] = load_float(a.query, b * a.s_qb + (h * G + r) * a.s_qh + d, a.q_dtype);
  }
  __syncthreads();
  rotate_rows(qs, a.k.basis + static_cast<int64_t>(h) * D * D, D, G, scratch, ws);
  const float* kscale = a.k.scale + static_cast<int64_t>(h) * D;
  for (int i = tid; i < G * D; i += kRotThreads) ws[i] *= kscale[i % D] * a.qk_scale;
  __syncthreads();
  const int warp = tid >> 5, lane = tid & 31;
  const float* mean = a.k.mean + static_cast<int64_t>(h) * D;
  for (int r = warp; r < G; r += kRotThreads / 32) {
    float base = 0.f, sum = 0.f, top = 0.f;
    for (int d = lane; d < D; d += 32) {
      base = fmaf(qs[r * D + d], mean[d], base);
      sum += ws[r * D + d];
      top = fmaxf(top, fabsf(ws[r * D + d]));
    }
    base = warp_sum(base);
    sum = warp_sum(sum);
    top = warp_max(top);
    if (top == 0.f) top = 1.f;
    if (lane == 0) {
      const int64_t row = static_cast<int64_t>(b) * a.num_q_heads + h * G + r;
      reinterpret_cast<float4*>(a.wpar)[row] = make_float4(base * a.qk_scale, sum, top, 0.f);
      scale_s[r] = top;
    }
  }
  __syncthreads();
  for (int i = tid; i < G * DP; i += kRotThreads) {
    const int r = i / DP, e = i % DP;
    const int64_t row = static_cast<int64_t>(b) * a.num_q_heads + h * G + r;
    a.w16[row * DP + e] = __float2half_rn(e < D ? ws[r * D + e] / scale_s[r] : 0.f);
  }
}

// ---- merge -------------------------------------------------------------------------------------------

__host__ __device__ inline int merge_smem_floats(int D, int G, int NS) {
  return 2 * G * D + 2 * kMaxSinkTokens * D + G * NS + G * kMaxSinkTokens + G + rot_scratch_floats(D, G);
}

__global__ void __launch_bounds__(kRotThreads) merge_kernel(const DecodeArgs a) {
  extern __shared__ __align__(16) float msmem[];
  const int D = a.head_dim, DP = a.padded_dim, NS = a.num_splits;
  const int b = blockIdx.x, h = blockIdx.y;
  const int H = a.cache.num_kv_heads, G = a.num_q_heads / H;
  const Cache& c = a.cache;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int seq_len = a.seq_lens[b];
  const int n_sink = min(c.sink_tokens, seq_len);

  float* acc_s = msmem;                        // [G][D] merged acc * scale_V
  float* rot_s = acc_s + G * D;                // [G][D] acc_s @ U_V^T
  float* ksink = rot_s + G * D;                // [kMaxSinkTokens][D]
  float* vsink = ksink + kMaxSinkTokens * D;
  float* weight = vsink + kMaxSinkTokens * D;  // [G][NS] split weights / total
  float* sinkw = weight + G * NS;              // [G][kMaxSinkTokens]
  float* mass = sinkw + G * kMaxSinkTokens;    // [G]
  float* scratch = mass + G;                   // rotate_rows partials

  if (n_sink > 0) {
    const uint8_t* first = c.data + static_cast<int64_t>(a.block_table[static_cast<int64_t>(b) * a.s_bt]) * c.s_blk +
                           static_cast<int64_t>(h) * c.s_head;
    for (int i = tid; i < n_sink * D; i += kRotThreads) {
      const int k = i / D, d = i % D;
      const int byte = k * 4 * D + 2 * d;
      const uint8_t kp[2] = {first[spill_offset(c, byte)], first[spill_offset(c, byte + 1)]};
      const uint8_t vp[2] = {first[spill_offset(c, byte + 2 * D)], first[spill_offset(c, byte + 2 * D + 1)]};
      ksink[i] = bf16_at(kp);
      vsink[i] = bf16_at(vp);
    }
  }
  __syncthreads();

  const int64_t part0 = (static_cast<int64_t>(b) * H + h) * NS * a.padded_group;
  for (int r = warp; r < G; r += kRotThreads / 32) {
    const int qh = h * G + r;
    // Exact sink scores q . k (log2 units).
    float sig[kMaxSinkTokens];
    float top = -1e30f;
    for (int k = 0; k < kMaxSinkTokens; ++k) {
      sig[k] = -INFINITY;
      if (k < n_sink) {
        float dot = 0.f;
        for (int d = lane; d < D; d += 32)
          dot = fmaf(load_float(a.query, b * a.s_qb + qh * a.s_qh + d, a.q_dtype), ksink[k * D + d], dot);
        sig[k] = warp_sum(dot) * a.qk_scale;
        top = fmaxf(top, sig[k]);
      }
    }
    for (int s = lane; s < NS; s += 32) top = fmaxf(top, a.part_ml[(part0 + s * a.padded_group + r) * 2]);
    top = warp_max(top);
    float total = 0.f, packed = 0.f;
    for (int s = lane; s < NS; s += 32) {
      const float* ml = a.part_ml + (part0 + s * a.padded_group + r) * 2;
      const float f = exp2f(ml[0] - top);
      weight[r * NS + s] = f;
      packed = fmaf(ml[1], f, packed);
    }
    packed = warp_sum(packed);
    total = packed;
    for (int k = 0; k < n_sink; ++k) total += exp2f(sig[k] - top);
    const float inv = total > 0.f ? 1.f / total : 0.f;
    __syncwarp();
    for (int s = lane; s < NS; s += 32) weight[r * NS + s] *= inv;
    if (lane < kMaxSinkTokens) sinkw[r * kMaxSinkTokens + lane] = lane < n_sink ? exp2f(sig[lane] - top) * inv : 0.f;
    if (lane == 0) mass[r] = packed * inv;
  }
  __syncthreads();

  const float* scale_v = a.v.scale + static_cast<int64_t>(h) * D;
  for (int i = tid; i < G * D; i += kRotThreads) {
    const int r = i / D, e = i % D;
    const float* po = a.part_o + (part0 + r) * DP + e;
    const int64_t stride = static_cast<int64_t>(a.padded_group) * DP;
    float v = 0.f;
    for (int s0 = 0; s0 < NS; s0 += 16) {  // 16 loads in flight before their FMAs
      float x[16];
#pragma unroll
      for (int k = 0; k < 16; ++k) x[k] = s0 + k < NS ? __ldg(po + (s0 + k) * stride) : 0.f;
#pragma unroll
      for (int k = 0; k < 16; ++k)
        if (s0 + k < NS) v = fmaf(weight[r * NS + s0 + k], x[k], v);
    }
    acc_s[i] = v * scale_v[e];
  }
  __syncthreads();
  rotate_rows(acc_s, a.v.basis_t + static_cast<int64_t>(h) * D * D, D, G, scratch, rot_s);

  const float* mean = a.v.mean + static_cast<int64_t>(h) * D;
  for (int i = tid; i < G * D; i += kRotThreads) {
    const int r = i / D, j = i % D;
    float v = fmaf(mass[r], mean[j], rot_s[i]);
    for (int k = 0; k < n_sink; ++k) v = fmaf(sinkw[r * kMaxSinkTokens + k], vsink[k * D + j], v);
    store_float(a.out, b * a.s_ob + (h * G + r) * a.s_oh + j, a.out_dtype, v);
  }
}

// Allow the largest opt-in shared memory once per instantiation (occupancy follows each launch's own size).
template <typename Kernel>
cudaError_t allow_max_smem(Kernel kernel, bool& done) {
  if (done) return cudaSuccess;
  int device = 0, limit = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (e == cudaSuccess) e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, limit);
  done = e == cudaSuccess;
  return e;
}

template <int D, int NQT, bool kFields>
cudaError_t launch_split(const DecodeArgs& a, cudaStream_t stream) {
  const SplitSmem lay = split_smem(D, NQT, a.k.lut_n, a.v.lut_n, a.k.pair_n, a.v.pair_n, a.pitch);
  static bool smem_ready = false;
  const cudaError_t e = allow_max_smem(split_kernel<D, NQT, kFields>, smem_ready);
  if (e != cudaSuccess) return e;
  const dim3 grid(a.num_splits, a.cache.num_kv_heads, a.batch);
  split_kernel<D, NQT, kFields><<<grid, kThreads, lay.total, stream>>>(a);
  return cudaGetLastError();
}

template <int D, bool kFields>
cudaError_t launch_split_f(const DecodeArgs& a, cudaStream_t stream) {
  const int group = a.num_q_heads / a.cache.num_kv_heads;
  return group <= 8 ? launch_split<D, 1, kFields>(a, stream) : launch_split<D, 2, kFields>(a, stream);
}

template <int D>
cudaError_t launch_split_d(const DecodeArgs& a, cudaStream_t stream) {
  return (a.k.mode != 0 || a.v.mode != 0) ? launch_split_f<D, true>(a, stream) : launch_split_f<D, false>(a, stream);
}

}  // namespace

bool decode_supports(int head_dim, int group, int sink_tokens) {
  return decode_head_dim_supported(head_dim) && group >= 1 && group <= kMaxGroup && sink_tokens <= kMaxSinkTokens;
}

cudaError_t launch_decode(const DecodeArgs& a, cudaStream_t stream) {
  if (a.batch == 0) return cudaSuccess;
  if (!decode_supports(a.head_dim, a.num_q_heads / a.cache.num_kv_heads, a.cache.sink_tokens) ||
      a.num_splits < 1 || a.num_splits > kMaxSplits)
    return cudaErrorInvalidValue;
  const int G = a.num_q_heads / a.cache.num_kv_heads;
  const dim3 heads(a.batch, a.cache.num_kv_heads);
  static bool merge_ready = false, prep_ready = false;
  cudaError_t e = allow_max_smem(merge_kernel, merge_ready);
  if (e == cudaSuccess) e = allow_max_smem(prep_kernel, prep_ready);
  if (e != cudaSuccess) return e;
  const size_t prep_smem = sizeof(float) * (2 * G * a.head_dim + kMaxGroup + rot_scratch_floats(a.head_dim, G));
  prep_kernel<<<heads, kRotThreads, prep_smem, stream>>>(a);
  e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  switch (a.head_dim) {
    case 32: e = launch_split_d<32>(a, stream); break;
    case 64: e = launch_split_d<64>(a, stream); break;
    case 96: e = launch_split_d<96>(a, stream); break;
    case 128: e = launch_split_d<128>(a, stream); break;
    default: e = launch_split_d<256>(a, stream); break;
  }
  if (e != cudaSuccess) return e;
  const size_t merge_smem = sizeof(float) * merge_smem_floats(a.head_dim, G, a.num_splits);
  merge_kernel<<<heads, kRotThreads, merge_smem, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace sq
