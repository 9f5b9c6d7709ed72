// Label log-probs from logits on CPU: the C++ twin of kernels/logprobs.py.
//
// Forward reads each row of logits once, in chunks of kChunk logits: a first pass over the
// chunk (fresh from memory) finds its maximum, which updates the running maximum of an online
// log-sum-exp; a second pass (from L1) sums exp(z - max). O(1) values per token are written.
// Backward reads the row once more and writes g * (onehot - softmax) * dz/dx straight into
// the gradient, which may be the logits' own storage.
//
// Rows run in parallel (at::parallel_for); each row is reduced by one thread in a fixed
// order (vector lanes, then lanes left to right), so results do not depend on the number of
// threads. The math is dpo_fast/reference.py's; its comments explain the formulas.
//
// Built just in time by dpo_fast/cpp.py for the machine's vector ISA (CPU_CAPABILITY).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace dpo_fast {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
// Logits per chunk: two fp32 buffers of this size stay in L1 (16 KiB).
constexpr int64_t kChunk = 2048;
// Rows handed to a thread at least, so that small problems are not split.
constexpr int64_t kGrainElements = 1 << 15;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
static_assert(kChunk % 64 == 0, "a chunk holds whole vectors of any width");

struct Transform {
  float scale;
  bool has_softcap;
  float softcap;

  // z = softcap(x * scale) and dz/dx. tanh(|v|) = -t / (2 + t) with t = expm1(-2|v|): one
  // exp-like call, no cancellation for small |v|, clean saturation at +-inf; and
  // 1 - tanh(v)^2 = 4 e / (1 + e)^2 with e = exp(-2|v|) = 1 + t.
  void z_and_derivative(const Vec& x, Vec& z, Vec& dz_dx) const {
    Vec u = x * Vec(scale);
    if (!has_softcap) {
      z = u;
      dz_dx = Vec(scale);
      return;
    }
    Vec v = u / Vec(softcap);
    Vec t = (v.abs() * Vec(-2.0f)).expm1();
    Vec two_plus_t = t + Vec(2.0f);
    z = ((t.neg() / two_plus_t) * Vec(softcap)) ^ (v & Vec(-0.0f));
    dz_dx = Vec(4.0f * scale) * (t + Vec(1.0f)) / (two_plus_t * two_plus_t);
  }

  // z alone (the compiler drops the unused derivative).
  Vec z(const Vec& x) const {
    Vec z_value, unused;
    z_and_derivative(x, z_value, unused);
    return z_value;
  }

  // The derivative at one logit, computed by the vector code so it matches it exactly.
  float derivative_at(float x) const {
    Vec z, dz_dx;
    z_and_derivative(Vec(x), z, dz_dx);
    float lanes[kLanes];
    dz_dx.store(lanes);
    return lanes[0];
  }
};

// The softmax denominator, summed in fp64 lanes. When the label holds nearly all the mass,
// 1 - p_y lives in the low bits of a sum that starts at exp(0) = 1: fp32 lanes that add
// thousands of tiny terms to that 1 (each rounded to a multiple of 2^-23) lose percents of
// it, and with it the target gradient. fp64 keeps it to ~1e-16 for any vocabulary size.
struct DoubleSum {
  using VecD = at::vec::Vectorized<double>;
  static_assert(2 * VecD::size() == kLanes, "a float vector splits into two double vectors");
  VecD low{0.0}, high{0.0};

