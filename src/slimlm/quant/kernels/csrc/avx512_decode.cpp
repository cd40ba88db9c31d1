// Decode (small-M) weight-only matmul kernels for slimlm, AVX-512 VNNI / BF16.
//
// y (M, N) = x (M, K) @ W^T, W dequantized on the fly.
//
// int4 x int8 activations ("q4p_a8", the default for int4) and int8 x int16 activations ("q8p_a16", the
//   default for int8): straight from the layer's portable buffers, nothing repacked (sections at the end).
//
// Repacked layouts (tile = 16 output rows), for the kernels below that keep a copy next to the codes:
// int4 ("q4bf16", opt-in `cpu_int4_avx512`): activations rounded to bf16 (like ATen's op).
//     qw  uint8 [N/16][K/8][64]: chunk (t, c) holds k = 8c..8c+7 of rows 16t..16t+15;
//         byte 4j+i = q[16t+j][8c+i] | q[16t+j][8c+4+i] << 4   (j < 16, i < 4)
//     sc  fp16  [N/16][G][16]  scale of row 16t+j, group g
//     zp  uint8 [N/16][G][16]  zero point of row 16t+j, group g
//   Nibble q becomes the bf16 bit pattern 0x4300|q = 128+q exactly (byte unpack with 0x43), dot products
//   with _mm512_dpbf16_ps, and (128 + z) * sum(x_g) is subtracted per group.
// int8 VNNI ("q8a8"): activations quantized to int8 per 32-column block (dx = amax/127, round to nearest);
//   weights as unsigned codes u = q + 128 (stored ^ 0x80).
//     qw  uint8 [N/16][K/4][64]: chunk (t, c): byte 4j+i = u[16t+j][4c+i]
//     sc  fp32 [N], zp fp32 [N] (128 for symmetric, else the zero point)
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <vector>

namespace {

constexpr int QB = 32;  // activation quantization block
constexpr int PF = 8192;  // software prefetch distance in bytes; 8192 was best in a sweep on EPYC

// x (M, K) contiguous fp32 or bf16 as fp32 rows: x's own data, or bf16 widened into `buf` (exactly: a bf16
// value is the high half of its fp32; no tensor allocated through the dispatcher)
const float* float_rows(const torch::Tensor& x, std::vector<float>& buf) {
  if (x.scalar_type() != torch::kBFloat16) return x.data_ptr<float>();
  buf.resize((size_t)x.numel());
  const uint16_t* xb = (const uint16_t*)x.data_ptr<at::BFloat16>();
  for (size_t i = 0; i < buf.size(); ++i) {
    const uint32_t u = (uint32_t)xb[i] << 16;
    std::memcpy(&buf[i], &u, 4);
  }
  return buf.data();
}

// x (M, K) fp32 -> xq int8 (M, K), dx (M, K/32), dsum (M, K/32) = dx * sum(xq of block)
void quant_act(const float* x, int M, int K, int8_t* xq, float* dx, float* dsum) {
  const int nb = K / QB;
  const __m512 signmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  for (int m = 0; m < M; ++m) {
    for (int b = 0; b < nb; ++b) {
      const float* p = x + (size_t)m * K + b * QB;
      __m512 a = _mm512_loadu_ps(p), c = _mm512_loadu_ps(p + 16);
      __m512 am = _mm512_max_ps(_mm512_and_ps(a, signmask), _mm512_and_ps(c, signmask));
      float amax = _mm512_reduce_max_ps(am);
      float d = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
      __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, _mm512_set1_ps(id)));
      __m512i qc = _mm512_cvtps_epi32(_mm512_mul_ps(c, _mm512_set1_ps(id)));
      int8_t* o = xq + (size_t)m * K + b * QB;
      _mm_storeu_si128((__m128i*)o, _mm512_cvtsepi32_epi8(qa));
      _mm_storeu_si128((__m128i*)(o + 16), _mm512_cvtsepi32_epi8(qc));
      int s = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qc));
      dx[m * nb + b] = d;
      dsum[m * nb + b] = d * (float)s;
    }
  }
}

template <int M>
void q8a8_tiles(const int8_t* xq, const float* dx, const float* xtot, int K, const uint8_t* qw, const float* sc,
                const float* zp, float* y, int N, int64_t t0, int64_t t1) {
  const int nb = K / QB;
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* w = qw + (size_t)t * K * 16;
    __m512 D[M];
    for (int m = 0; m < M; ++m) D[m] = _mm512_setzero_ps();
    for (int kb = 0; kb < nb; ++kb) {
      const uint8_t* wb = w + (size_t)kb * 512;
      for (int p = 0; p < 512; p += 64) _mm_prefetch((const char*)(wb + PF + p), _MM_HINT_T0);
      __m512i ai[M], bi[M];
      for (int m = 0; m < M; ++m) ai[m] = bi[m] = _mm512_setzero_si512();
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) {
        __m512i v0 = _mm512_loadu_si512(wb + c * 128);
        __m512i v1 = _mm512_loadu_si512(wb + c * 128 + 64);
        for (int m = 0; m < M; ++m) {
          const int8_t* xp = xq + (size_t)m * K + kb * QB + c * 8;
          ai[m] = _mm512_dpbusd_epi32(ai[m], v0, _mm512_set1_epi32(*(const int32_t*)xp));
          bi[m] = _mm512_dpbusd_epi32(bi[m], v1, _mm512_set1_epi32(*(const int32_t*)(xp + 4)));
        }
      }
      for (int m = 0; m < M; ++m)
        D[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(ai[m], bi[m])), _mm512_set1_ps(dx[m * nb + kb]),
                               D[m]);
    }
    __m512 sv = _mm512_loadu_ps(sc + t * 16), zv = _mm512_loadu_ps(zp + t * 16);
    for (int m = 0; m < M; ++m)
      _mm512_storeu_ps(y + (size_t)m * N + t * 16, _mm512_mul_ps(sv, _mm512_fnmadd_ps(zv, _mm512_set1_ps(xtot[m]), D[m])));
  }
}

