// Fused glue of one decode step for slimlm's engine (everything between the weight matmuls), so a
// layer costs a handful of calls instead of ~60 small PyTorch ops. Plain C++ (the compiler
// vectorises it); float32 or bfloat16 tensors, rounding where the PyTorch path rounds:
//
//   add_rms_norm(h, delta, w, eps)   h += delta (in place, if delta is given); returns
//                                    w * to_dtype(h * rsqrt(mean(h^2) + eps))     (HF's RMSNorm)
//   silu_mul(gate, up)               to_dtype(silu(gate)) * up
//   rope_attend(q, k, v, cos, sin, kc, vc, rows, pos, window, scale)
//       q (B, H*D), k/v (B, Hkv*D): rotate the first R dims of q and k (half-split, as Llama), write
//       k, v into the cache kc/vc (S, Hkv, L, D) at slot rows[b], position pos[b], then attend (q and k
//       are rotated in place):
//       each query head sees keys j <= pos[b] (and j > pos[b] - window), float32 softmax.
//       Returns (B, H*D).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>

namespace {

template <typename T> inline float f(T v) { return static_cast<float>(v); }
template <typename T> inline T cast(float v) { return static_cast<T>(v); }  // bf16: round to nearest even

template <typename T>
void add_rms_norm_impl(T* h, const T* delta, const T* w, T* out, int64_t rows, int64_t c, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    T* hr = h + r * c;
    if (delta) {
      const T* dr = delta + r * c;
      for (int64_t i = 0; i < c; ++i) hr[i] = cast<T>(f(hr[i]) + f(dr[i]));
    }
    float ss = 0.f;
    for (int64_t i = 0; i < c; ++i) ss += f(hr[i]) * f(hr[i]);
    const float inv = 1.f / std::sqrt(ss / (float)c + eps);
    T* o = out + r * c;
    for (int64_t i = 0; i < c; ++i) o[i] = cast<T>(f(w[i]) * f(cast<T>(f(hr[i]) * inv)));
  }
}

template <typename T>
void silu_mul_impl(const T* g, const T* u, T* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float x = f(g[i]);
    out[i] = cast<T>(f(cast<T>(x / (1.f + std::exp(-x)))) * f(u[i]));
  }
}

// rotate the first r dims of x (d) in place: x*cos + rotate_half(x)*sin, each product and the sum rounded to T
template <typename T>
inline void rope(T* x, const T* cs, const T* sn, int r) {
  const int half = r / 2;
  float tmp[512];
  for (int i = 0; i < r; ++i) tmp[i] = f(x[i]);
  for (int i = 0; i < r; ++i) {
    const float rot = i < half ? -tmp[i + half] : tmp[i - half];
    x[i] = cast<T>(f(cast<T>(tmp[i] * f(cs[i]))) + f(cast<T>(rot * f(sn[i]))));
  }
}

template <typename T>
void rope_attend_impl(T* q, T* k, const T* v, const T* cs, const T* sn, int r, T* kc, T* vc, const int64_t* rows,
                      const int64_t* pos, int64_t B, int64_t H, int64_t Hkv, int64_t L, int64_t D, int64_t window,
                      float scale, T* out) {
  const int64_t G = H / Hkv;
  // rope on q and k, then write k and v into the cache
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) rope(q + (b * H + h) * D, cs + b * r, sn + b * r, r);
    for (int64_t h = 0; h < Hkv; ++h) {
      T* kh = k + (b * Hkv + h) * D;
      rope(kh, cs + b * r, sn + b * r, r);
      T* kdst = kc + ((rows[b] * Hkv + h) * L + pos[b]) * D;
      T* vdst = vc + ((rows[b] * Hkv + h) * L + pos[b]) * D;
      const T* vh = v + (b * Hkv + h) * D;
      for (int64_t i = 0; i < D; ++i) { kdst[i] = kh[i]; vdst[i] = vh[i]; }
    }
  }
  at::parallel_for(0, B * Hkv, 1, [&](int64_t a, int64_t e) {
    std::vector<float> scores, acc(D), qf(D);
    for (int64_t task = a; task < e; ++task) {
      const int64_t b = task / Hkv, h = task % Hkv;
      const int64_t last = pos[b], first = window > 0 ? std::max<int64_t>(0, last - window + 1) : 0;
      const int64_t n = last - first + 1;
      scores.resize(n);
      const T* kbase = kc + ((rows[b] * Hkv + h) * L) * D;
      const T* vbase = vc + ((rows[b] * Hkv + h) * L) * D;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t head = h * G + g;
        const T* qh = q + (b * H + head) * D;
        for (int64_t i = 0; i < D; ++i) qf[i] = f(qh[i]);
        float mx = -INFINITY;
        for (int64_t j = 0; j < n; ++j) {
          const T* kj = kbase + (first + j) * D;
          float s = 0.f;
          for (int64_t i = 0; i < D; ++i) s += qf[i] * f(kj[i]);
          scores[j] = s * scale;
          mx = std::max(mx, scores[j]);
        }
        float total = 0.f;
        for (int64_t j = 0; j < n; ++j) { scores[j] = std::exp(scores[j] - mx); total += scores[j]; }
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t j = 0; j < n; ++j) {
          const T* vj = vbase + (first + j) * D;
          const float p = scores[j] / total;
          for (int64_t i = 0; i < D; ++i) acc[i] += p * f(vj[i]);
        }
        T* o = out + (b * H + head) * D;
        for (int64_t i = 0; i < D; ++i) o[i] = cast<T>(acc[i]);
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
  gate = gate.contiguous(), up = up.contiguous();
  TORCH_CHECK(gate.sizes() == up.sizes() && gate.scalar_type() == up.scalar_type(), "silu_mul: shapes");
  auto out = torch::empty_like(gate);
  DISPATCH(gate, "silu_mul", silu_mul_impl<T>(gate.data_ptr<T>(), up.data_ptr<T>(), out.data_ptr<T>(), gate.numel()));
  return out;
}

torch::Tensor rope_attend(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor cos, torch::Tensor sin,
                          torch::Tensor kc, torch::Tensor vc, torch::Tensor rows, torch::Tensor pos, int64_t window,
                          double scale) {
  const int64_t B = q.size(0), Hkv = kc.size(1), L = kc.size(2), D = kc.size(3);
  const int64_t H = q.size(1) / D;
  const int r = (int)cos.size(-1);
  TORCH_CHECK(r <= D && r % 2 == 0 && r <= 512, "rope_attend: rotary dims");
  TORCH_CHECK(kc.is_contiguous() && vc.is_contiguous() && kc.scalar_type() == q.scalar_type(), "rope_attend: cache");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous(), "rope_attend: q and k must be contiguous (rotated in place)");
  v = v.contiguous();
  cos = cos.to(q.scalar_type()).contiguous(), sin = sin.to(q.scalar_type()).contiguous();
  rows = rows.to(torch::kLong).contiguous(), pos = pos.to(torch::kLong).contiguous();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(pos.data_ptr<int64_t>()[b] < L && rows.data_ptr<int64_t>()[b] < kc.size(0), "rope_attend: beyond the cache");
  auto out = torch::empty({B, H * D}, q.options());
  DISPATCH(q, "rope_attend",
           rope_attend_impl<T>(q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), cos.data_ptr<T>(), sin.data_ptr<T>(),
                               r, kc.data_ptr<T>(), vc.data_ptr<T>(), rows.data_ptr<int64_t>(), pos.data_ptr<int64_t>(),
                               B, H, Hkv, L, D, window, (float)scale, out.data_ptr<T>()));
  return out;
}
