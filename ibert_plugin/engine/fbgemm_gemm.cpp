// Integer linear GEMMs through fbgemm (shipped inside libtorch_cpu), run in torch's OpenMP pool.
//
// Y[M, N] (int32) = A_u8[M, K] @ W_s8[N, K]^T, raw accumulators of the u8 operand (the engine stores s8 activations
// as x + 128 and folds -128 * colsum(W) into the bias). Two kernels (see docs/integer_spec.md, CPU kernel reference §7):
//   * acc32: PackAMatrix<u8, int32> x PackBMatrix<s8, int32>; on AVX2 without VNNI the u8 x s8 pair sums saturate
//     int16, so it is exact only for |w| <= 64 (7-bit or ternary weights); the start-up self-test checks it.
//   * acc16 (ternary): int16 accumulation over K blocks of KCB = 128 (128 * 255 * 1 = 32640 <= 32767), then int32;
//     exact for |w| <= 1 only.
// The weights are packed once; the int8 source is not kept, so the packed panel is the only resident copy.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <fbgemm/Fbgemm.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <memory>

namespace {

// Work below this many MACs runs on one thread (an OpenMP barrier costs more than the work at tiny M).
constexpr int64_t kParallelMinMacs = int64_t(1) << 22;

class PackedLinear {
 public:
  PackedLinear(const at::Tensor& w, bool acc16) : acc16_(acc16) {
    TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar, "weight must be int8 [N, K]");
    TORCH_CHECK(fbgemm::fbgemmSupportedCPU(), "fbgemm does not support this CPU");
    at::Tensor wc = w.contiguous();
    N_ = static_cast<int>(wc.size(0));
    K_ = static_cast<int>(wc.size(1));
    const int8_t* src = wc.data_ptr<int8_t>();
    if (acc16_) {
      TORCH_CHECK(!fbgemm::fbgemmHasAvx512Support(), "acc16 route is tuned for AVX2 blocking only");
      // fbgemm's AVX2 int16-accumulation defaults with KCB halved to 128 so the int16 block sums cannot saturate.
      bf_ = fbgemm::BlockingFactors{3, 16, 16, 2, 60, 128, 64};
      b16_ = std::make_unique<fbgemm::PackBMatrix<int8_t, int16_t>>(fbgemm::matrix_op_t::Transpose, K_, N_, src, K_,
                                                                     nullptr, 1, &bf_);
      packed_bytes_ = int64_t(b16_->blockRows()) * b16_->blockCols() * b16_->blockRowSize() * b16_->blockColSize();
    } else {
      // AVX2 defaults with KCB 512 -> 256: K = 768 then packs without padding to 1024 (a third less memory for the
      // 768-wide weights); AVX-512 defaults already use KCB = 256.
      if (!fbgemm::fbgemmHasAvx512Support()) {
        bf_ = fbgemm::BlockingFactors{12, 8, 8, 4, 120, 256, 8};
        bfp_ = &bf_;
      }
      b32_ = std::make_unique<fbgemm::PackBMatrix<int8_t, int32_t>>(fbgemm::matrix_op_t::Transpose, K_, N_, src, K_,
                                                                     nullptr, 1, bfp_);
      packed_bytes_ = int64_t(b32_->blockRows()) * b32_->blockCols() * b32_->blockRowSize() * b32_->blockColSize();
    }
  }

  void run(const at::Tensor& a, at::Tensor& out) const {
    TORCH_CHECK(a.scalar_type() == at::kByte && a.is_contiguous() && a.size(-1) == K_, "a: contiguous u8 [M, K]");
    const int64_t M64 = a.numel() / K_;
    TORCH_CHECK(out.scalar_type() == at::kInt && out.is_contiguous() && out.numel() == M64 * N_, "out: int32 [M, N]");
    TORCH_CHECK(M64 < (int64_t(1) << 31), "too many rows");
    const int M = static_cast<int>(M64);
    if (M == 0) return;
    const uint8_t* A = a.data_ptr<uint8_t>();
    int32_t* C = out.data_ptr<int32_t>();
    const int nth = (M64 * K_ * N_ >= kParallelMinMacs) ? std::max(1, at::get_num_threads()) : 1;
#pragma omp parallel num_threads(nth)
    {
      const int tid = omp_get_thread_num();
      const int n = omp_get_num_threads();
      fbgemm::DoNothing<int32_t, int32_t> done;
      fbgemm::memCopy<int32_t, int32_t> copy(done);
      if (acc16_) {
        fbgemm::PackAMatrix<uint8_t, int16_t> pa(fbgemm::matrix_op_t::NoTranspose, M, K_, A, K_, nullptr, 1, &bf_);
        fbgemm::fbgemmPacked(pa, *b16_, C, C, static_cast<uint32_t>(N_), copy, tid, n, &bf_);
      } else {
        fbgemm::PackAMatrix<uint8_t, int32_t> pa(fbgemm::matrix_op_t::NoTranspose, M, K_, A, K_, nullptr, 1, bfp_);
        fbgemm::fbgemmPacked(pa, *b32_, C, C, static_cast<uint32_t>(N_), copy, tid, n, bfp_);
      }
    }
  }

  int64_t packed_bytes() const { return packed_bytes_; }
  int64_t n() const { return N_; }
  int64_t k() const { return K_; }
  bool acc16() const { return acc16_; }

 private:
  bool acc16_;
  int N_ = 0, K_ = 0;
  int64_t packed_bytes_ = 0;
  fbgemm::BlockingFactors bf_{};
  const fbgemm::BlockingFactors* bfp_ = nullptr;  // nullptr: fbgemm's defaults for the running ISA
  std::unique_ptr<fbgemm::PackBMatrix<int8_t, int32_t>> b32_;
  std::unique_ptr<fbgemm::PackBMatrix<int8_t, int16_t>> b16_;
};

bool cpu_supported() { return fbgemm::fbgemmSupportedCPU(); }
bool has_avx512() { return fbgemm::fbgemmHasAvx512Support(); }
bool has_vnni() { return fbgemm::fbgemmHasAvx512VnniSupport(); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<PackedLinear>(m, "PackedLinear")
      .def(pybind11::init<const at::Tensor&, bool>(), pybind11::arg("w"), pybind11::arg("acc16") = false)
      .def("run", &PackedLinear::run, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def_property_readonly("packed_bytes", &PackedLinear::packed_bytes)
      .def_property_readonly("n", &PackedLinear::n)
      .def_property_readonly("k", &PackedLinear::k)
      .def_property_readonly("acc16", &PackedLinear::acc16);
  m.def("cpu_supported", &cpu_supported);
  m.def("has_avx512", &has_avx512);
  m.def("has_vnni", &has_vnni);
}