// bf16 activations against the same int4 layout. xb: (M, K) bf16 bits, xsum: (M, G) sum of bf16(x) per group.
// After unpacklo/hi_epi8 with 0x43: 32-bit lane p of 128-bit block L holds k-pair (p & 1) of row 4L + (p >> 1)
// (lo) or 4L + 2 + (p >> 1) (hi); the k-pair alternates, so a 64-bit broadcast of x[k..k+3] feeds every lane.
template <int M, int GS, bool BF16OUT>
void q4bf16_tiles(const uint16_t* xb, const float* xsum, int K, int G, const uint8_t* qw, const uint16_t* sc,
                  const uint8_t* zp, void* y, int N, int64_t t0, int64_t t1) {
  const __m512i mask = _mm512_set1_epi8(0x0F), c43 = _mm512_set1_epi8(0x43);
  // lane permutations: row r of the tile -> (lane of lo/hi accumulator); we compute per-lane scale vectors
  // sA[lane] = s[row_lo(lane)], sB[lane] = s[row_hi(lane)] with idx vectors
  const __m512i idxA = _mm512_setr_epi32(0, 0, 1, 1, 4, 4, 5, 5, 8, 8, 9, 9, 12, 12, 13, 13);
  const __m512i idxB = _mm512_setr_epi32(2, 2, 3, 3, 6, 6, 7, 7, 10, 10, 11, 11, 14, 14, 15, 15);
  const __m512 evenmask = _mm512_castsi512_ps(_mm512_setr_epi32(-1, 0, -1, 0, -1, 0, -1, 0, -1, 0, -1, 0, -1, 0, -1, 0));
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* w = qw + (size_t)t * (K / 8) * 64;
    const uint16_t* s = sc + (size_t)t * G * 16;
    const uint8_t* z = zp + (size_t)t * G * 16;
    __m512 yA[M], yB[M];
    for (int m = 0; m < M; ++m) yA[m] = yB[m] = _mm512_setzero_ps();
    for (int g = 0; g < G; ++g) {
      __m512 aA[M], aB[M];
      for (int m = 0; m < M; ++m) aA[m] = aB[m] = _mm512_setzero_ps();
      const uint8_t* wg = w + (size_t)g * (GS / 8) * 64;
      for (int p = 0; p < GS * 8; p += 64) _mm_prefetch((const char*)(wg + PF + p), _MM_HINT_T0);
#pragma GCC unroll 4
      for (int c = 0; c < GS / 8; ++c) {
        __m512i v = _mm512_loadu_si512(wg + c * 64);
        __m512i lo = _mm512_and_si512(v, mask);
        __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
        __m512bh loA = (__m512bh)_mm512_unpacklo_epi8(lo, c43), loB = (__m512bh)_mm512_unpackhi_epi8(lo, c43);
        __m512bh hiA = (__m512bh)_mm512_unpacklo_epi8(hi, c43), hiB = (__m512bh)_mm512_unpackhi_epi8(hi, c43);
        for (int m = 0; m < M; ++m) {
          const uint16_t* xp = xb + (size_t)m * K + g * GS + c * 8;
          __m512bh x0 = (__m512bh)_mm512_set1_epi64(*(const int64_t*)xp);
          __m512bh x1 = (__m512bh)_mm512_set1_epi64(*(const int64_t*)(xp + 4));
          aA[m] = _mm512_dpbf16_ps(aA[m], loA, x0);
          aB[m] = _mm512_dpbf16_ps(aB[m], loB, x0);
          aA[m] = _mm512_dpbf16_ps(aA[m], hiA, x1);
          aB[m] = _mm512_dpbf16_ps(aB[m], hiB, x1);
        }
      }
      __m512 sv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(s + g * 16)));
      __m512 zv = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(z + g * 16))));
      __m512 szv = _mm512_mul_ps(sv, _mm512_add_ps(zv, _mm512_set1_ps(128.f)));  // s * (128 + z)
      __m512 sA = _mm512_permutexvar_ps(idxA, sv), sB = _mm512_permutexvar_ps(idxB, sv);
      __m512 zA = _mm512_and_ps(_mm512_permutexvar_ps(idxA, szv), evenmask);
      __m512 zB = _mm512_and_ps(_mm512_permutexvar_ps(idxB, szv), evenmask);
      for (int m = 0; m < M; ++m) {
        __m512 xs = _mm512_set1_ps(xsum[m * G + g]);
        yA[m] = _mm512_fnmadd_ps(zA, xs, _mm512_fmadd_ps(sA, aA[m], yA[m]));
        yB[m] = _mm512_fnmadd_ps(zB, xs, _mm512_fmadd_ps(sB, aB[m], yB[m]));
      }
    }
    // pair-sum lanes (2i, 2i+1) and scatter back to row order
    for (int m = 0; m < M; ++m) {
      // pairsum: lanes 2i+1 added into 2i
      __m512 pa = _mm512_add_ps(yA[m], _mm512_permute_ps(yA[m], 0xB1));  // swap adjacent
      __m512 pb = _mm512_add_ps(yB[m], _mm512_permute_ps(yB[m], 0xB1));
      // even lanes of pa: rows 4L + {0,1} at lanes 4L + {0,2}; of pb: rows 4L+{2,3} at lanes 4L+{0,2}
      // row r = 4L+q: q<2 -> pa lane 4L+2q, q>=2 -> pb lane 4L+2(q-2) (index 16+ in permutex2var)
      const __m512i idx = _mm512_setr_epi32(0, 2, 16, 18, 4, 6, 20, 22, 8, 10, 24, 26, 12, 14, 28, 30);
      __m512 out = _mm512_permutex2var_ps(pa, idx, pb);
      if constexpr (BF16OUT)  // round to nearest even, as torch's float -> bfloat16 cast
        _mm256_storeu_si256((__m256i*)((uint16_t*)y + (size_t)m * N + t * 16), (__m256i)_mm512_cvtneps_pbh(out));
      else
        _mm512_storeu_ps((float*)y + (size_t)m * N + t * 16, out);
    }
  }
}

