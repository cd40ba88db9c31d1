// Decode (small-M) weight-only matmul kernels for slimlm, AVX-512 VNNI / BF16.
//
// y (M, N) fp32 = x (M, K) fp32 @ W^T, W dequantized on the fly.
//
// int4 VNNI ("q4a8"): activations quantized on the fly to int8 per 32-column block (scale dx = amax/127,
//   round to nearest), dot products with _mm512_dpbusd_epi32 (u8 nibble codes x s8 activations).
//   Layout (tile = 16 output rows):
//     qw  uint8 [N/16][K/8][64]: chunk (t, c) holds k = 8c..8c+7 of rows 16t..16t+15;
//         byte 4j+i = q[16t+j][8c+i] | q[16t+j][8c+4+i] << 4   (j < 16, i < 4)
//     sc  fp16  [N/16][G][16]  scale of row 16t+j, group g
//     zp  uint8 [N/16][G][16]  zero point of row 16t+j, group g
//   y[m][n] = sum_g s_ng * (sum_{b in g} dx_mb * dot_mnb  -  z_ng * sum_{b in g} dx_mb * sum_k xq_mk)
//
// int8 VNNI ("q8a8"): same activation quantization; weights as unsigned codes u = q + 128 (stored ^ 0x80).
//     qw  uint8 [N/16][K/4][64]: chunk (t, c): byte 4j+i = u[16t+j][4c+i]
//     sc  fp32 [N], zp fp32 [N] (128 for symmetric, else the zero point)
//
// int4 BF16 ("q4bf16"): activations rounded to bf16 (like ATen's op), weights use the same qw/sc/zp layout as
//   int4 VNNI (same repack!). Nibble q becomes the bf16 bit pattern 0x4300|q = 128+q exactly (byte unpack with
//   0x43), dot products with _mm512_dpbf16_ps, and (128 + z) * sum(x_g) is subtracted per group.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <vector>

namespace {

constexpr int QB = 32;  // activation quantization block
constexpr int PF = 8192;  // software prefetch distance in bytes; 8192 was best in a sweep on EPYC

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

template <int M, int NBG>  // NBG: 32-blocks per weight group
void q4a8_tiles(const int8_t* xq, const float* dx, const float* xsg, int K, int G, const uint8_t* qw,
                const uint16_t* sc, const uint8_t* zp, float* y, int N, int64_t t0, int64_t t1) {
  const int nb = K / QB;
  const __m512i mask = _mm512_set1_epi8(0x0F);
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* w = qw + (size_t)t * (K / 8) * 64;
    const uint16_t* s = sc + (size_t)t * G * 16;
    const uint8_t* z = zp + (size_t)t * G * 16;
    __m512 yacc[M];
    for (int m = 0; m < M; ++m) yacc[m] = _mm512_setzero_ps();
    for (int g = 0; g < G; ++g) {
      __m512 af[M];
      for (int bb = 0; bb < NBG; ++bb) {
        const int kb = g * NBG + bb;
        const uint8_t* wb = w + (size_t)kb * 256;
        for (int p = 0; p < 256; p += 64) _mm_prefetch((const char*)(wb + PF + p), _MM_HINT_T0);
        __m512i ai[M], bi[M];
        for (int m = 0; m < M; ++m) ai[m] = bi[m] = _mm512_setzero_si512();
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) {
          __m512i v = _mm512_loadu_si512(wb + c * 64);
          __m512i lo = _mm512_and_si512(v, mask);
          __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
          for (int m = 0; m < M; ++m) {
            const int8_t* xp = xq + (size_t)m * K + kb * QB + c * 8;
            ai[m] = _mm512_dpbusd_epi32(ai[m], lo, _mm512_set1_epi32(*(const int32_t*)xp));
            bi[m] = _mm512_dpbusd_epi32(bi[m], hi, _mm512_set1_epi32(*(const int32_t*)(xp + 4)));
          }
        }
        for (int m = 0; m < M; ++m) {
          __m512 f = _mm512_cvtepi32_ps(_mm512_add_epi32(ai[m], bi[m]));
          __m512 d = _mm512_set1_ps(dx[m * nb + kb]);
          af[m] = bb == 0 ? _mm512_mul_ps(f, d) : _mm512_fmadd_ps(f, d, af[m]);
        }
      }
      if (((g * 32) & 63) == 0) {  // scales/zeros: same lead in time as the codes (1 line per 2/4 groups)
        _mm_prefetch((const char*)(s + g * 16) + PF / (8 * NBG), _MM_HINT_T0);
        if (((g * 16) & 63) == 0) _mm_prefetch((const char*)(z + g * 16) + PF / (16 * NBG), _MM_HINT_T0);
      }
      __m512 sv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(s + g * 16)));
      __m512 zv = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(z + g * 16))));
      for (int m = 0; m < M; ++m)
        yacc[m] = _mm512_fmadd_ps(sv, _mm512_fnmadd_ps(zv, _mm512_set1_ps(xsg[m * G + g]), af[m]), yacc[m]);
    }
    for (int m = 0; m < M; ++m) _mm512_storeu_ps(y + (size_t)m * N + t * 16, yacc[m]);
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

// x (M, K) fp32 contiguous. Returns (M, N) fp32.
torch::Tensor q4a8_mm(torch::Tensor x, torch::Tensor qw, torch::Tensor sc, torch::Tensor zp, int64_t group) {
  const int M = x.size(0), K = x.size(1);
  const int N = qw.size(0) * 16, G = K / group, nb = K / QB;
  TORCH_CHECK(K % 128 == 0 || K % group == 0, "K");
  auto y = torch::empty({M, N}, x.options());
  std::vector<int8_t> xq((size_t)M * K);
  std::vector<float> dx((size_t)M * nb), ds((size_t)M * nb), xsg((size_t)M * G);
  const float* xp = x.data_ptr<float>();
  const uint8_t* w = qw.data_ptr<uint8_t>();
  const uint16_t* s = (const uint16_t*)sc.data_ptr<at::Half>();
  const uint8_t* z = zp.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  const int64_t ntiles = N / 16;
  for (int m0 = 0; m0 < M; m0 += 8) {
    const int mm = std::min(8, M - m0);
    quant_act(xp + (size_t)m0 * K, mm, K, xq.data(), dx.data(), ds.data());
    const int nbg = group / QB;
    for (int m = 0; m < mm; ++m)
      for (int g = 0; g < G; ++g) {
        float a = 0;
        for (int b = 0; b < nbg; ++b) a += ds[m * nb + g * nbg + b];
        xsg[m * G + g] = a;
      }
    float* yo = yp + (size_t)m0 * N;
#define Q4CASE(MM, NBG)                                                                                              \
  case MM:                                                                                                            \
    par(ntiles, [&](int64_t a, int64_t b) { q4a8_tiles<MM, NBG>(xq.data(), dx.data(), xsg.data(), K, G, w, s, z, yo, N, a, b); }); \
    break;
    if (nbg == 1) {
      switch (mm) { Q4CASE(1, 1) Q4CASE(2, 1) Q4CASE(3, 1) Q4CASE(4, 1) Q4CASE(5, 1) Q4CASE(6, 1) Q4CASE(7, 1) Q4CASE(8, 1) }
    } else if (nbg == 4) {
      switch (mm) { Q4CASE(1, 4) Q4CASE(2, 4) Q4CASE(3, 4) Q4CASE(4, 4) Q4CASE(5, 4) Q4CASE(6, 4) Q4CASE(7, 4) Q4CASE(8, 4) }
    } else {
      TORCH_CHECK(false, "group must be 32 or 128");
    }
  }
  return y;
}

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

