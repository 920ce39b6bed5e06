// torch custom ops `torch.ops.spectralquant.*` over the CUDA kernels (sq_store.cu, sq_decode.cu, sq_gather.cu).
//
// Called from vllm_spectralquant/ops/cuda_ext.py, which passes the KernelCodec tensors as
//   params = [meta int32 [H,G,4], lut32 f32 [H,N], lut16 f16 [H,N], basis, basis_t f32 [H,D,D], mean, scale f32 [H,D]
//             (the store divides by encoding's scale; decode and gather multiply by decoding's, with the key gain),
//             pair_meta int32 [H,G,4], pairs int32 [H,PN]]
// and the geometry and token-field layout as named integers (block_size, slot_bytes, sink_bytes,
// sink_tokens, k_mode, k_field, v_mode, v_field; decode also num_splits, padded_dim, padded_group,
// load_mode, pitch). Kernel limits come from sq_limits.h, generated from format/kernel_limits.py.
// All ops run on the current stream, write in place, allocate nothing and never synchronise.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "sq_launch.h"

namespace {

using at::Tensor;

sq::DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return sq::DType::kFloat32;
    case at::kHalf:
      return sq::DType::kFloat16;
    case at::kBFloat16:
      return sq::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "spectralquant: unsupported dtype ", t.scalar_type(), " (float32, float16, bfloat16)");
  }
}

void check_cuda(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "spectralquant: ", name, " must be a CUDA tensor");
}

sq::Component component(at::TensorList p, int64_t mode, int64_t field) {
  TORCH_CHECK(p.size() == 9, "spectralquant: a component takes 9 parameter tensors, got ", p.size());
  TORCH_CHECK(p[0].scalar_type() == at::kInt && p[7].scalar_type() == at::kInt && p[8].scalar_type() == at::kInt,
              "spectralquant: meta, pair_meta and pairs must be int32");
  for (size_t i = 0; i < p.size(); ++i) {
    check_cuda(p[i], "codec parameter");
    TORCH_CHECK(p[i].is_contiguous(), "spectralquant: codec parameters must be contiguous");
  }
  sq::Component c;
  c.meta = reinterpret_cast<const int4*>(p[0].data_ptr<int32_t>());
  c.lut32 = p[1].data_ptr<float>();
  c.lut16 = reinterpret_cast<const __half*>(p[2].data_ptr<at::Half>());
  c.lut_n = static_cast<int>(p[1].size(1));
  c.basis = p[3].data_ptr<float>();
  c.basis_t = p[4].data_ptr<float>();
  c.mean = p[5].data_ptr<float>();
  c.scale = p[6].data_ptr<float>();
  c.pair_meta = reinterpret_cast<const int4*>(p[7].data_ptr<int32_t>());
  c.pairs = reinterpret_cast<const uint32_t*>(p[8].data_ptr<int32_t>());
  c.pair_n = static_cast<int>(p[8].size(1));
  c.mode = static_cast<int>(mode);
  c.field_offset = static_cast<int>(field);
  return c;
}

// The geometry arguments every op takes (named in the schemas below).
struct Geometry {
  int64_t block_size, slot_bytes, sink_bytes, sink_tokens, k_mode, k_field, v_mode, v_field;
};

sq::Cache cache_of(const Tensor& kv_cache, const Geometry& info) {
  check_cuda(kv_cache, "kv_cache");
  TORCH_CHECK(kv_cache.scalar_type() == at::kByte && kv_cache.dim() == 4 && kv_cache.stride(3) == 1,
              "spectralquant: kv_cache must be uint8 [num_blocks, H, block_size, C] with unit byte stride");
  sq::Cache c;
  c.data = kv_cache.data_ptr<uint8_t>();
  c.s_blk = kv_cache.stride(0);
  c.s_head = kv_cache.stride(1);
  c.s_tok = kv_cache.stride(2);
  c.num_kv_heads = static_cast<int>(kv_cache.size(1));
  c.block_size = static_cast<int>(info.block_size);
  c.slot_bytes = static_cast<int>(info.slot_bytes);
  c.sink_bytes = static_cast<int>(info.sink_bytes);
  c.sink_tokens = static_cast<int>(info.sink_tokens);
  TORCH_CHECK(kv_cache.size(2) == c.block_size && kv_cache.size(3) == c.slot_bytes + c.sink_bytes,
              "spectralquant: kv_cache shape does not match the geometry");
  return c;
}

void check_launch(cudaError_t e, const char* what) {
  TORCH_CHECK(e == cudaSuccess, "spectralquant ", what, " launch failed: ", cudaGetErrorString(e));
}

