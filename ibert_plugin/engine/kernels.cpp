// Fused integer kernels of the I-BERT / TernaryBERT inference engine.
//
// Every kernel implements a formula of docs/integer_spec.md on integers (int32 / int64, int128 only where a product can
// exceed 63 bits) and is bit-exact against the pure-PyTorch spec reference (tests/test_engine_kernels.py).
// Activations that feed the next GEMM are written as u8 with zero point 128 (s8 value + 128).
// Parallelism: OpenMP over rows (attention: at::parallel_for over batch x heads), in torch's OpenMP pool (the
// extension resolves libgomp.so.1 to the copy torch loaded), sized by at::get_num_threads().
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

using i64 = int64_t;
using i32 = int32_t;
using u8 = uint8_t;

inline int nthreads() { return std::max(1, at::get_num_threads()); }
// Below this many elements a kernel runs on one thread: at batch 1 an OpenMP barrier costs more than the work,
// and on a loaded host a descheduled (or spinning) worker turns each barrier into a scheduler quantum. Measured with
// benchmarks/engine_profile.py at load ~9 on 2 cores: with 2^15, and at batch 32 with 2^19, resid_ln / softmax /
// requant ran 5-20x slower per element than on one thread; these kernels cost ~1 ns per element, so below 2^21
// elements (~2 ms of work) the second thread gains little even on a quiet host.
constexpr int64_t kParallelMin = int64_t(1) << 21;

// floor((z * m + 2^(e-1)) / 2^e), exact; int128 only when the product may exceed 63 bits.
inline i64 requant_wide(i64 z, i64 m, int e) {
  const i64 az = z < 0 ? -z : z;
  if (e <= 62 && az < (i64(1) << 41)) return (z * m + (i64(1) << (e - 1))) >> e;  // |m| <= 2^21: product < 2^62
  if (e > 120) return 0;  // |z * m| < 2^85 < 2^(e-1): (z*m + 2^(e-1)) / 2^e is in (0, 1)
  __int128 p = (__int128)z * (__int128)m + ((__int128)1 << (e - 1));
  return (i64)(p >> e);
}

inline i64 clampi(i64 v, i64 lo, i64 hi) { return v < lo ? lo : (v > hi ? hi : v); }

// Shift of the plain int64 requants (QKV, context, residual and embedding sums), whose operands have |z| < 2^40 and
// |m| <= 2^20: |z m| < 2^61, so every shift e >= 62 gives 0, as e = 62 does (no shift by 64 or more).
constexpr i64 kMaxShift = 62;
inline i64 cap_shift(i64 e) { return e < kMaxShift ? e : kMaxShift; }

// ---------------------------------------------------------------------------------------------------------------
// Exact-double requantization. AVX2 has no 64-bit multiply and no 64-bit arithmetic shift, so gcc emulates the int64
// formulas element by element. v = floor((t + 2^(e-1)) / 2^e), t = z m, is computed instead as
// floor(t 2^-e + 0.5) in doubles, which gives the same integer whenever |t| < 2^52: t is then exact; for e <= 52,
// t 2^-e + 0.5 = (t + 2^(e-1)) 2^-e is an integer below 2^53 times a power of two, exact, and so is its floor; for
// e > 52, |t 2^-e| < 1/2, so both sides are 0 (the double sum lies in [2^-53, 1 - 2^-53]). Each kernel checks
// |z| |m| < 2^52 per call from its constants and its inputs' bounds, and keeps the int64 formulas otherwise.
// AVX-512 builds keep the int64 formulas (native 64-bit lanes). g_double_requant = false forces the int64 formulas
// (tests compare the two).
constexpr double kExactBound = 4503599627370496.0;  // 2^52
constexpr double kUnclamped = 1e300;  // requant_d's bound where a caller clamps the sum itself
bool g_double_requant = true;
std::atomic<int64_t> g_double_calls{0};  // kernel calls that took the exact-double form (tests read it)
inline bool double_requant_enabled() {
#if defined(__AVX2__) && !defined(__AVX512F__)
  return g_double_requant;
#else
  return false;
#endif
}
void set_double_requant(bool on) { g_double_requant = on; }
bool double_requant_active() { return double_requant_enabled(); }
int64_t double_requant_calls() { return g_double_calls.load(); }
// 2^k for |k| <= 1022 from its IEEE bits (std::ldexp is a library call: per-column constants are built per call)
inline double pow2(i64 k) {
  const uint64_t bits = uint64_t(k + 1023) << 52;
  double d;
  std::memcpy(&d, &bits, sizeof d);
  return d;
}
// 2^-e for e >= 1 (0 beyond 2^-1022: the floor(t 2^-e + 0.5) is then 0, as for every e > 52)
inline double pow2_neg(i64 e) { return e > 1022 ? 0.0 : pow2(-e); }

// Per-column constants of floor(z m 2^-e + 0.5) in doubles: m and 2^-e; `ok` when every column is exact for
// |z| <= zmax (whether the form runs is decided per call: double_requant_enabled()).
struct DoubleRequant {
  std::vector<double> m, inv;
  bool ok = false;
  DoubleRequant() = default;
  DoubleRequant(const i64* mm, const i64* e, i64 C, double zmax) : m(C), inv(C) {
    ok = true;
    for (i64 c = 0; c < C && ok; ++c) {
      m[c] = double(mm[c]);
      inv[c] = pow2_neg(e[c]);
      ok = e[c] >= 1 && std::fabs(m[c]) * zmax < kExactBound;
    }
  }
};

// floor(x m inv + 0.5) clamped to [-qm, qm] (one value of the exact-double form)
inline double requant_d(double x, double m, double inv, double qm) {
  const double v = std::floor(x * m * inv + 0.5);
  return v < -qm ? -qm : (v > qm ? qm : v);
}

#if defined(__AVX2__)
// Four int32 in [-127, 127] (after clamping) -> u8 + 128, eight at a time from two vectors of four.
inline void store_u8x8(u8* o, __m128i lo, __m128i hi) {
  const __m128i w = _mm_add_epi16(_mm_packs_epi32(lo, hi), _mm_set1_epi16(128));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(o), _mm_packus_epi16(w, w));
}
// floor(x m inv + 0.5) clamped to [-qm, qm], as int32
inline __m128i requant4(__m256d x, const double* m, const double* inv, __m256d qm) {
  __m256d v = _mm256_floor_pd(_mm256_add_pd(_mm256_mul_pd(_mm256_mul_pd(x, _mm256_loadu_pd(m)), _mm256_loadu_pd(inv)),
                                            _mm256_set1_pd(0.5)));
  v = _mm256_min_pd(_mm256_max_pd(v, _mm256_sub_pd(_mm256_setzero_pd(), qm)), qm);
  return _mm256_cvttpd_epi32(v);
}
#endif

inline i64 floordiv(i64 a, i64 b) {  // b > 0
  i64 q = a / b;
  if ((a % b != 0) && (a < 0)) --q;
  return q;
}

// floor(sqrt(n)) by I-BERT Algorithm 4 (integer Newton), the algorithm of quant/primitives.isqrt: start at
// 2^ceil(bits(n)/2) >= sqrt(n), iterate x <- floor((x + floor(n/x)) / 2) until the iterate stops decreasing.
inline i64 isqrt_newton(i64 n) {
  if (n <= 0) return 0;
  const int bits = 64 - __builtin_clzll((unsigned long long)n);
  i64 x = i64(1) << ((bits + 1) / 2);
  for (;;) {
    const i64 y = (x + n / x) >> 1;
    if (y >= x) return x;
    x = y;
  }
}

inline int bit_width(i64 qmax) { return 64 - __builtin_clzll((unsigned long long)qmax) + 1; }

void check(bool ok, const char* msg) { TORCH_CHECK(ok, msg); }

// Every tensor a kernel indexes is checked before its data pointer is taken: a wrong call raises (RuntimeError in
// Python), it never reads or writes outside a buffer. `n` is the element count it must have (-1: any).
void check_tensor(const at::Tensor& t, at::ScalarType dt, i64 n, const char* what) {
  TORCH_CHECK(t.defined() && t.scalar_type() == dt && t.is_contiguous() && (n < 0 || t.numel() == n), what,
              ": expected a contiguous ", c10::toString(dt), " tensor", n >= 0 ? " of " + std::to_string(n) +
              " elements" : std::string(), ", got ", t.defined() ? c10::toString(t.scalar_type()) : "undefined",
              t.defined() ? " with " + std::to_string(t.numel()) + " elements" : std::string(),
              t.defined() && !t.is_contiguous() ? " (not contiguous)" : "");
}

// An optional output: empty (not wanted) or a tensor check_tensor accepts. Returns whether it is wanted.
bool check_optional(const at::Tensor& t, at::ScalarType dt, i64 n, const char* what) {
  if (!t.defined() || t.numel() == 0) return false;
  check_tensor(t, dt, n, what);
  return true;
}

// Per-column requant shifts: >= 1 (the rounding term is 2^(e-1)).
void check_shifts(const at::Tensor& e, const char* what) {
  const i64* p = e.data_ptr<i64>();
  for (i64 j = 0; j < e.numel(); ++j) TORCH_CHECK(p[j] >= 1, what, ": requant shifts must be >= 1, got ", p[j]);
}

// The IntLayerNorm arguments shared by resid_ln and embed_ln: its constants, the optional next requant (checked when
// out_u8 is wanted) and the int64 outputs (out_q, and the pre-LN sum `pre`).
void check_ln_args(const std::string& k, i64 M, i64 C, const at::Tensor& ln_bint, int64_t shift,
                   const at::Tensor& next_m, const at::Tensor& next_e, int64_t next_qmax, const at::Tensor& out_u8,
                   const at::Tensor& out_q, const at::Tensor& out_pre, const char* pre) {
  check_tensor(ln_bint, at::kLong, C, (k + " ln_bint").c_str());
  TORCH_CHECK(shift >= 0 && shift <= 62, k, ": shift in [0, 62], got ", shift);
  if (check_optional(out_u8, at::kByte, M * C, (k + " out_u8").c_str())) {
    check_tensor(next_m, at::kLong, C, (k + " next_m").c_str());
    check_tensor(next_e, at::kLong, C, (k + " next_e").c_str());
    check_shifts(next_e, (k + " next_e").c_str());
    TORCH_CHECK(next_qmax >= 1 && next_qmax <= 127, k, ": next_qmax in [1, 127], got ", next_qmax);
  }
  check_optional(out_q, at::kLong, M * C, (k + " out_q").c_str());
  check_optional(out_pre, at::kLong, M * C, (k + " " + pre).c_str());
}

