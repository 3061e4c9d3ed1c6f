// The compiled CPU kernels of monoquant: fused dequantize + matmul for small row counts (GEMV / skinny GEMM),
// one-pass dequantize, and an exact INT8 GEMM with its quantize / rescale passes (each section says more).
//
// The fused matmul and the dequantize read the canonical stored buffers directly (no repacking, no float copy):
//   INT4: qweight uint8 [N, ceil(K/2)] (low nibble = even column), scale float32 [N, K/g],
//         zero_point uint8 [N, K/g] or absent (symmetric: codes are offset by 8);
//   INT8: qweight int8 [N, K] (symmetric) or uint8 [N, K] with zero_point uint8 [N] or [];
//         scale float32 [N] or [].
// Computes y[m, n] = sum_k x[m, k] * (q[n, k] - z) * s in float32, rearranged so that the zero-point and the
// scale leave the inner loop:
//   y[m, n] = sum_groups s * (sum_{k in group} x[m, k] * q[n, k]  -  z * sum_{k in group} x[m, k]).
// The inner loop widens codes to float32 and multiplies-adds them with the input for up to MAX_ROWS (8) input
// rows at once, so each weight byte is read once per 8 rows; an INT4 group's products are summed unscaled and
// scaled once per group. Output rows are split across threads with at::parallel_for (tasks of at least
// MIN_TASK_MACS multiply-adds: tinier calls stay on the calling thread), and each tile prefetches
// the next tile's weight rows (a row-major weight is many short streams that hardware prefetchers start late
// on: measured 1.17 -> 0.76 ms for a cold 4096x4096 INT4 GEMV on AVX2). Which SIMD path runs is decided by
// the compiler flags: monoquant/fused.py builds this file on the machine that uses it with -march=native, so
// __AVX512F__ / __AVX2__ describe this CPU; without either, a portable scalar loop is compiled. INT4 layers
// whose group is not a multiple of the vector block (2 * lanes columns) take the scalar loop as well. An
// AVX2-only build runs the matmul through its own section (namespace avx2, after the generic loops): the same
// arithmetic with fewer instructions per weight.
//
// Python entry points (float32 contiguous x [M, K]; output float32 [M, N]; the optional float32 bias [N] is added
// to each output before it is stored, as y.add_(bias) would: one rounding):
//   int4_linear(x, qweight, scale, zero_point_or_None, group_size, bias=None)
//   int8_linear(x, qweight, scale, zero_point_or_None, bias=None)
//   dequantize_int4(out, qweight, scale, zero_point_or_None, group_size, row_start)
//   dequantize_int8(out, qweight, scale, zero_point_or_None, row_start, scaled)
//   w8a8_pack(qweight), w8a8_gemm(codes, packed, N): exact INT8 x INT8 -> INT32 GEMM (AVX2 vpmaddwd)
//   w8a8_vnni_pack(qweight), w8a8_vnni_linear(x, packed, N, rowsum, w_scale, bias_or_None, qmin, qmax, symmetric,
//   eps, static_scale_or_None, static_zero_or_None): the whole INT8-activation layer on AVX512-VNNI; w8a8_vnni()
//   quantize_rows(x, scale, zero_or_None, qmin, qmax, shift), dynamic_quantize_rows(x, qmin, qmax, symmetric,
//   eps) (x float32 or bf16), dynamic_fake_quantize_rows(x, qmin, qmax, symmetric, eps), rescale_rows(acc, x_scale, w_scale, bias_or_None, x_zero_or_None,
//   w_rowsum_or_None, bf16_out): the passes around an integer GEMM
//   mse_clip_errors(view, lo, hi, ratios, qmin, qmax, symmetric, eps): the MSE clipping search's errors
//   quantize_weight_rows(x, scale, zero_or_None, group, qmin, qmax, out): round-to-nearest weight codes
//   gptq_columns(wb, hb, errs, codes, scale, zero, slots, i0, i1, s1, qmin, qmax): GPTQ's per-column loop
//   signal_noise_sums(ref, approx): the two sums of an SQNR, float64, one pass
//   int4_linear_bf16(x, qweight, scale, zero_point_or_None, group_size), int8_linear_bf16(x, qweight, scale,
//   zero_point_or_None): bf16 x [M, K] -> bf16 [M, N] with vdpbf16ps (few rows); int4_gemm_bf16 / int8_gemm_bf16
//   (the same arguments, then bias_or_None): the same for many rows (weight dequantized into bf16 panels once per
//   call, bias added before the one rounding); bf16_dot(): whether the build has them
//   direct_conv2d(x, weight, bias_or_None, pad_h, pad_w): a float32 2-d conv of stride 1 (its section says more)
//   simd() -> "avx512", "avx2" or "scalar"

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX512F__)
constexpr int LANES = 16;
constexpr int MAX_ROWS = 8;
constexpr int ACC_REGS = 16;  // of 32 zmm registers
using vec = __m512;
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline vec vset(float v) { return _mm512_set1_ps(v); }
inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
inline vec vsub(vec a, vec b) { return _mm512_sub_ps(a, b); }
inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
inline float vsum(vec v) { return _mm512_reduce_add_ps(v); }
// the first LANES bytes of `b` as floats, unsigned or signed
inline vec widen_u8(__m128i b) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b)); }
inline vec widen_i8(__m128i b) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)); }
inline __m128i load_lanes(const void* p) { return _mm_loadu_si128(static_cast<const __m128i*>(p)); }
// 2 * LANES INT4 codes from LANES packed bytes: even columns in lo, odd columns in hi. The codes become floats
// by a table lookup (vpermps reads only the low 4 bits of each index, so the low nibble needs no mask): one
// shuffle per 16 codes where a mask or shift plus a conversion took two (a 1-row INT4 GEMV is bound by these
// instructions, not by memory, when the packed weight sits in cache)
inline void int4_codes(const uint8_t* p, vec& lo, vec& hi) {
  const __m512 values = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  lo = _mm512_permutexvar_ps(b, values);
  hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), values);
}
const char* SIMD = "avx512";
#elif defined(__AVX2__)
constexpr int LANES = 8;
constexpr int MAX_ROWS = 8;
constexpr int ACC_REGS = 8;  // of 16 ymm registers
using vec = __m256;
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline vec vset(float v) { return _mm256_set1_ps(v); }
inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
inline vec vsub(vec a, vec b) { return _mm256_sub_ps(a, b); }
inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
inline vec widen_u8(__m128i b) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)); }
inline vec widen_i8(__m128i b) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)); }
inline __m128i load_lanes(const void* p) { return _mm_loadl_epi64(static_cast<const __m128i*>(p)); }
inline float vsum(vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline void int4_codes(const uint8_t* p, vec& lo, vec& hi) {
  __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  lo = _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(0xF)));
  hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
}
const char* SIMD = "avx2";
#else
constexpr int LANES = 0;
constexpr int MAX_ROWS = 4;
const char* SIMD = "scalar";
#endif

#if defined(__AVX512F__) || defined(__AVX2__)
// LANES codes from memory as floats
inline vec int8_codes(const int8_t* p) { return widen_i8(load_lanes(p)); }
inline vec uint8_codes(const uint8_t* p) { return widen_u8(load_lanes(p)); }
#endif

constexpr int64_t GRAIN = 64;        // output rows per parallel task, at least (a multiple of BLOCK_ROWS)
constexpr int64_t CHUNK_FLOATS = 4096;  // input values (columns x rows) per pass over a block of output rows
constexpr int64_t BLOCK_ROWS = 32;   // output rows whose accumulators stay in L1 while the chunks go by
// Multiply-adds a parallel task must have before the float32 matmuls split their work across threads: waking the
// pool and joining it costs about a microsecond, what ~2^15 multiply-adds take on one core, so a call with less
// work than that per thread runs on the calling thread. Measured on AMD EPYC Zen 4 (2 threads), 1024 -> 128 layer:
// 2^18 (1 row on one thread) was 1.5-2.3 us slower at 1 row than 2^15 (two tasks), and no faster at 2-16 rows.
constexpr int64_t MIN_TASK_MACS = int64_t{1} << 15;

// at::parallel_for's grain for `units` of work of `macs_per_unit` multiply-adds each: at least `base` units, and
// at least MIN_TASK_MACS per task (the grain decides only how work is split, never the result).
inline int64_t task_grain(int64_t base, int64_t macs_per_unit) {
  return std::max<int64_t>(base, (MIN_TASK_MACS + macs_per_unit - 1) / std::max<int64_t>(1, macs_per_unit));
}

// ---------------------------------------------------------------------------------------------------------
// The two weight formats, as "sources" the generic loops below read from.
//   span():        columns that share one scale (INT4: the group; INT8: all K, the scale is applied at the end)
//   scale(n, gi):  the scale multiplied into the codes of span gi (INT4), or 1 (INT8: `scaled` is false)
//   finish(...):   y[m, n] from the sum of x * (scaled codes): subtracts the zero-point term (and scales INT8)
//   code(n, k):    one code, for the scalar loops

struct Int4Src {
  const uint8_t* q;     // [N, KB] packed codes
  const float* s;       // [N, G]
  const uint8_t* z;     // [N, G] or nullptr (then 8)
  const float* xsum;    // [M, G] input sums per group
  int64_t KB, G, g;
  int64_t rows;         // N
  static constexpr bool scaled = true;
  static constexpr int64_t COLS_PER_LINE = 128;  // columns per 64-byte cache line
  int64_t span() const { return g; }
  float scale(int64_t n, int64_t gi) const { return s[n * G + gi]; }
  float zero(int64_t n, int64_t gi) const { return z ? static_cast<float>(z[n * G + gi]) : 8.0f; }
  float code(int64_t n, int64_t k) const {
    const uint8_t byte = q[n * KB + (k >> 1)];
    return static_cast<float>((k & 1) ? (byte >> 4) : (byte & 0xF));
  }
  // dot minus the zero-point term sum_groups s * z * xsum (vectorised: it was 10% of an 8-row call)
  float finish(int64_t m, int64_t n, float dot) const {
    const float* sr = s + n * G;
    const float* xr = xsum + m * G;
    float t = 0.0f;
    int64_t gi = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
    vec acc = vzero();
    if (z) {
      for (; gi + LANES <= G; gi += LANES) acc = vfma(vmul(vload(sr + gi), uint8_codes(z + n * G + gi)), vload(xr + gi), acc);
    } else {
      for (; gi + LANES <= G; gi += LANES) acc = vfma(vmul(vload(sr + gi), vset(8.0f)), vload(xr + gi), acc);
    }
    t = vsum(acc);
#endif
    for (; gi < G; ++gi) t += scale(n, gi) * zero(n, gi) * xr[gi];
    return dot - t;
  }
#if defined(__AVX512F__) || defined(__AVX2__)
  // columns k .. k + 2 * LANES: even ones in lo, odd ones in hi (the input is permuted to match)
  void codes(int64_t n, int64_t k, vec& lo, vec& hi) const { int4_codes(q + n * KB + (k >> 1), lo, hi); }
  const void* at(int64_t n, int64_t k) const { return q + n * KB + (k >> 1); }
#endif
};

template <typename Q>
struct Int8Src {
  const Q* q;           // [N, K]
  const float* s;       // [N] or one value
  const uint8_t* z;     // like s, or nullptr
  const float* xsum;    // [M] input row sums
  int64_t K;
  bool per_row;
  int64_t rows;         // N
  static constexpr bool scaled = false;
  static constexpr int64_t COLS_PER_LINE = 64;
  int64_t span() const { return K; }
  float scale(int64_t, int64_t) const { return 1.0f; }
  float code(int64_t n, int64_t k) const { return static_cast<float>(q[n * K + k]); }
  float finish(int64_t m, int64_t n, float dot) const {
    const int64_t i = per_row ? n : 0;
    return s[i] * (dot - (z ? static_cast<float>(z[i]) * xsum[m] : 0.0f));
  }
#if defined(__AVX512F__) || defined(__AVX2__)
  void codes(int64_t n, int64_t k, vec& lo, vec& hi) const {
    lo = widen(q + n * K + k);
    hi = widen(q + n * K + k + LANES);
  }
  const void* at(int64_t n, int64_t k) const { return q + n * K + k; }
  static vec widen(const int8_t* p) { return int8_codes(p); }
  static vec widen(const uint8_t* p) { return uint8_codes(p); }
#endif
};

// y[m, n] for output rows [n0, n1), every input row, one multiply-add at a time (odd shapes, no SIMD build).
template <typename Src>
void scalar_block(const Src& src, const float* x, const float* bias, float* y, int64_t M, int64_t N, int64_t K,
                  int64_t n0, int64_t n1) {
  const int64_t span = src.span();
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) {
      float total = 0.0f;
      for (int64_t k0 = 0; k0 < K; k0 += span) {
        float dot = 0.0f;
        for (int64_t k = k0; k < k0 + span; ++k) dot += x[m * K + k] * src.code(n, k);
        total += src.scale(n, k0 / span) * dot;
      }
      const float v = src.finish(m, n, total);
      y[m * N + n] = bias ? v + bias[n] : v;
    }
}

#if defined(__AVX512F__) || defined(__AVX2__)
// The loops over a tile's rows must be unrolled for the accumulators to live in registers; GCC does not
// unroll 8-trip loops with this much in them on its own (they then went through the stack, 3-10x slower).
#define MQ_UNROLL _Pragma("GCC unroll 16")

// Tile of NR output rows x R input rows over columns [k0, k1) (whole spans, multiples of 2 * LANES).
// Even- and odd-half sums (lo, hi) are kept apart so that 2 * NR * R independent multiply-add chains hide the
// FMA latency; the codes are widened once and shared by the R input rows. A scaled source (INT4) sums the
// unscaled products of one group in registers and multiplies the group's sum by its scale once, so the
// inner loop is widen + multiply-add only. Accumulators live in `state` between chunks of columns.
template <int R, int NR, typename Src>
void simd_tile(const Src& src, const float* xc, int64_t n, int64_t k0, int64_t k1,
               vec* state) {
  // with more than ACC_REGS accumulators the odd-half products go into the even-half sums (one chain of two
  // multiply-adds per row, still 8+ chains in flight), so that the accumulators stay in registers
  constexpr bool merged = 2 * NR * R > ACC_REGS;
  vec lo_acc[NR][R], hi_acc[NR][R];
  auto load_state = [&]() {
    MQ_UNROLL
    for (int j = 0; j < NR; ++j)
      MQ_UNROLL
      for (int r = 0; r < R; ++r) {
        lo_acc[j][r] = state[(j * R + r) * 2];
        if constexpr (!merged) hi_acc[j][r] = state[(j * R + r) * 2 + 1];
      }
  };
  if constexpr (!Src::scaled) load_state();
  const int64_t span = src.span();
  for (int64_t gs = k0; gs < k1; gs += span) {
    if constexpr (Src::scaled) {
      MQ_UNROLL
      for (int j = 0; j < NR; ++j)
        MQ_UNROLL
        for (int r = 0; r < R; ++r) {
          lo_acc[j][r] = vzero();
          if constexpr (!merged) hi_acc[j][r] = vzero();
        }
    }
    const int64_t ge = std::min(k1, gs + span);
    for (int64_t k = gs; k < ge; k += 2 * LANES) {
      if (k % Src::COLS_PER_LINE == 0) {  // the next tile's rows, one tile ahead: a row-major weight is NR
        MQ_UNROLL                         // short streams the hardware prefetchers start late on
        for (int j = 0; j < NR; ++j)
          _mm_prefetch(static_cast<const char*>(src.at(std::min(n + NR + j, src.rows - 1), k)), _MM_HINT_T0);
      }
      vec lo[NR], hi[NR];
      MQ_UNROLL
      for (int j = 0; j < NR; ++j) src.codes(n + j, k, lo[j], hi[j]);
      MQ_UNROLL
      for (int r = 0; r < R; ++r) {
        const float* xr = xc + (static_cast<uint64_t>(k - k0) / (2 * LANES) * R + r) * (2 * LANES);
        const vec xl = vload(xr), xh = vload(xr + LANES);
        MQ_UNROLL
        for (int j = 0; j < NR; ++j) {
          lo_acc[j][r] = vfma(lo[j], xl, lo_acc[j][r]);
          if constexpr (merged)
            lo_acc[j][r] = vfma(hi[j], xh, lo_acc[j][r]);
          else
            hi_acc[j][r] = vfma(hi[j], xh, hi_acc[j][r]);
        }
      }
    }
    if constexpr (Src::scaled) {  // state += scale * (this group's sums)
      MQ_UNROLL
      for (int j = 0; j < NR; ++j) {
        const vec sj = vset(src.scale(n + j, gs / span));
        MQ_UNROLL
        for (int r = 0; r < R; ++r) {
          vec& total = state[(j * R + r) * 2];
          total = vfma(merged ? lo_acc[j][r] : vadd(lo_acc[j][r], hi_acc[j][r]), sj, total);
        }
      }
    }
  }
  if constexpr (!Src::scaled) {
    MQ_UNROLL
    for (int j = 0; j < NR; ++j)
      MQ_UNROLL
      for (int r = 0; r < R; ++r) {
        state[(j * R + r) * 2] = lo_acc[j][r];
        if constexpr (!merged) state[(j * R + r) * 2 + 1] = hi_acc[j][r];
      }
  }
}

// Output rows [n0, n1) for input rows [m0, m0 + R): chunks of columns outermost, so that the chunk of input
// stays in L1 while the block's weights stream past it. `xi` is the R rows' interleaved copy (see
// interleave_rows). Columns from kv to K (INT8 only) are added one by one.
template <int R, typename Src>
void simd_block(const Src& src, const float* x, const float* xi, const float* bias, float* y, int64_t N, int64_t K,
                int64_t kv, int64_t m0, int64_t n0, int64_t n1, std::vector<vec>& state) {
  constexpr int NR = R == 1 ? 4 : (R == 2 || LANES == 16 ? 2 : 1);  // output rows per tile: fit the registers
  const int64_t span = src.span();
  // the chunk of R input rows fills at most half of a 32 KiB L1, in whole vector steps
  const int64_t cols = std::max<int64_t>(1, CHUNK_FLOATS / R / (2 * LANES)) * (2 * LANES);
  const int64_t chunk = span >= cols ? cols : std::max<int64_t>(span, cols / span * span);
  state.assign((n1 - n0 + NR) * R * 2, vzero());
  for (int64_t k0 = 0; k0 < kv; k0 += chunk) {
    const int64_t k1 = std::min(kv, k0 + chunk);
    const float* xc = xi + k0 * R;
    int64_t n = n0;
    for (; n + NR <= n1; n += NR) simd_tile<R, NR>(src, xc, n, k0, k1, state.data() + (n - n0) * R * 2);
    for (; n < n1; ++n) simd_tile<R, 1>(src, xc, n, k0, k1, state.data() + (n - n0) * R * 2);
  }
  for (int64_t n = n0; n < n1; ++n)
    for (int r = 0; r < R; ++r) {
      const vec* st = state.data() + ((n - n0) * R + r) * 2;
      float dot = vsum(vadd(st[0], st[1]));
      for (int64_t k = kv; k < K; ++k) dot += x[(m0 + r) * K + k] * src.code(n, k);
      const float v = src.finish(m0 + r, n, dot);
      y[(m0 + r) * N + n] = bias ? v + bias[n] : v;
    }
}