  void add(const Vec& e) {
#if defined(CPU_CAPABILITY_AVX512)
    const __m512 v = e;
    low = low + VecD(_mm512_cvtps_pd(_mm512_castps512_ps256(v)));
    high = high + VecD(_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
#elif defined(CPU_CAPABILITY_AVX2)
    const __m256 v = e;
    low = low + VecD(_mm256_cvtps_pd(_mm256_castps256_ps128(v)));
    high = high + VecD(_mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
#else
    float lanes[kLanes];
    e.store(lanes);
    double widened[kLanes];
    for (int64_t i = 0; i < kLanes; ++i) {
      widened[i] = lanes[i];
    }
    low = low + VecD::loadu(widened);
    high = high + VecD::loadu(widened + VecD::size());
#endif
  }

  void scale(double alpha) {
    low = low * VecD(alpha);
    high = high * VecD(alpha);
  }

  double total() const {
    double lanes[kLanes];
    low.store(lanes);
    high.store(lanes + VecD::size());
    double sum = 0.0;
    for (int64_t i = 0; i < kLanes; ++i) {
      sum += lanes[i];
    }
    return sum;
  }
};

float sum_lanes(const Vec& v) {
  float lanes[kLanes];
  v.store(lanes);
  float total = 0.0f;
  for (int64_t i = 0; i < kLanes; ++i) {
    total += lanes[i];
  }
  return total;
}

// Maximum that propagates NaN, so a NaN logit gives a NaN log-prob rather than being skipped.
float max_nan(float a, float b) {
  return (std::isnan(a) || a > b) ? a : b;
}

float max_lanes(const Vec& v) {
  float lanes[kLanes];
  v.store(lanes);
  float m = lanes[0];
  for (int64_t i = 1; i < kLanes; ++i) {
    m = max_nan(lanes[i], m);
  }
  return m;
}

// n logits at stride `stride` as fp32: the logits themselves when they already are
// contiguous fp32, else converted into `buffer`.
template <typename scalar_t>
const float* load_chunk(const scalar_t* x, int64_t stride, int64_t n, float* buffer) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (stride == 1) {
      return x;
    }
  }
  int64_t i = 0;
  if (stride == 1) {
    if constexpr (!std::is_same_v<scalar_t, float>) {
      for (; i + kLanes <= n; i += kLanes) {
        Vec v;
        at::vec::load_to_float(x + i, v);
        v.store(buffer + i);
      }
    }
    for (; i < n; ++i) {
      buffer[i] = static_cast<float>(x[i]);
    }
  } else {
    for (; i < n; ++i) {
      buffer[i] = static_cast<float>(x[i * stride]);
    }
  }
  return buffer;
}

template <typename scalar_t>
void store_chunk(const float* buffer, scalar_t* out, int64_t stride, int64_t n) {
  if (stride == 1) {
    at::vec::convert(buffer, out, n);
  } else {
    for (int64_t i = 0; i < n; ++i) {
      out[i * stride] = static_cast<scalar_t>(buffer[i]);
    }
  }
}

struct RowResult {
  float logp, lse, entropy, mean_logits, log_sum_sq_probs;
  bool is_top1;
};