// int8 weights (unsigned codes u = 16h + l, the q8a8 layout) against bf16 activations: each nibble plane becomes
// bf16 128 + nibble exactly (byte unpack with 0x43, as q4bf16), the high plane is dotted with 16·x (exact in
// bf16) and the low plane with x into the same accumulators, so acc = sum x·u + 2176·sum(x) per row.
template <int M>
void q8bf16_tiles(const uint16_t* xb, const uint16_t* x16, const float* xtot, int K, const uint8_t* qw,
                  const float* sc, const float* zp, void* y, bool bf16out, int N, int64_t t0, int64_t t1) {
  const __m512i mask = _mm512_set1_epi8(0x0F), c43 = _mm512_set1_epi8(0x43);
  const __m512i idx = _mm512_setr_epi32(0, 2, 16, 18, 4, 6, 20, 22, 8, 10, 24, 26, 12, 14, 28, 30);
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* w = qw + (size_t)t * K * 16;
    __m512 aA[M], aB[M], hA[M], hB[M];  // four independent chains: dpbf16's latency, not its throughput, binds
    for (int m = 0; m < M; ++m) aA[m] = aB[m] = hA[m] = hB[m] = _mm512_setzero_ps();
    for (int c = 0; c < K / 4; ++c) {
      const uint8_t* wc = w + (size_t)c * 64;
      if ((c & 3) == 0)
        for (int p = 0; p < 256; p += 64) _mm_prefetch((const char*)(wc + PF + p), _MM_HINT_T0);
      __m512i v = _mm512_loadu_si512(wc);
      __m512i lo = _mm512_and_si512(v, mask);
      __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
      __m512bh loA = (__m512bh)_mm512_unpacklo_epi8(lo, c43), loB = (__m512bh)_mm512_unpackhi_epi8(lo, c43);
      __m512bh hiA = (__m512bh)_mm512_unpacklo_epi8(hi, c43), hiB = (__m512bh)_mm512_unpackhi_epi8(hi, c43);
      for (int m = 0; m < M; ++m) {
        __m512bh x1 = (__m512bh)_mm512_set1_epi64(*(const int64_t*)(xb + (size_t)m * K + 4 * c));
        __m512bh xh = (__m512bh)_mm512_set1_epi64(*(const int64_t*)(x16 + (size_t)m * K + 4 * c));
        aA[m] = _mm512_dpbf16_ps(aA[m], loA, x1);
        aB[m] = _mm512_dpbf16_ps(aB[m], loB, x1);
        hA[m] = _mm512_dpbf16_ps(hA[m], hiA, xh);
        hB[m] = _mm512_dpbf16_ps(hB[m], hiB, xh);
      }
    }
    for (int m = 0; m < M; ++m) aA[m] = _mm512_add_ps(aA[m], hA[m]), aB[m] = _mm512_add_ps(aB[m], hB[m]);
    __m512 sv = _mm512_loadu_ps(sc + t * 16), zv = _mm512_add_ps(_mm512_loadu_ps(zp + t * 16), _mm512_set1_ps(2176.f));
    for (int m = 0; m < M; ++m) {
      __m512 pa = _mm512_add_ps(aA[m], _mm512_permute_ps(aA[m], 0xB1));
      __m512 pb = _mm512_add_ps(aB[m], _mm512_permute_ps(aB[m], 0xB1));
      __m512 acc = _mm512_permutex2var_ps(pa, idx, pb);  // rows in order (see q4bf16_tiles)
      __m512 out = _mm512_mul_ps(sv, _mm512_fnmadd_ps(zv, _mm512_set1_ps(xtot[m]), acc));
      if (bf16out)
        _mm256_storeu_si256((__m256i*)((uint16_t*)y + (size_t)m * N + t * 16), (__m256i)_mm512_cvtneps_pbh(out));
      else
        _mm512_storeu_ps((float*)y + (size_t)m * N + t * 16, out);
    }
  }
}

template <typename F>
void par(int64_t ntiles, F f) {
  at::parallel_for(0, ntiles, 1, [&](int64_t a, int64_t b) { f(a, b); });
}

}  // namespace

torch::Tensor q8a8_mm(torch::Tensor x, torch::Tensor qw, torch::Tensor sc, torch::Tensor zp) {
  const int M = x.size(0), K = x.size(1);
  const int N = qw.size(0) * 16, nb = K / QB;
  auto y = torch::empty({M, N}, x.options());
  std::vector<int8_t> xq((size_t)M * K);
  std::vector<float> dx((size_t)M * nb), ds((size_t)M * nb), xt(8);
  const float* xp = x.data_ptr<float>();
  const uint8_t* w = qw.data_ptr<uint8_t>();
  const float* s = sc.data_ptr<float>();
  const float* z = zp.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t ntiles = N / 16;
  for (int m0 = 0; m0 < M; m0 += 8) {
    const int mm = std::min(8, M - m0);
    quant_act(xp + (size_t)m0 * K, mm, K, xq.data(), dx.data(), ds.data());
    for (int m = 0; m < mm; ++m) {
      float a = 0;
      for (int b = 0; b < nb; ++b) a += ds[m * nb + b];
      xt[m] = a;
    }
    float* yo = yp + (size_t)m0 * N;
#define Q8CASE(MM) \
  case MM: par(ntiles, [&](int64_t a, int64_t b) { q8a8_tiles<MM>(xq.data(), dx.data(), xt.data(), K, w, s, z, yo, N, a, b); }); break;
    switch (mm) { Q8CASE(1) Q8CASE(2) Q8CASE(3) Q8CASE(4) Q8CASE(5) Q8CASE(6) Q8CASE(7) Q8CASE(8) }
  }
  return y;
}

// Sum of each row's bf16 values per weight group: xsum (M, G) fp32.
static std::vector<float> group_sums(const uint16_t* xb, int M, int K, int group) {
  const int G = K / group;
  std::vector<float> xsum((size_t)M * G);
  for (int m = 0; m < M; ++m)
    for (int g = 0; g < G; ++g) {
      __m512 acc = _mm512_setzero_ps();
      for (int k = 0; k < group; k += 16) {
        __m256i v = _mm256_loadu_si256((const __m256i*)(xb + (size_t)m * K + g * group + k));
        acc = _mm512_add_ps(acc, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16)));
      }
      xsum[(size_t)m * G + g] = _mm512_reduce_add_ps(acc);
    }
  return xsum;
}

template <int MM, int GS, bool BF16OUT>
static void q4bf16_segments(const uint16_t* xo, const float* xso, int K, int G, const std::vector<torch::Tensor>& qws,
                            const std::vector<torch::Tensor>& scs, const std::vector<torch::Tensor>& zps,
                            const std::vector<void*>& ys, const std::vector<int64_t>& first, int64_t a, int64_t b) {
  // tiles [a, b) of the concatenation of all weights: run each weight's share
  for (size_t j = 0; j < qws.size(); ++j) {
    const int64_t lo = std::max(a, first[j]), hi = std::min(b, first[j + 1]);
    if (lo >= hi) continue;
    const int N = (int)(first[j + 1] - first[j]) * 16;
    q4bf16_tiles<MM, GS, BF16OUT>(xo, xso, K, G, qws[j].data_ptr<uint8_t>(), (const uint16_t*)scs[j].data_ptr<at::Half>(),
                                  zps[j].data_ptr<uint8_t>(), ys[j], N, lo - first[j], hi - first[j]);
  }
}