// Columns [0, kv) of the input, each group of MAX_ROWS rows (R = fewer for the last) interleaved in blocks of
// 2 * LANES columns: block b of row r of the group starting at m0 is at m0 * kv + (b * R + r) * 2 * LANES.
// Read in place, rows of a large K are a multiple of 4 KiB apart and compete for the same L1 sets (measured
// 3x slower at 8 rows); interleaved, one pointer plus constant offsets reaches all R rows. Done once per call.
// With `pairs` (INT4) each block is stored as its LANES even columns then its LANES odd ones, the order in which
// int4_codes widens LANES packed bytes (this copy did it in the same pass: a separate PyTorch permute cost
// 5.7 us of a 16 us 1-row INT4 call of a 1024 -> 128 layer, 20 us at 16 rows).
std::vector<float> interleave_rows(const float* x, int64_t M, int64_t K, int64_t kv, bool pairs) {
  std::vector<float> xi(M * kv);
  for (int64_t m0 = 0; m0 < M; m0 += MAX_ROWS) {
    const int64_t R = std::min<int64_t>(MAX_ROWS, M - m0);
    for (int64_t b = 0; b < kv / (2 * LANES); ++b)
      for (int64_t r = 0; r < R; ++r) {
        const float* from = x + (m0 + r) * K + b * 2 * LANES;
        float* to = xi.data() + m0 * kv + (b * R + r) * 2 * LANES;
        if (pairs) {
          for (int i = 0; i < LANES; ++i) {
            to[i] = from[2 * i];
            to[LANES + i] = from[2 * i + 1];
          }
        } else {
          std::copy(from, from + 2 * LANES, to);
        }
      }
  }
  return xi;
}
#endif

// Sums of each input row over consecutive spans of `span` columns (K a multiple of span): out[m * K / span + g],
// what the zero-point term multiplies (computed here rather than by a PyTorch sum: one op less per call).
std::vector<float> span_sums(const float* x, int64_t M, int64_t K, int64_t span) {
  const int64_t G = K / span;
  std::vector<float> out(M * G);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t gi = 0; gi < G; ++gi) {
      const float* p = x + m * K + gi * span;
      float t = 0.0f;
      int64_t k = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
      if (span >= LANES) {
        vec acc = vzero();
        for (; k + LANES <= span; k += LANES) acc = vadd(acc, vload(p + k));
        t = vsum(acc);
      }
#endif
      for (; k < span; ++k) t += p[k];
      out[m * G + gi] = t;
    }
  return out;
}

// y = x W^T (+ bias) with the SIMD loop over columns [0, kv) (kv a multiple of the span and of 2 * LANES, or 0
// to use the scalar loop; `pairs`: the INT4 column order), split over output rows across threads where the work
// is large enough (task_grain). The tasks are whole blocks of BLOCK_ROWS output rows, so every output is summed
// by the same tile (the tile's width decides the summation order) whatever the number of threads: the result
// does not depend on it (a split at any row changed the last bits of some outputs).
template <typename Src>
void run(const Src& src, const float* x, const float* bias, float* y, int64_t M, int64_t N, int64_t K, int64_t kv,
         bool pairs) {
#if defined(__AVX512F__) || defined(__AVX2__)
  const std::vector<float> xi = kv > 0 ? interleave_rows(x, M, K, kv, pairs) : std::vector<float>();
#else
  (void)pairs;
#endif
  const int64_t blocks = (N + BLOCK_ROWS - 1) / BLOCK_ROWS;
  at::parallel_for(0, blocks, task_grain(GRAIN / BLOCK_ROWS, BLOCK_ROWS * M * K), [&](int64_t c0, int64_t c1) {
    const int64_t n0 = c0 * BLOCK_ROWS, n1 = std::min(N, c1 * BLOCK_ROWS);
#if defined(__AVX512F__) || defined(__AVX2__)
    if (kv > 0) {
      std::vector<vec> state;
      for (int64_t b0 = n0; b0 < n1; b0 += BLOCK_ROWS) {
        const int64_t b1 = std::min(n1, b0 + BLOCK_ROWS);
        for (int64_t m0 = 0; m0 < M; m0 += MAX_ROWS) {
          switch (std::min<int64_t>(MAX_ROWS, M - m0)) {
#define MQ_CASE(R) case R: if constexpr (MAX_ROWS >= R) simd_block<R>(src, x, xi.data() + m0 * kv, bias, y, N, K, kv, m0, b0, b1, state); break;
            MQ_CASE(1) MQ_CASE(2) MQ_CASE(3) MQ_CASE(4) MQ_CASE(5) MQ_CASE(6) MQ_CASE(7) MQ_CASE(8)
#undef MQ_CASE
          }
        }
      }
      return;
    }
#endif
    scalar_block(src, x, bias, y, M, N, K, n0, n1);
  });
}

#if defined(__AVX2__) && !defined(__AVX512F__)
// ---------------------------------------------------------------------------------------------------------
// AVX2 weight-only matmul (what an AVX2-only CPU runs for int4_linear / int8_linear; the AVX-512 build keeps the
// generic loops above). Same result as the generic loops, y = sum_groups s * (sum x q - z * sum x), with fewer
// instructions per weight, which is what bounds a 1-row call once the packed weight sits in cache:
//   - INT4: 8 packed bytes p = lo + 16 hi (columns 2i and 2i + 1) widen to 8 dwords with one vpmovzxbd; the
//     floats of p and of p >> 4 (= hi) meet the input as  x_even * p + (x_odd - 16 x_even) * hi
//     = x_even * lo + x_odd * hi, so the low nibble needs no mask: widen, shift, 2 conversions and 2
//     multiply-adds per 16 weights (the generic loop masked as well: 7 instructions, measured 0.77 -> 0.70 ms
//     for a 4096x4096 GEMV on one thread of an AMD EPYC (Zen 4) built for Haswell). The input's odd columns
//     are rewritten once per call (x_odd - 16 x_even, rounded once: an error of a few float32 ulps of
//     16 |x_even| per term, far inside the float32 accumulation's own).
//   - INT8: 16 codes widen with two vpmovsxbd / vpmovzxbd and convert; the scale and zero-point are applied
//     once per output.
//   - Up to 8 input rows share each widened vector (one widening per 16 multiply-adds at 8 rows: the FMA
//     units bound it), input rows interleaved per 16 columns so that one pointer reaches them all; columns
//     in passes of at most 16 KiB of input (L1) over blocks of 32 output rows whose sums wait in L1.
namespace avx2 {

constexpr int64_t STEP = 16;       // columns per inner step (two __m256 of codes)
constexpr int64_t ROWS = 8;        // input rows per pass over the weight
constexpr int64_t PASS_FLOATS = 4096;  // input floats (columns x rows) per pass: 16 KiB
constexpr int64_t BLOCK_N = 32;    // output rows per block (and per parallel task)

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The codes of output row n, columns [k, k + 16), as two float vectors that multiply the two halves of the
// input's 16-column block (see prepare_input).
struct Int4Codes {
  static constexpr bool GROUPED = true;        // a scale per group of columns, applied per group
  static constexpr int64_t LINE_COLS = 128;    // columns per 64-byte cache line
  const uint8_t* q;
  int64_t KB;
  const uint8_t* at(int64_t n, int64_t k) const { return q + n * KB + k / 2; }
  void codes(int64_t n, int64_t k, __m256& a, __m256& b) const {
    const __m256i p = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(at(n, k))));
    a = _mm256_cvtepi32_ps(p);                          // lo + 16 hi
    b = _mm256_cvtepi32_ps(_mm256_srli_epi32(p, 4));    // hi
  }
};

template <typename Q>
struct Int8Codes {
  static constexpr bool GROUPED = false;       // one scale per output row, applied at the end
  static constexpr int64_t LINE_COLS = 64;
  const Q* q;
  int64_t K;
  const Q* at(int64_t n, int64_t k) const { return q + n * K + k; }
  static __m256i widen(__m128i b) {
    if constexpr (std::is_same_v<Q, int8_t>) return _mm256_cvtepi8_epi32(b);
    else return _mm256_cvtepu8_epi32(b);
  }
  void codes(int64_t n, int64_t k, __m256& a, __m256& b) const {
    a = _mm256_cvtepi32_ps(widen(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(at(n, k)))));
    b = _mm256_cvtepi32_ps(widen(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(at(n, k + 8)))));
  }
};

// Input rows [m0, m0 + R) over columns [0, kv), as the tiles read them: 16-column block b of row r at
// ((b * R) + r) * 16. INT4 (pairs): the block's 8 even columns, then its 8 odd columns minus 16 times the even
// ones; INT8: the 16 columns in order.
void prepare_input(const float* x, int64_t K, int64_t kv, int64_t m0, int64_t R, bool pairs, float* out) {
  for (int64_t b = 0; b < kv / STEP; ++b)
    for (int64_t r = 0; r < R; ++r) {
      const float* from = x + (m0 + r) * K + b * STEP;
      float* to = out + (b * R + r) * STEP;
      if (pairs) {
        for (int i = 0; i < 8; ++i) {
          to[i] = from[2 * i];
          to[8 + i] = from[2 * i + 1] - 16.0f * from[2 * i];
        }
      } else {
        std::copy(from, from + STEP, to);
      }
    }
}

#define MQ_AVX2_UNROLL _Pragma("GCC unroll 16")

// Output rows [n, n + NR) x input rows [0, R) over columns [k0, k1) (whole groups): adds into tot[j * R + r].
// `xc` is the interleaved input from column k0. With few accumulators the two halves of a block go into
// separate sums (more independent multiply-add chains); with many, into one (the registers run out).
template <int R, int NR, typename Codes>
inline void tile(const Codes& c, const float* xc, int64_t n, int64_t k0, int64_t k1, int64_t group,
                 const float* scale, int64_t G, int64_t rows, __m256* tot) {
  constexpr bool split = 2 * NR * R <= 12;
  __m256 acc[NR][R], acc2[NR][R];
  auto zero = [&]() {
    MQ_AVX2_UNROLL for (int j = 0; j < NR; ++j)
      MQ_AVX2_UNROLL for (int r = 0; r < R; ++r) {
        acc[j][r] = _mm256_setzero_ps();
        if constexpr (split) acc2[j][r] = _mm256_setzero_ps();
      }
  };
  if constexpr (!Codes::GROUPED) {
    zero();
  }
  const int64_t span = Codes::GROUPED ? group : k1 - k0;
  for (int64_t gs = k0; gs < k1; gs += span) {
    if constexpr (Codes::GROUPED) zero();
    for (int64_t k = gs; k < gs + span; k += STEP) {
      if (k % Codes::LINE_COLS == 0) {  // the next tile's rows, one tile ahead (short row streams start late)
        MQ_AVX2_UNROLL for (int j = 0; j < NR; ++j)
          _mm_prefetch(reinterpret_cast<const char*>(c.at(std::min(n + NR + j, rows - 1), k)), _MM_HINT_T0);
      }
      const float* xk = xc + (k - k0) * R;
      MQ_AVX2_UNROLL for (int j = 0; j < NR; ++j) {
        __m256 a, b;
        c.codes(n + j, k, a, b);
        MQ_AVX2_UNROLL for (int r = 0; r < R; ++r) {
          acc[j][r] = _mm256_fmadd_ps(a, _mm256_loadu_ps(xk + r * STEP), acc[j][r]);
          if constexpr (split)
            acc2[j][r] = _mm256_fmadd_ps(b, _mm256_loadu_ps(xk + r * STEP + 8), acc2[j][r]);
          else
            acc[j][r] = _mm256_fmadd_ps(b, _mm256_loadu_ps(xk + r * STEP + 8), acc[j][r]);
        }
      }
    }
    if constexpr (Codes::GROUPED) {  // tot += scale * (this group's sums)
      MQ_AVX2_UNROLL for (int j = 0; j < NR; ++j) {
        const __m256 s = _mm256_set1_ps(scale[(n + j) * G + gs / group]);
        MQ_AVX2_UNROLL for (int r = 0; r < R; ++r) {
          const __m256 sum = split ? _mm256_add_ps(acc[j][r], acc2[j][r]) : acc[j][r];
          tot[j * R + r] = _mm256_fmadd_ps(sum, s, tot[j * R + r]);
        }
      }
    }
  }
  if constexpr (!Codes::GROUPED) {
    MQ_AVX2_UNROLL for (int j = 0; j < NR; ++j)
      MQ_AVX2_UNROLL for (int r = 0; r < R; ++r)
        tot[j * R + r] = _mm256_add_ps(tot[j * R + r], split ? _mm256_add_ps(acc[j][r], acc2[j][r]) : acc[j][r]);
  }
}

// Output rows [n0, n1) x input rows [0, R) over columns [0, kv): the sum of each (output row, input row) pair
// as 8 partial sums in tot[(n - n0) * R + r]. Passes over at most PASS_FLOATS input values (whole groups),
// each over every tile of the block.
template <int R, typename Codes>
void block(const Codes& c, const float* xi, int64_t kv, int64_t group, const float* scale, int64_t G,
           int64_t rows, int64_t n0, int64_t n1, __m256* tot) {
  constexpr int NR = R == 1 ? 4 : R == 2 ? 4 : R == 3 ? 3 : R <= 6 ? 2 : 1;  // output rows per tile: the registers
  const int64_t unit = Codes::GROUPED ? group : STEP;
  const int64_t cols = std::max<int64_t>(unit, PASS_FLOATS / R / unit * unit);
  std::fill(tot, tot + (n1 - n0) * R, _mm256_setzero_ps());
  for (int64_t k0 = 0; k0 < kv; k0 += cols) {
    const int64_t k1 = std::min(kv, k0 + cols);
    const float* xc = xi + k0 * R;
    int64_t n = n0;
    for (; n + NR <= n1; n += NR) tile<R, NR>(c, xc, n, k0, k1, group, scale, G, rows, tot + (n - n0) * R);
    for (; n < n1; ++n) tile<R, 1>(c, xc, n, k0, k1, group, scale, G, rows, tot + (n - n0) * R);
  }
}

template <typename Codes>
void block_rows(int64_t R, const Codes& c, const float* xi, int64_t kv, int64_t group, const float* scale,
                int64_t G, int64_t rows, int64_t n0, int64_t n1, __m256* tot) {
  switch (R) {
#define MQ_AVX2_CASE(r) case r: block<r>(c, xi, kv, group, scale, G, rows, n0, n1, tot); break;
    MQ_AVX2_CASE(1) MQ_AVX2_CASE(2) MQ_AVX2_CASE(3) MQ_AVX2_CASE(4)
    MQ_AVX2_CASE(5) MQ_AVX2_CASE(6) MQ_AVX2_CASE(7) MQ_AVX2_CASE(8)
#undef MQ_AVX2_CASE
  }
}

// y [M, N] = x [M, K] W^T for columns [0, kv) through the tiles, then finish(m, n, sum) for each output (the
// zero-point term, the scale, the columns past kv). Blocks of BLOCK_N output rows are the parallel tasks.
template <typename Codes, typename Finish>
void matmul(const Codes& c, const float* x, float* y, int64_t M, int64_t N, int64_t K, int64_t kv, int64_t group,
            const float* scale, int64_t G, bool pairs, const Finish& finish) {
  std::vector<float> xi(M * kv);
  for (int64_t m0 = 0; m0 < M; m0 += ROWS)
    prepare_input(x, K, kv, m0, std::min(ROWS, M - m0), pairs, xi.data() + m0 * kv);
  const int64_t blocks = (N + BLOCK_N - 1) / BLOCK_N;
  at::parallel_for(0, blocks, task_grain(1, BLOCK_N * M * K), [&](int64_t b0, int64_t b1) {
    std::vector<__m256> tot(BLOCK_N * ROWS);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * BLOCK_N, n1 = std::min(N, n0 + BLOCK_N);
      for (int64_t m0 = 0; m0 < M; m0 += ROWS) {
        const int64_t R = std::min(ROWS, M - m0);
        block_rows(R, c, xi.data() + m0 * kv, kv, group, scale, G, N, n0, n1, tot.data());
        for (int64_t n = n0; n < n1; ++n)
          for (int64_t r = 0; r < R; ++r) y[(m0 + r) * N + n] = finish(m0 + r, n, hsum(tot[(n - n0) * R + r]));
      }
    }
  });
}

}  // namespace avx2
#endif  // AVX2 weight-only matmul

void check_common(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale) {
  TORCH_CHECK(x.device().is_cpu() && q.device().is_cpu() && scale.device().is_cpu(), "fused_linear: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(),
              "fused_linear: x must be contiguous float32 [M, K]");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.is_contiguous(), "fused_linear: float32 scale");
  TORCH_CHECK(q.dim() == 2 && q.is_contiguous(), "fused_linear: qweight must be contiguous [N, *]");
}

// The bias to add before the output is stored (nullptr: none): float32 contiguous [N].
const float* bias_of(const c10::optional<torch::Tensor>& bias, int64_t N) {
  if (!bias.has_value()) return nullptr;
  TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == torch::kFloat32 && bias->is_contiguous() &&
              bias->numel() == N, "fused_linear: bias must be contiguous float32 [N]");
  return bias->data_ptr<float>();
}

torch::Tensor int4_linear(const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& scale,
                          const c10::optional<torch::Tensor>& zero_point, int64_t group_size,
                          const c10::optional<torch::Tensor>& bias) {
  check_common(x, qweight, scale);
  TORCH_CHECK(qweight.scalar_type() == torch::kUInt8, "int4_linear: qweight must be uint8");
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  TORCH_CHECK(group_size > 0 && K % group_size == 0, "int4_linear: group_size must divide K");
  const int64_t G = K / group_size;
  TORCH_CHECK(qweight.size(1) == (K + 1) / 2, "int4_linear: qweight must be [N, ceil(K/2)]");
  TORCH_CHECK(scale.numel() == N * G, "int4_linear: scale must be [N, K/group_size]");
  const uint8_t* zp = nullptr;
  if (zero_point.has_value()) {
    TORCH_CHECK(zero_point->scalar_type() == torch::kUInt8 && zero_point->is_contiguous() &&
                zero_point->numel() == N * G, "int4_linear: zero_point must be uint8 [N, K/group_size]");
    zp = zero_point->data_ptr<uint8_t>();
  }
  const float* b = bias_of(bias, N);
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const std::vector<float> xsum = span_sums(xp, M, K, group_size);
  const Int4Src src{qweight.data_ptr<uint8_t>(), scale.data_ptr<float>(), zp, xsum.data(),
                    qweight.size(1), G, group_size, N};
#if defined(__AVX2__) && !defined(__AVX512F__)
  if (group_size % avx2::STEP == 0) {
    avx2::matmul(avx2::Int4Codes{src.q, src.KB}, xp, y.data_ptr<float>(), M, N, K, K, group_size, src.s, G, true,
                 [&](int64_t m, int64_t n, float dot) {
                   const float v = src.finish(m, n, dot);
                   return b ? v + b[n] : v;
                 });
    return y;
  }
#endif
  int64_t kv = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
  if (group_size % (2 * LANES) == 0) kv = K;
#endif
  run(src, xp, b, y.data_ptr<float>(), M, N, K, kv, true);
  return y;
}

