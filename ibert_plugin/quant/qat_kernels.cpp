// Fused CPU kernels of the symmetric-mode QAT forward: one pass per op instead of PyTorch's chain of elementwise
// kernels over float64 carriers (memory traffic, not arithmetic, is their cost). Each computes exactly what the
// PyTorch reference in primitives.py / nonlinear.py computes (every step there is exact: see the docstrings), and
// tests/test_qat_kernels.py checks the two bit for bit; the PyTorch code stays the path on other devices.
//
//   requant_clamp: out = clamp(R(z, m, e) [+ R(z_id, m_id, e_id)], -n, n) as float32, R = floor((z m + 2^(e-1)) / 2^e)
//       (I-BERT dyadic requantization), by the reference's exact float64 split for float64 z (|z| < 2^51) and its
//       one exact product for float32 z (|z| < 2^24); non-integer z (training-time dropout) rounds as there.
//   int_gelu: I-BERT i-GELU (Eq. 8-9, Algorithm 2, with the per-channel normalisation shift k), float64 out, and the
//       straight-through derivative the backward needs.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

namespace {

using i64 = int64_t;

void check(bool ok, const char* msg) { TORCH_CHECK(ok, "ibert QAT kernel: ", msg); }

// Per-channel (C,) or per-tensor (1,) float64 constants over the last dim of a [rows, C] view.
struct Chan {
  const double* p;
  bool per_channel;
  inline double at(i64 c) const { return per_channel ? p[c] : p[0]; }
};

Chan chan(const at::Tensor& t, i64 C, const char* name) {
  check(t.scalar_type() == at::kDouble && t.is_contiguous() && (t.numel() == 1 || t.numel() == C), name);
  return Chan{t.data_ptr<double>(), t.numel() != 1};
}

// Per-channel constants of one requantized operand (see primitives._requant_forward / _requant_f64).
struct Requant {
  bool per_channel;
  // float32 operands: r = m 2^-e (z m is exact: 24 + 21 bits)
  std::vector<double> r;
  // float64 operands, the exact split z = zh 2^s + zl of _requant_f64 with e capped at 72, s = clamp(e - 1, 0, 31):
  // 2^-s, 2^s, m 2^-s, m, 2^(s - e)
  std::vector<double> p2ms, p2s, mps, m, p2se;
  Requant(const at::Tensor& mt, const at::Tensor& et, i64 C) {
    const Chan mc = chan(mt, C, "m: float64 (1,) or (C,)"), ec = chan(et, C, "e: float64 like m");
    check(mt.numel() == et.numel(), "m and e: same shape");
    per_channel = mc.per_channel;
    const i64 n = mt.numel();
    r.resize(n), p2ms.resize(n), p2s.resize(n), mps.resize(n), m.resize(n), p2se.resize(n);
    for (i64 c = 0; c < n; ++c) {
      const double mv = mc.p[c], ev = ec.p[c];
      check(ev >= 1 && ev <= 1000 && std::floor(ev) == ev && std::floor(mv) == mv, "dyadic (m, e): integers, e >= 1");
      r[c] = mv * std::ldexp(1.0, -int(ev));
      const double e = ev < 72 ? ev : 72, sh = std::min(std::max(e - 1, 0.0), 31.0);
      p2ms[c] = std::ldexp(1.0, -int(sh));
      p2s[c] = std::ldexp(1.0, int(sh));
      mps[c] = mv * p2ms[c];
      m[c] = mv;
      p2se[c] = std::ldexp(1.0, int(sh - e));
    }
  }
};

// One operand's R = floor((z m + 2^(e-1)) / 2^e) over a row (stored, or added into acc), exactly the reference's
// float64 operations (each exact for the integers of its domain), one branch-free loop per case.
template <bool kAdd, bool kPerChannel>
void requant_row_f64(const double* __restrict z, i64 C, const Requant& q, double* __restrict acc) {
  const double *__restrict p2ms = q.p2ms.data(), *__restrict p2s = q.p2s.data(), *__restrict mps = q.mps.data(),
                           *__restrict m = q.m.data(), *__restrict p2se = q.p2se.data();
#pragma omp simd
  for (i64 c = 0; c < C; ++c) {
    const i64 k = kPerChannel ? c : 0;
    const double zh = std::floor(z[c] * p2ms[k]);
    const double lo = std::floor(std::nearbyint(z[c] - zh * p2s[k]) * mps[k]);
    const double u = lo + zh * m[k];
    const double v = std::floor(u * p2se[k] + 0.5);
    acc[c] = kAdd ? acc[c] + v : v;
  }
}

template <bool kAdd, bool kPerChannel>
void requant_row_f32(const float* __restrict z, i64 C, const Requant& q, double* __restrict acc) {
  const double* __restrict r = q.r.data();
#pragma omp simd
  for (i64 c = 0; c < C; ++c) {
    const double v = std::floor(double(z[c]) * r[kPerChannel ? c : 0] + 0.5);
    acc[c] = kAdd ? acc[c] + v : v;
  }
}

template <bool kAdd>
void requant_row(const at::Tensor& z, i64 row, i64 C, const Requant& q, double* acc) {
  if (z.scalar_type() == at::kFloat) {
    const float* zr = z.data_ptr<float>() + row * C;
    q.per_channel ? requant_row_f32<kAdd, true>(zr, C, q, acc) : requant_row_f32<kAdd, false>(zr, C, q, acc);
  } else {
    const double* zr = z.data_ptr<double>() + row * C;
    q.per_channel ? requant_row_f64<kAdd, true>(zr, C, q, acc) : requant_row_f64<kAdd, false>(zr, C, q, acc);
  }
}

void check_operand(const at::Tensor& z, const char* name) {
  check(z.device().is_cpu() && z.is_contiguous() && (z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble),
        name);
}

at::Tensor requant_clamp(const at::Tensor& z, const at::Tensor& m, const at::Tensor& e,
                         const c10::optional<at::Tensor>& z_id, const c10::optional<at::Tensor>& m_id,
                         const c10::optional<at::Tensor>& e_id, int64_t n) {
  check_operand(z, "z: contiguous float32/float64 CPU tensor");
  check(z.dim() >= 1 && n >= 1 && n < (i64(1) << 24), "z: at least 1-D; 1 <= n < 2^24");
  const i64 C = z.size(-1), rows = C ? z.numel() / C : 0;
  const Requant q(m, e, C);
  const bool has_id = z_id.has_value() && z_id->defined();
  std::unique_ptr<Requant> qi;
  if (has_id) {
    check_operand(*z_id, "z_id: contiguous float32/float64 CPU tensor");
    check(z_id->sizes() == z.sizes(), "z_id: the shape of z");
    qi.reset(new Requant(*m_id, *e_id, C));
  }
  at::Tensor out = at::empty(z.sizes(), z.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  const double lim = double(n);
  at::parallel_for(0, rows, 64, [&](int64_t lo, int64_t hi) {
    std::vector<double> acc(C);
    for (i64 row = lo; row < hi; ++row) {
      requant_row<false>(z, row, C, q, acc.data());
      if (has_id) requant_row<true>(*z_id, row, C, *qi, acc.data());
      float* __restrict orow = o + row * C;
      const double* __restrict a = acc.data();
#pragma omp simd
      for (i64 c = 0; c < C; ++c) orow[c] = float(a[c] < -lim ? -lim : (a[c] > lim ? lim : a[c]));
    }
  });
  return out;
}

struct GeluRows {
  i64 C;
  const double *p2k, *nb, *bb, *a0, *one, *dk;
  double inv;
  double *out, *deriv;
};

// One branch-free loop per (input dtype, derivative) so that it vectorises.
template <typename T, bool kDeriv>
void gelu_rows(const GeluRows& P, const T* q, i64 lo, i64 hi) {
  const i64 C = P.C;
  const double inv = P.inv;
  // restrict-qualified locals: without them the many constant arrays defeat GCC's alias versioning (scalar code)
  const double *__restrict p2k = P.p2k, *__restrict nb = P.nb, *__restrict bb = P.bb, *__restrict a0 = P.a0,
                           *__restrict one = P.one, *__restrict dk = P.dk;
  for (i64 row = lo; row < hi; ++row) {
    const T* __restrict qr = q + row * C;
    double* __restrict o = P.out + row * C;
    double* __restrict d = kDeriv ? P.deriv + row * C : nullptr;
#pragma omp simd
    for (i64 c = 0; c < C; ++c) {
      const double x = double(qr[c]);
      double t = std::floor(std::fabs(x) * p2k[c]);
      t = (t < nb[c] ? t : nb[c]) + bb[c];
      const double y = std::floor(a0[c] - t * t * inv);
      const double sg = double(x > 0) - double(x < 0);
      const double w = one[c] - y * sg;
      o[c] = x * w;
      if (kDeriv) d[c] = w + x * (t * dk[c]);
    }
  }
}

// i-GELU on an integer accumulator q [.., C] (float64 or float32 integers) with per-channel constants (see
// nonlinear.int_gelu): t = min(floor(|q| 2^k), -b) + b; Y = floor((2^(S-1) - c - t^2) / 2^S); w = one - sgn(q) Y;
// q_out = q w. With need_deriv also deriv = w + q t 2^k 2^-(S-1) (the STE slope). Every step is exact in float64.
std::vector<at::Tensor> int_gelu(const at::Tensor& q, const at::Tensor& shift, const at::Tensor& b_int,
                                 const at::Tensor& c_int, const at::Tensor& one, int64_t gelu_shift, bool need_deriv) {
  check_operand(q, "q: contiguous float32/float64 CPU tensor");
  check(q.dim() >= 1 && gelu_shift >= 1 && gelu_shift < 30, "q: at least 1-D; 1 <= gelu_shift < 30");
  const i64 C = q.size(-1), rows = C ? q.numel() / C : 0;
  const Chan K = chan(shift, C, "shift: float64 (1,) or (C,)"), B = chan(b_int, C, "b_int: float64 like shift"),
             Cc = chan(c_int, C, "c_int: float64 like shift"), O = chan(one, C, "one: float64 like shift");
  std::vector<double> p2k(C), nb(C), bb(C), a0(C), oo(C), dk(C);
  const double inv = std::ldexp(1.0, -int(gelu_shift));
  for (i64 c = 0; c < C; ++c) {
    p2k[c] = std::ldexp(1.0, int(K.at(c)));
    bb[c] = B.at(c);
    nb[c] = -bb[c];
    a0[c] = (std::ldexp(1.0, int(gelu_shift - 1)) - Cc.at(c)) * inv;  // as the reference's addcmul constant
    oo[c] = O.at(c);
    dk[c] = p2k[c] * std::ldexp(1.0, -int(gelu_shift - 1));
  }
  auto opt = q.options().dtype(at::kDouble);
  at::Tensor out = at::empty(q.sizes(), opt);
  at::Tensor deriv = need_deriv ? at::empty(q.sizes(), opt) : at::empty({0}, opt);
  const GeluRows P{C, p2k.data(), nb.data(), bb.data(), a0.data(), oo.data(), dk.data(), inv,
                   out.data_ptr<double>(), need_deriv ? deriv.data_ptr<double>() : nullptr};
  at::parallel_for(0, rows, 32, [&](int64_t lo, int64_t hi) {
    if (q.scalar_type() == at::kFloat) {
      need_deriv ? gelu_rows<float, true>(P, q.data_ptr<float>(), lo, hi)
                 : gelu_rows<float, false>(P, q.data_ptr<float>(), lo, hi);
    } else {
      need_deriv ? gelu_rows<double, true>(P, q.data_ptr<double>(), lo, hi)
                 : gelu_rows<double, false>(P, q.data_ptr<double>(), lo, hi);
    }
  });
  return {out, deriv};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("requant_clamp", &requant_clamp);
  mod.def("int_gelu", &int_gelu);
}