void store_kv(const Tensor& key, const Tensor& value, Tensor& kv_cache, const Tensor& slot_mapping,
              const Tensor& pad_start, at::TensorList k_params, at::TensorList v_params, int64_t block_size,
              int64_t slot_bytes, int64_t sink_bytes, int64_t sink_tokens, int64_t k_mode, int64_t k_field,
              int64_t v_mode, int64_t v_field) {
  const Geometry info{block_size, slot_bytes, sink_bytes, sink_tokens, k_mode, k_field, v_mode, v_field};
  const c10::cuda::CUDAGuard guard(kv_cache.device());
  check_cuda(key, "key");
  check_cuda(value, "value");
  check_cuda(slot_mapping, "slot_mapping");
  TORCH_CHECK(key.dim() == 3 && value.dim() == 3 && key.stride(2) == 1 && value.stride(2) == 1,
              "spectralquant.store_kv: key/value must be [T, H, D] with unit stride over D");
  TORCH_CHECK(key.scalar_type() == value.scalar_type(), "spectralquant.store_kv: key and value dtypes differ");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous(),
              "spectralquant.store_kv: slot_mapping must be contiguous int64");
  TORCH_CHECK(key.size(0) >= slot_mapping.size(0) && value.size(0) >= slot_mapping.size(0),
              "spectralquant.store_kv: fewer key/value rows than slots");
  sq::StoreArgs a;
  a.key = key.data_ptr();
  a.value = value.data_ptr();
  a.s_kt = key.stride(0);
  a.s_kh = key.stride(1);
  a.s_vt = value.stride(0);
  a.s_vh = value.stride(1);
  a.dtype = dtype_of(key);
  a.slot_mapping = slot_mapping.data_ptr<int64_t>();
  a.num_tokens = static_cast<int>(slot_mapping.size(0));
  a.head_dim = static_cast<int>(key.size(2));
  a.pad_start = pad_start.data_ptr<int32_t>();
  a.cache = cache_of(kv_cache, info);
  a.k = component(k_params, info.k_mode, info.k_field);
  a.v = component(v_params, info.v_mode, info.v_field);
  check_launch(sq::launch_store(a, c10::cuda::getCurrentCUDAStream()), "store_kv");
}

void decode_attention(const Tensor& query, const Tensor& kv_cache, const Tensor& block_table, const Tensor& seq_lens,
                      at::TensorList k_params, at::TensorList v_params, Tensor& w16, Tensor& wpar, Tensor& part_o,
                      Tensor& part_ml, Tensor& out, double softmax_scale, int64_t block_size, int64_t slot_bytes,
                      int64_t sink_bytes, int64_t sink_tokens, int64_t k_mode, int64_t k_field, int64_t v_mode,
                      int64_t v_field, int64_t num_splits, int64_t padded_dim, int64_t padded_group, int64_t load_mode,
                      int64_t pitch) {
  const Geometry info{block_size, slot_bytes, sink_bytes, sink_tokens, k_mode, k_field, v_mode, v_field};
  const c10::cuda::CUDAGuard guard(kv_cache.device());
  for (const Tensor& t : {query, block_table, seq_lens, w16, wpar, part_o, part_ml, out}) check_cuda(t, "argument");
  TORCH_CHECK(query.stride(2) == 1 && out.stride(2) == 1, "spectralquant.decode_attention: unit stride over D");
  TORCH_CHECK(block_table.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt && block_table.stride(1) == 1 &&
                  seq_lens.is_contiguous(),
              "spectralquant.decode_attention: block_table and seq_lens must be int32 (unit inner stride)");
  TORCH_CHECK(w16.scalar_type() == at::kHalf && wpar.scalar_type() == at::kFloat && part_o.scalar_type() == at::kFloat &&
                  part_ml.scalar_type() == at::kFloat && w16.is_contiguous() && wpar.is_contiguous() &&
                  part_o.is_contiguous() && part_ml.is_contiguous(),
              "spectralquant.decode_attention: bad workspace views");
  sq::DecodeArgs a;
  a.query = query.data_ptr();
  a.s_qb = query.stride(0);
  a.s_qh = query.stride(1);
  a.q_dtype = dtype_of(query);
  a.out = out.data_ptr();
  a.s_ob = out.stride(0);
  a.s_oh = out.stride(1);
  a.out_dtype = dtype_of(out);
  a.cache = cache_of(kv_cache, info);
  a.block_table = block_table.data_ptr<int32_t>();
  a.s_bt = block_table.stride(0);
  a.seq_lens = seq_lens.data_ptr<int32_t>();
  a.k = component(k_params, info.k_mode, info.k_field);
  a.v = component(v_params, info.v_mode, info.v_field);
  a.batch = static_cast<int>(seq_lens.size(0));
  a.num_q_heads = static_cast<int>(query.size(1));
  a.head_dim = static_cast<int>(query.size(2));
  a.num_splits = static_cast<int>(num_splits);
  a.padded_dim = static_cast<int>(padded_dim);
  a.padded_group = static_cast<int>(padded_group);
  a.load_mode = static_cast<int>(load_mode);
  a.pitch = static_cast<int>(pitch);
  a.qk_scale = static_cast<float>(softmax_scale * 1.4426950408889634);
  a.w16 = reinterpret_cast<__half*>(w16.data_ptr<at::Half>());
  a.wpar = wpar.data_ptr<float>();
  a.part_o = part_o.data_ptr<float>();
  a.part_ml = part_ml.data_ptr<float>();
  TORCH_CHECK(query.size(0) >= a.batch && out.size(0) >= a.batch && block_table.size(0) >= a.batch,
              "spectralquant.decode_attention: query/out/block_table have fewer rows than seq_lens");
  TORCH_CHECK(a.num_q_heads % a.cache.num_kv_heads == 0, "spectralquant.decode_attention: Hq % H != 0");
  TORCH_CHECK(sq::decode_supports(a.head_dim, a.num_q_heads / a.cache.num_kv_heads, a.cache.sink_tokens),
              "spectralquant.decode_attention: shape not supported by the CUDA kernel");
  check_launch(sq::launch_decode(a, c10::cuda::getCurrentCUDAStream()), "decode_attention");
}

