// A row-major float32 GEMM for XLA's CPU backend (an XLA FFI handler), computed by the
// Fortran `sgemm_` of a BLAS library loaded at run time (mim_jax/blas/__init__.py says why).
#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

typedef void (*SgemmFn)(const char* transa, const char* transb, const int* m, const int* n,
                        const int* k, const float* alpha, const float* a, const int* lda,
                        const float* b, const int* ldb, const float* beta, float* c,
                        const int* ldc);

static SgemmFn sgemm = nullptr;

extern "C" void mim_jax_set_sgemm(void* fn) { sgemm = reinterpret_cast<SgemmFn>(fn); }

// c[m, n] = op(a) op(b), op(x) = x or x^T; a, b and c are dense and row-major.
static ffi::Error Gemm(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                       ffi::ResultBuffer<ffi::F32> c, bool transpose_a, bool transpose_b) {
  if (sgemm == nullptr) return ffi::Error::Internal("mim_jax_sgemm: no sgemm_ was set");
  auto a_dims = a.dimensions();
  auto b_dims = b.dimensions();
  auto c_dims = c->dimensions();
  if (a_dims.size() != 2 || b_dims.size() != 2 || c_dims.size() != 2)
    return ffi::Error::InvalidArgument("mim_jax_sgemm: operands must be 2-D");
  const int64_t m = transpose_a ? a_dims[1] : a_dims[0];
  const int64_t k = transpose_a ? a_dims[0] : a_dims[1];
  const int64_t k_b = transpose_b ? b_dims[1] : b_dims[0];
  const int64_t n = transpose_b ? b_dims[0] : b_dims[1];
  if (k != k_b || c_dims[0] != m || c_dims[1] != n)
    return ffi::Error::InvalidArgument("mim_jax_sgemm: shapes do not match");
  if (m > INT32_MAX || n > INT32_MAX || k > INT32_MAX || a_dims[1] > INT32_MAX ||
      b_dims[1] > INT32_MAX)
    return ffi::Error::InvalidArgument("mim_jax_sgemm: a dimension exceeds 32-bit BLAS");
  float* out = c->typed_data();
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {  // BLAS would leave c alone; XLA's buffer is uninitialised
    for (int64_t i = 0; i < m * n; ++i) out[i] = 0.0f;
    return ffi::Error::Success();
  }
  const int mi = m, ni = n, ki = k, lda = a_dims[1], ldb = b_dims[1], ldc = n;
  const float one = 1.0f, zero = 0.0f;
  const char op_a = transpose_a ? 'T' : 'N', op_b = transpose_b ? 'T' : 'N';
  // Row-major c = op(a) op(b) is column-major c^T = op(b)^T op(a)^T, where each row-major
  // matrix read column-major is its transpose: so b comes first, untouched.
  sgemm(&op_b, &op_a, &ni, &mi, &ki, &one, b.typed_data(), &ldb, a.typed_data(), &lda, &zero,
        out, &ldc);
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(MimJaxSgemm, Gemm,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b"));