#if defined(__AVX2__) && !defined(__AVX512F__)
// INT8 through the AVX2 tiles: columns [0, kv) vectorised, the rest (K % 16) added one by one before the
// zero-point term and the scale.
template <typename Q>
void avx2_int8(const Int8Src<Q>& src, const float* xp, const float* bias, float* y, int64_t M, int64_t N, int64_t K,
               int64_t kv) {
  avx2::matmul(avx2::Int8Codes<Q>{src.q, K}, xp, y, M, N, K, kv, avx2::STEP, src.s, 1, false,
               [&](int64_t m, int64_t n, float dot) {
                 for (int64_t k = kv; k < K; ++k) dot += xp[m * K + k] * src.code(n, k);
                 const float v = src.finish(m, n, dot);
                 return bias ? v + bias[n] : v;
               });
}
#endif

torch::Tensor int8_linear(const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& scale,
                          const c10::optional<torch::Tensor>& zero_point, const c10::optional<torch::Tensor>& bias) {
  check_common(x, qweight, scale);
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  TORCH_CHECK(qweight.size(1) == K, "int8_linear: qweight must be [N, K]");
  const bool per_row = scale.dim() > 0;
  TORCH_CHECK(scale.numel() == (per_row ? N : 1), "int8_linear: scale must be [N] or a scalar");
  const float* b = bias_of(bias, N);
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // the row sums only the zero-point term needs (symmetric codes have none)
  const std::vector<float> xsum = zero_point.has_value() ? span_sums(xp, M, K, K) : std::vector<float>();
  int64_t kv = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
  kv = K - K % (2 * LANES);
#endif
  if (zero_point.has_value()) {
    TORCH_CHECK(qweight.scalar_type() == torch::kUInt8, "int8_linear: affine qweight must be uint8");
    TORCH_CHECK(zero_point->scalar_type() == torch::kUInt8 && zero_point->numel() == scale.numel(),
                "int8_linear: zero_point must be uint8 shaped like scale");
    const Int8Src<uint8_t> src{qweight.data_ptr<uint8_t>(), scale.data_ptr<float>(),
                               zero_point->data_ptr<uint8_t>(), xsum.data(), K, per_row, N};
#if defined(__AVX2__) && !defined(__AVX512F__)
    avx2_int8(src, xp, b, yp, M, N, K, kv);
#else
    run(src, xp, b, yp, M, N, K, kv, false);
#endif
  } else {
    TORCH_CHECK(qweight.scalar_type() == torch::kInt8, "int8_linear: symmetric qweight must be int8");
    const Int8Src<int8_t> src{qweight.data_ptr<int8_t>(), scale.data_ptr<float>(), nullptr, nullptr, K, per_row,
                              N};
#if defined(__AVX2__) && !defined(__AVX512F__)
    avx2_int8(src, xp, b, yp, M, N, K, kv);
#else
    run(src, xp, b, yp, M, N, K, kv, false);
#endif
  }
  return y;
}

// ---------------------------------------------------------------------------------------------------------
// Dequantize into a float32 or bf16 buffer, one pass, bit-identical to IntegerFormat.dequantize_into:
//   out[r, k] = (q[row_start + r, k] - z) * s    in float32; in bf16: the float32 product of the exact
//   integer (q - z) and bf16(s), rounded once to bf16 (round to nearest even), which is what PyTorch's bf16
//   sub_ and mul_ passes compute. With scaled = false the scale is left out (INT8: the caller scales the
//   matmul output instead). The codes are widened in registers, so nothing but `out` is written.

inline float bf16_round(float f) { return static_cast<float>(c10::BFloat16(f)); }

#if defined(__AVX512F__) || defined(__AVX2__)
// store LANES float32 values, or LANES bf16 values rounded to nearest even (NaN stays NaN)
inline void store_out(float* p, vec v) { vstore(p, v); }
inline void store_out(c10::BFloat16* p, vec v) {
#if defined(__AVX512F__)
  __m512i bits = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(rounded));
#else
  __m256i bits = _mm256_castps_si256(v);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
  // pack 8 x int32 (each < 65536) into 8 x uint16: packus works per 128-bit lane, so fix the order after
  __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
#endif
}

// 16 codes (as uint8 in column order) -> 16 outputs (q - z) * s
template <typename T>
inline void dequant16(T* out, __m128i codes, vec z, vec s, bool scaled, bool is_signed) {
  for (int h = 0; h < 16 / LANES; ++h) {
    const __m128i part = h == 0 ? codes : _mm_srli_si128(codes, 8);
    vec f = is_signed ? widen_i8(part) : widen_u8(part);
    f = vsub(f, z);
    if (scaled) f = vmul(f, s);
    store_out(out + h * LANES, f);
  }
}
#endif

template <typename T>
inline T to_out(float v);
template <>
inline float to_out<float>(float v) { return v; }
template <>
inline c10::BFloat16 to_out<c10::BFloat16>(float v) { return c10::BFloat16(v); }

// INT4: rows [r0, r1) of `out` from packed rows row_start + r
template <typename T>
void dequant_int4_rows(T* out, const uint8_t* q, const float* s, const uint8_t* z, int64_t K, int64_t KB,
                       int64_t G, int64_t g, int64_t row_start, int64_t r0, int64_t r1) {
  constexpr bool bf16 = std::is_same<T, c10::BFloat16>::value;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = row_start + r;
    const uint8_t* qr = q + n * KB;
    T* o = out + r * K;
    for (int64_t gi = 0; gi < G; ++gi) {
      const float sv = bf16 ? bf16_round(s[n * G + gi]) : s[n * G + gi];
      const float zv = z ? static_cast<float>(z[n * G + gi]) : 8.0f;
      int64_t k = gi * g;
      const int64_t ke = k + g;
#if defined(__AVX512F__) || defined(__AVX2__)
      if ((k & 1) == 0) {
        const vec vs = vset(sv), vz = vset(zv);
        const __m128i low4 = _mm_set1_epi8(0x0F);
        for (; k + 32 <= ke; k += 32) {
          const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qr + k / 2));
          const __m128i lo = _mm_and_si128(b, low4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
          dequant16(o + k, _mm_unpacklo_epi8(lo, hi), vz, vs, true, false);
          dequant16(o + k + 16, _mm_unpackhi_epi8(lo, hi), vz, vs, true, false);
        }
      }
#endif
      for (; k < ke; ++k) {
        const uint8_t byte = qr[k >> 1];
        const float code = static_cast<float>((k & 1) ? (byte >> 4) : (byte & 0xF));
        o[k] = to_out<T>((code - zv) * sv);
      }
    }
  }
}

// INT8 (int8 symmetric or uint8 affine codes): rows [r0, r1) of `out`
template <typename T, typename Q>
void dequant_int8_rows(T* out, const Q* q, const float* s, const uint8_t* z, bool per_row, int64_t K,
                       int64_t row_start, int64_t r0, int64_t r1, bool scaled) {
  constexpr bool bf16 = std::is_same<T, c10::BFloat16>::value;
  constexpr bool is_signed = std::is_same<Q, int8_t>::value;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = row_start + r;
    const int64_t i = per_row ? n : 0;
    const float sv = bf16 ? bf16_round(s[i]) : s[i];
    const float zv = z ? static_cast<float>(z[i]) : 0.0f;
    const Q* qr = q + n * K;
    T* o = out + r * K;
    int64_t k = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
    const vec vs = vset(sv), vz = vset(zv);
    for (; k + 16 <= K; k += 16)
      dequant16(o + k, _mm_loadu_si128(reinterpret_cast<const __m128i*>(qr + k)), vz, vs, scaled,
                is_signed);
#endif
    for (; k < K; ++k) {
      const float d = static_cast<float>(qr[k]) - zv;
      o[k] = to_out<T>(scaled ? d * sv : d);
    }
  }
}

void check_out(const torch::Tensor& out, int64_t K, int64_t row_start, int64_t N) {
  TORCH_CHECK(out.device().is_cpu() && out.dim() == 2 && out.is_contiguous() && out.size(1) == K,
              "dequantize: out must be a contiguous CPU [rows, K] tensor");
  TORCH_CHECK(out.scalar_type() == torch::kFloat32 || out.scalar_type() == torch::kBFloat16,
              "dequantize: out must be float32 or bfloat16");
  TORCH_CHECK(row_start >= 0 && row_start + out.size(0) <= N, "dequantize: rows out of range");
}

constexpr int64_t DEQUANT_GRAIN = 16;  // output rows per parallel task

// rows of a float32 or bf16 `out`, split across threads: f(typed out pointer, first row, end row)
template <typename F>
void for_out_rows(torch::Tensor& out, F&& f) {
  at::parallel_for(0, out.size(0), DEQUANT_GRAIN, [&](int64_t r0, int64_t r1) {
    if (out.scalar_type() == torch::kFloat32)
      f(out.data_ptr<float>(), r0, r1);
    else
      f(out.data_ptr<c10::BFloat16>(), r0, r1);
  });
}

torch::Tensor dequantize_int4(torch::Tensor out, const torch::Tensor& qweight, const torch::Tensor& scale,
                              const c10::optional<torch::Tensor>& zero_point, int64_t group_size,
                              int64_t row_start) {
  TORCH_CHECK(qweight.device().is_cpu() && qweight.scalar_type() == torch::kUInt8 && qweight.dim() == 2 &&
              qweight.is_contiguous(), "dequantize_int4: qweight must be contiguous uint8 [N, ceil(K/2)]");
  const int64_t N = qweight.size(0), K = out.size(1);
  check_out(out, K, row_start, N);
  TORCH_CHECK(group_size > 0 && K % group_size == 0 && qweight.size(1) == (K + 1) / 2,
              "dequantize_int4: group_size must divide K and qweight must be [N, ceil(K/2)]");
  const int64_t G = K / group_size;
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.is_contiguous() && scale.numel() == N * G,
              "dequantize_int4: scale must be contiguous float32 [N, K/group_size]");
  const uint8_t* zp = nullptr;
  if (zero_point.has_value()) {
    TORCH_CHECK(zero_point->scalar_type() == torch::kUInt8 && zero_point->is_contiguous() &&
                zero_point->numel() == N * G, "dequantize_int4: zero_point must be uint8 [N, K/group_size]");
    zp = zero_point->data_ptr<uint8_t>();
  }
  const uint8_t* q = qweight.data_ptr<uint8_t>();
  const float* s = scale.data_ptr<float>();
  const int64_t KB = qweight.size(1);
  for_out_rows(out, [&](auto* o, int64_t r0, int64_t r1) {
    dequant_int4_rows(o, q, s, zp, K, KB, G, group_size, row_start, r0, r1);
  });
  return out;
}

torch::Tensor dequantize_int8(torch::Tensor out, const torch::Tensor& qweight, const torch::Tensor& scale,
                              const c10::optional<torch::Tensor>& zero_point, int64_t row_start, bool scaled) {
  TORCH_CHECK(qweight.device().is_cpu() && qweight.dim() == 2 && qweight.is_contiguous(),
              "dequantize_int8: qweight must be contiguous [N, K]");
  const int64_t N = qweight.size(0), K = qweight.size(1);
  check_out(out, K, row_start, N);
  const bool per_row = scale.dim() > 0;
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.is_contiguous() &&
              scale.numel() == (per_row ? N : 1), "dequantize_int8: scale must be float32 [N] or a scalar");
  const float* s = scale.data_ptr<float>();
  auto rows = [&](const auto* q, const uint8_t* z) {
    for_out_rows(out, [&](auto* o, int64_t r0, int64_t r1) {
      dequant_int8_rows(o, q, s, z, per_row, K, row_start, r0, r1, scaled);
    });
  };
  if (zero_point.has_value()) {
    TORCH_CHECK(qweight.scalar_type() == torch::kUInt8 && zero_point->scalar_type() == torch::kUInt8 &&
                zero_point->numel() == scale.numel(), "dequantize_int8: affine codes and zero_point must be uint8");
    rows(qweight.data_ptr<uint8_t>(), zero_point->data_ptr<uint8_t>());
  } else {
    TORCH_CHECK(qweight.scalar_type() == torch::kInt8, "dequantize_int8: symmetric codes must be int8");
    rows(qweight.data_ptr<int8_t>(), nullptr);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// Exact INT8 x INT8 -> INT32 GEMM for CPUs without integer dot-product instructions (AVX2; where VNNI or AMX
// exist, torch._int_mm is faster). acc[m, n] = sum_k a[m, k] * w[n, k], every sum exact in int32: the codes
// are widened to int16 and multiplied in pairs with vpmaddwd (16 products per instruction, twice the
// multiply-adds of a float32 FMA), |a|, |w| <= 128 so a pair is <= 2^15 and K <= 2^17 keeps the sum in range.
// The weight is packed once (w8a8_pack) into panels of 16 output rows, each column pair of the 16 rows next
// to each other: packed[p, k/2, c, j] = w[16 p + c, k + j] (zero padding), the order vpmaddwd multiplies
// against a broadcast pair of input codes. Threads split the panels; each works on blocks of PANELS_PER_BLOCK
// panels (the block's weight stays in L2) and walks all input rows through it, MR rows at a time.

constexpr int64_t W8A8_MAX_K = 1 << 17;
constexpr int64_t PANEL = 16;
constexpr int64_t PANELS_PER_BLOCK = 8;
constexpr int64_t W8A8_ROWS_PER_TASK = 192;  // a multiple of the 6-row tile

torch::Tensor w8a8_pack(const torch::Tensor& w) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == torch::kInt8 && w.dim() == 2,
              "w8a8_pack: weight codes must be a CPU int8 [N, K] tensor");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(K <= W8A8_MAX_K, "w8a8_pack: K above 2^17 could overflow the int32 sums");
  const int64_t P = (N + PANEL - 1) / PANEL, KP = (K + 1) / 2;
  auto packed = torch::zeros({P, KP, PANEL, 2}, w.options());
  const auto wc = w.contiguous();
  const int8_t* src = wc.data_ptr<int8_t>();
  int8_t* dst = packed.data_ptr<int8_t>();
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t c = 0; c < PANEL && p * PANEL + c < N; ++c)
        for (int64_t k = 0; k < K; ++k)
          dst[((p * KP + k / 2) * PANEL + c) * 2 + (k & 1)] = src[(p * PANEL + c) * K + k];
  });
  return packed;
}

#if defined(__AVX2__)
// MR input rows x one panel (16 output rows), all K: 2 * MR accumulators of 8 int32 sums
template <int MR>
void w8a8_tile(const int16_t* a16, int64_t lda, const int8_t* panel, int64_t KP, int32_t* c, int64_t ldc,
               int64_t cols) {
  __m256i acc[MR][2];
  MQ_UNROLL
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  for (int64_t kp = 0; kp < KP; ++kp) {
    const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(panel + kp * 32)));
    const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(panel + kp * 32 + 16)));
    MQ_UNROLL
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      std::memcpy(&pair, a16 + r * lda + 2 * kp, sizeof(pair));
      const __m256i x = _mm256_set1_epi32(pair);
      acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(x, w0));
      acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(x, w1));
    }
  }
  MQ_UNROLL
  for (int r = 0; r < MR; ++r) {
    if (cols == PANEL) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + r * ldc), acc[r][0]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + r * ldc + 8), acc[r][1]);
    } else {
      alignas(32) int32_t tmp[PANEL];
      _mm256_store_si256(reinterpret_cast<__m256i*>(tmp), acc[r][0]);
      _mm256_store_si256(reinterpret_cast<__m256i*>(tmp + 8), acc[r][1]);
      std::copy(tmp, tmp + cols, c + r * ldc);
    }
  }
}
#endif

torch::Tensor w8a8_gemm(const torch::Tensor& a, const torch::Tensor& packed, int64_t N) {
  TORCH_CHECK(a.device().is_cpu() && a.scalar_type() == torch::kInt8 && a.dim() == 2,
              "w8a8_gemm: input codes must be a CPU int8 [M, K] tensor");
  TORCH_CHECK(packed.scalar_type() == torch::kInt8 && packed.dim() == 4 && packed.size(2) == PANEL &&
              packed.size(3) == 2 && packed.is_contiguous(), "w8a8_gemm: weight must come from w8a8_pack");
  const int64_t M = a.size(0), K = a.size(1), KP = packed.size(1), P = packed.size(0);
  TORCH_CHECK(KP == (K + 1) / 2 && P == (N + PANEL - 1) / PANEL, "w8a8_gemm: input and packed weight disagree");
  auto c = torch::empty({M, N}, a.options().dtype(torch::kInt32));
  // input codes widened to int16 once, rows padded to an even length (the pad multiplies a zero weight)
  auto a16 = torch::zeros({M, 2 * KP}, a.options().dtype(torch::kInt16));
  a16.narrow(1, 0, K).copy_(a);
  const int16_t* ap = a16.data_ptr<int16_t>();
  const int8_t* wp = packed.data_ptr<int8_t>();
  int32_t* cp = c.data_ptr<int32_t>();
  // tasks: (block of panels) x (chunk of input rows), so that small layers still keep every thread busy
  const int64_t blocks = (P + PANELS_PER_BLOCK - 1) / PANELS_PER_BLOCK;
  const int64_t chunks = (M + W8A8_ROWS_PER_TASK - 1) / W8A8_ROWS_PER_TASK;
  at::parallel_for(0, blocks * chunks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / chunks, m_end = std::min(M, (t % chunks + 1) * W8A8_ROWS_PER_TASK);
      const int64_t p_end = std::min(P, (b + 1) * PANELS_PER_BLOCK);
      for (int64_t m0 = (t % chunks) * W8A8_ROWS_PER_TASK; m0 < m_end; ) {
        const int64_t mr = std::min<int64_t>(6, m_end - m0);
        for (int64_t p = b * PANELS_PER_BLOCK; p < p_end; ++p) {
          const int64_t cols = std::min(PANEL, N - p * PANEL);
          const int16_t* arow = ap + m0 * 2 * KP;
          const int8_t* panel = wp + p * KP * PANEL * 2;
          int32_t* crow = cp + m0 * N + p * PANEL;
#if defined(__AVX2__)
          switch (mr) {
#define MQ_CASE(R) case R: w8a8_tile<R>(arow, 2 * KP, panel, KP, crow, N, cols); break;
            MQ_CASE(1) MQ_CASE(2) MQ_CASE(3) MQ_CASE(4) MQ_CASE(5) MQ_CASE(6)
#undef MQ_CASE
          }
#else
          for (int64_t r = 0; r < mr; ++r)
            for (int64_t col = 0; col < cols; ++col) {
              int32_t sum = 0;
              for (int64_t kp = 0; kp < KP; ++kp)
                for (int j = 0; j < 2; ++j)
                  sum += static_cast<int32_t>(arow[r * 2 * KP + 2 * kp + j]) * panel[(kp * PANEL + col) * 2 + j];
              crow[r * N + col] = sum;
            }
#endif
        }
        m0 += mr;
      }
    }
  });
  return c;
}