// One row of V logits at stride `stride`. kStats: also the per-token statistics.
template <typename scalar_t, bool kStats>
RowResult forward_row(
    const scalar_t* x,
    int64_t stride,
    int64_t V,
    int64_t label,
    const Transform& transform,
    float* x_buffer,
    float* z_buffer) {
  float m = kNegInf;  // running maximum
  float m_shift = 0.0f;  // what exps are taken relative to: m, or 0 while m is -inf
  DoubleSum sum_exp;
  Vec sum_exp_z(0.0f), sum_exp_sq(0.0f), sum_z(0.0f);
  float z_label = 0.0f;
  float max_before_label = kNegInf;
  // Without softcap z = x * scale is recomputed where needed (one multiply); with it, the
  // tanh is paid once and z is kept in z_buffer for the second pass over the chunk.
  const bool keep_z = transform.has_softcap;
  const Vec scale(transform.scale);
  for (int64_t start = 0; start < V; start += kChunk) {
    const int64_t n = std::min(kChunk, V - start);
    const float* src = load_chunk(x + start * stride, stride, n, x_buffer);
    // exactly the value the vector code computes, so ties with the maximum are exact
    const auto z_at = [&](int64_t j) { return keep_z ? z_buffer[j] : src[j] * transform.scale; };

    Vec chunk_max(kNegInf);
    for (int64_t i = 0; i < n; i += kLanes) {
      const int64_t count = std::min(kLanes, n - i);
      // missing lanes of a partial vector load as 0 and transform to 0: harmless in sum_z
      Vec z = transform.z(Vec::loadu(src + i, count));
      if (keep_z) {
        z.store(z_buffer + i, count);
      }
      if constexpr (kStats) {
        sum_z += z;
      }
      chunk_max = at::vec::maximum(chunk_max, count == kLanes ? z : Vec::set(Vec(kNegInf), z, count));
    }
    const float chunk_max_value = max_lanes(chunk_max);

    if (label >= start && label < start + n) {
      z_label = z_at(label - start);
      if constexpr (kStats) {
        for (int64_t j = 0; j < label - start; ++j) {
          max_before_label = max_nan(z_at(j), max_before_label);
        }
      }
    } else if (kStats && label >= start + n) {
      max_before_label = max_nan(chunk_max_value, max_before_label);
    }

    const float m_new = max_nan(chunk_max_value, m);
    if (!(m_new == m)) {
      const float shift_new = m_new == kNegInf ? 0.0f : m_new;
      // m = -inf: nothing summed yet, alpha = 0 (not exp(0 - shift), which may overflow)
      const float alpha = std::exp(m - shift_new);
      sum_exp.scale(alpha);
      if constexpr (kStats) {
        sum_exp_z = sum_exp_z * Vec(alpha);
        sum_exp_sq = sum_exp_sq * Vec(alpha * alpha);
      }
      m = m_new;
      m_shift = shift_new;
    }

    const Vec shift(m_shift);
    for (int64_t i = 0; i < n; i += kLanes) {
      const int64_t count = std::min(kLanes, n - i);
      Vec z = keep_z ? Vec::loadu(z_buffer + i, count) : Vec::loadu(src + i, count) * scale;
      if (count < kLanes) {
        // pad with -inf: exp gives 0 there
        z = Vec::set(Vec(kNegInf), z, count);
      }
      Vec e = (z - shift).exp();
      sum_exp.add(e);
      if constexpr (kStats) {
        // a -inf logit has e = 0 and contributes 0 to sum p * z, not 0 * -inf = nan
        sum_exp_z += Vec::blendv(Vec(0.0f), e * z, e > Vec(0.0f));
        sum_exp_sq += e * e;
      }
    }
  }

  RowResult r{};
  const double total_exp = sum_exp.total();
  const float log_sum_exp = static_cast<float>(std::log(total_exp));
  // (z_y - max) - log(sum_exp), not z_y - lse: exact when y is the arg-max (see reference.py)
  r.logp = (z_label - m_shift) - log_sum_exp;
  r.lse = m_shift + log_sum_exp;
  if constexpr (kStats) {
    r.entropy = r.lse - sum_lanes(sum_exp_z) / static_cast<float>(total_exp);
    r.mean_logits = sum_lanes(sum_z) / static_cast<float>(V);
    // the first index wins ties: top-1 iff it reaches the max and no earlier logit does
    r.is_top1 = z_label >= m && z_label > max_before_label;
    r.log_sum_sq_probs = std::log(sum_lanes(sum_exp_sq)) - 2.0f * log_sum_exp;
  }
  return r;
}

// Writes all V gradient elements of one scored row.
template <typename scalar_t>
void backward_row(
    const scalar_t* x,
    int64_t stride,
    scalar_t* grad_x,
    int64_t grad_stride,
    int64_t V,
    int64_t label,
    float g,
    float lse,
    float logp,
    const Transform& transform,
    float* x_buffer,
    float* grad_buffer) {
  // read before the row is overwritten: grad_x may alias x
  const float x_label = static_cast<float>(x[label * stride]);
  const Vec neg_g(-g);
  const Vec lse_vec(lse);
  for (int64_t start = 0; start < V; start += kChunk) {
    const int64_t n = std::min(kChunk, V - start);
    const float* src = load_chunk(x + start * stride, stride, n, x_buffer);
    float* dst = grad_buffer;
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (grad_stride == 1) {
        dst = grad_x + start;
      }
    }
    for (int64_t i = 0; i < n; i += kLanes) {
      const int64_t count = std::min(kLanes, n - i);
      Vec z, dz_dx;
      transform.z_and_derivative(Vec::loadu(src + i, count), z, dz_dx);
      Vec grad = neg_g * (z - lse_vec).exp() * dz_dx;
      grad.store(dst + i, count);
    }
    if (dst == grad_buffer) {
      store_chunk(grad_buffer, grad_x + start * grad_stride, grad_stride, n);
    }
  }
  // the target term 1 - p_y as -expm1(log p_y) in fp32 (no cancellation as p_y -> 1)
  grad_x[label * grad_stride] =
      static_cast<scalar_t>(g * -std::expm1(logp) * transform.derivative_at(x_label));
}