// Values of an index tensor must lie in [0, n).
void check_index(const at::Tensor& t, i64 n, const char* what) {
  const i64* p = t.data_ptr<i64>();
  for (i64 j = 0; j < t.numel(); ++j)
    TORCH_CHECK(p[j] >= 0 && p[j] < n, what, ": index ", p[j], " outside [0, ", n, ")");
}

// ---------------------------------------------------------------------------------------------------------------
// Integer pair dot products for the attention GEMMs. An int32 "pair" holds two int16 values (low half first); madd
// adds lo(a) lo(b) + hi(a) hi(b) to each int32 lane, which is vpmaddwd (vpdpwssd with VNNI). Operands here are s8
// values or probabilities in [0, 255], so no pair sum comes near the one vpmaddwd overflow (both pairs -2^15 x -2^15).
#if defined(__AVX512BW__)
#include <immintrin.h>
constexpr i64 kLanes = 16;
using vec = __m512i;
inline vec vzero() { return _mm512_setzero_si512(); }
inline vec vbcast(i32 a) { return _mm512_set1_epi32(a); }
inline vec vload(const i32* p) { return _mm512_loadu_si512(p); }
inline void vstore(i32* p, vec v) { _mm512_storeu_si512(p, v); }
#if defined(__AVX512VNNI__)
inline vec vmadd(vec c, vec a, vec b) { return _mm512_dpwssd_epi32(c, a, b); }
#else
inline vec vmadd(vec c, vec a, vec b) { return _mm512_add_epi32(c, _mm512_madd_epi16(a, b)); }
#endif
#elif defined(__AVX2__)
#include <immintrin.h>
constexpr i64 kLanes = 8;
using vec = __m256i;
inline vec vzero() { return _mm256_setzero_si256(); }
inline vec vbcast(i32 a) { return _mm256_set1_epi32(a); }
inline vec vload(const i32* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline void vstore(i32* p, vec v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
inline vec vmadd(vec c, vec a, vec b) { return _mm256_add_epi32(c, _mm256_madd_epi16(a, b)); }
#else
constexpr i64 kLanes = 1;
using vec = i32;
inline vec vzero() { return 0; }
inline vec vbcast(i32 a) { return a; }
inline vec vload(const i32* p) { return *p; }
inline void vstore(i32* p, vec v) { *p = v; }
inline vec vmadd(vec c, vec a, vec b) {
  return c + i32(int16_t(a & 0xffff)) * i32(int16_t(b & 0xffff)) + i32(int16_t(a >> 16)) * i32(int16_t(b >> 16));
}
#endif
constexpr i64 kTile = 2 * kLanes;  // output lanes of one madd tile

inline i64 round_up(i64 n, i64 k) { return (n + k - 1) / k * k; }
inline i32 pack16(i64 lo, i64 hi) { return i32(uint32_t(uint16_t(lo)) | (uint32_t(uint16_t(hi)) << 16)); }

// o_r[j] = sum_p madd(a_r[p], b[p ldb + j]) for the four rows r and j < n (n a multiple of kTile): four rows times two
// vectors, eight independent accumulators (a madd has 4-5 cycles of latency; each load of b feeds four of them).
inline void madd_rows4(const i32* a0, const i32* a1, const i32* a2, const i32* a3, i64 np, const i32* b, i64 ldb,
                       i64 n, i32* o0, i32* o1, i32* o2, i32* o3) {
  for (i64 j = 0; j < n; j += kTile) {
    vec c00 = vzero(), c01 = vzero(), c10 = vzero(), c11 = vzero();
    vec c20 = vzero(), c21 = vzero(), c30 = vzero(), c31 = vzero();
    for (i64 p = 0; p < np; ++p) {
      const vec b0 = vload(b + p * ldb + j), b1 = vload(b + p * ldb + j + kLanes);
      vec x = vbcast(a0[p]);
      c00 = vmadd(c00, x, b0);
      c01 = vmadd(c01, x, b1);
      x = vbcast(a1[p]);
      c10 = vmadd(c10, x, b0);
      c11 = vmadd(c11, x, b1);
      x = vbcast(a2[p]);
      c20 = vmadd(c20, x, b0);
      c21 = vmadd(c21, x, b1);
      x = vbcast(a3[p]);
      c30 = vmadd(c30, x, b0);
      c31 = vmadd(c31, x, b1);
    }
    vstore(o0 + j, c00);
    vstore(o0 + j + kLanes, c01);
    vstore(o1 + j, c10);
    vstore(o1 + j + kLanes, c11);
    vstore(o2 + j, c20);
    vstore(o2 + j + kLanes, c21);
    vstore(o3 + j, c30);
    vstore(o3 + j + kLanes, c31);
  }
}

// One i-softmax row (quant/nonlinear.int_softmax through the i-exp table): s int32 [n]; keep int32 [n], -1 on keys
// that count and 0 on padding; lut[i] = e(d = -i) for i in [0, lm1] (index clamped at lm1, the table's trailing 0).
// Writes the probabilities p in [0, 255] to pr. s - max is computed in int32, exact for |s| < 2^30 (attention scores
// are below dh 2^14; softmax_u8 checks); a fully padded row gives all zeros as the reference does. Branch-free
// (masks, gathers), so every loop vectorises.
inline void softmax_row(const i32* __restrict s, i64 n, const i32* __restrict keep, const i32* __restrict lut,
                        i32 lm1, i32* __restrict ev, i32* __restrict pr) {
  i32 mx = INT32_MIN;
  for (i64 j = 0; j < n; ++j) mx = std::max(mx, (s[j] & keep[j]) | (~keep[j] & INT32_MIN));
  i64 sum = 0, j = 0;
#if defined(__AVX2__)
  // gcc turns the table lookup into a gather of 64-bit indices; 32-bit index gathers, sums widened to int64
  {
    const __m256i vmx = _mm256_set1_epi32(mx), vlm1 = _mm256_set1_epi32(lm1), v0 = _mm256_setzero_si256();
    __m256i acc = v0;
    for (; j + 8 <= n; j += 8) {
      __m256i d = _mm256_sub_epi32(vmx, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + j)));
      d = _mm256_min_epi32(_mm256_max_epi32(d, v0), vlm1);
      const __m256i e = _mm256_and_si256(_mm256_i32gather_epi32(lut, d, 4),
                                         _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keep + j)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(ev + j), e);
      acc = _mm256_add_epi64(acc, _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(e)),
                                                   _mm256_cvtepi32_epi64(_mm256_extracti128_si256(e, 1))));
    }
    alignas(32) i64 part[4];
    _mm256_store_si256(reinterpret_cast<__m256i*>(part), acc);
    sum = part[0] + part[1] + part[2] + part[3];
  }
#endif
  for (; j < n; ++j) {
    const i32 d = mx - s[j];  // negative only on padded keys above the unpadded max (and all keys of a padded row)
    const i32 idx = d < 0 ? 0 : (d < lm1 ? d : lm1);
    ev[j] = lut[idx] & keep[j];
    sum += ev[j];
  }
  if (sum < 1) sum = 1;
  const i64 f = (i64(1) << 40) / sum;
  // p = (ev f 255 + 2^39) >> 40, computed in doubles: ev <= sum gives ev f <= 2^40, so ev (f 255) < 2^48 and the sum
  // with 2^39 are exact in a double's 53-bit significand, and the scaling by 2^-40 and the floor are exact too. The
  // same integers as the int64 formula, four lanes at a time on AVX2 (which has no 64-bit multiply).
  const double f255 = double(f * 255), half = 549755813888.0, inv = 1.0 / 1099511627776.0;  // 2^39, 2^-40
  j = 0;
#if defined(__AVX2__)
  {
    const __m256d vf = _mm256_set1_pd(f255), vh = _mm256_set1_pd(half), vi = _mm256_set1_pd(inv),
                  vcap = _mm256_set1_pd(255.0);
    for (; j + 4 <= n; j += 4) {
      const __m256d x = _mm256_cvtepi32_pd(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ev + j)));
      const __m256d q = _mm256_floor_pd(_mm256_mul_pd(_mm256_add_pd(_mm256_mul_pd(x, vf), vh), vi));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(pr + j), _mm256_cvttpd_epi32(_mm256_min_pd(q, vcap)));
    }
  }
#endif
  for (; j < n; ++j) {
    const double q = std::floor((double(ev[j]) * f255 + half) * inv);
    pr[j] = i32(q > 255.0 ? 255.0 : q);
  }
}

// keep[j] = -1 (key j counts) or 0 (padding), from a u8 padding row (1 = padding) or none.
inline void keep_row(const u8* kp, i64 n, i32* keep) {
  for (i64 j = 0; j < n; ++j) keep[j] = kp && kp[j] ? 0 : -1;
}

void check_lut(const at::Tensor& lut) {
  check(lut.scalar_type() == at::kInt && lut.is_contiguous() && lut.numel() >= 1 && lut.numel() < (i64(1) << 30),
        "lut: int32 i-exp table");
}

// i-softmax over the last dim: scores int32 [B,H,Tq,Tk] with |s| < 2^30; key_pad u8 [B,Tk] (1 = padding) or empty.
// Output p u8 [B,H,Tq,Tk] in [0, 255]. The engine runs the same rows inside attention_u8; this entry point serves
// the build check of an installed package.
void softmax_u8(const at::Tensor& scores, const at::Tensor& key_pad, const at::Tensor& lut, at::Tensor& out) {
  check(scores.scalar_type() == at::kInt && scores.is_contiguous() && scores.dim() == 4, "scores: int32 [B,H,T,T]");
  check_lut(lut);
  check_tensor(out, at::kByte, scores.numel(), "softmax_u8 out");
  const i64 Bsz = scores.size(0), H = scores.size(1), Tq = scores.size(2), Tk = scores.size(3);
  const bool has_mask = check_optional(key_pad, at::kByte, scores.size(0) * scores.size(3), "softmax_u8 key_pad");
  const u8* KP = has_mask ? key_pad.data_ptr<u8>() : nullptr;
  const i32* S = scores.data_ptr<i32>();
  u8* O = out.data_ptr<u8>();
  std::vector<i32> ev(Tk), pr(Tk), keep(Tk);
  for (i64 r = 0; r < Bsz * H * Tq; ++r) {
    const i32* s = S + r * Tk;
    for (i64 j = 0; j < Tk; ++j) check(s[j] > -(1 << 30) && s[j] < (1 << 30), "scores: |s| >= 2^30");
    keep_row(has_mask ? KP + (r / (H * Tq)) * Tk : nullptr, Tk, keep.data());
    softmax_row(s, Tk, keep.data(), lut.data_ptr<i32>(), i32(lut.numel() - 1), ev.data(), pr.data());
    for (i64 j = 0; j < Tk; ++j) O[r * Tk + j] = u8(pr[j]);
  }
}