// ---------------------------------------------------------------------------------------------------------
// The float32 passes around an integer GEMM, one pass each, bit-identical to the PyTorch ops they replace
// (monoquant/nn/activation.py and kernels._w8a8; this file is built with -ffp-contract=off, so a multiply
// followed by an add is never fused into one rounding):
//   quantize_rows: codes[m, k] = clamp(round_half_even(x[m, k] / s) + z, qmin, qmax) - shift, as int8
//   rescale_rows:  y[m, n] = (float(acc[m, n] - xz[m] * rs[n]) * xs) * ws (+ b[n]) for int32 sums acc (or
//                  float32 ones that hold integers exactly, below 2**24: oneDNN's int8 matmul), scales per row (xs), per
//                  column (ws) or one value each; the integer zero-point term (input zero-point xz per row times
//                  the weight's code sums rs) only when given, exact in int32 as the separate in-place update
//                  it replaces; written as float32, or rounded once to bf16 (what .to(torch.bfloat16) gives)
// The input of the quantize passes may be bf16: each value is widened to float32 exactly, as x.float() would.

inline float as_float(float v) { return v; }
inline float as_float(c10::BFloat16 v) { return static_cast<float>(v); }
#if defined(__AVX2__)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {  // bf16 is the upper half of a float32: widen and shift
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#endif

// codes of one row: clamp(round_half_even(x / s) + z, lo, hi) - sh as int8 (a NaN gives lo - sh)
template <typename T>
inline void quantize_row(const T* xr, int8_t* o, int64_t K, float s, float z, bool add_zero, float lo, float hi,
                         float sh) {
  int64_t k = 0;
#if defined(__AVX2__)
  const __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(z), vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi),
               vsh = _mm256_set1_ps(sh);
  for (; k + 8 <= K; k += 8) {
    __m256 v = _mm256_round_ps(_mm256_div_ps(load8(xr + k), vs),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    if (add_zero) v = _mm256_add_ps(v, vz);
    v = _mm256_sub_ps(_mm256_min_ps(_mm256_max_ps(v, vlo), vhi), vsh);  // NaN -> lo (no undefined cast)
    const __m256i i32 = _mm256_cvtps_epi32(v);
    const __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(o + k), _mm_packs_epi16(i16, i16));
  }
#endif
  for (; k < K; ++k) {
    float v = std::nearbyint(as_float(xr[k]) / s);
    if (add_zero) v += z;
    v = std::min(std::max(v, lo), hi) - sh;
    o[k] = static_cast<int8_t>(v == v ? v : lo - sh);
  }
}

torch::Tensor quantize_rows(const torch::Tensor& x, const torch::Tensor& scale,
                            const c10::optional<torch::Tensor>& zero, double qmin, double qmax, int64_t shift) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(),
              "quantize_rows: x must be contiguous float32 [M, K]");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.is_contiguous() &&
              (scale.numel() == 1 || scale.numel() == M), "quantize_rows: float32 scale per row or one");
  const float* zp_f = nullptr;
  torch::Tensor zf;
  if (zero.has_value()) {
    TORCH_CHECK(zero->numel() == scale.numel(), "quantize_rows: zero-point shaped like the scale");
    zf = zero->to(torch::kFloat32).contiguous();
    zp_f = zf.data_ptr<float>();
  }
  TORCH_CHECK(qmin - shift >= -128 && qmax - shift <= 127, "quantize_rows: shifted codes must fit int8");
  auto out = torch::empty({M, K}, x.options().dtype(torch::kInt8));
  const float* xp = x.data_ptr<float>();
  const float* sp = scale.data_ptr<float>();
  int8_t* op = out.data_ptr<int8_t>();
  const bool per_row = scale.numel() == M;
  const float lo = static_cast<float>(qmin), hi = static_cast<float>(qmax), sh = static_cast<float>(shift);
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float s = sp[per_row ? m : 0];
      const float z = zp_f ? zp_f[per_row ? m : 0] : 0.0f;
      quantize_row(xp + m * K, op + m * K, K, s, z, zp_f != nullptr, lo, hi, sh);
    }
  });
  return out;
}

// A row's min/max qparams (F.qparams_from_minmax in float64, the scale rounded to float32; a NaN row: NaN scale, 0)
inline void row_qparams(float mn, float mx, bool nan, double qmin, double qmax, bool symmetric, double eps,
                        float& s_out, int32_t& z_out) {
  double s, z = 0.0;
  if (nan) {
    s = std::nan("");
  } else if (symmetric) {
    s = std::max(std::fabs(static_cast<double>(mn)), std::fabs(static_cast<double>(mx))) / qmax;
    s = s < eps ? eps : s;
  } else {
    const double l = std::min(static_cast<double>(mn), 0.0), h = std::max(static_cast<double>(mx), 0.0);
    s = (h - l) / (qmax - qmin);
    s = s < eps ? eps : s;
    z = std::min(std::max(std::nearbyint(qmin - l / s), qmin), qmax);
    if (z != z) z = 0.0;  // an inf range
  }
  s_out = static_cast<float>(s);
  z_out = static_cast<int32_t>(z);
}

// One row of dynamic_quantize_rows: its min/max qparams (scale s, zero-point z) and its int8 codes
// (shifted by -128 when affine) in o.
template <typename T>
inline void dynamic_quantize_row(const T* xr, int8_t* o, int64_t K, double qmin, double qmax, bool symmetric,
                                 double eps, float& s_out, int32_t& z_out) {
  const float lo = static_cast<float>(qmin), hi = static_cast<float>(qmax), sh = symmetric ? 0.0f : 128.0f;
  float mn = as_float(xr[0]), mx = mn;
  bool nan = false;
  int64_t k = 0;
#if defined(__AVX2__)
  if (K >= 8) {
    __m256 vmn = load8(xr), vmx = vmn, vnan = _mm256_cmp_ps(vmn, vmn, _CMP_UNORD_Q);
    for (k = 8; k + 8 <= K; k += 8) {
      const __m256 v = load8(xr + k);
      vmn = _mm256_min_ps(vmn, v);
      vmx = _mm256_max_ps(vmx, v);
      vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    alignas(32) float a[8], b[8];
    _mm256_store_ps(a, vmn);
    _mm256_store_ps(b, vmx);
    nan = _mm256_movemask_ps(vnan) != 0;
    mn = a[0], mx = b[0];
    for (int i = 1; i < 8; ++i) mn = std::min(mn, a[i]), mx = std::max(mx, b[i]);
  }
#endif
  for (; k < K; ++k) {
    const float v = as_float(xr[k]);
    nan |= v != v;
    mn = std::min(mn, v);
    mx = std::max(mx, v);
  }
  row_qparams(mn, mx, nan, qmin, qmax, symmetric, eps, s_out, z_out);
  quantize_row(xr, o, K, s_out, static_cast<float>(z_out), !symmetric, lo, hi, sh);
}

// Dynamic per-row qparams and codes in one pass over each row, bit-identical to ActivationQuantizer.qparams
// (F.minmax in float32, then F.qparams_from_minmax in float64, the scale rounded to float32) followed by
// quantize_rows. A row with a NaN gets a NaN scale (and zero-point 0), as torch's NaN-propagating min/max give.
template <typename T>
std::vector<torch::Tensor> dynamic_quantize_rows_of(const torch::Tensor& x, double qmin, double qmax, bool symmetric,
                                                    double eps) {
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K > 0, "dynamic_quantize_rows: rows must not be empty");
  const int64_t shift = symmetric ? 0 : 128;
  TORCH_CHECK(qmin - shift >= -128 && qmax - shift <= 127, "dynamic_quantize_rows: shifted codes must fit int8");
  auto codes = torch::empty({M, K}, x.options().dtype(torch::kInt8));
  auto scale = torch::empty({M}, x.options().dtype(torch::kFloat32));
  auto zero = torch::empty({M}, x.options().dtype(torch::kInt32));
  const T* xp = x.data_ptr<T>();
  int8_t* cp = codes.data_ptr<int8_t>();
  float* sp = scale.data_ptr<float>();
  int32_t* zp = zero.data_ptr<int32_t>();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      dynamic_quantize_row(xp + m * K, cp + m * K, K, qmin, qmax, symmetric, eps, sp[m], zp[m]);
  });
  return {codes, scale, zero};
}

std::vector<torch::Tensor> dynamic_quantize_rows(const torch::Tensor& x, double qmin, double qmax, bool symmetric,
                                                 double eps) {
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16) &&
              x.dim() == 2 && x.is_contiguous(), "dynamic_quantize_rows: x must be contiguous float32 or bf16 [M, K]");
  return x.scalar_type() == torch::kBFloat16 ? dynamic_quantize_rows_of<c10::BFloat16>(x, qmin, qmax, symmetric, eps)
                                             : dynamic_quantize_rows_of<float>(x, qmin, qmax, symmetric, eps);
}

// A convolution input [M, ...] fake-quantized per sample (each x[m], a row of M) with dynamic qparams in one call: the codes and qparams of
// dynamic_quantize_rows, then (code - zero-point) * scale in float32, bit-identical to ActivationQuantizer's
// fake_quantize from those codes (int8 codes widened, the shifted zero-point subtracted, times the scale). A row
// with an inf or NaN gives a NaN row (no code stands for it). What a quantized conv with INT8 activations runs
// before its float conv: one call instead of a dozen tensor ops, whose fixed cost decided batch-1 convs.
torch::Tensor dynamic_fake_quantize_rows(const torch::Tensor& x, double qmin, double qmax, bool symmetric,
                                         double eps) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() >= 2 && x.is_contiguous(),
              "dynamic_fake_quantize_rows: x must be contiguous float32 [M, ...]");
  const int64_t M = x.size(0), K = M ? x.numel() / M : 0;
  const auto q = dynamic_quantize_rows_of<float>(x.view({M, K}), qmin, qmax, symmetric, eps);
  const int32_t shift = symmetric ? 0 : 128;
  auto out = torch::empty_like(x);
  const int8_t* cp = q[0].data_ptr<int8_t>();
  const float* sp = q[1].data_ptr<float>();
  const int32_t* zp = q[2].data_ptr<int32_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float s = std::isfinite(sp[m]) ? sp[m] : std::nanf("");
      const float z = static_cast<float>(zp[m] - shift);
      const int8_t* c = cp + m * K;
      float* o = op + m * K;
      for (int64_t k = 0; k < K; ++k) o[k] = (static_cast<float>(c[k]) - z) * s;
    }
  });
  return out;
}

#if defined(__AVX512F__) || defined(__AVX2__)
// LANES sums as float32: int32 ones minus the zero-point term z * rs when rs is given (exact int32 arithmetic),
// or float32 ones that hold integers (converted to int32 and back: exact)
#if defined(__AVX512F__)
inline __m512i load_sums(const int32_t* a) { return _mm512_loadu_si512(a); }
inline __m512i load_sums(const float* a) { return _mm512_cvttps_epi32(_mm512_loadu_ps(a)); }
template <typename A>
inline vec sums_as_float(const A* a, const int32_t* rs, int32_t z) {
  __m512i v = load_sums(a);
  if (rs) v = _mm512_sub_epi32(v, _mm512_mullo_epi32(_mm512_set1_epi32(z), _mm512_loadu_si512(rs)));
  return _mm512_cvtepi32_ps(v);
}
#else
inline __m256i load_sums(const int32_t* a) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a)); }
inline __m256i load_sums(const float* a) { return _mm256_cvttps_epi32(_mm256_loadu_ps(a)); }
template <typename A>
inline vec sums_as_float(const A* a, const int32_t* rs, int32_t z) {
  __m256i v = load_sums(a);
  if (rs)
    v = _mm256_sub_epi32(v, _mm256_mullo_epi32(_mm256_set1_epi32(z),
                                                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rs))));
  return _mm256_cvtepi32_ps(v);
}
#endif
#endif

template <typename T, typename A>
void rescale_rows_into(T* yp, const A* ap, const float* xs, const float* ws, const float* bp,
                       const int32_t* xz, const int32_t* rs, int64_t M, int64_t N, bool xs_rows, bool ws_cols) {
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float a = xs[xs_rows ? m : 0];
      const int32_t z = xz ? xz[m] : 0;
      const A* arow = ap + m * N;
      T* yrow = yp + m * N;
      int64_t n = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
      // the same roundings in the same order, LANES outputs at a time (bf16 outputs rounded in registers)
      const vec va = vset(a), vws = vset(ws[0]);
      for (; n + LANES <= N; n += LANES) {
        vec v = vmul(sums_as_float(arow + n, xz ? rs + n : nullptr, z), va);
        v = vmul(v, ws_cols ? vload(ws + n) : vws);
        if (bp) v = vadd(v, vload(bp + n));
        store_out(yrow + n, v);
      }
#endif
      for (; n < N; ++n) {
        const int32_t a_n = static_cast<int32_t>(arow[n]);  // a float32 sum holds an exact integer
        const int32_t sum = xz ? a_n - z * rs[n] : a_n;
        float v = static_cast<float>(sum) * a;
        v = v * ws[ws_cols ? n : 0];
        yrow[n] = static_cast<T>(bp ? v + bp[n] : v);
      }
    }
  });
}

torch::Tensor rescale_rows(const torch::Tensor& acc, const torch::Tensor& x_scale, const torch::Tensor& w_scale,
                           const c10::optional<torch::Tensor>& bias, const c10::optional<torch::Tensor>& x_zero,
                           const c10::optional<torch::Tensor>& w_rowsum, bool bf16_out) {
  const bool float_acc = acc.scalar_type() == torch::kFloat32;
  TORCH_CHECK(acc.device().is_cpu() && (acc.scalar_type() == torch::kInt32 || float_acc) && acc.dim() == 2 &&
              acc.is_contiguous(), "rescale_rows: acc must be contiguous int32 [M, N] (or float32 holding integers)");
  const int64_t M = acc.size(0), N = acc.size(1);
  TORCH_CHECK(x_scale.scalar_type() == torch::kFloat32 && x_scale.is_contiguous() &&
              (x_scale.numel() == 1 || x_scale.numel() == M), "rescale_rows: float32 x_scale per row or one");
  TORCH_CHECK(w_scale.scalar_type() == torch::kFloat32 && w_scale.is_contiguous() &&
              (w_scale.numel() == 1 || w_scale.numel() == N), "rescale_rows: float32 w_scale per column or one");
  const float* bp = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == torch::kFloat32 && bias->is_contiguous() && bias->numel() == N,
                "rescale_rows: float32 bias [N]");
    bp = bias->data_ptr<float>();
  }
  TORCH_CHECK(x_zero.has_value() == w_rowsum.has_value(), "rescale_rows: x_zero and w_rowsum go together");
  const int32_t* xz = nullptr;
  const int32_t* rs = nullptr;
  if (x_zero.has_value()) {
    TORCH_CHECK(x_zero->scalar_type() == torch::kInt32 && x_zero->is_contiguous() && x_zero->numel() == M,
                "rescale_rows: int32 x_zero [M]");
    TORCH_CHECK(w_rowsum->scalar_type() == torch::kInt32 && w_rowsum->is_contiguous() && w_rowsum->numel() == N,
                "rescale_rows: int32 w_rowsum [N]");
    xz = x_zero->data_ptr<int32_t>();
    rs = w_rowsum->data_ptr<int32_t>();
  }
  auto y = torch::empty({M, N}, acc.options().dtype(bf16_out ? torch::kBFloat16 : torch::kFloat32));
  const float* xs = x_scale.data_ptr<float>();
  const float* ws = w_scale.data_ptr<float>();
  const bool xs_rows = x_scale.numel() == M, ws_cols = w_scale.numel() == N;
  auto with_acc = [&](auto* yp) {
    if (float_acc)
      rescale_rows_into(yp, acc.data_ptr<float>(), xs, ws, bp, xz, rs, M, N, xs_rows, ws_cols);
    else
      rescale_rows_into(yp, acc.data_ptr<int32_t>(), xs, ws, bp, xz, rs, M, N, xs_rows, ws_cols);
  };
  if (bf16_out)
    with_acc(y.data_ptr<c10::BFloat16>());
  else
    with_acc(y.data_ptr<float>());
  return y;
}

// ---------------------------------------------------------------------------------------------------------
// W8A8 with VNNI: a dynamic (or static) INT8-activation linear layer in one call, for AVX512-VNNI CPUs
// (vpdpbusd: 64 u8 x s8 products summed into 16 int32 lanes per instruction, twice the multiply-adds of a bf16
// dot product). Bit-identical to dynamic_quantize_rows (or quantize_rows) + an exact int32 GEMM + rescale_rows:
//   codes:   ActivationQuantizer's int8 codes c (affine ones shifted by -128) are vpdpbusd's signed operand, read
//            as a broadcast group of 4 straight from memory inside the instruction (a separate vpbroadcastd per
//            row and step measured 20-30% slower), and the weight codes w its unsigned one, u = w + 128. So
//            sum_k c u = sum_k c w + 128 cs[m] (cs: the row's code sum, taken while quantizing), and the sums with
//            the input zero-point taken out are sum_k c u - 128 cs[m] - zt[m] rs[n] (rs: the weight's code sums
//            per output; zt = the zero-point - 128 when affine, else 0): int32 arithmetic that wraps, exact
//            because the result fits (K <= 2^17)
//   weight:  packed once (w8a8_vnni_pack) into panels of 64 output rows with 4 consecutive columns of a row
//            next to each other, as u8: packed[p, k / 4, c, j] = w[64 p + c, 4 (k / 4) + j] + 128 (padding
//            multiplies zero codes), the 256 bytes vpdpbusd multiplies against one group of 4 input codes
//   tile:    VNNI_MR (6) input rows x 64 outputs in 24 zmm accumulators over a block of at most VNNI_KQ_BLOCK
//            groups of 4 columns (a 24 KiB slice of the panel, which stays in L1 while all the task's tiles go
//            through it; the sums of earlier blocks wait in a small int32 buffer); after the last block the epilogue
//            works from the registers: y = (float(acc - 128 cs - zt rs) * xs) * ws (+ b), as float32 or rounded once to bf16
//            (the roundings of rescale_rows, in its order)
//   rows:    quantized 16 values per instruction (vnni_quantize_row: the reciprocal of the scale, the division
//            only near a rounding boundary, tested against the row's bound when its range was taken); with dynamic
//            qparams a row whose scale is not finite (it holds an inf or a NaN) gets a NaN row scale in the
//            epilogue, so its output row is all NaN
// Tasks are (chunk of input rows) x (group of panels), each thread the same number of chunks of (to a tile) the same
// rows: each quantizes its rows into a buffer of u8 codes (L2),
// then runs them through its panels. Panels are split only when there are too few rows to keep every thread
// busy (those tasks quantize the same rows again: a few rows, cheap next to their GEMM).
constexpr int64_t VNNI_PANEL = 64;
constexpr int VNNI_MR = 6;
constexpr int64_t VNNI_ROWS_PER_TASK = 96;  // a multiple of VNNI_MR; 96 x K bytes of codes stay in L2
// K = 1536 with whole-K tiles read each 98 KiB panel from L2 once per tile: measured 4.38 ms for 2048 x 1536 ->
// 384 against 3.68 ms for quantize + torch._int_mm + rescale (AMD EPYC Zen 4, 2 threads)
constexpr int64_t VNNI_KQ_BLOCK = 96;

bool has_vnni() {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  return true;
#else
  return false;
#endif
}

