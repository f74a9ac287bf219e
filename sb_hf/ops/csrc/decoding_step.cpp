// One support-basis decoding step of a layer in one call, for the degree-0 taylor far field on a CPU.
//
// The same step as sb_hf.ops.decoding.DecodingState.step (read that first: this is its fused form, built by
// sb_hf.ops.cpu_kernel). With one polynomial bucket of degree 0 and the taylor kernel, the polynomial part of a
// unit's folded small keys is exp(scale q . kbar) * (sum v, count) (kbar their mean): one pseudo-key of weight
// `count`. So a query row's attention is one softmax over its band (the last `window` keys of the cache), the
// unit's held exact keys and that pseudo-key; rows the method computes exactly (large queries, the radius guard,
// a broken row) attend to every key instead. The state tensors are the Python class's, updated in place.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kBlock = 256;  // keys per task of the band pass (tasks run in parallel, then merge)

enum Status : int64_t { kOk = 0, kQueryNotFinite = 1, kKeyNotFinite = 2, kValueNotFinite = 3, kFull = 4 };

template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

template <typename T>
inline T abs_max(const T* a, int64_t n) {
  T m = 0;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, std::abs(a[i]));
  return m;
}

template <typename T>
inline bool finite(const T* a, int64_t n) {
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) ok &= std::isfinite(a[i]);
  return ok;
}

// A partial softmax: sum_j exp(s_j - shift) v_j and sum_j exp(s_j - shift), shift = -inf when empty.
template <typename T>
struct Partial {
  T shift = -std::numeric_limits<T>::infinity();
  T mass = 0;
};

// acc/mass (relative to `into.shift`) += other's (relative to `shift`).
template <typename T>
inline void merge(Partial<T>& into, T* into_acc, T shift, T mass, const T* acc, int64_t dv) {
  if (mass == 0) return;
  if (shift > into.shift) {
    T rescale = std::exp(into.shift - shift);  // exp(-inf) = 0 for an empty `into`
    into.mass = into.mass * rescale + mass;
    for (int64_t i = 0; i < dv; ++i) into_acc[i] = into_acc[i] * rescale + acc[i];
    into.shift = shift;
  } else {
    T rescale = std::exp(shift - into.shift);
    into.mass += mass * rescale;
    for (int64_t i = 0; i < dv; ++i) into_acc[i] += acc[i] * rescale;
  }
}

// Exact attention of one query row to keys [lo, hi) of one KV head (`valid` per key or null): into `acc`.
template <typename T>
Partial<T> attend(const T* q, T scale, const T* k, int64_t k_stride, const T* v, int64_t v_stride, const bool* valid,
                  int64_t lo, int64_t hi, int64_t d, int64_t dv, T* acc, T* scores) {
  Partial<T> p;
  std::fill(acc, acc + dv, T(0));
  T top = -std::numeric_limits<T>::infinity();
  for (int64_t j = lo; j < hi; ++j) {
    T s = (valid == nullptr || valid[j]) ? scale * dot(q, k + j * k_stride, d) : -std::numeric_limits<T>::infinity();
    scores[j - lo] = s;
    top = std::max(top, s);
  }
  if (top == -std::numeric_limits<T>::infinity()) return p;  // nothing visible
  for (int64_t j = lo; j < hi; ++j) {
    T s = scores[j - lo];
    if (s == -std::numeric_limits<T>::infinity()) continue;
    T w = std::exp(s - top);
    p.mass += w;
    const T* vj = v + j * v_stride;
#pragma omp simd
    for (int64_t i = 0; i < dv; ++i) acc[i] += w * vj[i];
  }
  p.shift = top;
  return p;
}