template <typename scalar_t>
void zero_row(scalar_t* grad_x, int64_t grad_stride, int64_t V) {
  if (grad_stride == 1) {
    // all-zero bits are +0.0 in fp32, bf16 and fp16
    std::memset(grad_x, 0, V * sizeof(scalar_t));
  } else {
    for (int64_t i = 0; i < V; ++i) {
      grad_x[i * grad_stride] = static_cast<scalar_t>(0.0f);
    }
  }
}

// A fresh [tokens, V] gradient costs more in first-touch page faults than in arithmetic.
// Each thread asks the kernel to populate its own rows' pages in one call (Linux >= 5.14;
// elsewhere a no-op), which saves the per-page traps. Measured here: ~15% of the backward.
// (Transparent huge pages were faster in a tight loop but far slower at a training step's
// cadence on this VM, whose freed memory is handed back to the host.)
template <typename scalar_t>
void prefault(const scalar_t* begin, const scalar_t* end) {
#if defined(__linux__) && defined(MADV_POPULATE_WRITE)
  constexpr uintptr_t kPage = 4096;
  const uintptr_t first = (reinterpret_cast<uintptr_t>(begin) + kPage - 1) & ~(kPage - 1);
  const uintptr_t last = reinterpret_cast<uintptr_t>(end) & ~(kPage - 1);
  if (last > first) {
    madvise(reinterpret_cast<void*>(first), last - first, MADV_POPULATE_WRITE);
  }
#endif
}

template <typename F>
void dispatch_float_types(at::ScalarType dtype, const F& f) {
  switch (dtype) {
    case at::kFloat:
      f(float{});
      break;
    case at::kBFloat16:
      f(at::BFloat16{});
      break;
    case at::kHalf:
      f(at::Half{});
      break;
    default:
      TORCH_CHECK(false, "logits must be float32, bfloat16 or float16, got ", dtype);
  }
}

int64_t grain_rows(int64_t V) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(V, 1));
}

void check_label(int64_t label, int64_t V, int64_t ignore_index) {
  TORCH_CHECK(
      label >= 0 && label < V,
      "labels must be in [0, ",
      V,
      ") or equal ignore_index=",
      ignore_index,
      ", found ",
      label);
}

void check_logits(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), name, " must be a CPU tensor, got device ", x.device());
  TORCH_CHECK(x.dim() == 3, name, " must have shape (B, T, V), got ", x.sizes());
}

void check_rows(const at::Tensor& t, const char* name, at::IntArrayRef shape, at::ScalarType dtype) {
  TORCH_CHECK(
      t.device().is_cpu() && t.sizes() == shape && t.scalar_type() == dtype && t.is_contiguous(),
      name,
      " must be a contiguous CPU ",
      dtype,
      " tensor of shape ",
      shape,
      ", got ",
      t.scalar_type(),
      " ",
      t.sizes(),
      t.is_contiguous() ? "" : " (not contiguous)");
}

// Bits of the `stats` mask, in dpo_fast.constants.STAT_NAMES order.
constexpr int64_t kEntropy = 1, kMeanLogits = 2, kIsTop1 = 4, kLogSumSqProbs = 8;

