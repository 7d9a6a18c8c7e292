// CPU backend: dense layers through BLAS (blas.hpp), each followed by one fused pass over its output for
// bias + activation (+ output transform).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "../internal.hpp"
#include "blas.hpp"


namespace fastspec::detail::cpu {

namespace {
// y = x W^T. At one row a GEMV streams W once with no packing; a GEMM at rows == 1 packs W first
// and was measured 2.6x slower on the paper-size decoder.
void matmul(const float* x, std::size_t rows, const float* W, int in, int out, float* y) {
    if (rows == 1) {
        blas::gemv(W, out, in, in, x, y);
    } else {
        blas::gemm_xwt(x, int(rows), W, in, out, y);
    }
}
}  // namespace

// exp(x) in float, branch-free so the compiler vectorises the loops that call it (std::exp does not
// vectorise without -ffast-math). Cephes expf: x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial for
// e^r, times 2^n built in the exponent bits. Max relative error 2e-7 on [-87, 88] (tests/cpp/test_kernels).
namespace {
FASTSPEC_ALWAYS_INLINE float exp_approx(float x) {
    x = std::min(std::max(x, -87.0f), 88.0f);
    // round(x / ln2) by the 1.5 * 2^23 trick: exact for |x / ln2| < 2^22 and needs no SSE4.1.
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // Cody-Waite: ln2 in two parts
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const std::int32_t bits = (static_cast<std::int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 127]
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}
}  // namespace

float fast_exp(float x) { return exp_approx(x); }

namespace {
FASTSPEC_ALWAYS_INLINE void bias_relu_body(float* y, std::size_t rows, const float* b, int out) {
    for (std::size_t r = 0; r < rows; ++r) {
        float* yr = y + r * out;
        for (int i = 0; i < out; ++i) yr[i] = std::max(yr[i] + b[i], 0.0f);
    }
}

FASTSPEC_ALWAYS_INLINE void bias_sigmoid_output_body(float* y, std::size_t rows, const float* b, int out, float scale,
                                                     float offset) {
    for (std::size_t r = 0; r < rows; ++r) {
        float* yr = y + r * out;
        for (int i = 0; i < out; ++i) yr[i] = scale / (1.0f + exp_approx(-(yr[i] + b[i]))) + offset;
    }
}
}  // namespace

FASTSPEC_KERNEL_VARIANTS(bias_relu, (float* y, std::size_t rows, const float* b, int out), (y, rows, b, out))
FASTSPEC_KERNEL_VARIANTS(bias_sigmoid_output,
                         (float* y, std::size_t rows, const float* b, int out, float scale, float offset),
                         (y, rows, b, out, scale, offset))

void dense_relu(const float* x, std::size_t rows, const float* W, const float* b, int in, int out, float* y) {
    matmul(x, rows, W, in, out, y);
    bias_relu(y, rows, b, out);
}

void dense_sigmoid_output(const float* x, std::size_t rows, const float* W, const float* b, int in, int out,
                          float scale, float offset, float* y) {
    matmul(x, rows, W, in, out, y);
    bias_sigmoid_output(y, rows, b, out, scale, offset);
}

void dense_relu_16(const float* x, const std::uint16_t* W, bool bf16, const float* b, int in, int out, float* y) {
    gemv16(W, bf16, in, out, x, y);
    bias_relu(y, 1, b, out);
}

void dense_sigmoid_output_16(const float* x, const std::uint16_t* W, bool bf16, const float* b, int in, int out,
                             float scale, float offset, float* y) {
    gemv16(W, bf16, in, out, x, y);
    bias_sigmoid_output(y, 1, b, out, scale, offset);
}

const char* isa_name(Isa isa) noexcept {
    return isa == Isa::avx512 ? "avx512" : isa == Isa::avx2 ? "avx2" : "baseline";
}

bool isa_supported(Isa isa) noexcept {
#ifdef FASTSPEC_HAVE_VARIANTS
    __builtin_cpu_init();
    if (isa == Isa::avx512) return __builtin_cpu_supports("avx512f");
    if (isa == Isa::avx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    return true;
#else
    return isa == Isa::baseline;
#endif
}

namespace {
Isa choose_isa() noexcept {
    if (const char* forced = std::getenv("FASTSPEC_FORCE_ISA"); forced && *forced) {
        for (Isa isa : {Isa::avx512, Isa::avx2, Isa::baseline})
            if (std::strcmp(forced, isa_name(isa)) == 0) {
                if (isa_supported(isa)) return isa;
                std::fprintf(stderr, "fastspec: FASTSPEC_FORCE_ISA=%s, but this CPU (or build) cannot run it\n", forced);
                std::abort();
            }
        std::fprintf(stderr, "fastspec: FASTSPEC_FORCE_ISA=%s: expected avx512, avx2 or baseline\n", forced);
        std::abort();
    }
    for (Isa isa : {Isa::avx512, Isa::avx2})
        if (isa_supported(isa)) return isa;
    return Isa::baseline;
}
}  // namespace

Isa kernel_isa() noexcept {
    static const Isa isa = choose_isa();
    return isa;
}

void ensure_blas_threads(int threads) {
    blas::set_threads(threads);
}

std::string blas_config() { return blas::config(); }

}  // namespace fastspec::detail::cpu
