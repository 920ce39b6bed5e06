// Launchers of the SpectralQuant packed-cache kernels: plain structs of device pointers, no torch
// headers (sq_ops.cpp converts tensors; the .cu files compile on their own with nvcc).
//
// Layouts follow docs/FORMAT.md and vllm_spectralquant/ops/kernel_codec.py (KernelComponent).
#pragma once

#include <cstdint>

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "sq_limits.h"

namespace sq {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// How the decode kernel stages a 16-token step of one KV head into shared memory.
enum LoadMode : int {
  kRegion16 = 0,  // the 16 entries are one contiguous, 16-byte aligned run (head-major cache): cp.async 16 B
  kRow4 = 1,      // each entry starts 4-byte aligned and C % 4 == 0: cp.async 4 B per word of the slot
  kBytes = 2,     // anything else (e.g. token-major with odd C): byte loads
};

// The paged cache: uint8, logical [num_blocks, H, block_size, C], byte strides.
struct Cache {
  uint8_t* data;
  int64_t s_blk, s_head, s_tok;
  int num_kv_heads;
  int block_size;
  int slot_bytes;   // S: packed slot of one head-token
  int sink_bytes;   // X: sink-spill bytes per entry (C = S + X)
  int sink_tokens;  // exact tokens at the start of a sequence (stored in the first block's spill)
};

// Keys or values of one layer (kernel_codec.KernelComponent), all on the device.
struct Component {
  const int4* meta;       // [H, G]: slot byte offset, LUT entry offset, bits, mask
  const float* lut32;     // [H, lut_n] levels (sigma units)
  const __half* lut16;    // [H, lut_n]
  int lut_n;
  const int4* pair_meta;  // [H, G]: slot byte offset, pair-table byte offset, 2 * bits, pair mask << 2
  const uint32_t* pairs;  // [H, pair_n] half2 pair tables of the groups of <= 4 bits
  int pair_n;
  const float* basis;     // [H, D, D] U
  const float* basis_t;   // [H, D, D] U^T
  const float* mean;      // [H, D]
  const float* scale;     // [H, D]
  int mode;               // 0 none, 1 norm (s), 2 affine (s, z)
  int field_offset;       // slot byte of the first fp16 field
};

struct StoreArgs {
  const void* key;  // [T, H, D], head-dim stride 1
  const void* value;
  int64_t s_kt, s_kh, s_vt, s_vh;
  DType dtype;
  const int64_t* slot_mapping;  // [N]; block * block_size + offset, -1 = skip
  int num_tokens;               // N
  int head_dim;
  const int* pad_start;         // [H]: first zero-padding byte of the slot
  Cache cache;
  Component k, v;
};

struct DecodeArgs {
  const void* query;  // [>= B, Hq, D], head-dim stride 1
  int64_t s_qb, s_qh;
  DType q_dtype;
  void* out;          // [>= B, Hq, D], head-dim stride 1
  int64_t s_ob, s_oh;
  DType out_dtype;
  Cache cache;
  const int* block_table;  // [>= B, max_blocks]
  int64_t s_bt;
  const int* seq_lens;     // [B]
  Component k, v;
  int batch, num_q_heads, head_dim;
  int padded_dim;    // DP: row stride of w16 and part_o
  int padded_group;  // GP: query rows per (b, h, split) in part_o / part_ml
  int num_splits;
  float qk_scale;    // softmax_scale * log2(e)
  // Workspace (ops/workspace.py): w16 [B, Hq, DP], wpar [B, Hq, 4], part_o [B, H, NS, GP, DP], part_ml [.., 2]
  __half* w16;
  float* wpar;
  float* part_o;
  float* part_ml;
  int load_mode;  // LoadMode
  int pitch;      // shared-memory bytes per staged entry
};

struct GatherArgs {
  Cache cache;
  const int* block_table;
  int64_t s_bt;
  const int* seq_lens;
  Component k, v;
  float* k_out;  // [B, max_len, H, D] float32
  float* v_out;
  int64_t s_ob, s_ol, s_oh;
  int batch, max_len, head_dim;
};

// Each returns the launch error (cudaSuccess when the kernels were queued).
cudaError_t launch_store(const StoreArgs& args, cudaStream_t stream);
cudaError_t launch_decode(const DecodeArgs& args, cudaStream_t stream);
cudaError_t launch_gather(const GatherArgs& args, cudaStream_t stream);

// Shapes the CUDA decode kernel is instantiated for (others fall back to Triton); limits in sq_limits.h.
bool decode_supports(int head_dim, int group, int sink_tokens);

}  // namespace sq