// Labels are (B, T') with T' <= T: position t of row b scores logits[b, t] (a causal shift is
// T' = T - 1, read in place).
int64_t scored_positions(const at::Tensor& x, const at::Tensor& labels) {
  const int64_t B = x.size(0), T = x.size(1);
  TORCH_CHECK(
      labels.dim() == 2 && labels.size(0) == B && labels.size(1) <= T,
      "labels must be (B, T') with T' <= T for logits ",
      x.sizes(),
      ", got ",
      labels.sizes());
  return labels.size(1);
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> logprobs_forward_cpp(
    const at::Tensor& x,
    const at::Tensor& labels,
    int64_t ignore_index,
    double scale,
    std::optional<double> softcap,
    int64_t stats,
    bool /*inplace_backward: read by the op's autograd, not here*/) {
  check_logits(x, "logits");
  const int64_t B = x.size(0), V = x.size(2);
  const int64_t T = scored_positions(x, labels);
  check_rows(labels, "labels", {B, T}, at::kLong);
  TORCH_CHECK(stats >= 0 && stats < 16, "stats must be a bit mask of 4 statistics, got ", stats);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({B, T}, f32);
  at::Tensor lse = at::empty({B, T}, f32);
  at::Tensor entropy = at::empty({stats & kEntropy ? B : 0, T}, f32);
  at::Tensor mean_logits = at::empty({stats & kMeanLogits ? B : 0, T}, f32);
  at::Tensor is_top1 = at::empty({stats & kIsTop1 ? B : 0, T}, x.options().dtype(at::kBool));
  at::Tensor log_sum_sq = at::empty({stats & kLogSumSqProbs ? B : 0, T}, f32);
  const Transform transform{
      static_cast<float>(scale), softcap.has_value(), static_cast<float>(softcap.value_or(1.0))};
  const bool any_stats = stats != 0;

  dispatch_float_types(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    const int64_t* label_ptr = labels.const_data_ptr<int64_t>();
    float* logp_ptr = logp.data_ptr<float>();
    float* lse_ptr = lse.data_ptr<float>();
    float* entropy_ptr = entropy.numel() ? entropy.data_ptr<float>() : nullptr;
    float* mean_ptr = mean_logits.numel() ? mean_logits.data_ptr<float>() : nullptr;
    bool* top1_ptr = is_top1.numel() ? is_top1.data_ptr<bool>() : nullptr;
    float* sumsq_ptr = log_sum_sq.numel() ? log_sum_sq.data_ptr<float>() : nullptr;
    const int64_t stride_b = x.stride(0), stride_t = x.stride(1), stride_v = x.stride(2);

    at::parallel_for(0, B * T, grain_rows(V), [&](int64_t begin, int64_t end) {
      alignas(64) float x_buffer[kChunk];
      alignas(64) float z_buffer[kChunk];
      for (int64_t row = begin; row < end; ++row) {
        const int64_t label = label_ptr[row];
        RowResult r{};
        if (label != ignore_index) {
          check_label(label, V, ignore_index);
          const scalar_t* row_ptr = x_ptr + (row / T) * stride_b + (row % T) * stride_t;
          r = any_stats
              ? forward_row<scalar_t, true>(row_ptr, stride_v, V, label, transform, x_buffer, z_buffer)
              : forward_row<scalar_t, false>(row_ptr, stride_v, V, label, transform, x_buffer, z_buffer);
        }
        logp_ptr[row] = r.logp;
        lse_ptr[row] = r.lse;
        if (entropy_ptr) entropy_ptr[row] = r.entropy;
        if (mean_ptr) mean_ptr[row] = r.mean_logits;
        if (top1_ptr) top1_ptr[row] = r.is_top1;
        if (sumsq_ptr) sumsq_ptr[row] = r.log_sum_sq_probs;
      }
    });
  });

  std::vector<at::Tensor> stat_values;
  for (const auto& [bit, value] : {std::pair{kEntropy, entropy},
                                   std::pair{kMeanLogits, mean_logits},
                                   std::pair{kIsTop1, is_top1},
                                   std::pair{kLogSumSqProbs, log_sum_sq}}) {
    if (stats & bit) stat_values.push_back(value);
  }
  return {logp, lse, stat_values};
}

