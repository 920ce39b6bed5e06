// Gather: dequantise the packed context of B sequences into dense K, V [B, max_len, H, D] float32
// (reference_attention.gather_context), for prefill continuations.
//
// One CTA per (tile of kTokens positions, KV head, sequence), 256 threads: levels ->
// scale * (s * level + z) in shared memory -> @ U^T + mean (fp32, split over 256 / D thread groups);
// positions < sink_tokens take the exact bf16 spill; positions >= seq_len are written as zeros.
#include "sq_device.cuh"

namespace sq {
namespace {

constexpr int kTokens = 8;
constexpr int kThreads = 256;

__device__ void dequantise_component(const GatherArgs& a, const Component& comp, float* out, int which, int b, int h,
                                     int p0, int seq_len, const int64_t* entry, int64_t first_entry, float* rot,
                                     float* partial) {
  const int D = a.head_dim;
  const int tid = threadIdx.x;
  const Cache& c = a.cache;
  const int4* meta = comp.meta + static_cast<int64_t>(h) * (D / kGroup);
  const float* lut = comp.lut32 + static_cast<int64_t>(h) * comp.lut_n;
  const float* scale = comp.scale + static_cast<int64_t>(h) * D;

  for (int i = tid; i < kTokens * D; i += kThreads) {
    const int t = i / D, e = i % D;
    float v = 0.f;
    if (entry[t] >= 0) {
      const uint8_t* row = c.data + entry[t];
      const int4 m = meta[e / kGroup];
      const int bit = 8 * m.x + (e % kGroup) * m.z;
      const int sh = bit & 7;
      uint32_t raw = row[bit >> 3];
      if (sh + m.z > 8) raw |= static_cast<uint32_t>(row[(bit >> 3) + 1]) << 8;
      const float level = lut[m.y + ((raw >> sh) & static_cast<uint32_t>(m.w))];
      const float s = comp.mode >= 1 ? fp16_at(row + comp.field_offset) : 1.f;
      const float z = comp.mode == 2 ? fp16_at(row + comp.field_offset + 2) : 0.f;
      v = scale[e] * (s * level + z);
    }
    rot[i] = v;
  }
  __syncthreads();

  const int parts = kThreads / D > 0 ? kThreads / D : 1;
  const float* basis_t = comp.basis_t + static_cast<int64_t>(h) * D * D;
  for (int col = tid; col < parts * D; col += kThreads) {
    const int j = col % D, part = col / D;
    const int e0 = part * D / parts, e1 = (part + 1) * D / parts;
    float acc[kTokens];
#pragma unroll
    for (int t = 0; t < kTokens; ++t) acc[t] = 0.f;
    for (int e = e0; e < e1; ++e) {
      const float u = __ldg(basis_t + static_cast<int64_t>(e) * D + j);
#pragma unroll
      for (int t = 0; t < kTokens; ++t) acc[t] = fmaf(rot[t * D + e], u, acc[t]);
    }
#pragma unroll
    for (int t = 0; t < kTokens; ++t) partial[(part * kTokens + t) * D + j] = acc[t];
  }
  __syncthreads();

  const float* mean = comp.mean + static_cast<int64_t>(h) * D;
  const int n_sink = min(c.sink_tokens, seq_len);
  for (int i = tid; i < kTokens * D; i += kThreads) {
    const int t = i / D, j = i % D;
    const int pos = p0 + t;
    if (pos >= a.max_len) continue;
    float v = 0.f;
    if (pos < seq_len) {
      if (pos < n_sink) {
        const uint8_t* base = c.data + first_entry;
        const int byte = pos * 4 * D + which * 2 * D + 2 * j;
        const uint8_t pair[2] = {base[spill_offset(c, byte)], base[spill_offset(c, byte + 1)]};
        v = bf16_at(pair);
      } else {
        for (int p = 0; p < parts; ++p) v += partial[(p * kTokens + t) * D + j];
        v += mean[j];
      }
    }
    out[static_cast<int64_t>(b) * a.s_ob + static_cast<int64_t>(pos) * a.s_ol + static_cast<int64_t>(h) * a.s_oh + j] = v;
  }
  __syncthreads();
}

__global__ void __launch_bounds__(kThreads) gather_kernel(const GatherArgs a) {
  extern __shared__ __align__(16) float smem[];
  __shared__ int64_t entry[kTokens];
  __shared__ int64_t first_entry;
  const int D = a.head_dim;
  float* rot = smem;                  // [kTokens, D]
  float* partial = rot + kTokens * D;  // [parts, kTokens, D]
  const int h = blockIdx.y, b = blockIdx.z;
  const int p0 = blockIdx.x * kTokens;
  const int seq_len = a.seq_lens[b];
  const Cache& c = a.cache;
  const int* table = a.block_table + static_cast<int64_t>(b) * a.s_bt;
  if (threadIdx.x < kTokens) {
    const int pos = p0 + threadIdx.x;
    entry[threadIdx.x] = pos < seq_len ? static_cast<int64_t>(table[pos / c.block_size]) * c.s_blk +
                                             static_cast<int64_t>(h) * c.s_head +
                                             static_cast<int64_t>(pos % c.block_size) * c.s_tok
                                       : -1;
  }
  if (threadIdx.x == 0) first_entry = seq_len > 0 ? static_cast<int64_t>(table[0]) * c.s_blk + static_cast<int64_t>(h) * c.s_head : 0;
  __syncthreads();
  dequantise_component(a, a.k, a.k_out, 0, b, h, p0, seq_len, entry, first_entry, rot, partial);
  dequantise_component(a, a.v, a.v_out, 1, b, h, p0, seq_len, entry, first_entry, rot, partial);
}

}  // namespace

cudaError_t launch_gather(const GatherArgs& a, cudaStream_t stream) {
  if (a.batch == 0 || a.max_len == 0) return cudaSuccess;
  const int D = a.head_dim;
  const int parts = kThreads / D > 0 ? kThreads / D : 1;
  const size_t smem = sizeof(float) * kTokens * D * (1 + parts);
  const dim3 grid((a.max_len + kTokens - 1) / kTokens, a.cache.num_kv_heads, a.batch);
  gather_kernel<<<grid, kThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace sq