torch::Tensor w8a8_vnni_pack(const torch::Tensor& w) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == torch::kInt8 && w.dim() == 2,
              "w8a8_vnni_pack: weight codes must be a CPU int8 [N, K] tensor");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(K <= W8A8_MAX_K, "w8a8_vnni_pack: K above 2^17 could overflow the int32 sums");
  const int64_t P = (N + VNNI_PANEL - 1) / VNNI_PANEL, KQ = (K + 3) / 4;
  auto packed = torch::zeros({P, KQ, VNNI_PANEL, 4}, w.options().dtype(torch::kUInt8));
  const auto wc = w.contiguous();
  const int8_t* src = wc.data_ptr<int8_t>();
  uint8_t* dst = packed.data_ptr<uint8_t>();
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t c = 0; c < VNNI_PANEL && p * VNNI_PANEL + c < N; ++c)
        for (int64_t k = 0; k < K; ++k)
          dst[((p * KQ + k / 4) * VNNI_PANEL + c) * 4 + (k & 3)] =
              static_cast<uint8_t>(static_cast<int32_t>(src[(p * VNNI_PANEL + c) * K + k]) + 128);
  });
  return packed;
}

// What a tile's epilogue needs: per input row the scale, 128 x its code sum (cs) and the zero-point term's
// multiplier (zt); per output
// the weight's code sums, its scale (or one for all) and the bias (or none)
struct VnniEpilogue {
  const float* xs;
  const int32_t* cs;
  const int32_t* zt;
  const int32_t* rs;
  const float* ws;
  bool ws_cols;
  const float* bias;
};

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// MR rows of u8 codes (row stride lda) x one panel over the groups of 4 columns [kq0, kq1): sums start at zero
// (kq0 == 0) or from `part` (MR x 64 int32), and go back to `part` unless this is the last block (kq1 == KQ),
// where the epilogue writes y rows (stride ldy), columns [0, cols)
template <int MR, typename T>
void vnni_tile(const int8_t* a, int64_t lda, const uint8_t* panel, int64_t kq0, int64_t kq1, int64_t KQ,
               int32_t* part, T* y, int64_t ldy, int64_t cols, const VnniEpilogue& e) {
  __m512i acc[MR][4];
  MQ_UNROLL
  for (int r = 0; r < MR; ++r)
    MQ_UNROLL
    for (int j = 0; j < 4; ++j)
      acc[r][j] = kq0 == 0 ? _mm512_setzero_si512() : _mm512_loadu_si512(part + r * VNNI_PANEL + 16 * j);
  for (int64_t kq = kq0; kq < kq1; ++kq) {
    const uint8_t* wp = panel + kq * VNNI_PANEL * 4;
    const __m512i w0 = _mm512_loadu_si512(wp), w1 = _mm512_loadu_si512(wp + 64),
                  w2 = _mm512_loadu_si512(wp + 128), w3 = _mm512_loadu_si512(wp + 192);
    MQ_UNROLL
    for (int r = 0; r < MR; ++r) {
      // acc += w (u8) . {the row's 4 codes} (s8) broadcast from memory by the instruction itself (the intrinsic
      // with _mm512_set1_epi32 compiles to a separate vpbroadcastd that GCC will not fold)
      // (register copies in and out: an array element as the asm operand kept the whole array on the stack)
      const int32_t* quad = reinterpret_cast<const int32_t*>(a + r * lda + 4 * kq);
      __m512i s0 = acc[r][0], s1 = acc[r][1], s2 = acc[r][2], s3 = acc[r][3];
      asm("vpdpbusd %4%{1to16%}, %5, %0\n\t"
          "vpdpbusd %4%{1to16%}, %6, %1\n\t"
          "vpdpbusd %4%{1to16%}, %7, %2\n\t"
          "vpdpbusd %4%{1to16%}, %8, %3"
          : "+v"(s0), "+v"(s1), "+v"(s2), "+v"(s3)
          : "m"(*quad), "v"(w0), "v"(w1), "v"(w2), "v"(w3));
      acc[r][0] = s0, acc[r][1] = s1, acc[r][2] = s2, acc[r][3] = s3;
    }
  }
  if (kq1 < KQ) {
    MQ_UNROLL
    for (int r = 0; r < MR; ++r)
      MQ_UNROLL
      for (int j = 0; j < 4; ++j) _mm512_storeu_si512(part + r * VNNI_PANEL + 16 * j, acc[r][j]);
    return;
  }
  MQ_UNROLL
  for (int j = 0; j < 4; ++j) {
    const int64_t c0 = 16 * j;
    if (c0 >= cols) break;
    const int64_t width = std::min<int64_t>(16, cols - c0);
    const __mmask16 mask = width == 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << width) - 1);
    const __m512i rs = _mm512_maskz_loadu_epi32(mask, e.rs + c0);
    const __m512 ws = e.ws_cols ? _mm512_maskz_loadu_ps(mask, e.ws + c0) : _mm512_set1_ps(e.ws[0]);
    const __m512 b = e.bias ? _mm512_maskz_loadu_ps(mask, e.bias + c0) : _mm512_setzero_ps();
    MQ_UNROLL
    for (int r = 0; r < MR; ++r) {
      const __m512i sums = _mm512_sub_epi32(_mm512_sub_epi32(acc[r][j], _mm512_set1_epi32(e.cs[r])),
                                            _mm512_mullo_epi32(_mm512_set1_epi32(e.zt[r]), rs));
      __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(sums), _mm512_set1_ps(e.xs[r]));
      v = _mm512_mul_ps(v, ws);
      if (e.bias) v = _mm512_add_ps(v, b);
      T* out = y + r * ldy + c0;
      if (width == 16) {
        store_out(out, v);
      } else {
        alignas(64) T tmp[16];
        store_out(tmp, v);
        std::copy(tmp, tmp + width, out);
      }
    }
  }
}
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// The VNNI layer's input rows, 16 values per instruction (AVX-512), with the same codes and qparams as
// dynamic_quantize_row / quantize_row: x / s is computed as x * (1 / s), and where that product lies within
// |p| 2^-21 (tested: 2^-20) of a half-integer (where it and the correctly rounded quotient could round to
// different integers: both are within |q| 2^-23 of the exact quotient q) those lanes take the division itself,
// so the codes are the division's bit for bit. Returns the sum of the (shifted) codes, what the epilogue's
// 128 cs term needs.
inline __m512 vnni_load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 vnni_load16(const c10::BFloat16* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

// bound: a value >= |x / s| for every x of the row (dynamic qparams: max(|min|, |max|) / s, from the row's range),
// which turns the per-lane test into one compare against a constant; a negative bound (static qparams, no range
// taken) keeps the per-lane test. Either flags at least the lanes the per-lane |p| 2^-21 bound flags: the constant
// uses 2^-20 of the bound, which also covers the rounding of 0.5 - tolerance (lanes below 1/16 cannot be near a
// half-integer).
template <typename T>
inline int32_t vnni_quantize_row(const T* xr, int8_t* o, int64_t K, float s, float z, bool add_zero, float lo, float hi,
                                 float sh, float bound) {
  const float r = 1.0f / s;
  const bool by_reciprocal = std::isfinite(r) && r != 0.0f;
  const bool row_tol = bound >= 0.0f;
  const __m512 vs = _mm512_set1_ps(s), vr = _mm512_set1_ps(r), vz = _mm512_set1_ps(z), vlo = _mm512_set1_ps(lo),
               vhi = _mm512_set1_ps(hi), vsh = _mm512_set1_ps(sh), half = _mm512_set1_ps(0.5f),
               tol = _mm512_set1_ps(1.0f / (1 << 20)),
               edge = _mm512_set1_ps(row_tol ? 0.5f - bound * (1.0f / (1 << 20)) : 0.0f);
  __m512i sum = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = K - k >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (K - k)) - 1);
    const __m512 x = vnni_load16(xr + k, m);
    __m512 v;
    if (by_reciprocal) {
      const __m512 q = _mm512_mul_ps(x, vr);
      v = _mm512_roundscale_ps(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      // |q - round(q)| is exact; within the tolerance of 0.5, q and the quotient may round apart
      const __m512 d = _mm512_abs_ps(_mm512_sub_ps(q, v));
      const __m512 e = row_tol ? edge : _mm512_sub_ps(half, _mm512_mul_ps(_mm512_abs_ps(q), tol));
      const __mmask16 near = _mm512_mask_cmp_ps_mask(m, d, e, _CMP_GE_OQ);
      if (near)
        v = _mm512_mask_roundscale_ps(v, near, _mm512_div_ps(x, vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {
      v = _mm512_roundscale_ps(_mm512_div_ps(x, vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    if (add_zero) v = _mm512_add_ps(v, vz);
    v = _mm512_sub_ps(_mm512_min_ps(_mm512_max_ps(v, vlo), vhi), vsh);  // NaN -> lo - sh, as quantize_row
    const __m512i i32 = _mm512_maskz_cvtps_epi32(m, v);
    sum = _mm512_add_epi32(sum, i32);
    _mm_mask_storeu_epi8(o + k, m, _mm512_cvtsepi32_epi8(i32));
  }
  return _mm512_reduce_add_epi32(sum);
}

// min, max and whether a NaN is there, of one row, 16 values at a time
template <typename T>
inline void vnni_row_range(const T* xr, int64_t K, float& mn, float& mx, bool& nan) {
  const __m512 first = vnni_load16(xr, K >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << K) - 1));
  // lanes past K repeat the first value (neutral for min and max)
  __m512 vmn = _mm512_set1_ps(_mm512_cvtss_f32(first)), vmx = vmn;
  __mmask16 bad = 0;
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = K - k >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (K - k)) - 1);
    const __m512 v = _mm512_mask_mov_ps(vmn, m, vnni_load16(xr + k, m));
    vmn = _mm512_min_ps(vmn, v);
    vmx = _mm512_max_ps(vmx, v);
    bad |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  }
  mn = _mm512_reduce_min_ps(vmn);
  mx = _mm512_reduce_max_ps(vmx);
  nan = bad != 0;
}
// the same for bf16 rows, 32 values per load: widening by interleaving with zeros puts them out of order, which
// min, max and the NaN test do not see (one unordered compare of the two halves finds a NaN in either)
template <>
inline void vnni_row_range(const c10::BFloat16* xr, int64_t K, float& mn, float& mx, bool& nan) {
  const __m512i fill = _mm512_set1_epi16(static_cast<int16_t>(xr[0].x));  // lanes past K: the first value
  const __m512i zero = _mm512_setzero_si512();
  __m512 vmn = _mm512_set1_ps(static_cast<float>(xr[0])), vmx = vmn;
  __mmask16 bad = 0;
  for (int64_t k = 0; k < K; k += 32) {
    const __mmask32 m =
        K - k >= 32 ? static_cast<__mmask32>(0xFFFFFFFFu) : static_cast<__mmask32>((1u << (K - k)) - 1);
    const __m512i raw = _mm512_mask_loadu_epi16(fill, m, xr + k);
    const __m512 a = _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, raw));
    const __m512 b = _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, raw));
    vmn = _mm512_min_ps(vmn, _mm512_min_ps(a, b));
    vmx = _mm512_max_ps(vmx, _mm512_max_ps(a, b));
    bad |= _mm512_cmp_ps_mask(a, b, _CMP_UNORD_Q);
  }
  mn = _mm512_reduce_min_ps(vmn);
  mx = _mm512_reduce_max_ps(vmx);
  nan = bad != 0;
}
#endif

// y [M, N] (float32, or bf16 when x is bf16) from x [M, K]; x_scale [M] (dynamic) or the static one [1] is returned
// too. Static qparams: s_static (float32 [1]) and z_static (int32 [1], absent for symmetric activations).
template <typename T>
std::vector<torch::Tensor> w8a8_vnni_linear_of(const torch::Tensor& x, const torch::Tensor& packed, int64_t N,
                                               const torch::Tensor& rowsum, const torch::Tensor& w_scale,
                                               const c10::optional<torch::Tensor>& bias, double qmin, double qmax,
                                               bool symmetric, double eps, const c10::optional<torch::Tensor>& s_static,
                                               const c10::optional<torch::Tensor>& z_static) {
  const int64_t M = x.size(0), K = x.size(1), P = packed.size(0), KQ = packed.size(1);
  const bool dynamic = !s_static.has_value();
  auto y = torch::empty({M, N}, x.options());
  auto scale = dynamic ? torch::empty({M}, x.options().dtype(torch::kFloat32)) : s_static->clone();
  if (M == 0) return {y, scale};
  const T* xp = x.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  float* sp = scale.data_ptr<float>();
  const float s_fixed = dynamic ? 0.0f : sp[0];
  const int32_t z_fixed = dynamic || symmetric ? 0 : z_static->data_ptr<int32_t>()[0];
  const float lo = static_cast<float>(qmin), hi = static_cast<float>(qmax), sh = symmetric ? 0.0f : 128.0f;
  const int32_t* rsp = rowsum.data_ptr<int32_t>();
  const float* wsp = w_scale.data_ptr<float>();
  const bool ws_cols = w_scale.numel() == N;
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const int64_t threads = at::get_num_threads();
  int64_t chunks = (M + VNNI_ROWS_PER_TASK - 1) / VNNI_ROWS_PER_TASK;
  // as many chunks per thread, their bounds on multiples of VNNI_MR: parallel_for gives each thread a run of
  // whole chunks, and 22 chunks of 96 rows for 2048 rows on 2 threads gave one thread 1056 rows, the other 992
  if (chunks > threads) chunks = (chunks + threads - 1) / threads * threads;
  const int64_t tiles = (M + VNNI_MR - 1) / VNNI_MR;
  auto chunk_start = [&](int64_t c) { return c >= chunks ? M : std::min(M, (c * tiles / chunks) * VNNI_MR); };
  const int64_t groups = chunks >= threads ? 1 : std::min(P, (threads + chunks - 1) / chunks);
  const int64_t per_group = (P + groups - 1) / groups;
  constexpr int64_t most_rows = VNNI_ROWS_PER_TASK + VNNI_MR;  // a chunk's rows: ceil(tiles / chunks) tiles at most
  at::parallel_for(0, chunks * groups, 1, [&](int64_t t0, int64_t t1) {
    // kept per thread between calls: fresh buffers (157 KiB of codes at K = 1536) were mapped, page-faulted and
    // zeroed on every call
    static thread_local std::vector<int8_t> codes;
    static thread_local std::vector<int32_t> partial;  // earlier blocks' sums
    if (static_cast<int64_t>(codes.size()) < most_rows * KQ * 4) codes.resize(most_rows * KQ * 4);
    if (KQ > VNNI_KQ_BLOCK && static_cast<int64_t>(partial.size()) < most_rows * VNNI_PANEL)
      partial.resize(most_rows * VNNI_PANEL);
    float xs[most_rows];
    int32_t cs[most_rows], zt[most_rows];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t chunk = t / groups, group = t % groups;
      const int64_t m0 = chunk_start(chunk), rows = chunk_start(chunk + 1) - m0;
      TORCH_CHECK(rows <= most_rows, "w8a8_vnni_linear: internal chunk bound");
      for (int64_t r = 0; r < rows; ++r) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
        const T* xr = xp + (m0 + r) * K;
        int32_t z = z_fixed;
        float s = s_fixed, bound = -1.0f;  // static: no range taken, the quantize tests each lane
        if (dynamic) {
          float mn, mx;
          bool nan;
          vnni_row_range(xr, K, mn, mx, nan);
          row_qparams(mn, mx, nan, qmin, qmax, symmetric, eps, s, z);
          if (group == 0) sp[m0 + r] = s;
          bound = std::max(std::fabs(mn), std::fabs(mx)) * (1.0f / s);  // >= |x * (1 / s)|: rounding is monotone
          if (!(bound >= 0.0f) || std::isinf(bound)) bound = -1.0f;
        }
        int8_t* row_codes = codes.data() + r * KQ * 4;
        std::fill(row_codes + K, row_codes + KQ * 4, static_cast<int8_t>(0));  // the row padded to whole groups of 4
        const int32_t sum = vnni_quantize_row(xr, row_codes, K, s, static_cast<float>(z), !symmetric, lo, hi, sh,
                                              bound);
        // a row holding an inf or NaN (its dynamic scale is not finite) comes out all NaN: no code stands for it
        xs[r] = dynamic && !std::isfinite(s) ? std::nanf("") : s;
        cs[r] = static_cast<int32_t>(static_cast<uint32_t>(sum) * 128u);  // wraps like the int32 sums it corrects
        zt[r] = symmetric ? 0 : z - 128;
#endif
      }
      const int64_t p_end = std::min(P, (group + 1) * per_group);
      for (int64_t p = group * per_group; p < p_end; ++p) {
        const int64_t cols = std::min(VNNI_PANEL, N - p * VNNI_PANEL);
        const uint8_t* panel = wp + p * KQ * VNNI_PANEL * 4;
        for (int64_t kq0 = 0; kq0 < KQ; kq0 += VNNI_KQ_BLOCK) {
          const int64_t kq1 = std::min(KQ, kq0 + VNNI_KQ_BLOCK);
          for (int64_t r0 = 0; r0 < rows; r0 += VNNI_MR) {
            const int64_t mr = std::min<int64_t>(VNNI_MR, rows - r0);
            const VnniEpilogue e{xs + r0, cs + r0, zt + r0, rsp + p * VNNI_PANEL, ws_cols ? wsp + p * VNNI_PANEL : wsp,
                                 ws_cols, bp ? bp + p * VNNI_PANEL : nullptr};
            const int8_t* a = codes.data() + r0 * KQ * 4;
            int32_t* part = partial.data() + r0 * VNNI_PANEL;
            T* out = yp + (m0 + r0) * N + p * VNNI_PANEL;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
            switch (mr) {
#define MQ_CASE(R) case R: vnni_tile<R>(a, KQ * 4, panel, kq0, kq1, KQ, part, out, N, cols, e); break;
              MQ_CASE(1) MQ_CASE(2) MQ_CASE(3) MQ_CASE(4) MQ_CASE(5) MQ_CASE(6)
#undef MQ_CASE
            }
#else
            (void)a, (void)part, (void)out, (void)panel, (void)cols, (void)e, (void)kq1;
#endif
          }
        }
      }
    }
  });
  return {y, scale};
}