// Below this many multiply-adds (QK^T + P V of one call) attention runs on one thread. Measured on the quiet 2-core
// host with the demo's MiniLM models on the 1,000 real dev sentences (engine eval --compare-fp32): at 2^27 the
// length-bucketed batches stayed on one thread (W7A8 1.72x / 1.54x FP32 at batch 8 / 32); at 2^23 they go parallel
// (2.05x / 2.01x). (On a host loaded by other jobs two threads were slower per call: load, not the kernel.)
constexpr int64_t kAttnParallelMin = int64_t(1) << 23;

// Constants of one attention_u8 call (shapes, per-column q/k/v requant, the i-exp table, attn_act requant).
struct AttnArgs {
  i64 T, H, D, dh, N, qmax;
  const i32* acc;
  const i64 *bias, *m, *rnd, *sh;
  const u8* key_pad;  // [B, T] or null
  const i32* lut;
  i32 lm1;
  i64 ctx_m, ctx_e, ctx_rnd;
  u8 *out, *q_out, *k_out, *v_out, *p_out;  // optional outputs null
  // exact-double forms (DoubleRequant): q/k/v requant per column (bias, m, 2^-e), context requant (m 2^-e)
  const double *dbias = nullptr, *dm = nullptr, *dinv = nullptr;
  double ctx_scale = 0;
  bool qkv_dbl = false, ctx_dbl = false;
};

// clamp(floor((a + bias) m inv + 0.5), -qmax, qmax) for n columns, into int32 (the exact-double q/k/v requant).
inline void requant_row_double(const i32* __restrict a, const double* __restrict bias, const double* __restrict m,
                               const double* __restrict inv, i64 n, double qmax, i32* __restrict out) {
  i64 d = 0;
#if defined(__AVX2__)
  const __m256d vq = _mm256_set1_pd(qmax);
  for (; d + 4 <= n; d += 4) {
    const __m256d x = _mm256_add_pd(_mm256_cvtepi32_pd(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + d))),
                                    _mm256_loadu_pd(bias + d));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + d), requant4(x, m + d, inv + d, vq));
  }
#endif
  for (; d < n; ++d) out[d] = i32(requant_d(double(a[d]) + bias[d], m[d], inv[d], qmax));
}

// Rows of queries handled together: one block of scores, probabilities and contexts (madd_rows4).
constexpr i64 kRows = 4;
// Rows of the QKV accumulator fetched ahead of the q/k/v requant (measured: without it half of attention_head's
// time was spent waiting for these strided loads at 384-token windows).
constexpr i64 kPrefetchRows = 8;

// Work buffers of one thread: packed operands qp [T+kRows][dh2] (zero phantom rows past T), kp [dh2][Tp] (pairs of
// head dims), vp [Tm][dhp] (pairs of keys), and one block of kRows query rows: scores s [kRows][Tp], probabilities pr
// [kRows][Tp + 1] (room for the zero that pads an odd key count), pairs pp [kRows][Tm], contexts c [kRows][dhp].
struct AttnScratch {
  std::vector<i32> qp, kp, vp, s, ev, pr, pp, c, keep, row;
  AttnScratch(i64 T, i64 dh2, i64 Tp, i64 Tm, i64 dhp, i64 dh)
      : qp((T + kRows) * dh2), kp(dh2 * Tp), vp(Tm * dhp), s(kRows * Tp), ev(Tp), pr(kRows * (Tp + 1)),
        pp(kRows * Tm), c(kRows * dhp), keep(T), row(3 * dh) {}
};

// One (batch b, head h): requant + pack q/k/v, then per block of kRows query rows: scores, i-softmax, contexts,
// attn_act. Keys past the last unpadded one are skipped: their probability is 0 (the mask), so neither their scores
// nor their values change any sum; only the p_out rows get their zeros written.
void attention_head(const AttnArgs& P, i64 b, i64 h, AttnScratch& W) {
  const i64 T = P.T, H = P.H, D = P.D, dh = P.dh, N = P.N, qmax = P.qmax;
  const i64 dh2 = (dh + 1) / 2, Tp = round_up(T, kTile), Tm = (T + 1) / 2, dhp = round_up(dh, kTile);
  const i64 bh = b * H + h;
  i32 *__restrict qp = W.qp.data(), *__restrict kp = W.kp.data(), *__restrict vp = W.vp.data();
  i32* __restrict x = W.row.data();
  std::fill(W.kp.begin(), W.kp.end(), 0);
  std::fill(W.vp.begin(), W.vp.end(), 0);
  std::fill(qp + T * dh2, qp + (T + kRows) * dh2, 0);  // the phantom rows of the last block
  for (i64 t = 0; t < T; ++t) {
    const i32* __restrict a = P.acc + (b * T + t) * N;
    if (t + kPrefetchRows < T) {  // this head's three slices of a row are 3 dh int32 out of 3 D: strided, not streamed
      const i32* ahead = a + kPrefetchRows * N + h * dh;
      for (i64 part = 0; part < 3; ++part)
        for (i64 d = 0; d < dh; d += 16) __builtin_prefetch(ahead + part * D + d, 0, 0);
    }
    for (i64 part = 0; part < 3; ++part) {  // this head's q | k | v columns of row t
      const i64 c0 = part * D + h * dh;
      i32* __restrict xp = x + part * dh;
      if (P.qkv_dbl) {
        requant_row_double(a + c0, P.dbias + c0, P.dm + c0, P.dinv + c0, dh, double(qmax), xp);
        continue;
      }
      const i64 *__restrict bi = P.bias + c0, *__restrict mm = P.m + c0, *__restrict rn = P.rnd + c0,
                            *__restrict sh = P.sh + c0;
      for (i64 d = 0; d < dh; ++d) {
        const i64 val = ((i64(a[c0 + d]) + bi[d]) * mm[d] + rn[d]) >> sh[d];
        xp[d] = i32(val < -qmax ? -qmax : (val > qmax ? qmax : val));
      }
    }
    const i32 *xq = x, *xk = x + dh, *xv = x + 2 * dh;
    for (i64 p = 0; p < dh / 2; ++p) {
      qp[t * dh2 + p] = pack16(xq[2 * p], xq[2 * p + 1]);
      kp[p * Tp + t] = pack16(xk[2 * p], xk[2 * p + 1]);
    }
    if (dh % 2) {
      qp[t * dh2 + dh2 - 1] = pack16(xq[dh - 1], 0);
      kp[(dh2 - 1) * Tp + t] = pack16(xk[dh - 1], 0);
    }
    i32* __restrict vr = vp + (t / 2) * dhp;
    const int hs = t % 2 ? 16 : 0;
    for (i64 d = 0; d < dh; ++d) vr[d] |= i32(uint32_t(uint16_t(xv[d])) << hs);
    const i64 oo = (bh * T + t) * dh;
    if (P.q_out) for (i64 d = 0; d < dh; ++d) P.q_out[oo + d] = u8(xq[d] + 128);
    if (P.k_out) for (i64 d = 0; d < dh; ++d) P.k_out[oo + d] = u8(xk[d] + 128);
    if (P.v_out) for (i64 d = 0; d < dh; ++d) P.v_out[oo + d] = u8(xv[d] + 128);
  }
  i32* __restrict keep = W.keep.data();
  keep_row(P.key_pad ? P.key_pad + b * T : nullptr, T, keep);
  i64 nk = T;  // keys that can count: up to the last unpadded one
  while (nk > 0 && !keep[nk - 1]) --nk;
  const i64 Tpk = round_up(nk, kTile), Tmk = (nk + 1) / 2, Tps = Tp + 1;
  const i64 cm = P.ctx_m, ce = P.ctx_e, crnd = P.ctx_rnd;
  i32 *__restrict s = W.s.data(), *__restrict pr = W.pr.data(), *__restrict pp = W.pp.data(),
                  *__restrict c = W.c.data();
  for (i64 i = 0; i < T; i += kRows) {  // query rows i .. i + 3 (zero phantom rows past T)
    madd_rows4(qp + i * dh2, qp + (i + 1) * dh2, qp + (i + 2) * dh2, qp + (i + 3) * dh2, dh2, kp, Tp, Tpk, s, s + Tp,
               s + 2 * Tp, s + 3 * Tp);
    const i64 nr = std::min<i64>(kRows, T - i);
    for (i64 k = 0; k < nr; ++k) {
      i32* __restrict prk = pr + k * Tps;
      softmax_row(s + k * Tp, nk, keep, P.lut, P.lm1, W.ev.data(), prk);
      if (P.p_out) {
        u8* po = P.p_out + (bh * T + i + k) * T;
        for (i64 j = 0; j < nk; ++j) po[j] = u8(prk[j]);
        std::fill(po + nk, po + T, u8(0));
      }
      prk[nk] = 0;  // the pair past an odd key count
      i32* __restrict ppk = pp + k * Tm;
      for (i64 j = 0; j < Tmk; ++j) ppk[j] = prk[2 * j] | (prk[2 * j + 1] << 16);  // p in [0, 255]
    }
    for (i64 k = nr; k < kRows; ++k) std::fill(pp + k * Tm, pp + k * Tm + Tmk, 0);  // phantom rows
    madd_rows4(pp, pp + Tm, pp + 2 * Tm, pp + 3 * Tm, Tmk, vp, dhp, dhp, c, c + dhp, c + 2 * dhp, c + 3 * dhp);
    for (i64 k = 0; k < nr; ++k) {
      const i32* __restrict ck = c + k * dhp;
      u8* __restrict o = P.out + (b * T + i + k) * D + h * dh;
      if (P.ctx_dbl) {  // |ctx| < 2^31 and |ctx_m| 2^31 < 2^52 (checked): exact
        for (i64 d = 0; d < dh; ++d) o[d] = u8(i32(requant_d(double(ck[d]), P.ctx_scale, 1.0, double(qmax))) + 128);
        continue;
      }
      for (i64 d = 0; d < dh; ++d) {
        const i64 val = (i64(ck[d]) * cm + crnd) >> ce;
        o[d] = u8((val < -qmax ? -qmax : (val > qmax ? qmax : val)) + 128);
      }
    }
  }
}