// rows m0..m0+mm-1 (mm <= 8) of x against tiles [a, b) of all weights
template <int GS, bool BF16OUT>
static void q4bf16_rows(int mm, const uint16_t* xo, const float* xso, int K, int G, const std::vector<torch::Tensor>& qws,
                        const std::vector<torch::Tensor>& scs, const std::vector<torch::Tensor>& zps,
                        const std::vector<void*>& ys, const std::vector<int64_t>& first, int64_t a, int64_t b) {
#define QBROW(MM) case MM: q4bf16_segments<MM, GS, BF16OUT>(xo, xso, K, G, qws, scs, zps, ys, first, a, b); break;
  switch (mm) { QBROW(1) QBROW(2) QBROW(3) QBROW(4) QBROW(5) QBROW(6) QBROW(7) QBROW(8) }
#undef QBROW
}

// x (M, K) bf16 contiguous against several int4 weights of the same group size (e.g. q, k and v) in one
// parallel region. Returns one (M, N_j) tensor per weight, bf16 if out_bf16 else fp32. Rows go 8 at a time
// (the accumulators fill the registers), but each block of TB tiles serves all row chunks while it is
// in cache, so the weights are read from memory once whatever M is.
std::vector<torch::Tensor> q4bf16_mm_many(torch::Tensor x, std::vector<torch::Tensor> qws, std::vector<torch::Tensor> scs,
                                          std::vector<torch::Tensor> zps, int64_t group, bool out_bf16) {
  constexpr int64_t TB = 4;  // 64 output rows: 64 KB of int4 g32 codes at K = 2048
  const int M = x.size(0), K = x.size(1), G = K / group;
  TORCH_CHECK(group == 32 || group == 128, "group must be 32 or 128");
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && x.is_contiguous(), "x must be contiguous bf16");
  const uint16_t* xb = (const uint16_t*)x.data_ptr<at::BFloat16>();
  std::vector<float> xsum = group_sums(xb, M, K, group);
  std::vector<torch::Tensor> out;
  std::vector<int64_t> first{0};
  for (auto& qw : qws) {
    out.push_back(torch::empty({M, qw.size(0) * 16}, x.options().dtype(out_bf16 ? torch::kBFloat16 : torch::kFloat32)));
    first.push_back(first.back() + qw.size(0));
  }
  std::vector<std::vector<void*>> ys;  // per chunk of 8 rows: where each weight's output rows start
  for (int m0 = 0; m0 < M; m0 += 8) {
    ys.emplace_back();
    for (auto& y : out) ys.back().push_back((char*)y.data_ptr() + (size_t)m0 * y.size(1) * y.element_size());
  }
  auto body = [&](auto rows) {
    par(first.back(), [&](int64_t a, int64_t b) {
      for (int64_t t0 = a; t0 < b; t0 += TB) {
        const int64_t t1 = std::min(b, t0 + TB);
        for (int m0 = 0; m0 < M; m0 += 8)
          rows(std::min(8, M - m0), xb + (size_t)m0 * K, xsum.data() + (size_t)m0 * G, K, G, qws, scs, zps,
               ys[m0 / 8], first, t0, t1);
      }
    });
  };
  if (group == 32)
    out_bf16 ? body(q4bf16_rows<32, true>) : body(q4bf16_rows<32, false>);
  else
    out_bf16 ? body(q4bf16_rows<128, true>) : body(q4bf16_rows<128, false>);
  return out;
}

// Dequantize portable int4 codes to bf16 for prefill's dense GEMM: qweight (N, K/2) uint8 with the even
// column in the low nibble, scale (N, G) fp16, zero (N, G) uint8 (empty: symmetric, zero point 8).
// w[n][k] = bf16((q - z) * s): the float32 dequantized weight rounded once. Returns (N, K) bf16.
torch::Tensor q4_dequant_bf16(torch::Tensor qweight, torch::Tensor scale, torch::Tensor zero, int64_t group) {
  const int64_t N = qweight.size(0), K = qweight.size(1) * 2, G = K / group;
  TORCH_CHECK(group % 32 == 0 && K % group == 0 && qweight.is_contiguous() && scale.is_contiguous(), "q4_dequant_bf16");
  TORCH_CHECK(scale.scalar_type() == torch::kHalf && (zero.numel() == 0 || zero.is_contiguous()), "q4_dequant_bf16: scales");
  auto w = torch::empty({N, K}, qweight.options().dtype(torch::kBFloat16));
  const uint8_t* q = qweight.data_ptr<uint8_t>();
  const uint16_t* sc = (const uint16_t*)scale.data_ptr<at::Half>();
  const uint8_t* zp = zero.numel() ? zero.data_ptr<uint8_t>() : nullptr;
  uint16_t* out = (uint16_t*)w.data_ptr<at::BFloat16>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    const __m512i low4 = _mm512_set1_epi32(0x0F);
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t g = 0; g < G; ++g) {
        const float s = _cvtsh_ss(sc[n * G + g]);
        const __m512i vz = _mm512_set1_epi32(zp ? zp[n * G + g] : 8);
        const __m512 vs = _mm512_set1_ps(s);
        for (int64_t k = g * group; k < (g + 1) * group; k += 32) {  // 16 bytes -> 32 weights
          __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(q + n * (K / 2) + k / 2)));
          __m512 even = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(b, low4), vz));
          __m512 odd = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(b, 4), vz));
          __m256i eb = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(even, vs));
          __m256i ob = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(odd, vs));
          __m512i pair = _mm512_or_si512(_mm512_cvtepu16_epi32(eb), _mm512_slli_epi32(_mm512_cvtepu16_epi32(ob), 16));
          _mm512_storeu_si512((void*)(out + n * K + k), pair);
        }
      }
    }
  });
  return w;
}

