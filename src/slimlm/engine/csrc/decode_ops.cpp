// Fused glue of one decode step for slimlm's engine (everything between the weight matmuls), so a
// layer costs a handful of calls instead of ~60 small PyTorch ops. Plain C++ (the compiler
// vectorises it); float32 or bfloat16 tensors, rounding where the PyTorch path rounds:
//
//   add_rms_norm(h, delta, w, eps)   h += delta (in place, if delta is given); returns
//                                    w * to_dtype(h * rsqrt(mean(h^2) + eps))     (HF's RMSNorm)
//   silu_mul(gate, up)               silu(gate) * up (ATen's ops, called from C++)
//   rope_attend(q, k, v, cos, sin, kc, vc, tables, pos, window, scale)
//       q (B, H*D), k/v (B, Hkv*D): rotate the first R dims of q and k (half-split, as Llama), write
//       k, v into the paged cache kc/vc (blocks, Hkv, block_size, D) at position pos[b] of the sequence
//       whose block table is tables[b] (position p: block tables[b][p / block_size], offset p % block_size),
//       every row's before any row attends (so rows may be several tokens of one sequence, at their
//       positions), then attend (q and k are rotated in place):
//       each query head sees keys j <= pos[b] (and j > pos[b] - window), float32 softmax.
//       Returns (B, H*D).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

template <typename T> inline float f(T v) { return static_cast<float>(v); }
template <typename T> inline T cast(float v) { return static_cast<T>(v); }

// bfloat16 <-> float as branch-free bit operations the compiler vectorises (c10's conversion does not):
// round to nearest even, NaN kept a quiet NaN, as torch's cast
template <> inline float f(at::BFloat16 v) {
  const uint32_t u = (uint32_t)v.x << 16;
  float out;
  std::memcpy(&out, &u, 4);
  return out;
}
template <> inline at::BFloat16 cast(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return at::BFloat16((uint16_t)(nan ? 0x7FC0u : rounded), at::BFloat16::from_bits());
}

template <typename T>
inline void to_float(const T* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = f(src[i]);
}

inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// exp(x) for x <= 0 (softmax after subtracting the max), vectorisable: 2^(x log2 e) split into an integer
// power (exponent bits) and a degree-6 polynomial; relative error ~2e-7.
inline float exp_nonpos(float x) {
  x = std::max(x, -87.f);
  const float t = x * 1.44269504088896341f;
  const float n = std::nearbyint(t), r = (t - n) * 0.693147180559945f;
  float p = 1.f + r * (1.f + r * (0.5f + r * (0.166666672f + r * (0.0416666418f + r * (0.00833336823f + r * 0.00138887f)))));
  int32_t bits;
  std::memcpy(&bits, &p, 4);
  bits += (int32_t)n << 23;
  std::memcpy(&p, &bits, 4);
  return p;
}

template <typename T>
void add_rms_norm_impl(T* h, const T* delta, const T* w, T* out, int64_t rows, int64_t c, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    T* hr = h + r * c;
    if (delta) {
      const T* dr = delta + r * c;
#pragma omp simd
      for (int64_t i = 0; i < c; ++i) hr[i] = cast<T>(f(hr[i]) + f(dr[i]));
    }
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < c; ++i) ss += f(hr[i]) * f(hr[i]);
    const float inv = 1.f / std::sqrt(ss / (float)c + eps);
    T* o = out + r * c;
#pragma omp simd
    for (int64_t i = 0; i < c; ++i) o[i] = cast<T>(f(w[i]) * f(cast<T>(f(hr[i]) * inv)));
  }
}

// rotate the first r dims of x (d) in place: x*cos + rotate_half(x)*sin, each product and the sum rounded to T
template <typename T>
inline void rope(T* x, const T* cs, const T* sn, int r) {
  const int half = r / 2;
  float tmp[512];
  to_float(x, tmp, r);
#pragma omp simd
  for (int i = 0; i < half; ++i)
    x[i] = cast<T>(f(cast<T>(tmp[i] * f(cs[i]))) + f(cast<T>(-tmp[i + half] * f(sn[i]))));
#pragma omp simd
  for (int i = half; i < r; ++i)
    x[i] = cast<T>(f(cast<T>(tmp[i] * f(cs[i]))) + f(cast<T>(tmp[i - half] * f(sn[i]))));
}