// The whole self-attention between the QKV and the output GEMM, per (batch, head), in one call:
//   q, k, v = clamp(requant(acc + bias, m[c], e[c]), -qmax, qmax)   (the q/k/v QuantAct(8), per column c)
//   s = q k^T (int32), p = i-softmax(s) over unpadded keys (u8 [0, 255]), ctx = p v (int32),
//   out = clamp(requant(ctx, ctx_m, ctx_e), -qmax, qmax) + 128     (attn_act, per tensor) -> out u8 [B*T, D]
// acc int32 [B*T, 3D] (q | k | v columns, head h at h dh), bias / m / e int64 [3D], key_pad u8 [B, T] or empty.
// Bounds (int32 accumulation, checked): |q k| <= dh 2^14 < 2^31 for dh <= 2^16; |p v| <= T 255 128 < 2^31 for
// T <= 2^16. Optional outputs (empty = not written): q_out / k_out / v_out u8 [B,H,T,dh] (+128), p_out u8 [B,H,T,T].
// An attention layer's constants, prepared once (the engine builds one per layer at load): per-column q/k/v requant
// (bias, m, capped shift and rounding term; their exact-double forms), the i-exp table, the context requant.
struct AttnPlan {
  i64 N = 0, H = 0, qmax = 0;
  std::vector<i64> bias, m, rnd, sh;
  std::vector<i32> lut;
  i64 ctx_m = 0, ctx_e = 0, ctx_rnd = 0;
  std::vector<double> dbias;
  DoubleRequant qd;
  double ctx_scale = 0;
  bool qkv_exact = false, ctx_exact = false;  // the exact-double forms hold for these constants
};

std::shared_ptr<AttnPlan> attention_plan(const at::Tensor& bias, const at::Tensor& m, const at::Tensor& e,
                                         int64_t qmax, int64_t H, const at::Tensor& lut, int64_t ctx_m,
                                         int64_t ctx_e) {
  const i64 N = bias.numel();
  check(H >= 1 && N % (3 * H) == 0, "attention: bias is not [3 H dh]");
  check(qmax >= 1 && qmax <= 127, "attention: 8-bit activations only");
  check_tensor(bias, at::kLong, N, "attention bias");
  check_tensor(m, at::kLong, N, "attention m");
  check_tensor(e, at::kLong, N, "attention e");
  check_shifts(e, "attention e");
  check(ctx_e >= 1, "attention: ctx_e must be >= 1");
  check_lut(lut);
  auto P = std::make_shared<AttnPlan>();
  P->N = N, P->H = H, P->qmax = qmax;
  const i64 *Bv = bias.data_ptr<i64>(), *Mv = m.data_ptr<i64>(), *Ev = e.data_ptr<i64>();
  P->bias.assign(Bv, Bv + N);
  P->m.assign(Mv, Mv + N);
  P->rnd.resize(N), P->sh.resize(N);
  for (i64 j = 0; j < N; ++j) P->sh[j] = cap_shift(Ev[j]), P->rnd[j] = i64(1) << (P->sh[j] - 1);
  P->lut.assign(lut.data_ptr<i32>(), lut.data_ptr<i32>() + lut.numel());
  P->ctx_m = ctx_m;
  P->ctx_e = cap_shift(ctx_e);
  P->ctx_rnd = i64(1) << (P->ctx_e - 1);
  // q/k/v: |acc + bias| <= 2^31 + max |bias|; context: |p v| < 2^31
  double bmax = 0;
  for (i64 j = 0; j < N; ++j) bmax = std::max(bmax, std::fabs(double(Bv[j])));
  P->qd = DoubleRequant(Mv, Ev, N, 2147483648.0 + bmax);
  P->dbias.assign(Bv, Bv + N);
  P->qkv_exact = P->qd.ok && bmax < kExactBound;
  P->ctx_exact = std::fabs(double(ctx_m)) * 2147483648.0 < kExactBound;
  P->ctx_scale = double(ctx_m) * pow2_neg(ctx_e);
  return P;
}

void attention_run(const AttnPlan& plan, const at::Tensor& acc, int64_t Bsz, int64_t T, const at::Tensor& key_pad,
                   at::Tensor& out, at::Tensor& q_out, at::Tensor& k_out, at::Tensor& v_out, at::Tensor& p_out) {
  check(acc.scalar_type() == at::kInt && acc.is_contiguous() && acc.dim() == 2, "acc: contiguous int32 [B*T, 3D]");
  const i64 N = acc.size(1), D = N / 3, H = plan.H, dh = D / H;
  check(N == plan.N && Bsz >= 0 && T >= 0 && acc.size(0) == Bsz * T, "attention: acc is not [B*T, 3 H dh]");
  check(T <= (i64(1) << 16) && dh <= (i64(1) << 16), "attention: T and head_dim must be <= 2^16 (int32 sums)");
  check_tensor(out, at::kByte, Bsz * T * D, "attention out");
  const bool has_mask = check_optional(key_pad, at::kByte, Bsz * T, "attention key_pad");
  auto opt = [&](const at::Tensor& t, i64 n, const char* what) -> u8* {
    return check_optional(t, at::kByte, n, what) ? t.data_ptr<u8>() : nullptr;
  };
  AttnArgs P{T, H, D, dh, N, plan.qmax, acc.data_ptr<i32>(), plan.bias.data(), plan.m.data(), plan.rnd.data(),
             plan.sh.data(), has_mask ? key_pad.data_ptr<u8>() : nullptr, plan.lut.data(),
             i32(plan.lut.size() - 1), plan.ctx_m, plan.ctx_e, plan.ctx_rnd, out.data_ptr<u8>(),
             opt(q_out, Bsz * T * D, "attention q_out"), opt(k_out, Bsz * T * D, "attention k_out"),
             opt(v_out, Bsz * T * D, "attention v_out"), opt(p_out, Bsz * H * T * T, "attention p_out")};
  const bool dbl = double_requant_enabled();
  P.qkv_dbl = dbl && plan.qkv_exact;
  P.dbias = plan.dbias.data(), P.dm = plan.qd.m.data(), P.dinv = plan.qd.inv.data();
  P.ctx_dbl = dbl && plan.ctx_exact;
  P.ctx_scale = plan.ctx_scale;
  if (P.qkv_dbl || P.ctx_dbl) ++g_double_calls;
  const i64 dh2 = (dh + 1) / 2, Tp = round_up(T, kTile), Tm = (T + 1) / 2, dhp = round_up(dh, kTile);
  const i64 macs = Bsz * H * T * (Tp * dh2 + Tm * dhp) * 2;
  at::parallel_for(0, Bsz * H, macs >= kAttnParallelMin ? 1 : Bsz * H, [&](int64_t lo, int64_t hi) {
    AttnScratch W(T, dh2, Tp, Tm, dhp, dh);
    for (i64 bh = lo; bh < hi; ++bh) attention_head(P, bh / H, bh % H, W);
  });
}

void attention_u8(const at::Tensor& acc, const at::Tensor& bias, const at::Tensor& m, const at::Tensor& e,
                  int64_t qmax, int64_t Bsz, int64_t T, int64_t H, const at::Tensor& key_pad, const at::Tensor& lut,
                  int64_t ctx_m, int64_t ctx_e, at::Tensor& out, at::Tensor& q_out, at::Tensor& k_out,
                  at::Tensor& v_out, at::Tensor& p_out) {
  check(acc.scalar_type() == at::kInt && acc.is_contiguous() && acc.dim() == 2, "acc: contiguous int32 [B*T, 3D]");
  const i64 N = acc.size(1), D = N / 3, dh = H > 0 ? D / H : 0;
  check(H >= 1 && acc.size(0) == Bsz * T && D * 3 == N && dh * H == D, "attention: acc is not [B*T, 3 H dh]");
  check_tensor(bias, at::kLong, N, "attention bias");
  attention_run(*attention_plan(bias, m, e, qmax, H, lut, ctx_m, ctx_e), acc, Bsz, T, key_pad, out, q_out, k_out,
                v_out, p_out);
}

// One IntLayerNorm row on q (int64, length C), then optional requant to the next QuantAct(8) (u8 +128) and/or
// the raw LN output (int64).
struct LNParams {
  i64 C;
  i64 shift;
  const i64* bint;     // [C]
  const i64* nm;       // next requant m [C] or null
  const i64* ne;       // next requant e [C], capped at 62 (cap_shift) when `fast`
  const i64* nr;       // 2^(ne - 1) [C] when `fast`
  i64 nqmax;
  bool fast;           // every |nm| <= 2^21: the next requant is one int64 product (see ln_row)
};

// Per-call constants of the next requant after an IntLayerNorm: capped shifts and rounding terms, and whether the
// branch-free int64 path is exact for every column.
struct NextRequant {
  std::vector<i64> e, r;
  bool fast = true;
  NextRequant(const i64* m, const i64* e_in, i64 C) : e(C), r(C) {
    for (i64 c = 0; c < C; ++c) {
      fast = fast && std::llabs(m[c]) <= (i64(1) << 21) && e_in[c] >= 1;
      e[c] = cap_shift(e_in[c]);
      r[c] = i64(1) << (e[c] - 1);
    }
  }
};

// Loops are kept branch-free and split by output so that gcc vectorises them (AVX-512: int64 multiplies and
// per-lane arithmetic shifts).
inline void ln_row(i64* q, const LNParams& P, bool zero_row, u8* out_u8, i64* out_q) {
  const i64 C = P.C;
  if (zero_row) {
    if (out_q) std::fill(out_q, out_q + C, 0);
    if (out_u8) std::fill(out_u8, out_u8 + C, (u8)128);
    return;
  }
  i64 sum = 0;
  for (i64 c = 0; c < C; ++c) sum += q[c];
  const i64 mean = floordiv(2 * sum + C, 2 * C);
  i64 var = 0;
  const int sh = (int)P.shift;
  for (i64 c = 0; c < C; ++c) {
    const i64 y = q[c] - mean;
    q[c] = y;
    const i64 ys = y >> sh;
    var += ys * ys;
  }
  i64 sd = isqrt_newton(var);
  if (sd < 1) sd = 1;
  sd <<= sh;
  // |y| <= 2 sd (sd >= |floor(y / 2^shift)| 2^shift), so |y f| <= 2^46 and |yn| <= 2^31 + |b_int| <= 2^32.
  const i64 f = (i64(1) << 45) / sd;
  const i64* bint = P.bint;
  for (i64 c = 0; c < C; ++c) q[c] = ((q[c] * f) >> 15) + bint[c];
  if (out_q) std::copy(q, q + C, out_q);
  if (!out_u8) return;
  const i64 qm = P.nqmax;
  if (P.fast) {
    // |yn m| <= 2^53 < 2^61: (yn m + 2^(e-1)) >> e is exact in int64, and a shift capped at 62 gives the 0 every
    // larger shift gives.
    const i64 *nm = P.nm, *ne = P.ne, *nr = P.nr;
    for (i64 c = 0; c < C; ++c) {
      i64 v = (q[c] * nm[c] + nr[c]) >> ne[c];
      v = v < -qm ? -qm : (v > qm ? qm : v);
      out_u8[c] = (u8)(v + 128);
    }
  } else {
    for (i64 c = 0; c < C; ++c) out_u8[c] = (u8)(clampi(requant_wide(q[c], P.nm[c], (int)P.ne[c]), -qm, qm) + 128);
  }
}

