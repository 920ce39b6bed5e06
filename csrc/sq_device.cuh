// Device helpers shared by the store, decode and gather kernels.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "sq_launch.h"

namespace sq {

__device__ __forceinline__ float load_float(const void* p, int64_t i, DType t) {
  switch (t) {
    case DType::kFloat16:
      return __half2float(static_cast<const __half*>(p)[i]);
    case DType::kBFloat16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default:
      return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void store_float(void* p, int64_t i, DType t, float v) {
  switch (t) {
    case DType::kFloat16:
      static_cast<__half*>(p)[i] = __float2half_rn(v);
      break;
    case DType::kBFloat16:
      static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
      break;
    default:
      static_cast<float*>(p)[i] = v;
  }
}

// Little-endian fp16 / bf16 at any byte address (entries can be odd-aligned).
__device__ __forceinline__ float fp16_at(const uint8_t* p) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(p[0] | (p[1] << 8))));
}
__device__ __forceinline__ float bf16_at(const uint8_t* p) {
  return __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(p[0] | (p[1] << 8))));
}

// The fp16 value a float becomes when stored as a token field (clamped to the finite range).
__device__ __forceinline__ float fp16_round(float x) {
  return __half2float(__float2half_rn(fminf(fmaxf(x, -65504.f), 65504.f)));
}

// fp16 bit pattern of a float that fp16 represents exactly (zero, subnormal or normal), integer-only.
// Why not __half_as_ushort(__float2half_rn(x)): on sm_90a with CUDA 13.0 the cvt.rn.f16.f32 result stored
// byte-wise (st.global.u8) came out of the GPU as the float converted to an integer (35.97 -> 35) in the
// low byte, while the same PTX pattern for bf16 was right (bench/gpu_kernels_check.py, 2026-11-28).
__device__ __forceinline__ uint32_t fp16_bits_exact(float x) {
  const uint32_t u = __float_as_uint(x);
  const uint32_t sign = (u >> 16) & 0x8000u;
  if ((u & 0x7FFFFFFFu) == 0) return sign;
  const int exp = static_cast<int>((u >> 23) & 0xFFu) - 127;
  const uint32_t mant = u & 0x7FFFFFu;
  if (exp >= -14) return sign | (static_cast<uint32_t>(exp + 15) << 10) | (mant >> 13);
  return sign | ((mant | 0x800000u) >> (-exp - 1));  // subnormal: m * 2^-24
}

// Store x as a little-endian fp16 token field (rounded to nearest even, clamped to the finite range).
__device__ __forceinline__ void put_fp16(uint8_t* p, float x) {
  const uint32_t b = fp16_bits_exact(fp16_round(x));
  p[0] = static_cast<uint8_t>(b & 0xFFu);
  p[1] = static_cast<uint8_t>((b >> 8) & 0xFFu);
}

// Byte i of the sink spill of the (block, head) whose offset-0 entry is `entry`.
__device__ __forceinline__ int64_t spill_offset(const Cache& c, int i) {
  return static_cast<int64_t>(i / c.sink_bytes) * c.s_tok + c.slot_bytes + i % c.sink_bytes;
}

// acc[r] += sum over i in [i0, i1), ascending, of in[r * D + i] * m[i * D + j], for r < rows (<= kRows).
// `m` is a D x D fp32 matrix in global memory read down column j; its loads are issued 16 at a time
// before their FMAs, so a thread has 16 in flight (these loops are latency-bound at small batches).
template <int kRows>
__device__ __forceinline__ void column_dots(const float* in, const float* __restrict__ m, int D, int j, int i0, int i1,
                                            int rows, float (&acc)[kRows]) {
  constexpr int kInFlight = 16;
  for (int i = i0; i < i1; i += kInFlight) {
    float u[kInFlight];
#pragma unroll
    for (int k = 0; k < kInFlight; ++k) u[k] = i + k < i1 ? __ldg(m + static_cast<int64_t>(i + k) * D + j) : 0.f;
#pragma unroll
    for (int k = 0; k < kInFlight; ++k) {
      if (i + k >= i1) break;
#pragma unroll
      for (int r = 0; r < kRows; ++r)
        if (r < rows) acc[r] = fmaf(in[r * D + i + k], u[k], acc[r]);
    }
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_min(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Nearest codebook level (index) of u among `levels` (ascending, 2^bits used): the number of
// midpoints 0.5 * (l[i] + l[i+1]) that are <= u, as torch.searchsorted(right=True) counts them.
__device__ __forceinline__ int nearest_level(float u, const float* levels, int last) {
  int idx = 0;
#pragma unroll
  for (int step = 128; step > 0; step >>= 1) {
    const int cand = idx + step;
    if (cand <= last && 0.5f * (levels[cand] + levels[cand - 1]) <= u) idx = cand;
  }
  return idx;
}

}  // namespace sq