void gather_context(const Tensor& kv_cache, const Tensor& block_table, const Tensor& seq_lens, at::TensorList k_params,
                    at::TensorList v_params, Tensor& k_out, Tensor& v_out, int64_t block_size, int64_t slot_bytes,
                    int64_t sink_bytes, int64_t sink_tokens, int64_t k_mode, int64_t k_field, int64_t v_mode,
                    int64_t v_field) {
  const Geometry info{block_size, slot_bytes, sink_bytes, sink_tokens, k_mode, k_field, v_mode, v_field};
  const c10::cuda::CUDAGuard guard(kv_cache.device());
  TORCH_CHECK(block_table.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt && block_table.stride(1) == 1 &&
                  seq_lens.is_contiguous(),
              "spectralquant.gather_context: block_table and seq_lens must be int32");
  TORCH_CHECK(k_out.scalar_type() == at::kFloat && v_out.scalar_type() == at::kFloat && k_out.is_contiguous() &&
                  v_out.is_contiguous() && k_out.sizes() == v_out.sizes(),
              "spectralquant.gather_context: outputs must be contiguous float32 [B, L, H, D]");
  sq::GatherArgs a;
  a.cache = cache_of(kv_cache, info);
  a.block_table = block_table.data_ptr<int32_t>();
  a.s_bt = block_table.stride(0);
  a.seq_lens = seq_lens.data_ptr<int32_t>();
  a.k = component(k_params, info.k_mode, info.k_field);
  a.v = component(v_params, info.v_mode, info.v_field);
  a.k_out = k_out.data_ptr<float>();
  a.v_out = v_out.data_ptr<float>();
  a.s_ob = k_out.stride(0);
  a.s_ol = k_out.stride(1);
  a.s_oh = k_out.stride(2);
  a.batch = static_cast<int>(k_out.size(0));
  a.max_len = static_cast<int>(k_out.size(1));
  a.head_dim = static_cast<int>(k_out.size(3));
  check_launch(sq::launch_gather(a, c10::cuda::getCurrentCUDAStream()), "gather_context");
}

bool decode_supports(int64_t head_dim, int64_t group, int64_t sink_tokens) {
  return sq::decode_supports(static_cast<int>(head_dim), static_cast<int>(group), static_cast<int>(sink_tokens));
}

}  // namespace

#define SQ_GEOMETRY_ARGS \
  "int block_size, int slot_bytes, int sink_bytes, int sink_tokens, int k_mode, int k_field, int v_mode, int v_field"

TORCH_LIBRARY(spectralquant, m) {
  m.def(
      "store_kv(Tensor key, Tensor value, Tensor(a!) kv_cache, Tensor slot_mapping, Tensor pad_start, "
      "Tensor[] k_params, Tensor[] v_params, " SQ_GEOMETRY_ARGS ") -> ()");
  m.def(
      "decode_attention(Tensor query, Tensor kv_cache, Tensor block_table, Tensor seq_lens, Tensor[] k_params, "
      "Tensor[] v_params, Tensor(a!) w16, Tensor(b!) wpar, Tensor(c!) part_o, Tensor(d!) part_ml, Tensor(e!) out, "
      "float softmax_scale, " SQ_GEOMETRY_ARGS ", int num_splits, int padded_dim, int padded_group, int load_mode, "
      "int pitch) -> ()");
  m.def(
      "gather_context(Tensor kv_cache, Tensor block_table, Tensor seq_lens, Tensor[] k_params, Tensor[] v_params, "
      "Tensor(a!) k_out, Tensor(b!) v_out, " SQ_GEOMETRY_ARGS ") -> ()");
  // What the decode kernel is built for (Python asks instead of restating it).
  m.def("decode_supports(int head_dim, int group, int sink_tokens) -> bool", &decode_supports);
}

TORCH_LIBRARY_IMPL(spectralquant, CUDA, m) {
  m.impl("store_kv", &store_kv);
  m.impl("decode_attention", &decode_attention);
  m.impl("gather_context", &gather_context);
}