// resid_ln's row in exact doubles (see DoubleRequant): the same integers as the int64 formulas of resid_ln + ln_row,
// for a call whose constants pass the exactness checks (ResidDouble). q22 and the centred y fit int32
// (|q22| <= qmax22 <= 2^30); the variance sums int64 squares; |y f| <= 2^46 is exact, and |yn| <= 2^31 + |b_int|.
struct ResidDouble {
  std::vector<double> bias, bint;
  DoubleRequant main, next;
  double mr = 0, ir = 0;  // identity branch: m_r, 2^-e_r
  bool ok = false;
};

inline void resid_ln_row_double(const i32* __restrict a, const u8* __restrict rz, i64 C, const ResidDouble& D,
                                double qmax22, i64 shift, double nqmax, i32* __restrict q, double* __restrict yn,
                                u8* __restrict out_u8, i64* out_q22, i64* out_q) {
  const double *bi = D.bias.data(), *ma = D.main.m.data(), *ia = D.main.inv.data();
  i64 c = 0;
#if defined(__AVX2__)
  {
    const __m256d vq = _mm256_set1_pd(qmax22), vnq = _mm256_set1_pd(-qmax22), vmr = _mm256_set1_pd(D.mr * D.ir),
                  vh = _mm256_set1_pd(0.5), v128 = _mm256_set1_pd(128.0);
    for (; c + 4 <= C; c += 4) {
      const __m256d x = _mm256_add_pd(_mm256_cvtepi32_pd(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + c))),
                                      _mm256_loadu_pd(bi + c));
      const __m256d v1 = _mm256_floor_pd(
          _mm256_add_pd(_mm256_mul_pd(_mm256_mul_pd(x, _mm256_loadu_pd(ma + c)), _mm256_loadu_pd(ia + c)), vh));
      int32_t r4;
      std::memcpy(&r4, rz + c, 4);
      const __m256d r = _mm256_sub_pd(_mm256_cvtepi32_pd(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(r4))), v128);
      const __m256d v2 = _mm256_floor_pd(_mm256_add_pd(_mm256_mul_pd(r, vmr), vh));
      const __m256d v = _mm256_min_pd(_mm256_max_pd(_mm256_add_pd(v1, v2), vnq), vq);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + c), _mm256_cvttpd_epi32(v));
    }
  }
#endif
  const double mri = D.mr * D.ir;  // m_r 2^-e_r: |r m_r| < 2^52 and the power of two keep it exact
  for (; c < C; ++c) {
    const double v = requant_d(double(a[c]) + bi[c], ma[c], ia[c], kUnclamped) +
                     requant_d(double(rz[c]) - 128.0, mri, 1.0, kUnclamped);
    q[c] = i32(v < -qmax22 ? -qmax22 : (v > qmax22 ? qmax22 : v));
  }
  if (out_q22)
    for (i64 k = 0; k < C; ++k) out_q22[k] = q[k];
  i64 sum = 0;
  for (i64 k = 0; k < C; ++k) sum += q[k];
  const i32 mean = i32(floordiv(2 * sum + C, 2 * C));
  const int sh = int(shift < 31 ? shift : 31);  // |y| < 2^31: any larger shift gives the same -1 / 0
  i64 var = 0;
  for (i64 k = 0; k < C; ++k) {
    const i32 y = q[k] - mean;
    q[k] = y;
    const i32 ys = y >> sh;
    var += i64(ys) * i64(ys);
  }
  i64 sd = isqrt_newton(var);
  if (sd < 1) sd = 1;
  sd <<= shift;
  const double f = double((i64(1) << 45) / sd), s15 = 1.0 / 32768.0;
  const double *bn = D.bint.data(), *nm = D.next.m.data(), *ni = D.next.inv.data();
  c = 0;
#if defined(__AVX2__)
  {
    const __m256d vf = _mm256_set1_pd(f), vs = _mm256_set1_pd(s15), vq = _mm256_set1_pd(nqmax);
    for (; c + 8 <= C; c += 8) {
      __m128i lo, hi;
      for (int h = 0; h < 2; ++h) {
        const i64 k = c + 4 * h;
        const __m256d y = _mm256_cvtepi32_pd(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k)));
        const __m256d v = _mm256_add_pd(_mm256_floor_pd(_mm256_mul_pd(_mm256_mul_pd(y, vf), vs)),
                                        _mm256_loadu_pd(bn + k));
        if (out_q) _mm256_storeu_pd(yn + k, v);
        (h ? hi : lo) = requant4(v, nm + k, ni + k, vq);
      }
      store_u8x8(out_u8 + c, lo, hi);
    }
  }
#endif
  for (; c < C; ++c) {
    const double v = std::floor(double(q[c]) * f * s15) + bn[c];
    if (out_q) yn[c] = v;
    out_u8[c] = u8(i32(requant_d(v, nm[c], ni[c], nqmax)) + 128);
  }
  if (out_q)
    for (i64 k = 0; k < C; ++k) out_q[k] = i64(yn[k]);
}

// residual QuantAct(22) + IntLayerNorm (+ next QuantAct(8)):
//   q22 = clamp(requant(acc + bias, m_a[c], e_a[c]) + requant(resid_u8 - 128, m_r, e_r), -qmax22, qmax22)
// The constants of one call site, prepared once (the engine builds one per residual at load). Without next_m /
// next_e (empty) the plan serves calls that want no u8 output (the last layer).
struct ResidPlan {
  i64 C = 0, m_r = 0, e_r = 0, rr = 0, qmax22 = 0, shift = 0, next_qmax = 0;
  std::vector<i64> bias, ma, rnd, sh, bint, nm, ne;
  bool has_next = false;
  std::unique_ptr<NextRequant> nr;
  ResidDouble D;  // D.ok: the exact-double form holds for these constants (u8 output only)
};

std::shared_ptr<ResidPlan> resid_ln_plan(const at::Tensor& bias, const at::Tensor& m_a, const at::Tensor& e_a,
                                         int64_t m_r, int64_t e_r, int64_t qmax22, int64_t shift,
                                         const at::Tensor& ln_bint, const at::Tensor& next_m,
                                         const at::Tensor& next_e, int64_t next_qmax) {
  const i64 C = bias.numel();
  check_tensor(bias, at::kLong, C, "resid_ln bias");
  check_tensor(m_a, at::kLong, C, "resid_ln m_a");
  check_tensor(e_a, at::kLong, C, "resid_ln e_a");
  check_shifts(e_a, "resid_ln e_a");
  check(e_r >= 1, "resid_ln: e_r must be >= 1");
  check(qmax22 >= 1 && qmax22 < (i64(1) << 31), "resid_ln: qmax22 in [1, 2^31)");
  check_tensor(ln_bint, at::kLong, C, "resid_ln ln_bint");
  TORCH_CHECK(shift >= 0 && shift <= 62, "resid_ln: shift in [0, 62], got ", shift);
  auto P = std::make_shared<ResidPlan>();
  P->C = C, P->m_r = m_r, P->qmax22 = qmax22, P->shift = shift, P->next_qmax = next_qmax;
  P->has_next = next_m.defined() && next_m.numel() > 0;
  if (P->has_next) {
    check_tensor(next_m, at::kLong, C, "resid_ln next_m");
    check_tensor(next_e, at::kLong, C, "resid_ln next_e");
    check_shifts(next_e, "resid_ln next_e");
    TORCH_CHECK(next_qmax >= 1 && next_qmax <= 127, "resid_ln: next_qmax in [1, 127], got ", next_qmax);
    P->nm.assign(next_m.data_ptr<i64>(), next_m.data_ptr<i64>() + C);
    P->ne.assign(next_e.data_ptr<i64>(), next_e.data_ptr<i64>() + C);
  }
  const i64 *Bi = bias.data_ptr<i64>(), *Ma = m_a.data_ptr<i64>(), *Ea = e_a.data_ptr<i64>(),
            *LB = ln_bint.data_ptr<i64>();
  P->bias.assign(Bi, Bi + C);
  P->ma.assign(Ma, Ma + C);
  P->bint.assign(LB, LB + C);
  P->rnd.resize(C), P->sh.resize(C);
  for (i64 c = 0; c < C; ++c) P->sh[c] = cap_shift(Ea[c]), P->rnd[c] = i64(1) << (P->sh[c] - 1);
  P->e_r = cap_shift(e_r);
  P->rr = i64(1) << (P->e_r - 1);
  P->nr = std::make_unique<NextRequant>(P->nm.data(), P->ne.data(), P->has_next ? C : 0);
  ResidDouble& D = P->D;
  D.ok = P->has_next && qmax22 <= (i64(1) << 30) && 128.0 * std::fabs(double(m_r)) < kExactBound;
  if (D.ok) {
    double bmax = 0, lbmax = 0;
    D.bias.resize(C), D.bint.resize(C);
    for (i64 c = 0; c < C; ++c) {
      D.bias[c] = double(Bi[c]), D.bint[c] = double(LB[c]);
      bmax = std::max(bmax, std::fabs(D.bias[c]));
      lbmax = std::max(lbmax, std::fabs(D.bint[c]));
    }
    D.main = DoubleRequant(Ma, Ea, C, 2147483648.0 + bmax);          // |acc| <= 2^31
    D.next = DoubleRequant(P->nm.data(), P->ne.data(), C, 2147483648.0 + lbmax);  // |yn| <= 2^31 + |b_int|
    D.mr = double(m_r), D.ir = pow2_neg(e_r);
    D.ok = D.main.ok && D.next.ok && bmax < kExactBound;
  }
  return P;
}