template <typename T>
int64_t step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& key_valid,
             at::Tensor& out, at::Tensor& value_sum, at::Tensor& weight_sum, at::Tensor& key_sum, at::Tensor& key_count,
             at::Tensor& norm_max, at::Tensor& real_keys, at::Tensor& exact_k, at::Tensor& exact_v, at::Tensor& exact_bias,
             at::Tensor& exact_count, const std::vector<int64_t>& windows, const std::vector<int64_t>& sinks,
             const std::vector<double>& radius_limits, const c10::optional<at::Tensor>& column_queries,
             const c10::optional<at::Tensor>& column_threshold, int64_t seen, int64_t checked, bool fold_sinks,
             double threshold, double scale_, double radius, double radius_floor, double out_max) {
  const T scale = static_cast<T>(scale_);
  const T inf = std::numeric_limits<T>::infinity();
  const int64_t B = q.size(0), Hk = q.size(1), G = q.size(2), d = q.size(3);
  const int64_t L = k.size(2), dv = v.size(3);
  const int64_t N = static_cast<int64_t>(windows.size()), per_kv_head = N / Hk, per_unit = G / per_kv_head;
  const int64_t slots = exact_k.size(2);
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), qs2 = q.stride(2);
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);
  const bool* valid_base = key_valid.has_value() ? key_valid->data_ptr<bool>() : nullptr;
  auto valid_row = [&](int64_t b) { return valid_base == nullptr ? nullptr : valid_base + b * L; };
  auto key = [&](int64_t b, int64_t h, int64_t j) { return kp + b * ks0 + h * ks1 + j * ks2; };
  auto value = [&](int64_t b, int64_t h, int64_t j) { return vp + b * vs0 + h * vs1 + j * vs2; };
  auto query = [&](int64_t b, int64_t h, int64_t g) { return qp + b * qs0 + h * qs1 + g * qs2; };

  // The query and the keys and values no earlier call checked.
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hk; ++h) {
      for (int64_t g = 0; g < G; ++g)
        if (!finite(query(b, h, g), d)) return kQueryNotFinite;
      for (int64_t j = checked; j < L; ++j) {
        if (!finite(key(b, h, j), d)) return kKeyNotFinite;
        if (!finite(value(b, h, j), dv)) return kValueNotFinite;
      }
    }

  // Fold: unit n gets the keys [seen - window_n, L - window_n) that left its band.
  T* value_sum_p = value_sum.data_ptr<T>();
  T* weight_sum_p = weight_sum.data_ptr<T>();
  T* key_sum_p = key_sum.data_ptr<T>();
  int64_t* key_count_p = key_count.data_ptr<int64_t>();
  T* norm_max_p = norm_max.data_ptr<T>();
  int64_t* real_keys_p = real_keys.data_ptr<int64_t>();
  T* exact_k_p = exact_k.data_ptr<T>();
  T* exact_v_p = exact_v.data_ptr<T>();
  T* exact_bias_p = exact_bias.data_ptr<T>();
  int64_t* exact_count_p = exact_count.data_ptr<int64_t>();
  const T* column_q = column_queries.has_value() ? column_queries->data_ptr<T>() : nullptr;
  const T* column_t = column_threshold.has_value() ? column_threshold->data_ptr<T>() : nullptr;
  std::vector<int64_t> status(B * N, kOk);
  at::parallel_for(0, B * N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bn = begin; bn < end; ++bn) {
      const int64_t b = bn / N, n = bn % N, h = n / per_kv_head;
      const int64_t lo = std::max<int64_t>(seen - windows[n], 0), hi = L - windows[n];  // (windows up to 2^62)
      const bool* valid = valid_row(b);
      for (int64_t j = lo; j < hi; ++j) {
        if (valid != nullptr && !valid[j]) continue;
        const T* kj = key(b, h, j);
        const T* vj = value(b, h, j);
        bool exact = false;
        if (fold_sinks) exact = real_keys_p[bn]++ < sinks[n];
        if (column_q != nullptr)
          for (int64_t i = n * per_unit; i < (n + 1) * per_unit && !exact; ++i)
            exact = scale * dot(column_q + i * d, kj, d) > column_t[i];
        if (threshold == 0 || (std::isfinite(threshold) && abs_max(kj, d) > threshold)) exact = true;
        if (exact) {
          const int64_t slot = exact_count_p[bn]++;
          if (slot >= slots) {
            status[bn] = kFull;
            return;
          }
          std::copy(kj, kj + d, exact_k_p + (bn * slots + slot) * d);
          std::copy(vj, vj + dv, exact_v_p + (bn * slots + slot) * dv);
          exact_bias_p[bn * slots + slot] = 0;
        } else {
          T* vs = value_sum_p + bn * dv;
          T* ks = key_sum_p + bn * d;
          for (int64_t i = 0; i < dv; ++i) vs[i] += vj[i];
          for (int64_t i = 0; i < d; ++i) ks[i] += kj[i];
          weight_sum_p[bn] += 1;
          key_count_p[bn] += 1;
          if (radius <= 0) norm_max_p[bn] = std::max(norm_max_p[bn], std::sqrt(dot(kj, kj, d)));
        }
      }
    }
  });
  for (int64_t s : status)
    if (s != kOk) return s;

  // Each query row: computed exactly over every key, or its band + held keys + pseudo-key.
  const int64_t rows = B * Hk * G;
  std::vector<int64_t> start(rows);
  std::vector<char> exact_row(rows);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t b = r / (Hk * G), h = (r / G) % Hk, g = r % G, n = h * per_kv_head + g / per_unit;
    const T* qr = query(b, h, g);
    bool large = threshold == 0 || (std::isfinite(threshold) && abs_max(qr, d) > threshold);
    const T interval = radius > 0 ? static_cast<T>(radius)
                                  : std::max(scale * std::sqrt(dot(qr, qr, d)) * norm_max_p[b * N + n], static_cast<T>(radius_floor));
    large = large || interval > radius_limits[n];
    exact_row[r] = large;
    start[r] = large ? 0 : std::max<int64_t>(L - std::min(windows[n], L), 0);
  }

  // The band pass: per (batch, KV head), blocks of keys from its rows' earliest start; each block's partial per row.
  struct Task { int64_t b, h, lo, hi; };
  std::vector<Task> tasks;
  std::vector<int64_t> first_task(B * Hk + 1);
  for (int64_t bh = 0; bh < B * Hk; ++bh) {
    first_task[bh] = static_cast<int64_t>(tasks.size());
    int64_t lo = L;
    for (int64_t g = 0; g < G; ++g) lo = std::min(lo, start[bh * G + g]);
    for (int64_t j = lo; j < L; j += kBlock) tasks.push_back({bh / Hk, bh % Hk, j, std::min(j + kBlock, L)});
  }
  first_task[B * Hk] = static_cast<int64_t>(tasks.size());
  const int64_t width = dv + 2;  // per (task, row): shift, mass, acc
  std::vector<T> partials(tasks.size() * G * width);
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<T> scores(kBlock);
    for (int64_t t = begin; t < end; ++t) {
      const Task& task = tasks[t];
      for (int64_t g = 0; g < G; ++g) {
        T* slot = partials.data() + (t * G + g) * width;
        const int64_t lo = std::max(task.lo, start[(task.b * Hk + task.h) * G + g]);
        if (lo >= task.hi) {
          slot[0] = -inf;
          slot[1] = 0;
          continue;
        }
        Partial<T> p = attend(query(task.b, task.h, g), scale, key(task.b, task.h, 0), ks2, value(task.b, task.h, 0), vs2,
                              valid_row(task.b), lo, task.hi, d, dv, slot + 2, scores.data());
        slot[0] = p.shift;
        slot[1] = p.mass;
      }
    }
  });

  // Merge each row's blocks, held exact keys and pseudo-key; rows that broke down are recomputed exactly.
  T* out_p = out.data_ptr<T>();
  std::vector<T> acc(dv), part(dv), scores(std::max<int64_t>(L, slots));
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t b = r / (Hk * G), h = (r / G) % Hk, g = r % G, n = h * per_kv_head + g / per_unit, bn = b * N + n;
    const int64_t bh = b * Hk + h;
    const T* qr = query(b, h, g);
    Partial<T> total;
    std::fill(acc.begin(), acc.end(), T(0));
    for (int64_t t = first_task[bh]; t < first_task[bh + 1]; ++t) {
      const T* slot = partials.data() + (t * G + g) * width;
      merge(total, acc.data(), slot[0], slot[1], slot + 2, dv);
    }
    if (!exact_row[r]) {
      const int64_t held = exact_count_p[bn];
      if (held > 0) {
        Partial<T> p = attend(qr, scale, exact_k_p + bn * slots * d, d, exact_v_p + bn * slots * dv, dv,
                              static_cast<const bool*>(nullptr), 0, held, d, dv, part.data(), scores.data());
        merge(total, acc.data(), p.shift, p.mass, part.data(), dv);
      }
      const T count = weight_sum_p[bn];
      if (count > 0) {  // the pseudo-key: score scale q . kbar, weight count, value the mean of v
        const T center = scale * dot(qr, key_sum_p + bn * d, d) / static_cast<T>(std::max<int64_t>(key_count_p[bn], 1));
        merge(total, acc.data(), center, count, value_sum_p + bn * dv, dv);
      }
    }
    T* o = out_p + r * dv;
    bool broken = !(total.mass > 0);
    for (int64_t i = 0; i < dv; ++i) {
      o[i] = total.mass > 0 ? acc[i] / total.mass : T(0);
      broken = broken || !std::isfinite(o[i]) || std::abs(o[i]) > out_max;
    }
    if (broken && !exact_row[r]) {
      Partial<T> p = attend(qr, scale, key(b, h, 0), ks2, value(b, h, 0), vs2, valid_row(b), 0, L, d, dv, acc.data(),
                            scores.data());
      for (int64_t i = 0; i < dv; ++i) o[i] = p.mass > 0 ? acc[i] / p.mass : T(0);
    }
  }
  return kOk;
}