std::vector<torch::Tensor> w8a8_vnni_linear(const torch::Tensor& x, const torch::Tensor& packed, int64_t N,
                                            const torch::Tensor& rowsum, const torch::Tensor& w_scale,
                                            const c10::optional<torch::Tensor>& bias, double qmin, double qmax,
                                            bool symmetric, double eps, const c10::optional<torch::Tensor>& s_static,
                                            const c10::optional<torch::Tensor>& z_static) {
  TORCH_CHECK(has_vnni(), "w8a8_vnni_linear: this build has no AVX512-VNNI path (see w8a8_vnni())");
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16) &&
              x.dim() == 2 && x.is_contiguous() && x.size(1) > 0,
              "w8a8_vnni_linear: x must be contiguous float32 or bf16 [M, K], K > 0");
  const int64_t K = x.size(1);
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.dim() == 4 && packed.size(2) == VNNI_PANEL &&
              packed.size(3) == 4 && packed.is_contiguous() && packed.size(1) == (K + 3) / 4 &&
              packed.size(0) == (N + VNNI_PANEL - 1) / VNNI_PANEL,
              "w8a8_vnni_linear: the weight must come from w8a8_vnni_pack of an [N, K] weight");
  TORCH_CHECK(rowsum.scalar_type() == torch::kInt32 && rowsum.is_contiguous() && rowsum.numel() == N,
              "w8a8_vnni_linear: int32 rowsum [N]");
  TORCH_CHECK(w_scale.scalar_type() == torch::kFloat32 && w_scale.is_contiguous() &&
              (w_scale.numel() == 1 || w_scale.numel() == N), "w8a8_vnni_linear: float32 w_scale per output or one");
  c10::optional<torch::Tensor> b32;  // a bf16 bias (a bf16 model's) widened here, exactly: one call less in Python
  if (bias.has_value()) {
    TORCH_CHECK((bias->scalar_type() == torch::kFloat32 || bias->scalar_type() == torch::kBFloat16) &&
                bias->device().is_cpu() && bias->numel() == N, "w8a8_vnni_linear: float32 or bf16 bias [N]");
    b32 = bias->to(torch::kFloat32).contiguous();
  }
  TORCH_CHECK(qmin - (symmetric ? 0 : 128) >= -128 && qmax - (symmetric ? 0 : 128) <= 127,
              "w8a8_vnni_linear: shifted codes must fit int8");
  if (s_static.has_value()) {
    TORCH_CHECK(s_static->scalar_type() == torch::kFloat32 && s_static->numel() == 1 && s_static->is_contiguous(),
                "w8a8_vnni_linear: a static scale is one float32");
    TORCH_CHECK(symmetric || (z_static.has_value() && z_static->scalar_type() == torch::kInt32 &&
                              z_static->numel() == 1), "w8a8_vnni_linear: a static affine zero-point is one int32");
  }
  return x.scalar_type() == torch::kBFloat16
             ? w8a8_vnni_linear_of<c10::BFloat16>(x, packed, N, rowsum, w_scale, b32, qmin, qmax, symmetric, eps,
                                                  s_static, z_static)
             : w8a8_vnni_linear_of<float>(x, packed, N, rowsum, w_scale, b32, qmin, qmax, symmetric, eps, s_static,
                                          z_static);
}

// ---- MSE clipping search -----------------------------------------------------------------------------------
// mse_clip_errors(view, lo, hi, ratios, qmin, qmax, symmetric, eps) -> float64 [C, S]: for every slot (a row of
// the contiguous float64 view [S, L]) and candidate ratio r (C of them), the summed squared error of
// fake-quantizing the slot with the qparams of the range [r * lo, r * hi]. The qparams and the fake-quantize are
// the float64 formulas of monoquant.functional (qparams_from_minmax, then quantize / dequantize with the scale
// rounded to float32 first, round half to even), element for element; only the order of the final sum differs
// (8 partial sums, then the tail). One pass over a slot per candidate with the slot in L1, instead of the ~9
// tensor-sized passes per candidate the PyTorch ops make.
torch::Tensor mse_clip_errors(const torch::Tensor& view, const torch::Tensor& lo, const torch::Tensor& hi,
                              const torch::Tensor& ratios, int64_t qmin, int64_t qmax, bool symmetric, double eps) {
  TORCH_CHECK(view.device().is_cpu() && view.scalar_type() == torch::kFloat64 && view.dim() == 2 &&
              view.is_contiguous(), "mse_clip_errors: view must be contiguous float64 [S, L]");
  const int64_t S = view.size(0), L = view.size(1);
  for (const torch::Tensor* t : {&lo, &hi}) {
    TORCH_CHECK(t->scalar_type() == torch::kFloat64 && t->is_contiguous() && t->numel() == S,
                "mse_clip_errors: lo and hi must be contiguous float64 [S]");
  }
  TORCH_CHECK(ratios.scalar_type() == torch::kFloat64 && ratios.is_contiguous() && ratios.dim() == 1,
              "mse_clip_errors: ratios must be contiguous float64 [C]");
  const int64_t C = ratios.numel();
  auto errs = torch::empty({C, S}, view.options());
  const double* vp = view.data_ptr<double>();
  const double* lp = lo.data_ptr<double>();
  const double* hp = hi.data_ptr<double>();
  const double* rp = ratios.data_ptr<double>();
  double* ep = errs.data_ptr<double>();
  const double qlo = static_cast<double>(qmin), qhi = static_cast<double>(qmax);
  at::parallel_for(0, S, 16, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const double* x = vp + s * L;
      for (int64_t c = 0; c < C; ++c) {
        const double mn = lp[s] * rp[c], mx = hp[s] * rp[c];
        double scale, zero = 0.0;
        if (symmetric) {
          scale = std::max(std::max(std::fabs(mn), std::fabs(mx)) / qhi, eps);
        } else {
          const double l = std::min(mn, 0.0), h = std::max(mx, 0.0);
          scale = std::max((h - l) / (qhi - qlo), eps);
          zero = std::min(std::max(std::nearbyint(qlo - l / scale), qlo), qhi);
        }
        const double sc = static_cast<double>(static_cast<float>(scale));
        double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t j = 0;
        for (; j + 8 <= L; j += 8) {
          for (int t = 0; t < 8; ++t) {
            const double q = std::min(std::max(std::nearbyint(x[j + t] / sc) + zero, qlo), qhi);
            const double e = x[j + t] - (q - zero) * sc;
            acc[t] += e * e;
          }
        }
        double tail = 0.0;
        for (; j < L; ++j) {
          const double q = std::min(std::max(std::nearbyint(x[j] / sc) + zero, qlo), qhi);
          const double e = x[j] - (q - zero) * sc;
          tail += e * e;
        }
        ep[c * S + s] = (((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))) + tail;
      }
    }
  });
  return errs;
}

// ---- weight quantization (round to nearest) and GPTQ's column loop ----------------------------------------
// quantize_weight_rows(x, scale, zero_or_None, group, qmin, qmax, out): the codes of a float32 weight [R, C] with
// float64 qparams [R, C / group] (one per row: group = C), written as out's integer dtype: the float64 formula of
// monoquant.functional.quantize_rows, element for element (x / scale in float64, round half to even, + zero,
// clamp), in one pass over the weight instead of five tensor-sized ones.
// x / scale is taken as x * (1 / scale), which differs from the quotient by about one unit in the last place;
// only where that product lies that close to a half-integer could the rounded code differ, and there (a tie,
// tested per piece of the row: rare, except for weights that are exact multiples of half the scale) the piece
// is recomputed with the division. The codes are the division's in every case.
constexpr int64_t QUANTIZE_PIECE = 256;

// The loops below are plain C++ left to the compiler's vectorizer; on AVX-512 CPUs it is asked for 512-bit
// vectors (GCC's default for -march=native there is 256-bit: measured 55 -> 32 ms for the codes of a 4096 x 4096
// weight on one busy thread).
#if defined(__AVX512F__)
#define MQ_WIDE_VECTORS __attribute__((target("prefer-vector-width=512")))
#else
#define MQ_WIDE_VECTORS
#endif

template <typename T>
MQ_WIDE_VECTORS void quantize_weight_row(const float* xr, const double* sr, const double* zr, T* orow, int64_t C,
                                         int64_t group, double qlo, double qhi) {
  double buf[QUANTIZE_PIECE];
  for (int64_t g = 0; g < C / group; ++g) {
    const double s = sr[g], z = zr ? zr[g] : 0.0, inv = 1.0 / s;
    for (int64_t c0 = 0; c0 < group; c0 += QUANTIZE_PIECE) {
      const int64_t n = std::min(QUANTIZE_PIECE, group - c0);
      const float* x = xr + g * group + c0;
      T* o = orow + g * group + c0;
      int near_tie = 0;
      for (int64_t j = 0; j < n; ++j) {
        const double t = static_cast<double>(x[j]) * inv, q = std::rint(t);
        near_tie |= std::fabs(std::fabs(t - q) - 0.5) <= 1e-12 * (std::fabs(t) + 1.0);
        buf[j] = q;
      }
      if (near_tie) {
        for (int64_t j = 0; j < n; ++j) buf[j] = std::rint(static_cast<double>(x[j]) / s);
      }
      for (int64_t j = 0; j < n; ++j) {
        double q = buf[j] + z;  // + 0.0 for symmetric qtypes leaves every code as it is
        q = std::min(std::max(q, qlo), qhi);
        o[j] = static_cast<T>(static_cast<int32_t>(q == q ? q : qlo));
      }
    }
  }
}

template <typename T>
void quantize_weight_rows_as(const float* xp, const double* sp, const double* zp, T* op, int64_t R, int64_t C,
                             int64_t group, double qlo, double qhi) {
  const int64_t G = C / group;
  at::parallel_for(0, R, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      quantize_weight_row(xp + r * C, sp + r * G, zp ? zp + r * G : nullptr, op + r * C, C, group, qlo, qhi);
    }
  });
}

torch::Tensor quantize_weight_rows(const torch::Tensor& x, const torch::Tensor& scale,
                                   const c10::optional<torch::Tensor>& zero, int64_t group, int64_t qmin,
                                   int64_t qmax, torch::Tensor out) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(),
              "quantize_weight_rows: x must be contiguous float32 [R, C]");
  const int64_t R = x.size(0), C = x.size(1);
  TORCH_CHECK(group > 0 && C % group == 0, "quantize_weight_rows: group must divide the columns");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat64 && scale.is_contiguous() && scale.numel() == R * (C / group),
              "quantize_weight_rows: scale must be contiguous float64 [R, C / group]");
  const double* zp = nullptr;
  if (zero.has_value()) {
    TORCH_CHECK(zero->scalar_type() == torch::kFloat64 && zero->is_contiguous() && zero->numel() == scale.numel(),
                "quantize_weight_rows: zero-point must be contiguous float64, shaped like the scale");
    zp = zero->data_ptr<double>();
  }
  TORCH_CHECK(out.is_contiguous() && out.numel() == R * C, "quantize_weight_rows: out must be contiguous [R, C]");
  const double qlo = static_cast<double>(qmin), qhi = static_cast<double>(qmax);
  const float* xp = x.data_ptr<float>();
  const double* sp = scale.data_ptr<double>();
  switch (out.scalar_type()) {
    case torch::kInt8: quantize_weight_rows_as(xp, sp, zp, out.data_ptr<int8_t>(), R, C, group, qlo, qhi); break;
    case torch::kUInt8: quantize_weight_rows_as(xp, sp, zp, out.data_ptr<uint8_t>(), R, C, group, qlo, qhi); break;
    case torch::kInt16: quantize_weight_rows_as(xp, sp, zp, out.data_ptr<int16_t>(), R, C, group, qlo, qhi); break;
    default: TORCH_CHECK(false, "quantize_weight_rows: out must be int8, uint8 or int16");
  }
  return out;
}

// gptq_columns(wb, hb, errs, codes, scale, zero, slots, i0, i1, s1, qmin, qmax): GPTQ's per-column loop for the
// columns i0 <= i < i1 of one block (wb: the block's columns, transposed: float32 [B, M], updated in place;
// hb: float32 [B, B] block of the inverse Cholesky factor, any strides; errs/codes: float32 / int16
// [B, M], written at row i; scale/zero: float64 [S, M], column i uses row slots[i]). Per column, exactly the
// PyTorch ops of monoquant.gptq._quantize_columns: q = clamp(round(x / s) + z) in float64, err = (x - float((q -
// z) * s)) / hb[i, i] in float32, then wb[j] -= hb[i, j] * err for i < j < s1 (a multiply, then a subtract:
// built with -ffp-contract=off). Rows are independent, so threads split them and each thread runs all the
// columns on its rows while they stay in cache, instead of ~15 tensor ops per column from Python.
// gptq_columns on the rows m0 <= m < m1 (threads split the rows; every column is independent along them)
MQ_WIDE_VECTORS void gptq_column_rows(float* w, float* e, int16_t* c, const float* h, int64_t hs, int64_t ht,
                                      const double* sp, const double* zp, const int64_t* sl, int64_t M, int64_t m0,
                                      int64_t m1, int64_t i0, int64_t i1, int64_t s1, double qlo, double qhi) {
  for (int64_t i = i0; i < i1; ++i) {
    const double* s = sp + sl[i] * M;
    const double* z = zp + sl[i] * M;
    const float d = h[i * hs + i * ht];
    const float* x = w + i * M;
    float* er = e + i * M;
    int16_t* cr = c + i * M;
    for (int64_t m = m0; m < m1; ++m) {
      double q = std::nearbyint(static_cast<double>(x[m]) / s[m]) + z[m];
      q = std::min(std::max(q, qlo), qhi);
      cr[m] = static_cast<int16_t>(q);
      const float deq = static_cast<float>((q - z[m]) * s[m]);
      er[m] = (x[m] - deq) / d;
    }
    for (int64_t j = i + 1; j < s1; ++j) {
      const float hij = h[i * hs + j * ht];
      float* wj = w + j * M;
      for (int64_t m = m0; m < m1; ++m) wj[m] = wj[m] - hij * er[m];
    }
  }
}

void gptq_columns(torch::Tensor wb, const torch::Tensor& hb, torch::Tensor errs, torch::Tensor codes,
                  const torch::Tensor& scale, const torch::Tensor& zero, const torch::Tensor& slots, int64_t i0,
                  int64_t i1, int64_t s1, int64_t qmin, int64_t qmax) {
  TORCH_CHECK(wb.scalar_type() == torch::kFloat32 && wb.dim() == 2 && wb.is_contiguous(),
              "gptq_columns: wb must be contiguous float32 [B, M]");
  const int64_t B = wb.size(0), M = wb.size(1);
  TORCH_CHECK(hb.scalar_type() == torch::kFloat32 && hb.dim() == 2 && hb.size(0) == B && hb.size(1) == B,
              "gptq_columns: hb must be float32 [B, B]");
  TORCH_CHECK(errs.scalar_type() == torch::kFloat32 && errs.is_contiguous() && errs.sizes() == wb.sizes(),
              "gptq_columns: errs must be contiguous float32 [B, M]");
  TORCH_CHECK(codes.scalar_type() == torch::kInt16 && codes.is_contiguous() && codes.sizes() == wb.sizes(),
              "gptq_columns: codes must be contiguous int16 [B, M]");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat64 && scale.is_contiguous() && scale.dim() == 2 &&
              scale.size(1) == M && zero.scalar_type() == torch::kFloat64 && zero.is_contiguous() &&
              zero.sizes() == scale.sizes(), "gptq_columns: scale and zero must be contiguous float64 [S, M]");
  TORCH_CHECK(slots.scalar_type() == torch::kInt64 && slots.is_contiguous() && slots.numel() == B,
              "gptq_columns: slots must be contiguous int64 [B]");
  TORCH_CHECK(0 <= i0 && i0 <= i1 && i1 <= s1 && s1 <= B, "gptq_columns: need 0 <= i0 <= i1 <= s1 <= B");
  const int64_t S = scale.size(0);
  const int64_t* sl = slots.data_ptr<int64_t>();
  for (int64_t i = i0; i < i1; ++i) TORCH_CHECK(0 <= sl[i] && sl[i] < S, "gptq_columns: slot out of range");
  float* w = wb.data_ptr<float>();
  float* e = errs.data_ptr<float>();
  int16_t* c = codes.data_ptr<int16_t>();
  const float* h = hb.data_ptr<float>();
  const int64_t hs = hb.stride(0), ht = hb.stride(1);
  const double* sp = scale.data_ptr<double>();
  const double* zp = zero.data_ptr<double>();
  const double qlo = static_cast<double>(qmin), qhi = static_cast<double>(qmax);
  at::parallel_for(0, M, 256, [&](int64_t m0, int64_t m1) {
    gptq_column_rows(w, e, c, h, hs, ht, sp, zp, sl, M, m0, m1, i0, i1, s1, qlo, qhi);
  });
}

// signal_noise_sums(ref, approx) -> float64 [2]: sum(ref^2) and sum((ref - approx)^2) over two contiguous float32
// tensors of the same size, in one pass without temporaries (the weight SQNR of quantize_'s report). Squares and
// differences in float64, summed in float64 per piece of SUM_PIECE values (one partial sum per vector lane), the
// pieces' sums then added in order, so the result does not depend on the number of threads.
constexpr int64_t SUM_PIECE = 1 << 14;

MQ_WIDE_VECTORS void signal_noise_piece(const float* r, const float* a, int64_t n, double* out) {
  double sig = 0.0, noi = 0.0;
#pragma omp simd reduction(+ : sig, noi)  // one partial sum per vector lane, added at the end
  for (int64_t j = 0; j < n; ++j) {
    const double x = r[j], d = x - static_cast<double>(a[j]);
    sig += x * x;
    noi += d * d;
  }
  out[0] = sig;
  out[1] = noi;
}

torch::Tensor signal_noise_sums(const torch::Tensor& ref, const torch::Tensor& approx) {
  TORCH_CHECK(ref.device().is_cpu() && ref.scalar_type() == torch::kFloat32 && ref.is_contiguous() &&
              approx.scalar_type() == torch::kFloat32 && approx.is_contiguous() && approx.numel() == ref.numel(),
              "signal_noise_sums: ref and approx must be contiguous float32 tensors of the same size");
  const int64_t n = ref.numel(), pieces = (n + SUM_PIECE - 1) / SUM_PIECE;
  std::vector<double> partial(2 * pieces, 0.0);
  const float* rp = ref.data_ptr<float>();
  const float* ap = approx.data_ptr<float>();
  at::parallel_for(0, pieces, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t j0 = p * SUM_PIECE;
      signal_noise_piece(rp + j0, ap + j0, std::min(SUM_PIECE, n - j0), partial.data() + 2 * p);
    }
  });
  double sig = 0.0, noi = 0.0;
  for (int64_t p = 0; p < pieces; ++p) {
    sig += partial[2 * p];
    noi += partial[2 * p + 1];
  }
  auto out = torch::empty({2}, ref.options().dtype(torch::kFloat64));
  out[0] = sig;
  out[1] = noi;
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// AVX512-BF16 weight-only matmul for bf16 inputs of few rows (issue 23): y[m, n] = sum_k x[m, k] * w[n, k]
// with bf16 x [M, K] and the stored INT4 / INT8 weight read directly (no repacking, no bf16 copy of the
// weight), float32 sums, bf16 output [M, N] (bias added by the caller). Each vdpbf16ps multiplies 32 bf16
// inputs by 32 bf16 weights of one output row, a pair of columns per float32 lane (the lanes run along K, so
// the row-major stored layout is read as it is); the 16 lanes are summed once per output at the end.
// The weights reach registers as bf16 once per tile of up to 8 input rows and are reused by every row of it:
//   INT4: the group's 16 possible values bf16((c - z) * bf16(s)), c = 0..15, in a table built once per group
//         and output row (what IntegerFormat.dequantize_into writes in bf16: the exact integer times the bf16
//         scale, rounded once); each code is looked up with one vpermw;
//   INT8: the codes minus the zero-point, integers of at most 8 bits and so exact in bf16; the float32 sum is
//         multiplied by the row's float32 scale at the end.
// Tiles: MB input rows x NB output rows of accumulators (8 x 2, or 4 x 4 for the last rows), inputs in blocks
// of rows that stay in L2 while the thread's weight rows stream past. Requires K % 32 == 0 (INT4: group %
// 32 == 0) and N % 4 == 0 (the Python side checks; the candidates are not eligible otherwise).
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
constexpr bool BF16_DOT = true;