void resid_ln_run(const ResidPlan& plan, const at::Tensor& acc, const at::Tensor& resid_u8, at::Tensor& out_u8,
                  at::Tensor& out_q, at::Tensor& out_q22) {
  check(acc.scalar_type() == at::kInt && acc.is_contiguous() && acc.dim() == 2, "acc: int32 [M, C]");
  const i64 M = acc.size(0), C = acc.size(1);
  check(C == plan.C, "resid_ln: acc columns differ from the plan's");
  check_tensor(resid_u8, at::kByte, M * C, "resid_ln resid_u8");
  const bool want_u8 = check_optional(out_u8, at::kByte, M * C, "resid_ln out_u8");
  check(!want_u8 || plan.has_next, "resid_ln: out_u8 wanted but the plan has no next requant (next_m, next_e)");
  const bool want_q = check_optional(out_q, at::kLong, M * C, "resid_ln out_q");
  const bool want_q22 = check_optional(out_q22, at::kLong, M * C, "resid_ln out_q22");
  const i32* A = acc.data_ptr<i32>();
  const u8* Rz = resid_u8.data_ptr<u8>();
  u8* OU = want_u8 ? out_u8.data_ptr<u8>() : nullptr;
  i64* OQ = want_q ? out_q.data_ptr<i64>() : nullptr;
  i64* OQ22 = want_q22 ? out_q22.data_ptr<i64>() : nullptr;
  const ResidDouble& D = plan.D;
  const i64 qmax22 = plan.qmax22, shift = plan.shift;
  // The exact-double form on the engine's hot path (u8 out), when its constants keep every value below 2^52.
  if (want_u8 && D.ok && double_requant_enabled()) {
    ++g_double_calls;
#pragma omp parallel num_threads(nthreads()) if (M * C >= kParallelMin)
    {
      std::vector<i32> q(C);
      std::vector<double> yn(OQ ? C : 0);
#pragma omp for schedule(static)
      for (i64 i = 0; i < M; ++i)
        resid_ln_row_double(A + i * C, Rz + i * C, C, D, double(qmax22), shift, double(plan.next_qmax), q.data(),
                            yn.data(), OU + i * C, OQ22 ? OQ22 + i * C : nullptr, OQ ? OQ + i * C : nullptr);
    }
    return;
  }
  const NextRequant& NR = *plan.nr;
  const i64* nm = want_u8 ? plan.nm.data() : nullptr;
  const LNParams P{C, shift, plan.bint.data(), nm, NR.fast ? NR.e.data() : plan.ne.data(), NR.r.data(),
                   plan.next_qmax, NR.fast};
  const i64 *Bi = plan.bias.data(), *Ma = plan.ma.data(), *R = plan.rnd.data(), *SH = plan.sh.data();
  const i64 m_r = plan.m_r, e_r = plan.e_r, rr = plan.rr;
#pragma omp parallel num_threads(nthreads()) if (M * C >= kParallelMin)
  {
    std::vector<i64> q(C);
#pragma omp for schedule(static)
    for (i64 i = 0; i < M; ++i) {
      const i32* a = A + i * C;
      const u8* rz = Rz + i * C;
      for (i64 c = 0; c < C; ++c) {
        const i64 v1 = ((i64(a[c]) + Bi[c]) * Ma[c] + R[c]) >> SH[c];
        const i64 v2 = ((i64(rz[c]) - 128) * m_r + rr) >> e_r;
        q[c] = clampi(v1 + v2, -qmax22, qmax22);
      }
      if (OQ22) std::copy(q.begin(), q.end(), OQ22 + i * C);
      ln_row(q.data(), P, false, OU ? OU + i * C : nullptr, OQ ? OQ + i * C : nullptr);
    }
  }
}

void resid_ln(const at::Tensor& acc, const at::Tensor& bias, const at::Tensor& m_a, const at::Tensor& e_a,
              const at::Tensor& resid_u8, int64_t m_r, int64_t e_r, int64_t qmax22, int64_t shift,
              const at::Tensor& ln_bint, const at::Tensor& next_m, const at::Tensor& next_e, int64_t next_qmax,
              at::Tensor& out_u8, at::Tensor& out_q, at::Tensor& out_q22) {
  check(acc.scalar_type() == at::kInt && acc.is_contiguous() && acc.dim() == 2, "acc: int32 [M, C]");
  const i64 M = acc.size(0), C = acc.size(1);
  check_tensor(bias, at::kLong, C, "resid_ln bias");
  check_ln_args("resid_ln", M, C, ln_bint, shift, next_m, next_e, next_qmax, out_u8, out_q, out_q22, "out_q22");
  // the next requant's constants only matter (and are only checked) when a u8 output is wanted
  const bool want_u8 = out_u8.defined() && out_u8.numel() > 0;
  const at::Tensor none = at::empty({0}, at::kLong);
  resid_ln_run(*resid_ln_plan(bias, m_a, e_a, m_r, e_r, qmax22, shift, ln_bint, want_u8 ? next_m : none,
                              want_u8 ? next_e : none, next_qmax),
               acc, resid_u8, out_u8, out_q, out_q22);
}

// Embeddings: q16 = clamp(requant(tok_w[id], m_t, e_t) + requant(pos_w[pos], m_p, e_p), -qmax16, qmax16), then
// IntLayerNorm, padding rows zeroed, then the first layer's input QuantAct(8).
void embed_ln(const at::Tensor& tokens, const at::Tensor& positions, const at::Tensor& pad_rows, const at::Tensor& tok_w,
              const at::Tensor& pos_w, int64_t m_t, int64_t e_t, int64_t m_p, int64_t e_p, int64_t qmax16, int64_t shift,
              const at::Tensor& ln_bint, const at::Tensor& next_m, const at::Tensor& next_e, int64_t next_qmax,
              at::Tensor& out_u8, at::Tensor& out_q, at::Tensor& out_q16) {
  check(tok_w.dim() == 2 && pos_w.dim() == 2 && tok_w.size(1) == pos_w.size(1),
        "embed_ln: tok_w [V, C] and pos_w [P, C] with the same C");
  check_tensor(tok_w, at::kChar, -1, "embed_ln tok_w");
  check_tensor(pos_w, at::kChar, -1, "embed_ln pos_w");
  check_tensor(tokens, at::kLong, -1, "embed_ln tokens");
  const i64 M = tokens.numel(), C = tok_w.size(1);
  check_tensor(positions, at::kLong, M, "embed_ln positions");
  check_tensor(pad_rows, at::kByte, M, "embed_ln pad_rows");
  check_index(tokens, tok_w.size(0), "embed_ln tokens");
  check_index(positions, pos_w.size(0), "embed_ln positions");
  check(e_t >= 1 && e_p >= 1, "embed_ln: e_t and e_p must be >= 1");
  check(qmax16 >= 1 && qmax16 < (i64(1) << 31), "embed_ln: qmax16 in [1, 2^31)");
  check_ln_args("embed_ln", M, C, ln_bint, shift, next_m, next_e, next_qmax, out_u8, out_q, out_q16, "out_q16");
  const i64* TK = tokens.data_ptr<i64>();
  const i64* PS = positions.data_ptr<i64>();
  const u8* PR = pad_rows.data_ptr<u8>();
  const int8_t* TW = tok_w.data_ptr<int8_t>();
  const int8_t* PW = pos_w.data_ptr<int8_t>();
  const bool want_u8 = out_u8.defined() && out_u8.numel() > 0;
  const bool want_q = out_q.defined() && out_q.numel() > 0;
  const bool want_q16 = out_q16.defined() && out_q16.numel() > 0;
  const i64* nm = want_u8 ? next_m.data_ptr<i64>() : nullptr;
  const i64* ne = want_u8 ? next_e.data_ptr<i64>() : nullptr;
  const NextRequant NR(nm, ne, want_u8 ? C : 0);
  const LNParams P{C, shift, ln_bint.data_ptr<i64>(), nm, NR.fast ? NR.e.data() : ne, NR.r.data(), next_qmax,
                   NR.fast};
  u8* OU = want_u8 ? out_u8.data_ptr<u8>() : nullptr;
  i64* OQ = want_q ? out_q.data_ptr<i64>() : nullptr;
  i64* OQ16 = want_q16 ? out_q16.data_ptr<i64>() : nullptr;
  e_t = cap_shift(e_t);
  e_p = cap_shift(e_p);
  const i64 rt = i64(1) << (e_t - 1), rp = i64(1) << (e_p - 1);
#pragma omp parallel num_threads(nthreads()) if (M * C >= kParallelMin)
  {
    std::vector<i64> q(C);
#pragma omp for schedule(static)
    for (i64 i = 0; i < M; ++i) {
      const int8_t* tw = TW + TK[i] * C;
      const int8_t* pw = PW + PS[i] * C;
      for (i64 c = 0; c < C; ++c) {
        const i64 v1 = (i64(tw[c]) * m_t + rt) >> e_t;
        const i64 v2 = (i64(pw[c]) * m_p + rp) >> e_p;
        q[c] = clampi(v1 + v2, -qmax16, qmax16);
      }
      if (OQ16) std::copy(q.begin(), q.end(), OQ16 + i * C);
      ln_row(q.data(), P, PR[i] != 0, OU ? OU + i * C : nullptr, OQ ? OQ + i * C : nullptr);
    }
  }
}

// gelu_u8's requant in exact doubles, the int64 path's split (gelu_u8's comment) with every step exact:
// z = clamp(q w, +-bd) (|q w| < 2^49), zh = floor(z 2^-s), zl = z - zh 2^s (0 <= zl < 2^s, s <= 31),
// lo = floor(zl m 2^-s) (zl m < 2^51), v = floor((zh m + 2^(e-1-s) + lo) 2^-(e-s)) (|zh| <= 2^30: the sum is below
// 2^51), clamped to +-qmax, written as u8 + 128. Per column: bd, m, 2^s, 2^-s, 2^(e-1-s), 2^-(e-s).
struct GeluDouble {
  std::vector<double> bd, m, p2s, inv2s, r, inv;
};