// x (M, K) bf16 contiguous against int8 weights in the q8a8 layout. Returns (M, N), bf16 if out_bf16 else fp32.
torch::Tensor q8bf16_mm(torch::Tensor x, torch::Tensor qw, torch::Tensor sc, torch::Tensor zp, bool out_bf16) {
  const int M = x.size(0), K = x.size(1);
  const int N = qw.size(0) * 16;
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && x.is_contiguous() && K % 4 == 0, "q8bf16_mm: x");
  auto y = torch::empty({M, N}, x.options().dtype(out_bf16 ? torch::kBFloat16 : torch::kFloat32));
  const uint16_t* xb = (const uint16_t*)x.data_ptr<at::BFloat16>();
  std::vector<uint16_t> x16((size_t)M * K);  // 16·x: exponent + 4, exact (zero and tiny values stay as they are)
  std::vector<float> xt(M);
  for (int m = 0; m < M; ++m) {
    float tot = 0.f;
    for (int k = 0; k < K; ++k) {
      const uint16_t b = xb[(size_t)m * K + k];
      uint32_t u = (uint32_t)b << 16;
      float v;
      std::memcpy(&v, &u, 4);
      tot += v;
      v *= 16.f;
      std::memcpy(&u, &v, 4);
      x16[(size_t)m * K + k] = (uint16_t)(u >> 16);
    }
    xt[m] = tot;
  }
  const uint8_t* w = qw.data_ptr<uint8_t>();
  const float* s = sc.data_ptr<float>();
  const float* z = zp.data_ptr<float>();
  const int64_t ntiles = N / 16, TB = 2;  // 32 rows x K codes per block, reused by every chunk of 8 rows
  char* yp = (char*)y.data_ptr();
  par(ntiles, [&](int64_t a, int64_t b) {
    for (int64_t t0 = a; t0 < b; t0 += TB) {
      const int64_t t1 = std::min(b, t0 + TB);
      for (int m0 = 0; m0 < M; m0 += 8) {
        const uint16_t* xo = xb + (size_t)m0 * K;
        const uint16_t* x16o = x16.data() + (size_t)m0 * K;
        void* yo = yp + (size_t)m0 * N * y.element_size();
#define Q8BCASE(MM) case MM: q8bf16_tiles<MM>(xo, x16o, xt.data() + m0, K, w, s, z, yo, out_bf16, N, t0, t1); break;
        switch (std::min(8, M - m0)) { Q8BCASE(1) Q8BCASE(2) Q8BCASE(3) Q8BCASE(4) Q8BCASE(5) Q8BCASE(6) Q8BCASE(7) Q8BCASE(8) }
#undef Q8BCASE
      }
    }
  });
  return y;
}

// Dequantize int8 codes to bf16 for prefill: qweight (N, K) int8 (q = u - 128), scale (N,) fp32, zero (N,) fp32
// zero points of the unsigned codes (128 when symmetric). w = bf16((q + 128 - z) * s). Returns (N, K) bf16.
torch::Tensor q8_dequant_bf16(torch::Tensor qweight, torch::Tensor scale, torch::Tensor zero) {
  const int64_t N = qweight.size(0), K = qweight.size(1);
  TORCH_CHECK(K % 16 == 0 && qweight.is_contiguous() && scale.scalar_type() == torch::kFloat32 &&
              zero.scalar_type() == torch::kFloat32, "q8_dequant_bf16");
  auto w = torch::empty({N, K}, qweight.options().dtype(torch::kBFloat16));
  const int8_t* q = qweight.data_ptr<int8_t>();
  const float* sc = scale.data_ptr<float>();
  const float* zp = zero.data_ptr<float>();
  uint16_t* out = (uint16_t*)w.data_ptr<at::BFloat16>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const __m512i shift = _mm512_set1_epi32((int)zp[n] - 128);
      const __m512 s = _mm512_set1_ps(sc[n]);
      for (int64_t k = 0; k < K; k += 16) {
        __m512i v = _mm512_sub_epi32(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(q + n * K + k))), shift);
        _mm256_storeu_si256((__m256i*)(out + n * K + k), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_cvtepi32_ps(v), s)));
      }
    }
  });
  return w;
}


// ---- int4 x int8 activations straight from the portable layout (no repacked copy) -------------------
//
// The layer's own buffers, as saved: qweight (N, K/2) uint8, byte i of a row = q[2i] | q[2i+1] << 4;
// scale (N, G) fp16; zero (N, G) uint8 (empty: symmetric, zero point 8). Activations are quantized to
// int8 per 32 columns (dx = amax/127, round to nearest even), as llama.cpp's Q8_0 does.
//
// A row is read 64 bytes (128 columns) at a time: its low nibbles are the even columns and its high
// nibbles the odd ones, so x is quantized into the same split (xe, xo: per 128-column chunk, the 64 even
// then the 64 odd columns) and two vpdpbusd give 16 int32 lanes, lane d covering columns 8d..8d+7 of
// the chunk, all inside one 32-column block b = 4c + d/4. Per chunk and row:
//   acc += float(lanes) * s[n, group of lane] * dx[b of lane]
// and at the end y = sum(acc) - sum_g s[n,g] z[n,g] xs[g], xs[g] = sum_{b in g} dx_b * sum(xq in b).

