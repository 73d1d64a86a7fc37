/* The CPU kernels of cpu_matvec.c and cpu_attention.c as torch ops, registered with the dispatcher in C++
   (built into the same library by moekit/cpu_matvec.py, where a C++ compiler and torch's headers exist).

   Why: a decode step calls these ops ~50 times per token (every projection of a model with 8-bit
   activations, the experts, the paged attention of each layer). Through a Python kernel each call pays,
   before any work, the dispatcher entering Python, the checks and ctypes: about a tenth of a token on the
   medium model. Here the same call costs about a third of that.

   The ops are defined (schema, Meta kernel) in Python: moekit/cpu_matvec.py (qmatvec, f32matvec_cat, x8matvec) and
   moekit/attention/paged_cpu.py (paged_decode_attention), whose Python kernels (ctypes over the same C
   functions, registered under CompositeExplicitAutograd) stay the fallback where this file is not built:
   a kernel registered for CPU here takes precedence over them. Both check the same things before calling
   C, which trusts its sizes; tests/test_cpu_ops.py checks that they agree, bit for bit and in their errors.

   Legend: R rows of x, K reduction dim, N output rows, E weights of a stack, B blocks of 32 along K,
   G panels of 16 output rows (x8) or KV heads (attention), H query heads, S slots, Dh head dim. */

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <vector>

extern "C" {
int moekit_qmatvec(int fmt, const float *x, int64_t R, const uint8_t *q, const void *d, int64_t E, int64_t N,
                   int64_t B, const int64_t *index, float *y);
int moekit_f32matvec_cat(const float *x, int64_t R, const float *const *w, const int64_t *N, int64_t W, int64_t K,
                         float *y);
int moekit_x8_matvec(int fmt, const float *x, int64_t R, const uint8_t *panels, const float *pscale, int64_t E,
                     int64_t N, int64_t B, const int64_t *index, float *y);
int moekit_paged_decode_attention(const float *q, const float *pool_k, const float *pool_v, const int64_t *table,
                                  const uint8_t *valid, const float *sinks, int64_t B, int64_t H, int64_t G,
                                  int64_t S, int64_t N, int64_t Dh, float scale, float *out);
}

namespace {

constexpr int64_t QK = 32, PANEL = 16;

/* fmt code and bytes per block of 32 weights (cpu_matvec.py: METHODS, BLOCK_BYTES, PANEL_BYTES) */
struct Method {
    int fmt;
    int64_t block_bytes, panel_bytes;
};

Method method_of(const std::string &name) {
    if (name == "q8_0") return {0, 32, 512};
    if (name == "q4_0") return {1, 16, 256};
    if (name == "f32") return {2, 128, 0};
    if (name == "mxfp4") return {3, 16, 0};
    TORCH_CHECK_VALUE(false, "unknown method '", name, "' (q8_0, q4_0, mxfp4 or f32)");
}

void check_status(int status, const char *what, int64_t E) {
    TORCH_CHECK_INDEX(status != -2, what, ": an expert index is outside [0, ", E, ")");
    TORCH_CHECK(status == 0, what, ": out of memory");
}

/* t itself where it already has the type and is contiguous (the decode steps' case: no dispatcher call, no copy),
   else a contiguous copy of that type */
at::Tensor as_contiguous(const at::Tensor &t, at::ScalarType type) {
    return t.scalar_type() == type && t.is_contiguous() ? t : t.to(type).contiguous();
}

const int64_t *index_ptr(const std::optional<at::Tensor> &index, at::Tensor &keep) {
    if (!index.has_value()) return nullptr;
    keep = as_contiguous(*index, at::kLong);
    return keep.const_data_ptr<int64_t>();
}

at::Tensor qmatvec(c10::string_view method_name, const at::Tensor &x, const at::Tensor &qweight,
                   const std::optional<at::Tensor> &scale, const std::optional<at::Tensor> &index) {
    const std::string name(method_name);
    const Method m = method_of(name);
    TORCH_CHECK_VALUE(x.dim() == 2 && (qweight.dim() == 2 || qweight.dim() == 3), "qmatvec(", name,
                      "): x (R, K) and a weight (N, bytes) or (E, N, bytes)");
    const int64_t R = x.size(0), K = x.size(1), N = qweight.size(-2), B = K / QK;
    const int64_t E = qweight.dim() == 3 ? qweight.size(0) : 1;
    TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat && K % QK == 0 &&
                          qweight.size(-1) * qweight.element_size() == B * m.block_bytes,
                      "qmatvec(", name, "): x ", x.sizes(), " ", x.scalar_type(), " does not fit weight ",
                      qweight.sizes(), " ", qweight.scalar_type(), " (float32 x, K a multiple of 32)");
    const auto scale_type = m.fmt == 3 ? at::kByte : at::kFloat;  // mxfp4: its E8M0 exponent bytes
    TORCH_CHECK_VALUE(m.fmt == 2 || (scale.has_value() && scale->scalar_type() == scale_type &&
                                     scale->dim() >= 2 && scale->size(-2) == N && scale->size(-1) == B),
                      "qmatvec(", name, "): needs ", m.fmt == 3 ? "uint8 E8M0" : "float32", " scales (..., ", N,
                      ", ", B, ")");
    TORCH_CHECK_VALUE(index.has_value() == (qweight.dim() == 3) &&
                          (!index.has_value() || (index->dim() == 1 && index->size(0) == R)),
                      "qmatvec(", name, "): an index (R,) goes with a stack of weights (E, N, ...), none with one");
    const at::Tensor xc = x.contiguous(), wc = qweight.contiguous();
    const at::Tensor sc = m.fmt == 2 ? wc : scale->contiguous();  // f32: unread
    at::Tensor idx;
    const int64_t *index_R = index_ptr(index, idx);
    at::Tensor y = at::empty({R, N}, x.options());
    check_status(moekit_qmatvec(m.fmt, xc.const_data_ptr<float>(), R, static_cast<const uint8_t *>(wc.const_data_ptr()),
                                sc.const_data_ptr(), E, N, B, index_R,
                                y.mutable_data_ptr<float>()),
                 "qmatvec", E);
    return y;
}