void logprobs_backward_cpp(
    const at::Tensor& grad_logp,
    const at::Tensor& x,
    const at::Tensor& labels,
    const at::Tensor& logp,
    const at::Tensor& lse,
    const at::Tensor& grad_x,
    int64_t ignore_index,
    double scale,
    std::optional<double> softcap) {
  check_logits(x, "logits");
  const int64_t B = x.size(0), T_all = x.size(1), V = x.size(2);
  const int64_t T = scored_positions(x, labels);
  check_rows(labels, "labels", {B, T}, at::kLong);
  check_rows(grad_logp, "grad_logp", {B, T}, at::kFloat);
  check_rows(logp, "logp", {B, T}, at::kFloat);
  check_rows(lse, "lse", {B, T}, at::kFloat);
  check_logits(grad_x, "grad_x");
  TORCH_CHECK(
      grad_x.sizes() == x.sizes() && grad_x.scalar_type() == x.scalar_type(),
      "grad_x must match the logits' shape and dtype ",
      x.sizes(),
      " ",
      x.scalar_type(),
      ", got ",
      grad_x.sizes(),
      " ",
      grad_x.scalar_type());
  const Transform transform{
      static_cast<float>(scale), softcap.has_value(), static_cast<float>(softcap.value_or(1.0))};

  dispatch_float_types(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    // grad_x may alias x: every element of a row is read before it is written
    scalar_t* grad_ptr = static_cast<scalar_t*>(grad_x.data_ptr());
    const int64_t* label_ptr = labels.const_data_ptr<int64_t>();
    const float* g_ptr = grad_logp.const_data_ptr<float>();
    const float* logp_ptr = logp.const_data_ptr<float>();
    const float* lse_ptr = lse.const_data_ptr<float>();
    const int64_t stride_b = x.stride(0), stride_t = x.stride(1), stride_v = x.stride(2);
    const int64_t grad_b = grad_x.stride(0), grad_t = grad_x.stride(1), grad_v = grad_x.stride(2);

    // rows laid out in order (a contiguous gradient): a thread's rows span one address range
    const bool rows_in_order = grad_v == 1 && grad_t == V && grad_b >= T_all * V;

    // every row of grad_x is written: rows t >= T (the last position of a shifted batch) score
    // nothing and get zeros
    at::parallel_for(0, B * T_all, grain_rows(V), [&](int64_t begin, int64_t end) {
      if (rows_in_order) {
        const int64_t last = end - 1;
        prefault(
            grad_ptr + (begin / T_all) * grad_b + (begin % T_all) * grad_t,
            grad_ptr + (last / T_all) * grad_b + (last % T_all) * grad_t + V);
      }
      alignas(64) float x_buffer[kChunk];
      alignas(64) float grad_buffer[kChunk];
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / T_all, t = row % T_all;
        scalar_t* grad_row = grad_ptr + b * grad_b + t * grad_t;
        const int64_t scored = b * T + t;  // index into the (B, T) labels and per-token values
        if (t >= T || label_ptr[scored] == ignore_index) {
          zero_row(grad_row, grad_v, V);
          continue;
        }
        const int64_t label = label_ptr[scored];
        check_label(label, V, ignore_index);
        backward_row(
            x_ptr + b * stride_b + t * stride_t,
            stride_v,
            grad_row,
            grad_v,
            V,
            label,
            g_ptr[scored],
            lse_ptr[scored],
            logp_ptr[scored],
            transform,
            x_buffer,
            grad_buffer);
      }
    });
  });
}

}  // namespace
}  // namespace dpo_fast

// FRAGMENT: other parts of dpo_fast may register operators in the same namespace.
TORCH_LIBRARY_FRAGMENT(dpo_fast, m) {
  // the calling convention of dpo_fast/ops/logprobs.py, shared by every backend
  m.def(
      "logprobs_forward_cpp(Tensor logits, Tensor labels, int ignore_index, float scale, float? softcap, "
      "int stats, bool inplace_backward) -> (Tensor, Tensor, Tensor[])");
  m.def(
      "logprobs_backward_cpp(Tensor grad_logp, Tensor logits, Tensor labels, Tensor logp, Tensor lse, "
      "Tensor(a!) grad_logits, int ignore_index, float scale, float? softcap) -> ()");
}

TORCH_LIBRARY_IMPL(dpo_fast, CPU, m) {
  m.impl("logprobs_forward_cpp", &dpo_fast::logprobs_forward_cpp);
  m.impl("logprobs_backward_cpp", &dpo_fast::logprobs_backward_cpp);
}