namespace {

constexpr int Q4P_PF = 8192;  // prefetch distance in the row stream, bytes

struct Q4PAct {  // x (M, K) prepared once per call
  int M, K, C, G;  // C: 128-column chunks (the last may be partial), G: weight groups
  std::vector<int8_t> xe, xo;  // (M, C, 64)
  std::vector<float> dxv;      // (M, C, 16): dx of each lane's block (0 past K)
  std::vector<float> xs;       // (M, G)
};

Q4PAct q4p_prepare(const float* x, int M, int K, int group) {
  Q4PAct a;
  a.M = M, a.K = K, a.C = (K + 127) / 128, a.G = K / group;
  a.xe.assign((size_t)M * a.C * 64, 0), a.xo.assign((size_t)M * a.C * 64, 0);
  a.dxv.assign((size_t)M * a.C * 16, 0.f), a.xs.assign((size_t)M * a.G, 0.f);
  const int nb = K / QB;
  std::vector<int8_t> xq((size_t)K);
  std::vector<float> dx(nb), dsum(nb);
  for (int m = 0; m < M; ++m) {
    quant_act(x + (size_t)m * K, 1, K, xq.data(), dx.data(), dsum.data());
    int8_t* e = a.xe.data() + (size_t)m * a.C * 64;
    int8_t* o = a.xo.data() + (size_t)m * a.C * 64;
    for (int k = 0; k < K; k += 2) {
      const int c = k / 128, i = (k % 128) / 2;
      e[c * 64 + i] = xq[k], o[c * 64 + i] = xq[k + 1];
    }
    float* dv = a.dxv.data() + (size_t)m * a.C * 16;
    // lane d of chunk c is block 4c + d/4, so each block's dx fills 4 consecutive lanes. (Written as a
    // loop over lanes with `4c + d/4 < nb ? dx : 0`, GCC 12 -O3 vectorized it wrongly for K >= 640.)
    for (int b = 0; b < nb; ++b)
      for (int i = 0; i < 4; ++i) dv[b * 4 + i] = dx[b];
    for (int b = 0; b < nb; ++b) a.xs[(size_t)m * a.G + b * QB / group] += dsum[b];
  }
  return a;
}

// lane d of a chunk -> index of its weight group relative to the chunk's first group
template <int GS>
inline __m512i q4p_group_lanes() {
  if constexpr (GS == 32) return _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  else if constexpr (GS == 64) return _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  else return _mm512_setzero_si512();
}

// row n of one weight against M rows of x; writes y[m * ldy + n]. One row at a time, so the weights are
// read as one sequential stream (4 rows interleaved, sharing x's loads, measured about half as fast).
template <int M, int GS, bool BF16OUT>
void q4p_row(const Q4PAct& a, const uint8_t* qw, const uint16_t* sc, const uint8_t* zp, void* y, int64_t ldy,
             int64_t n) {
  const int K = a.K, C = a.C, G = a.G, KB = K / 2;
  const __m512i mask = _mm512_set1_epi8(0x0F), lanes = q4p_group_lanes<GS>();
  constexpr int GPC = GS >= 128 ? 1 : 128 / GS;  // groups starting in a full chunk
  const uint8_t* row = qw + (size_t)n * KB;
  const uint16_t* srow = sc + (size_t)n * G;
  __m512 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
  for (int c = 0; c < C; ++c) {
    const int bytes = std::min(64, KB - c * 64);
    const __mmask64 lm = bytes == 64 ? ~0ULL : ((1ULL << bytes) - 1);
    const int g0 = c * 128 / GS;
    const int ng = std::min(GPC, G - g0);
    _mm_prefetch((const char*)(row + c * 64 + Q4P_PF), _MM_HINT_T0);
    const __m512i v = bytes == 64 ? _mm512_loadu_si512(row + c * 64) : _mm512_maskz_loadu_epi8(lm, row + c * 64);
    const __m128 s4 = _mm_cvtph_ps(_mm_maskz_loadu_epi16((__mmask8)((1u << ng) - 1), srow + g0));
    const __m512 sv = _mm512_permutexvar_ps(lanes, _mm512_castps128_ps512(s4));  // each lane's group scale
    const __m512i lo = _mm512_and_si512(v, mask);
    const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
    for (int m = 0; m < M; ++m) {
      const __m512i xe = _mm512_loadu_si512(a.xe.data() + ((size_t)m * C + c) * 64);
      const __m512i xo = _mm512_loadu_si512(a.xo.data() + ((size_t)m * C + c) * 64);
      const __m512 dv = _mm512_loadu_ps(a.dxv.data() + ((size_t)m * C + c) * 16);
      __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xe);
      d = _mm512_dpbusd_epi32(d, hi, xo);
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(sv, dv), acc[m]);
    }
  }
  // zero-point term: sum_g s z xs, 16 groups at a time
  __m512 zt[M];
  for (int m = 0; m < M; ++m) zt[m] = _mm512_setzero_ps();
  for (int g = 0; g < G; g += 16) {
    const __mmask16 gm = G - g >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (G - g)) - 1);
    const __m512 s = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(gm, srow + g));
    const __m512 z = zp ? _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(gm, zp + n * G + g)))
                        : _mm512_set1_ps(8.f);
    const __m512 sz = _mm512_mul_ps(s, z);
    for (int m = 0; m < M; ++m)
      zt[m] = _mm512_fmadd_ps(sz, _mm512_maskz_loadu_ps(gm, a.xs.data() + (size_t)m * G + g), zt[m]);
  }
  for (int m = 0; m < M; ++m) {
    const float out = _mm512_reduce_add_ps(_mm512_sub_ps(acc[m], zt[m]));  // one horizontal sum
    if constexpr (BF16OUT) {  // round to nearest even, as torch's float -> bfloat16 cast (finite values)
      uint32_t bits;
      std::memcpy(&bits, &out, 4);
      ((uint16_t*)y)[(size_t)m * ldy + n] = (uint16_t)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
    } else {
      ((float*)y)[(size_t)m * ldy + n] = out;
    }
  }
}

template <int GS, bool BF16OUT>
void q4p_dispatch(int mm, const Q4PAct& a, const uint8_t* qw, const uint16_t* sc, const uint8_t* zp, void* y,
                  int64_t N, int64_t n0, int64_t n1) {
#define Q4PCASE(MM) case MM: for (int64_t n = n0; n < n1; ++n) q4p_row<MM, GS, BF16OUT>(a, qw, sc, zp, y, N, n); break;
  switch (mm) { Q4PCASE(1) Q4PCASE(2) Q4PCASE(3) Q4PCASE(4) Q4PCASE(5) Q4PCASE(6) Q4PCASE(7) Q4PCASE(8) }
#undef Q4PCASE
}

}  // namespace