at::Tensor f32matvec_cat(const at::Tensor &x, at::TensorList weights) {
    const bool fits = x.dim() == 2 && x.scalar_type() == at::kFloat && x.size(1) % QK == 0 && !weights.empty();
    TORCH_CHECK_VALUE(fits, "f32matvec_cat: x ", x.sizes(), " ", x.scalar_type(),
                      " must be float32 (R, K) with K a multiple of 32, and weights a non-empty list");
    const int64_t R = x.size(0), K = x.size(1), W = static_cast<int64_t>(weights.size());
    std::vector<at::Tensor> keep;
    std::vector<const float *> w_ptrs;
    std::vector<int64_t> N;
    int64_t N_all = 0;
    for (const at::Tensor &w : weights) {
        TORCH_CHECK_VALUE(w.dim() == 2 && w.scalar_type() == at::kFloat && w.size(1) == K, "f32matvec_cat: weight ",
                          w.sizes(), " ", w.scalar_type(), " does not fit x ", x.sizes(), " (float32 (N, K))");
        keep.push_back(w.contiguous());
        w_ptrs.push_back(keep.back().const_data_ptr<float>());
        N.push_back(w.size(0));
        N_all += w.size(0);
    }
    const at::Tensor xc = x.contiguous();
    at::Tensor y = at::empty({R * N_all}, x.options());
    const int status = moekit_f32matvec_cat(xc.const_data_ptr<float>(), R, w_ptrs.data(), N.data(), W, K,
                                            y.mutable_data_ptr<float>());
    TORCH_CHECK(status == 0, "f32matvec_cat: out of memory");
    return y;
}