template <typename T>
void rope_attend_impl(T* q, T* k, const T* v, const T* cs, const T* sn, int r, T* kc, T* vc, const int64_t* tables,
                      int64_t nt, const int64_t* pos, int64_t B, int64_t H, int64_t Hkv, int64_t S, int64_t D,
                      int64_t window, float scale, T* out) {
  const int64_t G = H / Hkv;
  // offset of position p's vector of kv head h in the cache of the sequence with block table t
  auto at = [&](const int64_t* t, int64_t h, int64_t p) { return ((t[p / S] * Hkv + h) * S + p % S) * D; };
  // every row's key (rotated) and value go into the cache first: rows of one sequence (a prefill chunk
  // in a mixed step) then see each other's keys whichever thread attends for them. A few KB per step:
  // not worth a parallel region.
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hkv; ++h) {
      const int64_t* table = tables + b * nt;
      T* kh = k + (b * Hkv + h) * D;
      rope(kh, cs + b * r, sn + b * r, r);
      T* kdst = kc + at(table, h, pos[b]);
      T* vdst = vc + at(table, h, pos[b]);
      const T* vh = v + (b * Hkv + h) * D;
      for (int64_t i = 0; i < D; ++i) { kdst[i] = kh[i]; vdst[i] = vh[i]; }
    }
  at::parallel_for(0, B * Hkv, 1, [&](int64_t a, int64_t e) {
    std::vector<float> scores, kt, acc(G * D), qf(G * D), row(D);
    for (int64_t task = a; task < e; ++task) {
      const int64_t b = task / Hkv, h = task % Hkv;
      const int64_t* table = tables + b * nt;
      // this task owns kv head h of row b and its G query heads: rotate them and attend
      for (int64_t g = 0; g < G; ++g) rope(q + (b * H + h * G + g) * D, cs + b * r, sn + b * r, r);
      const int64_t last = pos[b], first = window > 0 ? std::max<int64_t>(0, last - window + 1) : 0;
      const int64_t n = last - first + 1;
      scores.assign(G * n, 0.f);
      kt.resize(D * n);
      to_float(q + (b * H + h * G) * D, qf.data(), G * D);  // the G query heads sharing kv head h
      // keys transposed to (D, n) in float: the score loops run along keys; a block's run at a time
      for (int64_t j = 0; j < n;) {
        const int64_t p = first + j, off = p % S, run = std::min(S - off, n - j);
        const T* kb = kc + ((table[p / S] * Hkv + h) * S + off) * D;
        float* kd = kt.data() + j;
        for (int64_t jj = 0; jj < run; ++jj)
          for (int64_t i = 0; i < D; ++i) kd[i * n + jj] = f(kb[jj * D + i]);
        j += run;
      }
      for (int64_t g = 0; g < G; ++g) {
        float* sg = scores.data() + g * n;
        for (int64_t i = 0; i < D; ++i) {
          const float qi = qf[g * D + i] * scale;
          const float* ki = kt.data() + i * n;
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) sg[j] += qi * ki[j];
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* sg = scores.data() + g * n;
        float mx = -INFINITY, total = 0.f;
        for (int64_t j = 0; j < n; ++j) mx = std::max(mx, sg[j]);
#pragma omp simd reduction(+ : total)
        for (int64_t j = 0; j < n; ++j) {
          sg[j] = exp_nonpos(sg[j] - mx);
          total += sg[j];
        }
        const float inv = 1.f / total;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) sg[j] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      const T* vj = nullptr;  // value of key j, stepping through a block's run (no division per key)
      for (int64_t j = 0, left = 0; j < n; ++j, --left, vj += D) {
        if (left == 0) {
          const int64_t p = first + j, off = p % S;
          vj = vc + ((table[p / S] * Hkv + h) * S + off) * D;
          left = S - off;
        }
        to_float(vj, row.data(), D);
        for (int64_t g = 0; g < G; ++g) {
          const float p = scores[g * n + j];
          float* ag = acc.data() + g * D;
#pragma omp simd
          for (int64_t i = 0; i < D; ++i) ag[i] += p * row[i];
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        T* o = out + (b * H + h * G + g) * D;
        for (int64_t i = 0; i < D; ++i) o[i] = cast<T>(acc[g * D + i]);
      }
    }
  });
}