inline void gelu_requant_double(const i32* __restrict q, const i32* __restrict w, i64 n, const GeluDouble& G, i64 j0,
                                double qmax, u8* __restrict o) {
  const double *bd = G.bd.data() + j0, *m = G.m.data() + j0, *ps = G.p2s.data() + j0, *is = G.inv2s.data() + j0,
               *r = G.r.data() + j0, *inv = G.inv.data() + j0;
  i64 j = 0;
#if defined(__AVX2__)
  const __m256d vq = _mm256_set1_pd(qmax), vnq = _mm256_set1_pd(-qmax);
  for (; j + 8 <= n; j += 8) {
    __m128i half[2];
    for (int h = 0; h < 2; ++h) {
      const i64 k = j + 4 * h;
      const __m256d b = _mm256_loadu_pd(bd + k), mm = _mm256_loadu_pd(m + k), p = _mm256_loadu_pd(ps + k),
                    ip = _mm256_loadu_pd(is + k);
      __m256d z = _mm256_mul_pd(_mm256_cvtepi32_pd(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k))),
                                _mm256_cvtepi32_pd(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k))));
      z = _mm256_min_pd(_mm256_max_pd(z, _mm256_sub_pd(_mm256_setzero_pd(), b)), b);
      const __m256d zh = _mm256_floor_pd(_mm256_mul_pd(z, ip));
      const __m256d zl = _mm256_sub_pd(z, _mm256_mul_pd(zh, p));
      const __m256d lo = _mm256_floor_pd(_mm256_mul_pd(_mm256_mul_pd(zl, mm), ip));
      const __m256d t = _mm256_add_pd(_mm256_add_pd(_mm256_mul_pd(zh, mm), _mm256_loadu_pd(r + k)), lo);
      __m256d v = _mm256_floor_pd(_mm256_mul_pd(t, _mm256_loadu_pd(inv + k)));
      v = _mm256_min_pd(_mm256_max_pd(v, vnq), vq);
      half[h] = _mm256_cvttpd_epi32(v);
    }
    store_u8x8(o + j, half[0], half[1]);
  }
#endif
  for (; j < n; ++j) {
    double z = double(q[j]) * double(w[j]);
    z = z < -bd[j] ? -bd[j] : (z > bd[j] ? bd[j] : z);
    const double zh = std::floor(z * is[j]);
    const double zl = z - zh * ps[j];
    const double lo = std::floor(zl * m[j] * is[j]);
    double v = std::floor((zh * m[j] + r[j] + lo) * inv[j]);
    v = v < -qmax ? -qmax : (v > qmax ? qmax : v);
    o[j] = u8(i32(v) + 128);
  }
}

// i-GELU on the FC1 accumulator (+bias), then the fc2_act QuantAct(8) requant -> u8 (+128).
// Per channel j (quant/nonlinear.int_gelu): the erf input u = |q| << k (k >= 0, saturated at -b_int) or |q| >> -k;
// t = min(u, -b_int) + b_int; Y = max(0, (2^13 - c_int - t^2) >> 14); g = q (one - sgn(q) Y) (|g| < 2^51 for
// |q| <= 2^32); the requant of g saturates z = g at BD = 2^(e + bits - 19) (beyond it the result saturates,
// |m| <= 2^20), then v = floor((z m + 2^(e-1)) / 2^e) (quant/primitives requant_clamp without identity), computed
// exactly as floor((zh m + 2^(e-1-s) + floor(zl m / 2^s)) / 2^(e-s)) with z = zh 2^s + zl, s = max(e - 41, 0):
// |zh| <= 2^30 and 0 <= zl < 2^31, so both products are 32 x 32 -> 64 bit (vpmuldq) and every sum is below 2^62.
// Widths: the erf runs in int32 (checked per column: -b_int <= 46340, so t^2 < 2^31, |c_int| < 2^31 - 2^14 and
// |one| < 2^17, so |w| = |one - sgn(q) Y| < 2^18; i-GELU's scale normalisation keeps |b_int| < 41200 and
// |c_int| < 1.9e9 for both coefficient sets), and so does q = acc + bias when acc_bound + max |bias| < 2^31 - 1
// (acc_bound: the caller's bound on |acc|, the engine's 255 128 K for a K-deep GEMM; otherwise q, |q| and the
// shifts run in int64); g = q w is 32 x 32 -> 64 bit.
// Work runs in tiles of kGeluRows rows x kGeluCols columns, so that a tile's per-column constants stay in L1 across
// its rows.
constexpr i64 kGeluCols = 256, kGeluRows = 32;
// Rows of the accumulator fetched ahead inside a tile (measured: a third of the kernel's time was the first load of
// each accumulator row before this).
constexpr i64 kGeluPrefetchRows = 2;

// One FC1 layer's i-GELU + requant constants, prepared once (the engine builds one per layer at load).
struct GeluPlan {
  i64 N = 0, qmax = 0;
  bool q32 = false;  // the int32 path holds for every accumulator within acc_bound
  // u = min((min(|q|, CAP) >> kr) << kl, -b_int), kl = max(k, 0), kr = max(-k, 0) (capped where any larger shift
  // gives the same u); CAP = ((-b_int) >> kl) + 1 when kl > 0 (any larger |q| saturates the erf), no cap otherwise.
  std::vector<i64> BIA, CAP, KL, KR, BD, S1, RND, SH2;
  std::vector<i32> NB, CI2, ON2, MM, BIA2, CAP2, KL2, KR2;
  GeluDouble GD;  // built on the int32 path (the double form runs there)
};

std::shared_ptr<GeluPlan> gelu_plan(const at::Tensor& bias, const at::Tensor& k_sh, const at::Tensor& b_int,
                                    const at::Tensor& c_int, const at::Tensor& one, const at::Tensor& m,
                                    const at::Tensor& e, int64_t qmax, int64_t acc_bound) {
  check(qmax >= 1 && qmax <= 127, "gelu: 8-bit output only");
  check(acc_bound >= 0, "gelu: acc_bound must be >= 0");
  const i64 N = bias.numel();
  check_tensor(bias, at::kLong, N, "gelu_u8 bias");
  check_tensor(k_sh, at::kLong, N, "gelu_u8 k_sh");
  check_tensor(b_int, at::kLong, N, "gelu_u8 b_int");
  check_tensor(c_int, at::kLong, N, "gelu_u8 c_int");
  check_tensor(one, at::kLong, N, "gelu_u8 one");
  check_tensor(m, at::kLong, N, "gelu_u8 m");
  check_tensor(e, at::kLong, N, "gelu_u8 e");
  const i64* KS = k_sh.data_ptr<i64>();
  const i64* BI = b_int.data_ptr<i64>();
  const i64* CI = c_int.data_ptr<i64>();
  const i64* ON = one.data_ptr<i64>();
  const i64* Mm = m.data_ptr<i64>();
  const i64* E = e.data_ptr<i64>();
  const i64* Bias = bias.data_ptr<i64>();
  const int bits = bit_width(qmax);
  auto P = std::make_shared<GeluPlan>();
  GeluPlan& G = *P;
  G.N = N, G.qmax = qmax;
  // Per-column constants, so that the element loops are branch-free (vectorised, 512-bit on AVX-512).
  for (auto* v : {&G.BIA, &G.CAP, &G.KL, &G.KR, &G.BD, &G.S1, &G.RND, &G.SH2}) v->resize(N);
  for (auto* v : {&G.NB, &G.CI2, &G.ON2, &G.MM, &G.BIA2, &G.CAP2, &G.KL2, &G.KR2}) v->resize(N);
  i64 bmax = 0;
  bool small_k = true;
  for (i64 j = 0; j < N; ++j) {
    check(std::llabs(Mm[j]) <= (i64(1) << 20), "gelu requant multiplier above 2^20");
    check(E[j] >= 1, "gelu requant shift below 1");
    check(-BI[j] >= 0 && -BI[j] <= 46340 && std::llabs(CI[j]) < (i64(1) << 31) - (i64(1) << 14) &&
              std::llabs(ON[j]) < (i64(1) << 17),
          "gelu constants outside the int32 erf bounds (-b_int <= 46340, |c_int| < 2^31 - 2^14, |one| < 2^17)");
    G.BIA[j] = Bias[j];
    bmax = std::max<i64>(bmax, std::llabs(Bias[j]));
    G.NB[j] = i32(-BI[j]);
    G.CI2[j] = i32(CI[j]);
    G.ON2[j] = i32(ON[j]);
    G.MM[j] = i32(Mm[j]);
    const i64 k = KS[j];
    G.KL[j] = k > 0 ? (k > 62 ? 62 : k) : 0;
    G.KR[j] = k < 0 ? (-k > 63 ? 63 : -k) : 0;
    G.CAP[j] = G.KL[j] > 0 ? (i64(G.NB[j]) >> G.KL[j]) + 1 : INT64_MAX;
    small_k = small_k && G.KL[j] <= 30;  // CAP << kl <= -b_int + 2^kl < 2^31
    G.KL2[j] = i32(std::min<i64>(G.KL[j], 30));
    G.KR2[j] = i32(std::min<i64>(G.KR[j], 31));  // |q| < 2^31: >> 31 gives the 0 of every larger shift
    G.CAP2[j] = i32(std::min<i64>(G.CAP[j], INT32_MAX));
    const i64 ee = E[j] > 72 ? 72 : E[j];  // |z m| < 2^71 after the saturation: 0 for every larger shift too
    const i64 bexp = ee + bits - 19;
    G.BD[j] = i64(1) << (bexp > 0 ? bexp : 0);
    G.S1[j] = ee > 41 ? ee - 41 : 0;
    G.RND[j] = i64(1) << (ee - 1 - G.S1[j]);
    G.SH2[j] = ee - G.S1[j];
  }
  G.q32 = small_k && bmax + std::min<i64>(acc_bound, INT32_MAX) < (i64(1) << 31) - 1;
  for (i64 j = 0; j < N && G.q32; ++j) G.BIA2[j] = i32(G.BIA[j]);
  // The requant in exact doubles (gelu_requant_double) on the int32 path, from the int64 path's constants.
  if (G.q32) {
    GeluDouble& GD = G.GD;
    for (auto* v : {&GD.bd, &GD.m, &GD.p2s, &GD.inv2s, &GD.r, &GD.inv}) v->resize(N);
    for (i64 j = 0; j < N; ++j) {
      GD.bd[j] = double(G.BD[j]), GD.m[j] = double(Mm[j]);
      GD.p2s[j] = pow2(G.S1[j]), GD.inv2s[j] = pow2(-G.S1[j]);
      GD.r[j] = double(G.RND[j]), GD.inv[j] = pow2_neg(G.SH2[j]);
    }
  }
  return P;
}