at::Tensor x8matvec(c10::string_view method_name, const at::Tensor &x, const at::Tensor &panels,
                    const at::Tensor &pscale, int64_t N, const std::optional<at::Tensor> &index) {
    const std::string name(method_name);
    const Method m = method_of(name);
    TORCH_CHECK_VALUE(x.dim() == 2 && panels.dim() >= 3 && pscale.dim() == panels.dim(), "x8matvec(", name,
                      "): x (R, K), panels (..., G, B, bytes) and pscale (..., G, B, 16)");
    const int64_t R = x.size(0), K = x.size(1), B = K / QK, G = (N + PANEL - 1) / PANEL;
    int64_t E = 1;
    for (int64_t i = 0; i + 3 < panels.dim(); i++) E *= panels.size(i);
    const int64_t d = panels.dim();
    bool fits = m.panel_bytes > 0 && x.scalar_type() == at::kFloat && K % QK == 0 &&
                panels.scalar_type() == at::kByte && pscale.scalar_type() == at::kFloat &&
                panels.size(d - 3) == G && panels.size(d - 2) == B && panels.size(d - 1) == m.panel_bytes &&
                pscale.size(d - 3) == G && pscale.size(d - 2) == B && pscale.size(d - 1) == PANEL;
    for (int64_t i = 0; fits && i + 3 < d; i++) fits = panels.size(i) == pscale.size(i);
    TORCH_CHECK_VALUE(fits, "x8matvec(", name, "): x ", x.sizes(), " ", x.scalar_type(), " does not fit panels ",
                      panels.sizes(), " for N=", N, " (float32 x, K a multiple of 32)");
    TORCH_CHECK_VALUE(index.has_value() == (d > 3) && (!index.has_value() || (index->dim() == 1 && index->size(0) == R)),
                      "x8matvec(", name, "): an index (R,) goes with a stack of weights, none with one");
    const at::Tensor xc = x.contiguous(), pc = panels.contiguous(), sc = pscale.contiguous();
    at::Tensor idx;
    const int64_t *index_R = index_ptr(index, idx);
    at::Tensor y = at::empty({R, N}, x.options());
    check_status(moekit_x8_matvec(m.fmt, xc.const_data_ptr<float>(), R, pc.const_data_ptr<uint8_t>(),
                                  sc.const_data_ptr<float>(), E, N, B, index_R, y.mutable_data_ptr<float>()),
                 "x8matvec", E);
    return y;
}

at::Tensor paged_decode_attention(const at::Tensor &q, const at::Tensor &pool_k, const at::Tensor &pool_v,
                                  const at::Tensor &table, const at::Tensor &valid,
                                  const std::optional<at::Tensor> &sinks, double scale) {
    const bool shapes = q.dim() == 3 && pool_k.dim() == 3 && table.dim() == 2;
    const int64_t B = shapes ? q.size(0) : 0, H = shapes ? q.size(1) : 0, Dh = shapes ? q.size(2) : 0;
    const int64_t G = shapes ? pool_k.size(0) : 0, N = shapes ? pool_k.size(1) : 0, S = shapes ? table.size(1) : 0;
    TORCH_CHECK_VALUE(shapes && q.scalar_type() == at::kFloat && pool_k.scalar_type() == at::kFloat &&
                          pool_v.scalar_type() == at::kFloat && pool_v.sizes() == pool_k.sizes() &&
                          pool_k.size(2) == Dh && G > 0 && H % G == 0 && table.size(0) == B && valid.dim() == 2 &&
                          valid.size(0) == B && valid.size(1) == S &&
                          (!sinks.has_value() || (sinks->dim() == 1 && sinks->size(0) == H)),
                      "paged_decode_attention: q ", q.sizes(), ", pools ", pool_k.sizes(), " / ", pool_v.sizes(),
                      ", table ", table.sizes(), ", valid ", valid.sizes(),
                      " do not fit (float32 q (B, H, Dh), pools (G, N, Dh), H a multiple of G, table and valid (B, S))");
    const at::Tensor qc = q.contiguous(), kc = pool_k.contiguous(), vc = pool_v.contiguous();
    const at::Tensor tc = as_contiguous(table, at::kLong);
    // a bool mask is read as its bytes (0 or 1), without a copy
    const bool bool_mask = valid.scalar_type() == at::kBool && valid.is_contiguous();
    const at::Tensor mc = bool_mask ? valid : as_contiguous(valid, at::kByte);
    at::Tensor sc;
    if (sinks.has_value()) sc = as_contiguous(*sinks, at::kFloat);
    at::Tensor out = at::empty({B, H, Dh}, q.options());
    const int status = moekit_paged_decode_attention(
        qc.const_data_ptr<float>(), kc.const_data_ptr<float>(), vc.const_data_ptr<float>(),
        tc.const_data_ptr<int64_t>(), static_cast<const uint8_t *>(mc.const_data_ptr()),
        sinks.has_value() ? sc.const_data_ptr<float>() : nullptr, B, H, G, S, N, Dh, static_cast<float>(scale),
        out.mutable_data_ptr<float>());
    TORCH_CHECK_INDEX(status != -2, "paged_decode_attention: a valid slot's pool index is outside [0, ", N, ")");
    TORCH_CHECK(status == 0, "paged_decode_attention: out of memory");
    return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(moekit, CPU, m) {
    m.impl("qmatvec", &qmatvec);
    m.impl("f32matvec_cat", &f32matvec_cat);
    m.impl("x8matvec", &x8matvec);
    m.impl("paged_decode_attention", &paged_decode_attention);
}