#define DISPATCH(t, NAME, ...)                                                   \
  if (t.scalar_type() == torch::kFloat32) { using T = float; __VA_ARGS__; }       \
  else if (t.scalar_type() == torch::kBFloat16) { using T = at::BFloat16; __VA_ARGS__; } \
  else TORCH_CHECK(false, NAME ": float32 or bfloat16 only");

}  // namespace

torch::Tensor add_rms_norm(torch::Tensor h, c10::optional<torch::Tensor> delta, torch::Tensor w, double eps) {
  TORCH_CHECK(h.is_contiguous() && w.is_contiguous() && w.scalar_type() == h.scalar_type(), "add_rms_norm: layout");
  const int64_t c = h.size(-1), rows = h.numel() / c;
  auto out = torch::empty_like(h);
  torch::Tensor d;
  if (delta.has_value()) {
    d = delta->contiguous();
    TORCH_CHECK(d.scalar_type() == h.scalar_type() && d.numel() == h.numel(), "add_rms_norm: delta");
  }
  DISPATCH(h, "add_rms_norm",
           add_rms_norm_impl<T>(h.data_ptr<T>(), d.defined() ? d.data_ptr<T>() : nullptr, w.data_ptr<T>(),
                                out.data_ptr<T>(), rows, c, (float)eps));
  return out;
}

torch::Tensor silu_mul(torch::Tensor gate, torch::Tensor up) {
  return at::mul(at::silu(gate), up);  // ATen's own vectorised silu: bit-identical to the PyTorch path
}

torch::Tensor rope_attend(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor cos, torch::Tensor sin,
                          torch::Tensor kc, torch::Tensor vc, torch::Tensor tables, torch::Tensor pos, int64_t window,
                          double scale) {
  const int64_t B = q.size(0), Hkv = kc.size(1), S = kc.size(2), D = kc.size(3);
  const int64_t H = q.size(1) / D;
  const int r = (int)cos.size(-1);
  TORCH_CHECK(r <= D && r % 2 == 0 && r <= 512, "rope_attend: rotary dims");
  TORCH_CHECK(kc.is_contiguous() && vc.is_contiguous() && kc.scalar_type() == q.scalar_type(), "rope_attend: cache");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous(), "rope_attend: q and k must be contiguous (rotated in place)");
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == B, "rope_attend: one block table per row");
  v = v.contiguous();
  cos = cos.to(q.scalar_type()).contiguous(), sin = sin.to(q.scalar_type()).contiguous();
  tables = tables.to(torch::kLong).contiguous(), pos = pos.to(torch::kLong).contiguous();
  const int64_t nt = tables.size(1);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t p = pos.data_ptr<int64_t>()[b];
    TORCH_CHECK(p >= 0 && p < nt * S, "rope_attend: position beyond the block table");
    for (int64_t i = 0; i <= p / S; ++i) {
      const int64_t blk = tables.data_ptr<int64_t>()[b * nt + i];
      TORCH_CHECK(blk >= 0 && blk < kc.size(0), "rope_attend: block beyond the cache");
    }
  }
  auto out = torch::empty({B, H * D}, q.options());
  DISPATCH(q, "rope_attend",
           rope_attend_impl<T>(q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), cos.data_ptr<T>(), sin.data_ptr<T>(),
                               r, kc.data_ptr<T>(), vc.data_ptr<T>(), tables.data_ptr<int64_t>(), nt,
                               pos.data_ptr<int64_t>(), B, H, Hkv, S, D, window, (float)scale, out.data_ptr<T>()));
  return out;
}