// x (M, K) fp32 or bf16 against several int4 layers in the portable layout (same K and group size;
// e.g. q, k and v) in one parallel region. Returns one (M, N_j) tensor per layer, bf16 if out_bf16 else fp32.
std::vector<torch::Tensor> q4p_a8_mm_many(torch::Tensor x, std::vector<torch::Tensor> qws, std::vector<torch::Tensor> scs,
                                          std::vector<torch::Tensor> zps, int64_t group, bool out_bf16) {
  const int M = x.size(0), K = x.size(1);
  TORCH_CHECK((x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16) && x.dim() == 2,
              "q4p_a8_mm_many: x must be (M, K) fp32 or bf16");
  if (x.scalar_type() == torch::kFloat32 && !x.is_contiguous()) x = x.contiguous();
  if (x.scalar_type() == torch::kBFloat16 && !x.is_contiguous()) x = x.contiguous();
  TORCH_CHECK(K % 32 == 0 && K % group == 0 && (group == 32 || group == 64 || group == 128 || group == 256),
              "q4p_a8_mm_many: K must be a multiple of 32 and of the group size (32, 64, 128 or 256)");
  const int G = K / group;
  std::vector<int64_t> first{0};
  std::vector<torch::Tensor> out;
  for (size_t j = 0; j < qws.size(); ++j) {
    TORCH_CHECK(qws[j].is_contiguous() && qws[j].size(1) * 2 == K && scs[j].is_contiguous() &&
                scs[j].scalar_type() == torch::kHalf && scs[j].size(1) == G &&
                (zps[j].numel() == 0 || (zps[j].is_contiguous() && zps[j].size(1) == G)), "q4p_a8_mm_many: layer ", j);
    out.push_back(torch::empty({M, qws[j].size(0)}, x.options().dtype(out_bf16 ? torch::kBFloat16 : torch::kFloat32)));
    first.push_back(first.back() + qws[j].size(0));
  }
  // x in chunks of 8 rows (the accumulators fill the registers); each prepared once
  std::vector<Q4PAct> parts;
  std::vector<float> xf;
  const float* x32 = float_rows(x, xf);
  for (int m0 = 0; m0 < M; m0 += 8)
    parts.push_back(q4p_prepare(x32 + (size_t)m0 * K, std::min(8, M - m0), K, group));
  constexpr int64_t BLOCK = 16;  // rows per work item
  const int64_t blocks = (first.back() + BLOCK - 1) / BLOCK;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int m0 = 0; m0 < M; m0 += 8) {
      const int mm = std::min(8, M - m0);
      const Q4PAct* act = &parts[m0 / 8];
      for (size_t j = 0; j < qws.size(); ++j) {
        const int64_t lo = std::max(b0 * BLOCK, first[j]), hi = std::min(b1 * BLOCK, first[j + 1]);
        if (lo >= hi) continue;
        const int64_t N = first[j + 1] - first[j];
        const uint8_t* zp = zps[j].numel() ? zps[j].data_ptr<uint8_t>() : nullptr;
        const uint16_t* sc = (const uint16_t*)scs[j].data_ptr<at::Half>();
        void* y = (char*)out[j].data_ptr() + (size_t)m0 * N * out[j].element_size();
        auto run = [&](auto fn) { fn(mm, *act, qws[j].data_ptr<uint8_t>(), sc, zp, y, N, lo - first[j], hi - first[j]); };
        if (out_bf16) {
          if (group == 32) run(q4p_dispatch<32, true>); else if (group == 64) run(q4p_dispatch<64, true>);
          else if (group == 128) run(q4p_dispatch<128, true>); else run(q4p_dispatch<256, true>);
        } else {
          if (group == 32) run(q4p_dispatch<32, false>); else if (group == 64) run(q4p_dispatch<64, false>);
          else if (group == 128) run(q4p_dispatch<128, false>); else run(q4p_dispatch<256, false>);
        }
      }
    }
  });
  return out;
}

// ---- int8 x int16 activations straight from the portable layout (no repacked copy) -------------------
//
// The layer's own buffers: qweight (N, K) int8 (q = u - 128 of the unsigned code u), and per row a scale
// s (N,) fp32 and a shift t (N,) fp32 (empty: none), so that
//   y[m, n] = s[n] * sum_k x[m, k] q[n, k] + t[n] * sum_k x[m, k]     (t = s (128 - z) for zero point z)
// Activations are quantized to int16 per 256 columns (dx = amax/32767, round to nearest even): an error of
// at most 2^-16 of the block's largest value, far below bfloat16's 2^-9 relative rounding, so this is
// more exact than the bf16-activation kernel. vpdpwssd multiplies pairs of int16 (weights sign-extended
// from int8) into int32 lanes: |q x| <= 2^22, and a lane takes 16 products per block, so no overflow.
// A row is read as one sequential stream, 32 columns per instruction, like the int4 kernel above.

