// Torch bindings (CPU and Meta) of the quantization and exact-search core:
//   quantize_scalar, hamming_topk, int8_topk, score_rows. pack_bits lives in library.cpp.
// The Python layer (llmembed_fast.quant) validates arguments first; the checks here keep direct
// torch.ops calls from crashing; the Meta kernels run the same checks (FakeTensor / torch.compile get the CPU
// kernels' shapes and errors).
#include "common.h"

#include "../core/hamming.h"
#include "../core/int8_search.h"
#include "../core/quantize.h"

namespace lf_torch {
namespace {

lf::ComputeKind compute_kind(const at::Tensor& starts) {
  switch (starts.scalar_type()) {
    case at::kHalf: return lf::ComputeKind::F16;
    case at::kFloat: return lf::ComputeKind::F32;
    case at::kDouble: return lf::ComputeKind::F64;
    default:
      TORCH_CHECK_TYPE(false, "quantize_scalar: starts/steps must be float16, float32 or float64, got ",
                       starts.scalar_type());
  }
  return lf::ComputeKind::F32;
}

void check_quantize(const at::Tensor& x, const at::Tensor& starts, const at::Tensor& steps) {
  TORCH_CHECK_VALUE(x.dim() == 2, "quantize_scalar: x must be 2-D [N, D], got ", x.dim(), "-D");
  TORCH_CHECK_VALUE(starts.dim() == 1 && steps.dim() == 1 && starts.size(0) == x.size(1) &&
                        steps.size(0) == x.size(1),
                    "quantize_scalar: starts and steps must be 1-D of length D = ", x.size(1));
  TORCH_CHECK_TYPE(starts.scalar_type() == steps.scalar_type(), "quantize_scalar: starts and steps dtypes differ");
}

// Shape, dtype and device checks of quantize_scalar (the CPU and Meta kernels alike): (x kind, compute kind).
std::pair<lf::FloatKind, lf::ComputeKind> check_quantize_all(const at::Tensor& x, const at::Tensor& starts,
                                                            const at::Tensor& steps, c10::DeviceType type) {
  check_device("quantize_scalar", type, {&x, &starts, &steps});
  check_quantize(x, starts, steps);
  const auto xkind = float_kind(x, "quantize_scalar: x");
  const auto ck = compute_kind(starts);
  TORCH_CHECK_VALUE(!(xkind == lf::FloatKind::F64 && ck != lf::ComputeKind::F64),
                    "quantize_scalar: float64 x needs float64 starts/steps");
  TORCH_CHECK_VALUE(!(ck == lf::ComputeKind::F16 && xkind != lf::FloatKind::F16),
                    "quantize_scalar: float16 arithmetic needs float16 x");
  return {xkind, ck};
}

at::Tensor quantize_scalar_cpu(const at::Tensor& x, const at::Tensor& starts, const at::Tensor& steps,
                               bool signed_out) {
  const auto [xkind, ck] = check_quantize_all(x, starts, steps, c10::DeviceType::CPU);
  at::Tensor xc = (x.size(1) <= 1 || x.stride(1) == 1) ? x : x.contiguous();
  // The core reads half-precision parameters as float (exactly representable).
  const auto pdt = ck == lf::ComputeKind::F64 ? at::kDouble : at::kFloat;
  at::Tensor s = starts.to(pdt).contiguous(), t = steps.to(pdt).contiguous();
  at::Tensor out = at::empty({x.size(0), x.size(1)}, x.options().dtype(signed_out ? at::kChar : at::kByte));
  if (x.numel() == 0) return out;
  lf::quantize_scalar(xc.data_ptr(), xkind, xc.size(0), xc.size(1), xc.stride(0), s.data_ptr(), t.data_ptr(), ck,
                      signed_out, static_cast<uint8_t*>(out.data_ptr()), num_threads());
  return out;
}

at::Tensor quantize_scalar_meta(const at::Tensor& x, const at::Tensor& starts, const at::Tensor& steps,
                                bool signed_out) {
  check_quantize_all(x, starts, steps, c10::DeviceType::Meta);
  return at::empty({x.size(0), x.size(1)}, x.options().dtype(signed_out ? at::kChar : at::kByte));
}

void check_codes(const at::Tensor& t, const char* what) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kByte || t.scalar_type() == at::kChar, what,
                   " must be uint8 or int8 codes, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 2, what, " must be 2-D, got ", t.dim(), "-D");
}

void check_search(const at::Tensor& q, const at::Tensor& docs, int64_t k, const char* op) {
  TORCH_CHECK_VALUE(q.size(1) == docs.size(1), op, ": queries have ", q.size(1), " columns, docs ", docs.size(1));
  TORCH_CHECK_VALUE(k >= 1 && k <= docs.size(0), op, ": k must be in [1, ", docs.size(0), "], got ", k);
}

void check_hamming(const at::Tensor& queries, const at::Tensor& docs, int64_t k, c10::DeviceType type) {
  check_device("hamming_topk", type, {&queries, &docs});
  check_codes(queries, "hamming_topk: queries");
  check_codes(docs, "hamming_topk: docs");
  // binary (int8) codes are ubinary ^ 0x80: a mix would flip every byte's top bit on one side
  TORCH_CHECK_TYPE(queries.scalar_type() == docs.scalar_type(), "hamming_topk: queries (", queries.scalar_type(),
                   ") and docs (", docs.scalar_type(), ") must be the same code type (both uint8 or both int8)");
  check_search(queries, docs, k, "hamming_topk");
}

std::tuple<at::Tensor, at::Tensor> hamming_topk_cpu(const at::Tensor& queries, const at::Tensor& docs, int64_t k) {
  check_hamming(queries, docs, k, c10::DeviceType::CPU);
  at::Tensor q = queries.contiguous(), d = docs.contiguous();
  at::Tensor dist = at::empty({q.size(0), k}, q.options().dtype(at::kInt));
  at::Tensor idx = at::empty({q.size(0), k}, q.options().dtype(at::kLong));
  if (q.size(0) == 0) return {dist, idx};
  const uint8_t* qp = static_cast<const uint8_t*>(q.data_ptr());
  const uint8_t* dp = static_cast<const uint8_t*>(d.data_ptr());
  lf::hamming_topk(qp, q.size(0), dp, d.size(0), d.size(1), k, dist.data_ptr<int32_t>(), idx.data_ptr<int64_t>(),
                   num_threads());
  return {dist, idx};
}

std::tuple<at::Tensor, at::Tensor> hamming_topk_meta(const at::Tensor& queries, const at::Tensor& docs, int64_t k) {
  check_hamming(queries, docs, k, c10::DeviceType::Meta);
  return {at::empty({queries.size(0), k}, queries.options().dtype(at::kInt)),
          at::empty({queries.size(0), k}, queries.options().dtype(at::kLong))};
}

void check_int8_topk(const at::Tensor& weights, const at::Tensor& codes, int64_t k, c10::DeviceType type) {
  check_device("int8_topk", type, {&weights, &codes});
  TORCH_CHECK_TYPE(weights.scalar_type() == at::kDouble, "int8_topk: weights must be float64, got ",
                   weights.scalar_type());
  TORCH_CHECK_VALUE(weights.dim() == 2, "int8_topk: weights must be 2-D [Q, D]");
  check_codes(codes, "int8_topk: codes");
  check_search(weights, codes, k, "int8_topk");
  TORCH_CHECK_VALUE(codes.size(1) <= 65536, "int8_topk: D must be <= 65536, got ", codes.size(1));
}

std::tuple<at::Tensor, at::Tensor> int8_topk_cpu(const at::Tensor& weights, const at::Tensor& codes, int64_t k) {
  check_int8_topk(weights, codes, k, c10::DeviceType::CPU);
  at::Tensor w = weights.contiguous(), c = codes.contiguous();
  // Every score must be a finite float64: sum |w| * 255 bounds it. A NaN weight makes every bound NaN, and an
  // inf score of either sign turns into NaN in the bounds: rows would be ranked at random. One pass and one
  // sync; the finiteness of the weights themselves is looked at only to word the error.
  if (w.numel() > 0 && !std::isfinite(w.abs().sum(1).max().item<double>() * 255.0)) {
    TORCH_CHECK_VALUE(at::isfinite(w).all().item<bool>(), "int8_topk: weights must be finite (no NaN or inf)");
    TORCH_CHECK_VALUE(false, "int8_topk: weights too large: the scores would overflow float64 (scale the queries ",
                      "down)");
  }
  at::Tensor scores = at::empty({w.size(0), k}, w.options());
  at::Tensor idx = at::empty({w.size(0), k}, w.options().dtype(at::kLong));
  if (w.size(0) == 0) return {scores, idx};
  lf::int8_topk(w.data_ptr<double>(), w.size(0), static_cast<const uint8_t*>(c.data_ptr()), c.size(0), c.size(1),
                c.scalar_type() == at::kChar, k, scores.data_ptr<double>(), idx.data_ptr<int64_t>(), num_threads());
  return {scores, idx};
}

void check_score_rows(const at::Tensor& weights, const at::Tensor& vecs, const at::Tensor& rows,
                      c10::DeviceType type) {
  check_device("score_rows", type, {&weights, &vecs, &rows});
  TORCH_CHECK_TYPE(weights.scalar_type() == at::kDouble, "score_rows: weights must be float64, got ",
                   weights.scalar_type());
  TORCH_CHECK_TYPE(vecs.scalar_type() == at::kByte || vecs.scalar_type() == at::kChar ||
                       vecs.scalar_type() == at::kFloat,
                   "score_rows: vecs must be uint8/int8 codes or float32, got ", vecs.scalar_type());
  TORCH_CHECK_TYPE(rows.scalar_type() == at::kLong, "score_rows: rows must be int64, got ", rows.scalar_type());
  TORCH_CHECK_VALUE(weights.dim() == 2 && vecs.dim() == 2 && rows.dim() == 2,
                    "score_rows: weights [Q, D], vecs [N, D] and rows [Q, C] must be 2-D");
  TORCH_CHECK_VALUE(weights.size(1) == vecs.size(1) && rows.size(0) == weights.size(0),
                    "score_rows: weights [Q, D], vecs [N, D] and rows [Q, C] disagree");
}

// Exact float64 scores of the given rows of vecs (int8/uint8 codes as int8_topk reads them, or float32).
at::Tensor score_rows_cpu(const at::Tensor& weights, const at::Tensor& vecs, const at::Tensor& rows) {
  check_score_rows(weights, vecs, rows, c10::DeviceType::CPU);
  at::Tensor w = weights.contiguous(), v = vecs.contiguous(), r = rows.contiguous();
  at::Tensor out = at::empty({r.size(0), r.size(1)}, w.options());
  if (r.numel() == 0) return out;
  TORCH_CHECK_INDEX(r.min().item<int64_t>() >= 0 && r.max().item<int64_t>() < v.size(0),
                    "score_rows: rows must lie in [0, ", v.size(0), ")");
  if (v.scalar_type() == at::kFloat)
    lf::float_score_rows(w.data_ptr<double>(), w.size(0), w.size(1), v.data_ptr<float>(), r.data_ptr<int64_t>(),
                         r.size(1), out.data_ptr<double>(), num_threads());
  else
    lf::int8_score_rows(w.data_ptr<double>(), w.size(0), w.size(1), static_cast<const uint8_t*>(v.data_ptr()),
                        v.scalar_type() == at::kChar, r.data_ptr<int64_t>(), r.size(1), out.data_ptr<double>(),
                        num_threads());
  return out;
}

at::Tensor score_rows_meta(const at::Tensor& weights, const at::Tensor& vecs, const at::Tensor& rows) {
  check_score_rows(weights, vecs, rows, c10::DeviceType::Meta);
  return at::empty({rows.size(0), rows.size(1)}, weights.options());
}

std::tuple<at::Tensor, at::Tensor> int8_topk_meta(const at::Tensor& weights, const at::Tensor& codes, int64_t k) {
  check_int8_topk(weights, codes, k, c10::DeviceType::Meta);
  return {at::empty({weights.size(0), k}, weights.options()),
          at::empty({weights.size(0), k}, weights.options().dtype(at::kLong))};
}

}  // namespace
}  // namespace lf_torch

TORCH_LIBRARY_FRAGMENT(llmembed_fast, m) {
  m.def("quantize_scalar(Tensor x, Tensor starts, Tensor steps, bool signed) -> Tensor");
  m.def("hamming_topk(Tensor queries, Tensor docs, int k) -> (Tensor, Tensor)");
  m.def("int8_topk(Tensor weights, Tensor codes, int k) -> (Tensor, Tensor)");
  m.def("score_rows(Tensor weights, Tensor vecs, Tensor rows) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmembed_fast, CPU, m) {
  m.impl("quantize_scalar", &lf_torch::quantize_scalar_cpu);
  m.impl("hamming_topk", &lf_torch::hamming_topk_cpu);
  m.impl("int8_topk", &lf_torch::int8_topk_cpu);
  m.impl("score_rows", &lf_torch::score_rows_cpu);
}

TORCH_LIBRARY_IMPL(llmembed_fast, Meta, m) {
  m.impl("quantize_scalar", &lf_torch::quantize_scalar_meta);
  m.impl("hamming_topk", &lf_torch::hamming_topk_meta);
  m.impl("int8_topk", &lf_torch::int8_topk_meta);
  m.impl("score_rows", &lf_torch::score_rows_meta);
}