void gelu_run(const GeluPlan& G, const at::Tensor& acc, at::Tensor& out, at::Tensor& out_g) {
  check(acc.scalar_type() == at::kInt && acc.is_contiguous() && acc.dim() == 2, "acc: int32 [M, N]");
  const i64 M = acc.size(0), N = acc.size(1);
  check(N == G.N, "gelu_u8: acc columns differ from the plan's");
  check_tensor(out, at::kByte, M * N, "gelu_u8 out");
  check_optional(out_g, at::kLong, M * N, "gelu_u8 out_g");
  const i32* A = acc.data_ptr<i32>();
  u8* O = out.data_ptr<u8>();
  const bool want_g = out_g.defined() && out_g.numel() > 0;
  i64* G64 = want_g ? out_g.data_ptr<i64>() : nullptr;
  const i64 qmax = G.qmax;
  const bool q32 = G.q32;
  const bool dbl = q32 && double_requant_enabled();
  const GeluDouble& GD = G.GD;
  if (dbl) ++g_double_calls;
  const i64 n_cb = (N + kGeluCols - 1) / kGeluCols, n_rb = (M + kGeluRows - 1) / kGeluRows;
#pragma omp parallel num_threads(nthreads()) if (M * N >= kParallelMin)
  {
    i64 qv[kGeluCols], gb[kGeluCols];
    i32 u[kGeluCols], pos[kGeluCols], w[kGeluCols], qq[kGeluCols];
#pragma omp for schedule(static) collapse(2)
    for (i64 rb = 0; rb < n_rb; ++rb) {
      for (i64 cb = 0; cb < n_cb; ++cb) {
        const i64 j0 = cb * kGeluCols, nc = std::min(kGeluCols, N - j0);
        const i64 *__restrict bd = G.BD.data() + j0, *__restrict s1 = G.S1.data() + j0, *__restrict rn = G.RND.data() + j0,
                              *__restrict sh = G.SH2.data() + j0;
        const i32 *__restrict nb = G.NB.data() + j0, *__restrict ci = G.CI2.data() + j0, *__restrict on = G.ON2.data() + j0,
                              *__restrict mm = G.MM.data() + j0;
        const i64 i_end = std::min(M, (rb + 1) * kGeluRows);
        for (i64 i = rb * kGeluRows; i < i_end; ++i) {
          const i32* __restrict a = A + i * N + j0;
          u8* __restrict o = O + i * N + j0;
          // a tile walks kGeluRows rows at a stride of N: more streams than the hardware prefetcher follows
          if (i + kGeluPrefetchRows < i_end)
            for (i64 j = 0; j < nc; j += 16) __builtin_prefetch(a + kGeluPrefetchRows * N + j, 0, 0);

          if (q32) {  // everything in int32, g = q w in 32 x 32 -> 64 bit
            const i32 *__restrict bia = G.BIA2.data() + j0, *__restrict cap = G.CAP2.data() + j0,
                                  *__restrict kl = G.KL2.data() + j0, *__restrict kr = G.KR2.data() + j0;
            for (i64 j = 0; j < nc; ++j) {
              const i32 q = a[j] + bia[j];
              const i32 aq = q < 0 ? -q : q;
              const i32 uc = ((aq < cap[j] ? aq : cap[j]) >> kr[j]) << kl[j];
              const i32 t = (uc < nb[j] ? uc : nb[j]) - nb[j];
              i32 Y = (i32(8192) - ci[j] - t * t) >> 14;
              Y = Y > 0 ? Y : 0;
              qq[j] = q;
              w[j] = on[j] - (q > 0 ? Y : -Y);
            }
            if (G64)
              for (i64 j = 0; j < nc; ++j) G64[i * N + j0 + j] = i64(qq[j]) * i64(w[j]);
            if (dbl) {
              gelu_requant_double(qq, w, nc, GD, j0, double(qmax), o);
              continue;
            }
            for (i64 j = 0; j < nc; ++j) gb[j] = i64(qq[j]) * i64(w[j]);
          } else {  // q, |q| and the erf input's shifts in int64, the erf in int32
            const i64 *__restrict bia = G.BIA.data() + j0, *__restrict cap = G.CAP.data() + j0,
                                  *__restrict kl = G.KL.data() + j0, *__restrict kr = G.KR.data() + j0;
            for (i64 j = 0; j < nc; ++j) {
              const i64 q = i64(a[j]) + bia[j];
              const i64 aq = q < 0 ? -q : q;
              const i64 uc = ((aq < cap[j] ? aq : cap[j]) >> kr[j]) << kl[j];
              qv[j] = q;
              u[j] = i32(uc < nb[j] ? uc : nb[j]);
              pos[j] = q > 0;
            }
            for (i64 j = 0; j < nc; ++j) {
              const i32 t = u[j] - nb[j];
              i32 Y = (i32(8192) - ci[j] - t * t) >> 14;
              Y = Y > 0 ? Y : 0;
              w[j] = on[j] - (pos[j] ? Y : -Y);
            }
            for (i64 j = 0; j < nc; ++j) gb[j] = qv[j] * w[j];
          }
          if (G64 && !q32) std::copy(gb, gb + nc, G64 + i * N + j0);
          for (i64 j = 0; j < nc; ++j) {  // requant: saturate, split, two 32 x 32 -> 64 bit products
            const i64 z = gb[j] < -bd[j] ? -bd[j] : (gb[j] > bd[j] ? bd[j] : gb[j]);
            const i64 zh = z >> s1[j];
            const i64 zl = z - (zh << s1[j]);
            i64 v = (i64(i32(zh)) * i64(mm[j]) + rn[j] + ((i64(i32(zl)) * i64(mm[j])) >> s1[j])) >> sh[j];
            v = v < -qmax ? -qmax : (v > qmax ? qmax : v);
            o[j] = u8(v + 128);
          }
        }
      }
    }
  }
}

void gelu_u8(const at::Tensor& acc, const at::Tensor& bias, const at::Tensor& k_sh, const at::Tensor& b_int,
             const at::Tensor& c_int, const at::Tensor& one, const at::Tensor& m, const at::Tensor& e, int64_t qmax,
             int64_t acc_bound, at::Tensor& out, at::Tensor& out_g) {
  check(acc.scalar_type() == at::kInt && acc.is_contiguous() && acc.dim() == 2, "acc: int32 [M, N]");
  check(qmax >= 1 && qmax <= 127, "gelu: 8-bit output only");
  check(acc_bound >= 0, "gelu: acc_bound must be >= 0");
  check_tensor(bias, at::kLong, acc.size(1), "gelu_u8 bias");
  gelu_run(*gelu_plan(bias, k_sh, b_int, c_int, one, m, e, qmax, acc_bound), acc, out, out_g);
}

}  // namespace

// Named arguments: the engine calls every kernel by keyword.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("attention_u8", &attention_u8, py::arg("acc"), py::arg("bias"), py::arg("m"), py::arg("e"),
          py::arg("qmax"), py::arg("batch"), py::arg("seq_len"), py::arg("heads"), py::arg("key_pad"),
          py::arg("lut"), py::arg("ctx_m"), py::arg("ctx_e"), py::arg("out"), py::arg("q_out"), py::arg("k_out"),
          py::arg("v_out"), py::arg("p_out"));
  // Prepared constants (one plan per layer, built at engine load) and the calls that run them; the one-shot
  // functions above build a plan per call.
  py::class_<AttnPlan, std::shared_ptr<AttnPlan>>(mod, "AttnPlan");
  py::class_<ResidPlan, std::shared_ptr<ResidPlan>>(mod, "ResidPlan");
  py::class_<GeluPlan, std::shared_ptr<GeluPlan>>(mod, "GeluPlan");
  mod.def("attention_plan", &attention_plan, py::arg("bias"), py::arg("m"), py::arg("e"), py::arg("qmax"),
          py::arg("heads"), py::arg("lut"), py::arg("ctx_m"), py::arg("ctx_e"));
  mod.def("attention_run", &attention_run, py::arg("plan"), py::arg("acc"), py::arg("batch"), py::arg("seq_len"),
          py::arg("key_pad"), py::arg("out"), py::arg("q_out"), py::arg("k_out"), py::arg("v_out"), py::arg("p_out"));
  mod.def("resid_ln_plan", &resid_ln_plan, py::arg("bias"), py::arg("m_a"), py::arg("e_a"), py::arg("m_r"),
          py::arg("e_r"), py::arg("qmax22"), py::arg("shift"), py::arg("ln_bint"), py::arg("next_m"),
          py::arg("next_e"), py::arg("next_qmax"));
  mod.def("resid_ln_run", &resid_ln_run, py::arg("plan"), py::arg("acc"), py::arg("resid_u8"), py::arg("out_u8"),
          py::arg("out_q"), py::arg("out_q22"));
  mod.def("gelu_plan", &gelu_plan, py::arg("bias"), py::arg("k_sh"), py::arg("b_int"), py::arg("c_int"),
          py::arg("one"), py::arg("m"), py::arg("e"), py::arg("qmax"), py::arg("acc_bound"));
  mod.def("gelu_run", &gelu_run, py::arg("plan"), py::arg("acc"), py::arg("out"), py::arg("out_g"));
  mod.def("softmax_u8", &softmax_u8, py::arg("scores"), py::arg("key_pad"), py::arg("lut"), py::arg("out"));
  mod.def("resid_ln", &resid_ln, py::arg("acc"), py::arg("bias"), py::arg("m_a"), py::arg("e_a"),
          py::arg("resid_u8"), py::arg("m_r"), py::arg("e_r"), py::arg("qmax22"), py::arg("shift"),
          py::arg("ln_bint"), py::arg("next_m"), py::arg("next_e"), py::arg("next_qmax"), py::arg("out_u8"),
          py::arg("out_q"), py::arg("out_q22"));
  mod.def("embed_ln", &embed_ln, py::arg("tokens"), py::arg("positions"), py::arg("pad_rows"), py::arg("tok_w"),
          py::arg("pos_w"), py::arg("m_t"), py::arg("e_t"), py::arg("m_p"), py::arg("e_p"), py::arg("qmax16"),
          py::arg("shift"), py::arg("ln_bint"), py::arg("next_m"), py::arg("next_e"), py::arg("next_qmax"),
          py::arg("out_u8"), py::arg("out_q"), py::arg("out_q16"));
  mod.def("set_double_requant", &set_double_requant, py::arg("on"),
          "False forces the int64 requantization formulas (tests compare them with the exact-double ones)");
  mod.def("double_requant_active", &double_requant_active,
          "Whether resid_ln / gelu_u8 may use their exact-double requantization (AVX2 builds without AVX-512)");
  mod.def("double_requant_calls", &double_requant_calls, "Kernel calls so far that took the exact-double form");
  mod.def("gelu_u8", &gelu_u8, py::arg("acc"), py::arg("bias"), py::arg("k_sh"), py::arg("b_int"),
          py::arg("c_int"), py::arg("one"), py::arg("m"), py::arg("e"), py::arg("qmax"), py::arg("acc_bound"),
          py::arg("out"), py::arg("out_g"));
}