namespace bf16dot {

constexpr int64_t KSTEP = 32;      // bf16 values per vdpbf16ps
constexpr int64_t NCHUNK = 4;      // output rows per unit of work
constexpr int64_t XBLOCK_BYTES = 256 * 1024;  // input rows kept hot while the weight rows stream past

inline __m512bh as_bh(__m512i v) { return reinterpret_cast<__m512bh&>(v); }

// the 16 bf16 values bf16((c - z) * s) of one INT4 group (s already rounded to bf16), in the low 16 words
inline __m512i int4_table(float s, float z) {
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m256bh t = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(z)), _mm512_set1_ps(s)));
  return _mm512_castsi256_si512(reinterpret_cast<const __m256i&>(t));
}

// 32 INT4 codes (16 packed bytes, low nibble = even column) -> 32 bf16 weights in column order
inline __m512i int4_weights(const uint8_t* p, __m512i table) {
  const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  // word 0 of each lane: the low nibble (even column), word 1: the high nibble: (d | d << 12) & 0x000F000F
  const __m512i idx = _mm512_ternarylogic_epi32(d, _mm512_slli_epi32(d, 12), _mm512_set1_epi32(0x000F000F), 0xA8);
  return _mm512_permutexvar_epi16(idx, table);
}

// 32 INT8 codes minus the zero-point -> 32 bf16 weights (exact) in column order
template <typename Q>
inline __m512i int8_weights(const Q* p, __m512 z) {
  const __m128i b0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i b1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16));
  __m512 f0, f1;
  if (std::is_same<Q, int8_t>::value) {
    f0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b0));
    f1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b1));
  } else {
    f0 = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b0)), z);
    f1 = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b1)), z);
  }
  const __m512bh w = _mm512_cvtne2ps_pbh(f1, f0);  // columns 0..15 from f0 in the low half
  return reinterpret_cast<const __m512i&>(w);
}

struct Int4Weight {
  const uint8_t* q; const float* s; const uint8_t* z; int64_t KB, G, g;
  int64_t group(int64_t) const { return g; }
  // the group tables of rows n0..n0+NB for group gi
  template <int NB>
  void begin_group(int64_t n0, int64_t gi, __m512i* t) const {
    for (int j = 0; j < NB; ++j) {
      const int64_t i = (n0 + j) * G + gi;
      t[j] = int4_table(bf16_round(s[i]), z ? static_cast<float>(z[i]) : 8.0f);
    }
  }
  __m512i load(int64_t n, int64_t k, __m512i table) const { return int4_weights(q + n * KB + k / 2, table); }
  float out_scale(int64_t) const { return 1.0f; }
};

template <typename Q>
struct Int8Weight {
  const Q* q; const float* s; const uint8_t* z; bool per_row; int64_t K;
  int64_t group(int64_t k_total) const { return k_total; }  // one "group": the whole row
  template <int NB>
  void begin_group(int64_t n0, int64_t, __m512i* t) const {
    for (int j = 0; j < NB; ++j)  // the zero-point as a float vector, kept in the table slot
      t[j] = _mm512_castps_si512(_mm512_set1_ps(z ? static_cast<float>(z[per_row ? n0 + j : 0]) : 0.0f));
  }
  __m512i load(int64_t n, int64_t k, __m512i zv) const { return int8_weights(q + n * K + k, _mm512_castsi512_ps(zv)); }
  float out_scale(int64_t n) const { return s[per_row ? n : 0]; }
};

// y[m0 .. m0+MB, n0 .. n0+NB] of one tile
template <int MB, int NB, typename W>
inline void tile(const W& w, const uint16_t* x, int64_t K, int64_t m0, int64_t n0, c10::BFloat16* y, int64_t N) {
  __m512 acc[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
  const int64_t g = w.group(K);
  for (int64_t k0 = 0, gi = 0; k0 < K; k0 += g, ++gi) {
    __m512i t[NB];
    w.template begin_group<NB>(n0, gi, t);
    for (int64_t k = k0; k < k0 + g; k += KSTEP) {
      __m512i wv[NB];
      for (int j = 0; j < NB; ++j) wv[j] = w.load(n0 + j, k, t[j]);
      for (int i = 0; i < MB; ++i) {
        const __m512i xv = _mm512_loadu_si512(x + (m0 + i) * K + k);
        for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], as_bh(xv), as_bh(wv[j]));
      }
    }
  }
  for (int j = 0; j < NB; ++j) {
    const float sv = w.out_scale(n0 + j);
    for (int i = 0; i < MB; ++i) y[(m0 + i) * N + n0 + j] = c10::BFloat16(_mm512_reduce_add_ps(acc[i][j]) * sv);
  }
}

// rows [m0, m0 + rows) (rows < 8) of output rows n0 .. n0 + NCHUNK
template <typename W>
void tail_tiles(const W& w, const uint16_t* x, int64_t K, int64_t m0, int64_t rows, int64_t n0,
                c10::BFloat16* y, int64_t N) {
  switch (rows) {
    case 1: tile<1, 4>(w, x, K, m0, n0, y, N); break;
    case 2: tile<2, 4>(w, x, K, m0, n0, y, N); break;
    case 3: tile<3, 4>(w, x, K, m0, n0, y, N); break;
    case 4: tile<4, 4>(w, x, K, m0, n0, y, N); break;
    case 5: tile<5, 2>(w, x, K, m0, n0, y, N); tile<5, 2>(w, x, K, m0, n0 + 2, y, N); break;
    case 6: tile<6, 2>(w, x, K, m0, n0, y, N); tile<6, 2>(w, x, K, m0, n0 + 2, y, N); break;
    case 7: tile<7, 2>(w, x, K, m0, n0, y, N); tile<7, 2>(w, x, K, m0, n0 + 2, y, N); break;
    default: break;
  }
}

template <typename W>
void run(const W& w, const uint16_t* x, c10::BFloat16* y, int64_t M, int64_t N, int64_t K) {
  const int64_t xblock = std::max<int64_t>(8, (XBLOCK_BYTES / (2 * K)) / 8 * 8);  // input rows per block
  at::parallel_for(0, N / NCHUNK, 16, [&](int64_t c0, int64_t c1) {
    for (int64_t mb = 0; mb < M; mb += xblock) {
      const int64_t me = std::min(M, mb + xblock);
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t n0 = c * NCHUNK;
        int64_t m = mb;
        for (; m + 8 <= me; m += 8) {
          tile<8, 2>(w, x, K, m, n0, y, N);
          tile<8, 2>(w, x, K, m, n0 + 2, y, N);
        }
        if (m < me) tail_tiles(w, x, K, m, me - m, n0, y, N);
      }
    }
  });
}

}  // namespace bf16dot

// The same products for more rows (issue 23: "fuse dequantize into the GEMM's packing"): per block of 48 output
// rows, the weight is dequantized once per call (the bit-identical dequantize above, INT8 without its scale)
// straight into a panel of bf16 column pairs [K/2][48] (the layout vdpbf16ps wants when its lanes run along N),
// and an 8 x 48 micro-kernel multiplies every 8 input rows with it: 24 accumulators, 3 panel loads and 8
// broadcast input pairs per 24 vdpbf16ps, so the weight costs one dequantize per call, not one per row tile.
// The dequantize works in registers: 16 weight rows x 32 columns decoded into 16 zmm (each row's column pairs),
// transposed 16 x 16 (dwords) and stored as 16 panel rows, so the weight is read once and the panel written once
// (a bf16 copy of 16 whole rows in between measured 1.9 ms per call for a 4096 x 4096 INT4 weight, 2 threads of
// an AMD EPYC Zen 4: the whole cost of the GEMM at one input row). The epilogue scales the float32 sums by the
// column's scale (INT8), adds the bias in float32 and rounds once to bf16, as F.linear's bf16 GEMM does.
namespace bf16gemm {

constexpr int NV = 3;                 // 16-column vectors per panel
constexpr int64_t NP = 16 * NV;       // output rows (columns of y) per panel

// y[m0 .. m0+MB, n0 .. n0+16*NVB] = x rows . panel (float32 sums), times the columns' scales, plus their bias,
// rounded to bf16
template <int MB, int NVB>
inline void micro(const int32_t* x, int64_t ldx, const int32_t* panel, int64_t KP, const float* scale,
                  const float* bias, c10::BFloat16* y, int64_t ldy) {
  __m512 acc[MB][NVB];
  for (int i = 0; i < MB; ++i)
    for (int v = 0; v < NVB; ++v) acc[i][v] = _mm512_setzero_ps();
  for (int64_t kp = 0; kp < KP; ++kp) {
    __m512i b[NVB];
    for (int v = 0; v < NVB; ++v) b[v] = _mm512_loadu_si512(panel + kp * NP + 16 * v);
    for (int i = 0; i < MB; ++i) {
      const __m512i a = _mm512_set1_epi32(x[i * ldx + kp]);
      for (int v = 0; v < NVB; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], bf16dot::as_bh(a), bf16dot::as_bh(b[v]));
    }
  }
  // the epilogue's scale and bias loads stay here: hoisted above the loop they took the registers of its 24
  // accumulators (measured 4.5% slower with a bias at 2048 x 384 -> 384)
  asm volatile("" ::: "memory");
  for (int v = 0; v < NVB; ++v) {
    const __m512 s = scale ? _mm512_loadu_ps(scale + 16 * v) : _mm512_set1_ps(1.0f);
    const __m512 c = bias ? _mm512_loadu_ps(bias + 16 * v) : _mm512_setzero_ps();
    for (int i = 0; i < MB; ++i) {
      __m512 r = scale ? _mm512_mul_ps(acc[i][v], s) : acc[i][v];
      if (bias) r = _mm512_add_ps(r, c);
      const __m256bh o = _mm512_cvtneps_pbh(r);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i * ldy + 16 * v), reinterpret_cast<const __m256i&>(o));
    }
  }
}

template <int NVB>
void panel_rows(const int32_t* x, int64_t M, int64_t KP, const int32_t* panel, const float* scale, const float* bias,
                c10::BFloat16* y, int64_t N) {
  int64_t m = 0;
  for (; m + 8 <= M; m += 8) micro<8, NVB>(x + m * KP, KP, panel, KP, scale, bias, y + m * N, N);
  for (; m < M; ++m) micro<1, NVB>(x + m * KP, KP, panel, KP, scale, bias, y + m * N, N);
}

// INT8 weight rows n .. n+16, columns k .. k+32 minus their zero-points as bf16 (exact integers), one zmm per row
template <typename Q>
struct Int8Rows {
  const Q* q; const uint8_t* z; bool per_row; int64_t K;
  void operator()(int64_t n, int64_t k, __m512i* r) const {
    for (int64_t i = 0; i < 16; ++i) {
      const __m512 zv = _mm512_set1_ps(z ? static_cast<float>(z[per_row ? n + i : 0]) : 0.0f);
      r[i] = bf16dot::int8_weights(q + (n + i) * K + k, zv);
    }
  }
};

// INT4 weight rows n .. n+16, columns k .. k+32 (group % 32 == 0: within one group) through the group's tables
// (built when the rows or the group change; a copy per thread)
struct Int4Rows {
  const uint8_t* q; const float* s; const uint8_t* z; int64_t KB, G, group;
  int64_t n_at = -1, g_at = -1;
  __m512i t[16];
  void operator()(int64_t n, int64_t k, __m512i* r) {
    const int64_t gi = k / group;
    if (n != n_at || gi != g_at) {
      for (int64_t i = 0; i < 16; ++i) {
        const int64_t j = (n + i) * G + gi;
        t[i] = bf16dot::int4_table(bf16_round(s[j]), z ? static_cast<float>(z[j]) : 8.0f);
      }
      n_at = n, g_at = gi;
    }
    for (int64_t i = 0; i < 16; ++i) r[i] = bf16dot::int4_weights(q + (n + i) * KB + k / 2, t[i]);
  }
};

// the same for any other group size: the 16 rows dequantized whole (dequant_int4_rows), then read 32 columns at a time
struct Int4RowsAnyGroup {
  const uint8_t* q; const float* s; const uint8_t* z; int64_t K, KB, G, group;
  int64_t n_at = -1;
  std::vector<c10::BFloat16> rows;
  void operator()(int64_t n, int64_t k, __m512i* r) {
    if (n != n_at) {
      rows.resize(16 * K);
      dequant_int4_rows(rows.data(), q, s, z, K, KB, G, group, n, 0, 16);
      n_at = n;
    }
    for (int64_t i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(rows.data() + i * K + k);
  }
};

// 16 x 16 dwords in registers transposed: r[c] becomes column c of the rows r[0..15]
inline void transpose16(__m512i* r) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int b = 0; b < 4; ++b) {  // u[4b + c] lane L: column 4L + c of rows 4b .. 4b+3
    u[4 * b] = _mm512_unpacklo_epi64(t[4 * b], t[4 * b + 2]);
    u[4 * b + 1] = _mm512_unpackhi_epi64(t[4 * b], t[4 * b + 2]);
    u[4 * b + 2] = _mm512_unpacklo_epi64(t[4 * b + 1], t[4 * b + 3]);
    u[4 * b + 3] = _mm512_unpackhi_epi64(t[4 * b + 1], t[4 * b + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512i v0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44), v1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xEE);
    const __m512i v2 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44);
    const __m512i v3 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xEE);
    r[c] = _mm512_shuffle_i32x4(v0, v2, 0x88);
    r[4 + c] = _mm512_shuffle_i32x4(v0, v2, 0xDD);
    r[8 + c] = _mm512_shuffle_i32x4(v1, v3, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(v1, v3, 0xDD);
  }
}

constexpr int64_t PANEL_GROUP_BYTES = 512 * 1024;  // decoded panels a thread keeps in L2 while rows go through them
constexpr int64_t ROW_BLOCK = 64;                    // input rows taken through a panel group at a time

// decode(n, k, r) puts weight rows n .. n+16, columns k .. k+32 as bf16 into r[0..15] (each thread calls its own
// copy); scales: the per-column output scales or null; bias: float32 [N] or null.
// Each thread takes a range of panels, decodes as many of them as fit in PANEL_GROUP_BYTES, then runs the input
// rows through that group ROW_BLOCK rows at a time: the rows' block stays in L1/L2 while it meets every panel of
// the group, and each output row gets a contiguous stretch of the thread's columns (one panel, then all rows
// through it, wrote 96-byte column strips of the whole output: at 2048 x 384 -> 1536 it measured 8-10% slower
// than F.linear in the encoder, on par alone)
template <typename Decode>
void run(const Decode& decoder, const c10::BFloat16* x, c10::BFloat16* y, int64_t M, int64_t N, int64_t K,
         const float* scales, bool per_row, const float* bias) {
  const int64_t KP = K / 2, P = (N + NP - 1) / NP;
  const int64_t group = std::max<int64_t>(1, PANEL_GROUP_BYTES / (KP * NP * 4));
  const auto* x32 = reinterpret_cast<const int32_t*>(x);
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    // kept per thread between calls: fresh panels (393 KiB each at K = 4096) page-fault on every call
    static thread_local std::vector<int32_t> panels;
    const int64_t slots = std::min(group, p1 - p0);
    if (static_cast<int64_t>(panels.size()) < slots * KP * NP) panels.resize(slots * KP * NP);
    Decode decode = decoder;
    float colscale[NP], colbias[NP];
    for (int64_t g0 = p0; g0 < p1; g0 += group) {
      const int64_t g1 = std::min(p1, g0 + group);
      for (int64_t p = g0; p < g1; ++p) {  // 16 weight rows at a time dequantized and transposed into the panel
        int32_t* panel = panels.data() + (p - g0) * KP * NP;
        const int64_t n0 = p * NP, cols = std::min(NP, N - n0);
        for (int64_t v = 0; v < cols / 16; ++v)
          for (int64_t k = 0; k < K; k += bf16dot::KSTEP) {
            __m512i r[16];
            decode(n0 + 16 * v, k, r);
            transpose16(r);
            for (int c = 0; c < 16; ++c) _mm512_storeu_si512(panel + (k / 2 + c) * NP + 16 * v, r[c]);
          }
      }
      for (int64_t m0 = 0; m0 < M; m0 += ROW_BLOCK) {
        const int64_t rows = std::min(ROW_BLOCK, M - m0);
        for (int64_t p = g0; p < g1; ++p) {
          const int32_t* panel = panels.data() + (p - g0) * KP * NP;
          const int64_t n0 = p * NP, cols = std::min(NP, N - n0);
          const float* sc = nullptr;
          if (scales) {
            for (int64_t j = 0; j < cols; ++j) colscale[j] = scales[per_row ? n0 + j : 0];
            sc = colscale;
          }
          const float* bc = nullptr;
          if (bias) {
            std::copy(bias + n0, bias + n0 + cols, colbias);
            bc = colbias;
          }
          const int32_t* xb = x32 + m0 * KP;
          c10::BFloat16* yb = y + m0 * N + n0;
          if (cols == 48) panel_rows<3>(xb, rows, KP, panel, sc, bc, yb, N);
          else if (cols == 32) panel_rows<2>(xb, rows, KP, panel, sc, bc, yb, N);
          else panel_rows<1>(xb, rows, KP, panel, sc, bc, yb, N);
        }
      }
    }
  });
}

}  // namespace bf16gemm
#else
constexpr bool BF16_DOT = false;
#endif

void check_bf16_dot(const torch::Tensor& x, int64_t N, int64_t K) {
  TORCH_CHECK(BF16_DOT, "this build has no AVX512-BF16 kernels (monoquant.fused.bf16_dot() is False)");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kBFloat16 && x.dim() == 2 && x.is_contiguous(),
              "bf16 linear: x must be a contiguous bf16 CPU [M, K] tensor");
  TORCH_CHECK(x.size(1) == K && K % 32 == 0 && N % 4 == 0, "bf16 linear: K must be a multiple of 32 and N of 4");
}

torch::Tensor int4_linear_bf16(const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& scale,
                               const c10::optional<torch::Tensor>& zero_point, int64_t group_size) {
  const int64_t N = qweight.size(0), K = x.size(1);
  check_bf16_dot(x, N, K);
  TORCH_CHECK(qweight.scalar_type() == torch::kUInt8 && qweight.is_contiguous() && qweight.size(1) == K / 2,
              "int4_linear_bf16: qweight must be contiguous uint8 [N, K/2]");
  TORCH_CHECK(group_size > 0 && group_size % 32 == 0 && K % group_size == 0,
              "int4_linear_bf16: the group size must be a multiple of 32 that divides K");
  const int64_t G = K / group_size;
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.is_contiguous() && scale.numel() == N * G,
              "int4_linear_bf16: scale must be contiguous float32 [N, K/group_size]");
  const uint8_t* zp = nullptr;
  if (zero_point.has_value()) {
    TORCH_CHECK(zero_point->scalar_type() == torch::kUInt8 && zero_point->is_contiguous() &&
                zero_point->numel() == N * G, "int4_linear_bf16: zero_point must be uint8 [N, K/group_size]");
    zp = zero_point->data_ptr<uint8_t>();
  }
  auto y = torch::empty({x.size(0), N}, x.options());
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  const bf16dot::Int4Weight w{qweight.data_ptr<uint8_t>(), scale.data_ptr<float>(), zp, qweight.size(1), G,
                              group_size};
  bf16dot::run(w, reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>()), y.data_ptr<c10::BFloat16>(),
               x.size(0), N, K);
#endif
  return y;
}