int64_t decoding_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const c10::optional<at::Tensor>& key_valid, at::Tensor out, at::Tensor value_sum, at::Tensor weight_sum,
                      at::Tensor key_sum, at::Tensor key_count, at::Tensor norm_max, at::Tensor real_keys, at::Tensor exact_k,
                      at::Tensor exact_v, at::Tensor exact_bias, at::Tensor exact_count, const std::vector<int64_t>& windows,
                      const std::vector<int64_t>& sinks, const std::vector<double>& radius_limits,
                      const c10::optional<at::Tensor>& column_queries, const c10::optional<at::Tensor>& column_threshold,
                      int64_t seen, int64_t checked, bool fold_sinks, double threshold, double scale, double radius,
                      double radius_floor, double out_max) {
  TORCH_CHECK(q.device().is_cpu(), "the decoding kernel runs on a CPU");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q (B, Hk, G, d), k and v (B, Hk, L, d)");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "q, k and v need a contiguous last dim");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "q, k and v of one dtype");
  const int64_t units = static_cast<int64_t>(windows.size());
  TORCH_CHECK(units > 0 && units % q.size(1) == 0 && q.size(2) % (units / q.size(1)) == 0, "units do not fit the heads");
  TORCH_CHECK(static_cast<int64_t>(sinks.size()) == units && static_cast<int64_t>(radius_limits.size()) == units,
              "one sink count and radius limit per unit");
  for (const at::Tensor* t : {&out, &value_sum, &weight_sum, &key_sum, &key_count, &norm_max, &real_keys, &exact_k, &exact_v,
                              &exact_bias, &exact_count})
    TORCH_CHECK(t->is_contiguous(), "the state tensors must be contiguous");
  if (key_valid.has_value())
    TORCH_CHECK(key_valid->scalar_type() == at::kBool && key_valid->is_contiguous(), "key_valid: contiguous bool (B, L)");
  int64_t status = kOk;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "sb_hf_decoding_step", [&] {
    status = step<scalar_t>(q, k, v, key_valid, out, value_sum, weight_sum, key_sum, key_count, norm_max, real_keys, exact_k,
                            exact_v, exact_bias, exact_count, windows, sinks, radius_limits, column_queries, column_threshold,
                            seen, checked, fold_sinks, threshold, scale, radius, radius_floor, out_max);
  });
  return status;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decoding_step", &decoding_step, "One support-basis decoding step (degree-0 taylor far field), in place");
}