namespace {

constexpr int Q8P_BLOCK = 256;  // activation scale block, columns
// No software prefetch here: on the EPYC VM, weights in huge pages, prefetching 8 KB ahead (T0) was 10%
// slower than none and NTA 6% slower (15 alternating rounds, 1.1B-shaped layers); the int4 kernel above,
// with more arithmetic per byte, is 13% slower without its prefetch.

struct Q8PAct {  // x (M, K) prepared once per call
  int M, K, NB, KP;           // NB: 256-column blocks (the last may be partial); KP = NB * 256
  std::vector<int16_t> xq;    // (M, KP), zero past K
  std::vector<float> dx;      // (M, NB)
  std::vector<float> xsum;    // (M): sum_b dx_b * sum(xq in b), the quantized x's sum
};

Q8PAct q8p_prepare(const float* x, int M, int K) {
  Q8PAct a;
  a.M = M, a.K = K, a.NB = (K + Q8P_BLOCK - 1) / Q8P_BLOCK, a.KP = a.NB * Q8P_BLOCK;
  a.xq.assign((size_t)M * a.KP, 0), a.dx.assign((size_t)M * a.NB, 0.f), a.xsum.assign(M, 0.f);
  for (int m = 0; m < M; ++m) {
    const float* xr = x + (size_t)m * K;
    double total = 0.0;
    for (int b = 0; b < a.NB; ++b) {
      const int k0 = b * Q8P_BLOCK, k1 = std::min(K, k0 + Q8P_BLOCK);
      float amax = 0.f;
      for (int k = k0; k < k1; ++k) amax = std::max(amax, std::fabs(xr[k]));
      const float d = amax / 32767.f, inv = amax > 0.f ? 32767.f / amax : 0.f;
      int64_t s = 0;
      for (int k = k0; k < k1; ++k) {
        const int v = (int)std::nearbyint(xr[k] * inv);
        const int16_t q = (int16_t)std::max(-32767, std::min(32767, v));
        a.xq[(size_t)m * a.KP + k] = q;
        s += q;
      }
      a.dx[(size_t)m * a.NB + b] = d;
      total += (double)d * (double)s;
    }
    a.xsum[m] = (float)total;
  }
  return a;
}

// row n of one int8 weight against M rows of x; writes y[m * ldy + n]
template <int M, bool BF16OUT>
void q8p_row(const Q8PAct& a, const int8_t* qw, const float* s, const float* t, void* y, int64_t ldy, int64_t n) {
  const int K = a.K;
  const int8_t* row = qw + (size_t)n * K;
  __m512 facc[M];
  for (int m = 0; m < M; ++m) facc[m] = _mm512_setzero_ps();
  for (int b = 0; b < a.NB; ++b) {
    const int k0 = b * Q8P_BLOCK, chunks = std::min(Q8P_BLOCK, K - k0) / 32;
    __m512i acc0[M], acc1[M];
    for (int m = 0; m < M; ++m) acc0[m] = acc1[m] = _mm512_setzero_si512();
    int j = 0;
    for (; j + 1 < chunks; j += 2) {  // 64 columns: one cache line, two independent accumulators
      const int8_t* p = row + k0 + j * 32;  // no software prefetch: the hardware's keeps up with this stream
      const __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)p));
      const __m512i w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(p + 32)));
      for (int m = 0; m < M; ++m) {
        const int16_t* xr = a.xq.data() + (size_t)m * a.KP + k0 + j * 32;
        acc0[m] = _mm512_dpwssd_epi32(acc0[m], w0, _mm512_loadu_si512(xr));
        acc1[m] = _mm512_dpwssd_epi32(acc1[m], w1, _mm512_loadu_si512(xr + 32));
      }
    }
    if (j < chunks) {  // an odd 32-column chunk at the end of K
      const int8_t* p = row + k0 + j * 32;
      const __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)p));
      for (int m = 0; m < M; ++m)
        acc0[m] = _mm512_dpwssd_epi32(acc0[m], w0, _mm512_loadu_si512(a.xq.data() + (size_t)m * a.KP + k0 + j * 32));
    }
    for (int m = 0; m < M; ++m)
      facc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(acc0[m], acc1[m])),
                                _mm512_set1_ps(a.dx[(size_t)m * a.NB + b]), facc[m]);
  }
  for (int m = 0; m < M; ++m) {
    float out = s[n] * _mm512_reduce_add_ps(facc[m]);
    if (t) out += t[n] * a.xsum[m];
    if constexpr (BF16OUT) {  // round to nearest even, as torch's float -> bfloat16 cast (finite values)
      uint32_t bits;
      std::memcpy(&bits, &out, 4);
      ((uint16_t*)y)[(size_t)m * ldy + n] = (uint16_t)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
    } else {
      ((float*)y)[(size_t)m * ldy + n] = out;
    }
  }
}

template <bool BF16OUT>
void q8p_dispatch(int mm, const Q8PAct& a, const int8_t* qw, const float* s, const float* t, void* y, int64_t N,
                  int64_t n0, int64_t n1) {
#define Q8PCASE(MM) case MM: for (int64_t n = n0; n < n1; ++n) q8p_row<MM, BF16OUT>(a, qw, s, t, y, N, n); break;
  switch (mm) { Q8PCASE(1) Q8PCASE(2) Q8PCASE(3) Q8PCASE(4) Q8PCASE(5) Q8PCASE(6) Q8PCASE(7) Q8PCASE(8) }
#undef Q8PCASE
}

}  // namespace

// x (M, K) fp32 or bf16 against several int8 layers in the portable layout (same K; e.g. q, k and v) in one
// parallel region. Returns one (M, N_j) tensor per layer, bf16 if out_bf16 else fp32.
std::vector<torch::Tensor> q8p_a16_mm_many(torch::Tensor x, std::vector<torch::Tensor> qws, std::vector<torch::Tensor> scales,
                                           std::vector<torch::Tensor> shifts, bool out_bf16) {
  const int M = x.size(0), K = x.size(1);
  TORCH_CHECK((x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16) && x.dim() == 2,
              "q8p_a16_mm_many: x must be (M, K) fp32 or bf16");
  if (!x.is_contiguous()) x = x.contiguous();
  TORCH_CHECK(K % 32 == 0, "q8p_a16_mm_many: K must be a multiple of 32");
  std::vector<int64_t> first{0};
  std::vector<torch::Tensor> out;
  for (size_t j = 0; j < qws.size(); ++j) {
    const int64_t N = qws[j].size(0);
    TORCH_CHECK(qws[j].is_contiguous() && qws[j].scalar_type() == torch::kChar && qws[j].size(1) == K &&
                scales[j].is_contiguous() && scales[j].scalar_type() == torch::kFloat32 && scales[j].numel() == N &&
                (shifts[j].numel() == 0 || (shifts[j].is_contiguous() && shifts[j].scalar_type() == torch::kFloat32 &&
                                            shifts[j].numel() == N)), "q8p_a16_mm_many: layer ", j);
    out.push_back(torch::empty({M, N}, x.options().dtype(out_bf16 ? torch::kBFloat16 : torch::kFloat32)));
    first.push_back(first.back() + N);
  }
  std::vector<float> xf;
  const float* x32 = float_rows(x, xf);
  std::vector<Q8PAct> parts;  // x in chunks of 8 rows (the accumulators fill the registers)
  for (int m0 = 0; m0 < M; m0 += 8) parts.push_back(q8p_prepare(x32 + (size_t)m0 * K, std::min(8, M - m0), K));
  constexpr int64_t BLOCK = 16;  // rows per work item
  const int64_t blocks = (first.back() + BLOCK - 1) / BLOCK;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int m0 = 0; m0 < M; m0 += 8) {
      const int mm = std::min(8, M - m0);
      for (size_t j = 0; j < qws.size(); ++j) {
        const int64_t lo = std::max(b0 * BLOCK, first[j]), hi = std::min(b1 * BLOCK, first[j + 1]);
        if (lo >= hi) continue;
        const int64_t N = first[j + 1] - first[j];
        const float* t = shifts[j].numel() ? shifts[j].data_ptr<float>() : nullptr;
        void* y = (char*)out[j].data_ptr() + (size_t)m0 * N * out[j].element_size();
        (out_bf16 ? q8p_dispatch<true> : q8p_dispatch<false>)(mm, parts[m0 / 8], qws[j].data_ptr<int8_t>(),
                                                              scales[j].data_ptr<float>(), t, y, N, lo - first[j], hi - first[j]);
      }
    }
  });
  return out;
}