torch::Tensor int8_linear_bf16(const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& scale,
                               const c10::optional<torch::Tensor>& zero_point) {
  const int64_t N = qweight.size(0), K = x.size(1);
  check_bf16_dot(x, N, K);
  TORCH_CHECK(qweight.is_contiguous() && qweight.dim() == 2 && qweight.size(1) == K,
              "int8_linear_bf16: qweight must be contiguous [N, K]");
  const bool per_row = scale.dim() > 0;
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.is_contiguous() && scale.numel() == (per_row ? N : 1),
              "int8_linear_bf16: scale must be float32 [N] or a scalar");
  auto y = torch::empty({x.size(0), N}, x.options());
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>());
  auto* yp = y.data_ptr<c10::BFloat16>();
  const float* s = scale.data_ptr<float>();
  if (zero_point.has_value()) {
    TORCH_CHECK(qweight.scalar_type() == torch::kUInt8 && zero_point->scalar_type() == torch::kUInt8 &&
                zero_point->numel() == scale.numel(), "int8_linear_bf16: affine codes and zero_point must be uint8");
    const bf16dot::Int8Weight<uint8_t> w{qweight.data_ptr<uint8_t>(), s, zero_point->data_ptr<uint8_t>(), per_row, K};
    bf16dot::run(w, xp, yp, x.size(0), N, K);
  } else {
    TORCH_CHECK(qweight.scalar_type() == torch::kInt8, "int8_linear_bf16: symmetric codes must be int8");
    const bf16dot::Int8Weight<int8_t> w{qweight.data_ptr<int8_t>(), s, nullptr, per_row, K};
    bf16dot::run(w, xp, yp, x.size(0), N, K);
  }
#endif
  return y;
}


// the panel GEMM's bias: float32 or bf16 [N] (widened exactly), or none
torch::Tensor gemm_bias(const c10::optional<torch::Tensor>& bias, int64_t N) {
  if (!bias.has_value()) return torch::Tensor();
  TORCH_CHECK(bias->device().is_cpu() && bias->dim() == 1 && bias->numel() == N &&
              (bias->scalar_type() == torch::kFloat32 || bias->scalar_type() == torch::kBFloat16),
              "bf16 GEMM: bias must be a float32 or bf16 [N] CPU tensor");
  return bias->to(torch::kFloat32).contiguous();
}

// the panel GEMM's entry points: same buffers, checks as int4_linear_bf16 / int8_linear_bf16, N % 16 == 0, plus the
// bias added to the float32 result before its one rounding to bf16
torch::Tensor int4_gemm_bf16(const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& scale,
                             const c10::optional<torch::Tensor>& zero_point, int64_t group_size,
                             const c10::optional<torch::Tensor>& bias) {
  const int64_t N = qweight.size(0), K = x.size(1);
  check_bf16_dot(x, N, K);
  TORCH_CHECK(N % 16 == 0, "int4_gemm_bf16: N must be a multiple of 16");
  TORCH_CHECK(qweight.scalar_type() == torch::kUInt8 && qweight.is_contiguous() && qweight.size(1) == K / 2,
              "int4_gemm_bf16: qweight must be contiguous uint8 [N, K/2]");
  TORCH_CHECK(group_size > 0 && K % group_size == 0, "int4_gemm_bf16: the group size must divide K");
  const int64_t G = K / group_size;
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.is_contiguous() && scale.numel() == N * G,
              "int4_gemm_bf16: scale must be contiguous float32 [N, K/group_size]");
  const uint8_t* zp = nullptr;
  if (zero_point.has_value()) {
    TORCH_CHECK(zero_point->scalar_type() == torch::kUInt8 && zero_point->is_contiguous() &&
                zero_point->numel() == N * G, "int4_gemm_bf16: zero_point must be uint8 [N, K/group_size]");
    zp = zero_point->data_ptr<uint8_t>();
  }
  const auto b = gemm_bias(bias, N);
  auto y = torch::empty({x.size(0), N}, x.options());
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  const uint8_t* q = qweight.data_ptr<uint8_t>();
  const float* s = scale.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const int64_t KB = qweight.size(1);
  const auto* xp = x.data_ptr<c10::BFloat16>();
  auto* yp = y.data_ptr<c10::BFloat16>();
  if (group_size % bf16dot::KSTEP == 0)
    bf16gemm::run(bf16gemm::Int4Rows{q, s, zp, KB, G, group_size}, xp, yp, x.size(0), N, K, nullptr, false, bp);
  else
    bf16gemm::run(bf16gemm::Int4RowsAnyGroup{q, s, zp, K, KB, G, group_size}, xp, yp, x.size(0), N, K, nullptr,
                  false, bp);
#endif
  return y;
}

torch::Tensor int8_gemm_bf16(const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& scale,
                             const c10::optional<torch::Tensor>& zero_point, const c10::optional<torch::Tensor>& bias) {
  const int64_t N = qweight.size(0), K = x.size(1);
  check_bf16_dot(x, N, K);
  TORCH_CHECK(N % 16 == 0, "int8_gemm_bf16: N must be a multiple of 16");
  TORCH_CHECK(qweight.is_contiguous() && qweight.dim() == 2 && qweight.size(1) == K,
              "int8_gemm_bf16: qweight must be contiguous [N, K]");
  const bool per_row = scale.dim() > 0;
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.is_contiguous() && scale.numel() == (per_row ? N : 1),
              "int8_gemm_bf16: scale must be float32 [N] or a scalar");
  const auto b = gemm_bias(bias, N);
  auto y = torch::empty({x.size(0), N}, x.options());
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  const float* s = scale.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const auto* xp = x.data_ptr<c10::BFloat16>();
  auto* yp = y.data_ptr<c10::BFloat16>();
  if (zero_point.has_value()) {
    TORCH_CHECK(qweight.scalar_type() == torch::kUInt8 && zero_point->scalar_type() == torch::kUInt8 &&
                zero_point->numel() == scale.numel(), "int8_gemm_bf16: affine codes and zero_point must be uint8");
    bf16gemm::run(bf16gemm::Int8Rows<uint8_t>{qweight.data_ptr<uint8_t>(), zero_point->data_ptr<uint8_t>(), per_row, K},
                  xp, yp, x.size(0), N, K, s, per_row, bp);
  } else {
    TORCH_CHECK(qweight.scalar_type() == torch::kInt8, "int8_gemm_bf16: symmetric codes must be int8");
    bf16gemm::run(bf16gemm::Int8Rows<int8_t>{qweight.data_ptr<int8_t>(), nullptr, per_row, K}, xp, yp, x.size(0), N,
                  K, s, per_row, bp);
  }
#endif
  return y;
}

// ---------------------------------------------------------------------------------------------------------
// Direct 2-d convolution, float32, stride 1, no dilation, no groups (``dequant_conv_direct`` in
// monoquant/conv_kernels.py): for the small convolutions of small batches, where F.conv2d's im2col + GEMM (or
// oneDNN's) spends more on its passes and dispatch than on the multiply-adds (the digits CNN's 32 -> 64 conv on
// one 8x8 image: 1.2M multiply-adds in 35-45 us). Each input image is copied once into a zero-padded buffer
// [C, Hp, Wp] (plus a tail); output (oh, ow) is then position q = oh * Wp + ow of the padded grid and
//   y[co, q] = bias[co] + sum_{ci, r, s} w[co, ci, r, s] * xp[ci, q + r * Wp + s],
// so for a run of consecutive q the input values are consecutive in memory: one vector load serves LANES
// outputs. The last kw - 1 positions of each padded row (ow >= OW) are computed and dropped; reads past a
// channel's plane only reach dropped positions. A tile of TCO output channels x TQV vectors of positions stays in
// registers (each input vector is used TCO times, each broadcast weight TQV times); its shape follows the vectors
// left in the row of positions, so that a small image (the 4x4 one: 2 vectors) still fills the registers. The
// weight is the layer's kept float kernel as it is ([CO, C, kh, kw]: a tile broadcasts from TCO rows, each read
// front to back), so no second copy of it is kept. Tasks are (image, block of 16 output channels). Each output's
// sum starts from the bias and adds the products in (ci, r, s) order, one rounding per multiply-add: the float
// conv's value up to summation order.
//   direct_conv2d(x [N, C, H, W], weight [CO, C, kh, kw], bias [CO] or None, pad_h, pad_w) -> [N, CO, OH, OW]
constexpr int64_t CONV_BLOCK = 16;  // output channels per task

#if defined(__AVX512F__) || defined(__AVX2__)
template <int TCO, int TQV>
inline void conv_tile(const float* img, int64_t plane, int64_t Wp, int64_t C, int64_t kh, int64_t kw,
                      const float* const* w, const float* b, float* tmp, int64_t tstride, int64_t q0) {
  vec acc[TCO][TQV];
  for (int c = 0; c < TCO; ++c)
    for (int v = 0; v < TQV; ++v) acc[c][v] = vset(b[c]);
  const float* rows[TCO];
  for (int c = 0; c < TCO; ++c) rows[c] = w[c];
  for (int64_t ci = 0; ci < C; ++ci) {
    const float* chan = img + ci * plane + q0;
    for (int64_t r = 0; r < kh; ++r)
      for (int64_t s = 0; s < kw; ++s) {
        const float* src = chan + r * Wp + s;
        vec xv[TQV];
        for (int v = 0; v < TQV; ++v) xv[v] = vload(src + v * LANES);
        for (int c = 0; c < TCO; ++c) {
          const vec wv = vset(*rows[c]++);
          for (int v = 0; v < TQV; ++v) acc[c][v] = vfma(wv, xv[v], acc[c][v]);
        }
      }
  }
  for (int c = 0; c < TCO; ++c)
    for (int v = 0; v < TQV; ++v) vstore(tmp + c * tstride + q0 + v * LANES, acc[c][v]);
}

// the tiles of TQV vectors from q0 for the block's first `co_n` channels (sub-blocks of TCO)
template <int TCO, int TQV>
inline void conv_tiles(const float* img, int64_t plane, int64_t Wp, int64_t C, int64_t kh, int64_t kw,
                       const float* const* w, const float* b, float* tmp, int64_t tstride, int64_t q0, int co_n) {
  for (int c0 = 0; c0 < co_n; c0 += TCO)
    conv_tile<TCO, TQV>(img, plane, Wp, C, kh, kw, w + c0, b + c0, tmp + c0 * tstride, tstride, q0);
}
#endif

torch::Tensor direct_conv2d(const torch::Tensor& x, const torch::Tensor& weight,
                            const c10::optional<torch::Tensor>& bias, int64_t pad_h, int64_t pad_w) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 4 && x.is_contiguous(),
              "direct_conv2d: x must be contiguous float32 [N, C, H, W]");
  TORCH_CHECK(weight.scalar_type() == torch::kFloat32 && weight.dim() == 4 && weight.is_contiguous() &&
              weight.size(1) == x.size(1), "direct_conv2d: weight must be contiguous float32 [CO, C, kh, kw]");
  TORCH_CHECK(pad_h >= 0 && pad_w >= 0, "direct_conv2d: padding must not be negative");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t CO = weight.size(0), kh = weight.size(2), kw = weight.size(3), CKK = C * kh * kw;
  const int64_t blocks = (CO + CONV_BLOCK - 1) / CONV_BLOCK;
  const int64_t Hp = H + 2 * pad_h, Wp = W + 2 * pad_w, OH = Hp - kh + 1, OW = Wp - kw + 1;
  TORCH_CHECK(OH > 0 && OW > 0, "direct_conv2d: the kernel is larger than the padded input");
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == torch::kFloat32 && bias->is_contiguous() && bias->numel() == CO,
                "direct_conv2d: bias must be contiguous float32 [CO]");
    bp = bias->data_ptr<float>();
  }
  auto y = torch::empty({N, CO, OH, OW}, x.options());
  if (N == 0 || CO == 0) return y;
  const int64_t plane = Hp * Wp, Q = OH * Wp;
  const int64_t step = LANES > 0 ? LANES : 1;
  const int64_t Qpad = (Q + step - 1) / step * step;
  const int64_t image = C * plane + (Qpad - Q) + kw + step;  // the tail: reads of the last vectors stay inside
  auto padded = torch::zeros({N, image}, x.options());
  const float* xs = x.data_ptr<float>();
  float* xp = padded.data_ptr<float>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t ci = 0; ci < C; ++ci)
      for (int64_t h = 0; h < H; ++h)
        std::memcpy(xp + n * image + ci * plane + (h + pad_h) * Wp + pad_w, xs + ((n * C + ci) * H + h) * W,
                    W * sizeof(float));
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N * blocks, task_grain(1, CONV_BLOCK * CKK * Q), [&](int64_t t0, int64_t t1) {
    std::vector<float> tmp(CONV_BLOCK * Qpad);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / blocks, blk = t % blocks, co0 = blk * CONV_BLOCK;
      const int co_n = static_cast<int>(std::min<int64_t>(CONV_BLOCK, CO - co0));
      const float* img = xp + n * image;
      const float* w[CONV_BLOCK];  // a tile past the last channel repeats it; never stored
      float b[CONV_BLOCK] = {};
      for (int c = 0; c < CONV_BLOCK; ++c) w[c] = wp + (co0 + std::min(c, co_n - 1)) * CKK;
      for (int c = 0; c < co_n; ++c) b[c] = bp ? bp[co0 + c] : 0.f;
#if defined(__AVX512F__)
      for (int64_t q0 = 0, left = Qpad / LANES; left > 0;) {  // 16-24 accumulators of 32 registers
        const int tqv = static_cast<int>(std::min<int64_t>(left, 4));
        if (tqv == 4) conv_tiles<4, 4>(img, plane, Wp, C, kh, kw, w, b, tmp.data(), Qpad, q0, co_n);
        else if (tqv == 3) conv_tiles<8, 3>(img, plane, Wp, C, kh, kw, w, b, tmp.data(), Qpad, q0, co_n);
        else if (tqv == 2) conv_tiles<8, 2>(img, plane, Wp, C, kh, kw, w, b, tmp.data(), Qpad, q0, co_n);
        else conv_tiles<16, 1>(img, plane, Wp, C, kh, kw, w, b, tmp.data(), Qpad, q0, co_n);
        q0 += tqv * LANES;
        left -= tqv;
      }
#elif defined(__AVX2__)
      for (int64_t q0 = 0, left = Qpad / LANES; left > 0;) {  // 8-12 accumulators of 16 registers
        const int tqv = static_cast<int>(std::min<int64_t>(left, 3));
        if (tqv == 3) conv_tiles<4, 3>(img, plane, Wp, C, kh, kw, w, b, tmp.data(), Qpad, q0, co_n);
        else if (tqv == 2) conv_tiles<4, 2>(img, plane, Wp, C, kh, kw, w, b, tmp.data(), Qpad, q0, co_n);
        else conv_tiles<8, 1>(img, plane, Wp, C, kh, kw, w, b, tmp.data(), Qpad, q0, co_n);
        q0 += tqv * LANES;
        left -= tqv;
      }
#else
      for (int c = 0; c < co_n; ++c)
        for (int64_t q = 0; q < Q; ++q) {
          float acc = b[c];
          int64_t widx = 0;
          for (int64_t ci = 0; ci < C; ++ci)
            for (int64_t r = 0; r < kh; ++r)
              for (int64_t s = 0; s < kw; ++s, ++widx)
                acc += w[c][widx] * img[ci * plane + q + r * Wp + s];
          tmp[c * Qpad + q] = acc;
        }
#endif
      for (int c = 0; c < co_n; ++c)
        for (int64_t oh = 0; oh < OH; ++oh)
          std::memcpy(yp + ((n * CO + co0 + c) * OH + oh) * OW, tmp.data() + c * Qpad + oh * Wp, OW * sizeof(float));
    }
  });
  return y;
}

bool bf16_dot() { return BF16_DOT; }

std::string simd() { return SIMD; }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int4_linear", &int4_linear, "INT4 (group-wise) dequantize + matmul (+ bias), float32 accumulation",
        py::arg("x"), py::arg("qweight"), py::arg("scale"), py::arg("zero_point"), py::arg("group_size"),
        py::arg("bias") = py::none());
  m.def("int8_linear", &int8_linear, "INT8 (per-row or per-tensor) dequantize + matmul (+ bias), float32 accumulation",
        py::arg("x"), py::arg("qweight"), py::arg("scale"), py::arg("zero_point"), py::arg("bias") = py::none());
  m.def("dequantize_int4", &dequantize_int4, "INT4 codes -> float32/bf16 rows of the weight, one pass");
  m.def("dequantize_int8", &dequantize_int8, "INT8 codes -> float32/bf16 rows of the weight, one pass");
  m.def("w8a8_pack", &w8a8_pack, "INT8 weight codes -> the panel layout w8a8_gemm reads");
  m.def("w8a8_gemm", &w8a8_gemm, "exact INT8 x INT8 -> INT32 GEMM (vpmaddwd), for CPUs without VNNI/AMX");
  m.def("quantize_rows", &quantize_rows, "float32 rows -> int8 codes (round half even, clamp, shift), one pass");
  m.def("dynamic_quantize_rows", &dynamic_quantize_rows, "per-row min/max qparams and int8 codes, one pass per row");
  m.def("dynamic_fake_quantize_rows", &dynamic_fake_quantize_rows,
        "per-row min/max qparams, codes, and the codes dequantized again: a fake-quantized conv input, one call");
  m.def("rescale_rows", &rescale_rows,
        "int32 sums -> float32 or bf16 (zero-point term, row scale, column scale, bias), one pass");
  m.def("w8a8_vnni", &has_vnni, "whether this build has the AVX512-VNNI W8A8 kernel");
  m.def("w8a8_vnni_pack", &w8a8_vnni_pack, "INT8 weight codes -> the 64-row, 4-column panels w8a8_vnni_linear reads");
  m.def("w8a8_vnni_linear", &w8a8_vnni_linear,
        "INT8-activation linear layer: quantize rows, u8 x s8 vpdpbusd GEMM, zero-point/scales/bias epilogue");
  m.def("mse_clip_errors", &mse_clip_errors, "squared error of every clipping candidate of every slot, float64");
  m.def("quantize_weight_rows", &quantize_weight_rows, "float32 weight -> integer codes with float64 qparams");
  m.def("gptq_columns", &gptq_columns, "GPTQ's per-column quantize and error update inside one sub-block");
  m.def("signal_noise_sums", &signal_noise_sums, "sum(ref^2) and sum((ref - approx)^2) in float64, one pass");
  m.def("int4_linear_bf16", &int4_linear_bf16, "bf16 x times INT4 weights with vdpbf16ps (AVX512-BF16), bf16 output");
  m.def("int8_linear_bf16", &int8_linear_bf16, "bf16 x times INT8 weights with vdpbf16ps (AVX512-BF16), bf16 output");
  m.def("int4_gemm_bf16", &int4_gemm_bf16, "bf16 x times INT4 weights (+ bias): dequantized once into bf16 panels, vdpbf16ps");
  m.def("int8_gemm_bf16", &int8_gemm_bf16, "bf16 x times INT8 weights (+ bias): dequantized once into bf16 panels, vdpbf16ps");
  m.def("bf16_dot", &bf16_dot, "whether this build has the AVX512-BF16 kernels (int4/int8_linear_bf16)");
  m.def("direct_conv2d", &direct_conv2d, "direct float32 2-d convolution (stride 1, no dilation or groups), bias first",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("pad_h"), py::arg("pad_w"));
  m.def("simd", &simd, "which SIMD path this build compiled: avx512, avx2 or scalar");
}
