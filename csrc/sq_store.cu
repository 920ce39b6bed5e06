// Store: quantise new K/V tokens and write them into the packed paged cache (format.paged.store_kv).
//
// One CTA per (tile of kTokens tokens, KV head), 256 threads. Per component: rotate
// r = (x - mean) @ U / scale (fp32; the D x D product is split over 256 / D thread groups), apply
// the token scale, pick the nearest level by binary search over midpoints, pack each group's 8 codes
// into its `bits` bytes, write the fp16 fields; tokens at block offsets < sink_tokens also write
// their exact bf16 copy into the block's sink spill. Slot padding bytes are zeroed. Tokens whose
// slot is -1 are skipped. Non-finite input is saturated first (NaN -> 0, +-inf -> +-65504). No host synchronisation; grid depends only on N and H.
#include "sq_device.cuh"

namespace sq {
namespace {

constexpr int kTokens = 8;
constexpr int kThreads = 256;

struct TileRows {
  int64_t entry[kTokens];  // byte offset of the token's entry, -1 = skip
  int64_t block_entry[kTokens];  // byte offset of the (block, head) offset-0 entry
  int offset[kTokens];     // offset inside the block
  float s[kTokens], z[kTokens], norm[kTokens];
};

__device__ void encode_component(const StoreArgs& a, const Component& comp, const void* x, int64_t s_t, int64_t s_h,
                                 int which, int h, int t0, TileRows& rows, float* xs, float* partial, float* rot,
                                 uint8_t* codes, float* lut_s) {
  const int D = a.head_dim;
  const int G = D / kGroup;
  const int tid = threadIdx.x;
  const Cache& c = a.cache;
  const float* mean = comp.mean + static_cast<int64_t>(h) * D;
  const float* scale = comp.scale + static_cast<int64_t>(h) * D;

  // 1. x - mean into shared memory; sink tokens also keep their exact bf16 copy. The component's level
  //    tables come along in the same round of loads: the nearest-level search below reads them eight
  //    times in a row, dependent, which from global memory is the store's latency floor at small batches.
  const float* lut_g = comp.lut32 + static_cast<int64_t>(h) * comp.lut_n;
  for (int i = tid; i < comp.lut_n; i += kThreads) lut_s[i] = __ldg(lut_g + i);
  for (int i = tid; i < kTokens * D; i += kThreads) {
    const int t = i / D, d = i % D;
    float v = 0.f;
    if (rows.entry[t] >= 0) {
      float raw = load_float(x, static_cast<int64_t>(t0 + t) * s_t + static_cast<int64_t>(h) * s_h + d, a.dtype);
      // Non-finite input is saturated first, as an fp16 cache would hold it (format.codec.saturate):
      // NaN -> 0, +-inf -> +-65504, for the codes and the exact sink copy alike.
      if (raw != raw) raw = 0.f;
      if (isinf(raw)) raw = copysignf(65504.f, raw);
      v = raw - mean[d];
      if (rows.offset[t] < c.sink_tokens) {
        const unsigned short b = __bfloat16_as_ushort(__float2bfloat16_rn(raw));
        const int byte = rows.offset[t] * 4 * D + which * 2 * D + 2 * d;
        uint8_t* base = c.data + rows.block_entry[t];
        base[spill_offset(c, byte)] = static_cast<uint8_t>(b & 0xFF);
        base[spill_offset(c, byte + 1)] = static_cast<uint8_t>(b >> 8);
      }
    }
    xs[i] = v;
  }
  __syncthreads();

  // 2. rot[t][e] = sum_d xs[t][d] U[d][e] / scale[e]; parts of the d range in parallel.
  const int parts = kThreads / D > 0 ? kThreads / D : 1;
  const float* basis = comp.basis + static_cast<int64_t>(h) * D * D;
  for (int col = tid; col < parts * D; col += kThreads) {
    const int e = col % D, part = col / D;
    const int d0 = part * D / parts, d1 = (part + 1) * D / parts;
    float acc[kTokens];
#pragma unroll
    for (int t = 0; t < kTokens; ++t) acc[t] = 0.f;
    column_dots(xs, basis, D, e, d0, d1, kTokens, acc);
#pragma unroll
    for (int t = 0; t < kTokens; ++t) partial[(part * kTokens + t) * D + e] = acc[t];
  }
  __syncthreads();
  for (int i = tid; i < kTokens * D; i += kThreads) {
    const int t = i / D, e = i % D;
    float v = 0.f;
    for (int p = 0; p < parts; ++p) v += partial[(p * kTokens + t) * D + e];
    rot[i] = __fdiv_rn(v, scale[e]);
  }
  __syncthreads();

  // 3. Token scale (one warp per token).
  const int warp = tid >> 5, lane = tid & 31;
  for (int t = warp; t < kTokens; t += kThreads / 32) {
    float sum_sq = 0.f, lo = INFINITY, hi = -INFINITY;
    for (int e = lane; e < D; e += 32) {
      const float v = rot[t * D + e];
      sum_sq = fmaf(v, v, sum_sq);
      lo = fminf(lo, v);
      hi = fmaxf(hi, v);
    }
    sum_sq = warp_sum(sum_sq);
    lo = warp_min(lo);
    hi = warp_max(hi);
    if (lane == 0) {
      if (comp.mode == 1) {
        rows.norm[t] = sqrtf(sum_sq);
        rows.z[t] = 0.f;
      } else if (comp.mode == 2) {
        rows.s[t] = fp16_round(hi - lo);
        rows.z[t] = fp16_round(lo);
      } else {
        rows.s[t] = 1.f;
        rows.z[t] = 0.f;
      }
    }
  }
  __syncthreads();

  // 4. Nearest level of each coordinate.
  const int4* meta = comp.meta + static_cast<int64_t>(h) * G;
  const float* lut = lut_s;
  for (int i = tid; i < kTokens * D; i += kThreads) {
    const int t = i / D, e = i % D;
    const float r = rot[i];
    float u;
    if (comp.mode == 1) {
      const float n = rows.norm[t];
      u = __fdiv_rn(r, n > 0.f ? n : 1.f);
    } else if (comp.mode == 2) {
      const float s = rows.s[t];
      u = __fdiv_rn(r - rows.z[t], s > 0.f ? s : 1.f);
    } else {
      u = r;
    }
    const int4 m = meta[e / kGroup];
    const int code = nearest_level(u, lut + m.y, m.w);
    codes[i] = static_cast<uint8_t>(code);
    rot[i] = lut[m.y + code];  // levels, for the norm correction
  }
  __syncthreads();

  // 5. Norm correction: s = |r| / |levels|, so the decoded vector keeps the input norm.
  if (comp.mode == 1) {
    for (int t = warp; t < kTokens; t += kThreads / 32) {
      float sum_sq = 0.f;
      for (int e = lane; e < D; e += 32) sum_sq = fmaf(rot[t * D + e], rot[t * D + e], sum_sq);
      sum_sq = warp_sum(sum_sq);
      if (lane == 0) {
        const float lv = sqrtf(sum_sq);
        rows.s[t] = fp16_round(lv > 0.f ? __fdiv_rn(rows.norm[t], lv) : 0.f);
      }
    }
    __syncthreads();
  }

  // 6. Pack: group g of 8 codes at b bits is the b-byte little-endian stream sum_i code_i << (i b).
  for (int i = tid; i < kTokens * G; i += kThreads) {
    const int t = i / G, g = i % G;
    if (rows.entry[t] < 0) continue;
    const int4 m = meta[g];
    uint64_t stream = 0;
#pragma unroll
    for (int j = 0; j < kGroup; ++j) stream |= static_cast<uint64_t>(codes[t * D + g * kGroup + j]) << (j * m.z);
    uint8_t* dst = c.data + rows.entry[t] + m.x;
    for (int k = 0; k < m.z; ++k) dst[k] = static_cast<uint8_t>(stream >> (8 * k));
  }
  if (tid < kTokens && rows.entry[tid] >= 0 && comp.mode >= 1) {
    uint8_t* dst = c.data + rows.entry[tid] + comp.field_offset;
    put_fp16(dst, rows.s[tid]);
    if (comp.mode == 2) put_fp16(dst + 2, rows.z[tid]);
  }
  __syncthreads();
}

__global__ void __launch_bounds__(kThreads) store_kernel(const StoreArgs a) {
  extern __shared__ __align__(16) float smem[];
  __shared__ TileRows rows;
  const int D = a.head_dim;
  const int parts = kThreads / D > 0 ? kThreads / D : 1;
  float* xs = smem;                          // [kTokens, D]
  float* rot = xs + kTokens * D;             // [kTokens, D]
  float* partial = rot + kTokens * D;        // [parts, kTokens, D]
  float* lut_s = partial + parts * kTokens * D;  // [max(k.lut_n, v.lut_n)] level tables of the component at hand
  uint8_t* codes = reinterpret_cast<uint8_t*>(lut_s + (a.k.lut_n > a.v.lut_n ? a.k.lut_n : a.v.lut_n));  // [kTokens, D]

  const int h = blockIdx.y;
  const int t0 = blockIdx.x * kTokens;
  const Cache& c = a.cache;
  if (threadIdx.x < kTokens) {
    const int t = t0 + threadIdx.x;
    const int64_t slot = t < a.num_tokens ? a.slot_mapping[t] : -1;
    if (slot >= 0) {
      const int64_t blk = slot / c.block_size;
      const int off = static_cast<int>(slot % c.block_size);
      rows.block_entry[threadIdx.x] = blk * c.s_blk + static_cast<int64_t>(h) * c.s_head;
      rows.entry[threadIdx.x] = rows.block_entry[threadIdx.x] + off * c.s_tok;
      rows.offset[threadIdx.x] = off;
    } else {
      rows.entry[threadIdx.x] = -1;
      rows.block_entry[threadIdx.x] = -1;
      rows.offset[threadIdx.x] = 0;
    }
  }
  __syncthreads();
  encode_component(a, a.k, a.key, a.s_kt, a.s_kh, 0, h, t0, rows, xs, partial, rot, codes, lut_s);
  encode_component(a, a.v, a.value, a.s_vt, a.s_vh, 1, h, t0, rows, xs, partial, rot, codes, lut_s);

  // Unused budget at the end of the slot is zero, as in the reference.
  const int pad = a.pad_start[h];
  const int width = c.slot_bytes - pad;
  for (int i = threadIdx.x; i < kTokens * width; i += kThreads) {
    const int t = i / width;
    if (rows.entry[t] >= 0) c.data[rows.entry[t] + pad + i % width] = 0;
  }
}

}  // namespace

cudaError_t launch_store(const StoreArgs& a, cudaStream_t stream) {
  if (a.num_tokens == 0) return cudaSuccess;
  const int D = a.head_dim;
  const int parts = kThreads / D > 0 ? kThreads / D : 1;
  const int lut_n = a.k.lut_n > a.v.lut_n ? a.k.lut_n : a.v.lut_n;
  const size_t smem = sizeof(float) * (kTokens * D * (2 + parts) + lut_n) + kTokens * D;
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(store_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  const dim3 grid((a.num_tokens + kTokens - 1) / kTokens, a.cache.num_kv_heads);
  store_kernel<<<grid, kThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace sq
