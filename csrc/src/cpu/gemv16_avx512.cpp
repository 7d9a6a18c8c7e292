// Batch-1 GEMV that reads float16 / bfloat16 weights directly (AVX-512F): y = W x, W (out, in).
//
// At batch 1 the decoder is memory-bound: every weight is read once per spectrum. Reading the 16-bit
// weights as stored halves the bytes against the widened float32 copy. Each 16-bit value is widened
// in registers (exactly: vcvtph2ps, or a 16-bit shift for bfloat16) and accumulated in float32 with
// FMA, so results match the float32 path up to summation order. Compiled for AVX-512F only (target
// attribute) and called only after a runtime CPU check (have_avx512f); other CPUs use OpenBLAS sgemv.
#include <algorithm>
#include <cstring>

#include "../internal.hpp"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTSPEC_HAVE_GEMV16 1
// GCC 12's AVX-512 headers trip -Wuninitialized on their own _mm512_undefined_* placeholders.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#endif

namespace fastspec::detail::cpu {

#ifdef FASTSPEC_HAVE_GEMV16
namespace {

template <bool BF16>
__attribute__((target("avx512f"))) inline __m512 widen16(const std::uint16_t* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    if constexpr (BF16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    else
        return _mm512_cvtph_ps(h);
}

// The last in % 16 weights of a row, zero-padded to 16 through a small buffer (never reads past the row).
template <bool BF16>
__attribute__((target("avx512f"))) inline __m512 widen_tail(const std::uint16_t* p, int n) {
    alignas(32) std::uint16_t buf[16] = {};
    std::memcpy(buf, p, sizeof(std::uint16_t) * n);
    return widen16<BF16>(buf);
}

template <bool BF16, int R>
__attribute__((target("avx512f"))) inline void rows_block(const std::uint16_t* W, int in, const float* x, float* y) {
    const int full = in / 16 * 16, tail = in - full;
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int i = 0; i < full; i += 16) {
        const __m512 xv = _mm512_loadu_ps(x + i);
        for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(widen16<BF16>(W + std::size_t(r) * in + i), xv, acc[r]);
    }
    if (tail) {
        const __m512 xv = _mm512_maskz_loadu_ps(__mmask16((1u << tail) - 1), x + full);
        for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(widen_tail<BF16>(W + std::size_t(r) * in + full, tail), xv, acc[r]);
    }
    for (int r = 0; r < R; ++r) y[r] = _mm512_reduce_add_ps(acc[r]);
}

template <bool BF16>
__attribute__((target("avx512f"))) void gemv16_impl(const std::uint16_t* W, int in, int out, const float* x, float* y) {
    int o = 0;
    for (; o + 8 <= out; o += 8) rows_block<BF16, 8>(W + std::size_t(o) * in, in, x, y + o);
    for (; o + 4 <= out; o += 4) rows_block<BF16, 4>(W + std::size_t(o) * in, in, x, y + o);
    for (; o < out; ++o) rows_block<BF16, 1>(W + std::size_t(o) * in, in, x, y + o);
}

// The same for K vectors at once: each weight is widened once and used K times, so K products stream W from
// memory once (the batch-1 Jacobian's tangents).
template <bool BF16, int R, int K>
__attribute__((target("avx512f"))) inline void rows_block_k(const std::uint16_t* W, int in, const float* X, float* Y,
                                                            int out) {
    const int full = in / 16 * 16, tail = in - full;
    __m512 acc[R][K];
    for (int r = 0; r < R; ++r)
        for (int k = 0; k < K; ++k) acc[r][k] = _mm512_setzero_ps();
    for (int i = 0; i < full; i += 16) {
        __m512 w[R];
        for (int r = 0; r < R; ++r) w[r] = widen16<BF16>(W + std::size_t(r) * in + i);
        for (int k = 0; k < K; ++k) {
            const __m512 xv = _mm512_loadu_ps(X + std::size_t(k) * in + i);
            for (int r = 0; r < R; ++r) acc[r][k] = _mm512_fmadd_ps(w[r], xv, acc[r][k]);
        }
    }
    if (tail) {
        __m512 w[R];
        for (int r = 0; r < R; ++r) w[r] = widen_tail<BF16>(W + std::size_t(r) * in + full, tail);
        for (int k = 0; k < K; ++k) {
            const __m512 xv = _mm512_maskz_loadu_ps(__mmask16((1u << tail) - 1), X + std::size_t(k) * in + full);
            for (int r = 0; r < R; ++r) acc[r][k] = _mm512_fmadd_ps(w[r], xv, acc[r][k]);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int k = 0; k < K; ++k) Y[std::size_t(k) * out + r] = _mm512_reduce_add_ps(acc[r][k]);
}

template <bool BF16, int K>
__attribute__((target("avx512f"))) void gemv16_k(const std::uint16_t* W, int in, int out, const float* X, float* Y) {
    int o = 0;
    for (; o + 4 <= out; o += 4) rows_block_k<BF16, 4, K>(W + std::size_t(o) * in, in, X, Y + o, out);
    for (; o < out; ++o) rows_block_k<BF16, 1, K>(W + std::size_t(o) * in, in, X, Y + o, out);
}

template <bool BF16>
void gemv16_multi_impl(const std::uint16_t* W, int in, int out, const float* X, int k, float* Y) {
    for (int k0 = 0; k0 < k; k0 += 6) {  // 4 rows x 6 vectors: 24 accumulators + 4 weights in 32 registers
        const float* x = X + std::size_t(k0) * in;
        float* y = Y + std::size_t(k0) * out;
        switch (std::min(6, k - k0)) {
            case 1: gemv16_k<BF16, 1>(W, in, out, x, y); break;
            case 2: gemv16_k<BF16, 2>(W, in, out, x, y); break;
            case 3: gemv16_k<BF16, 3>(W, in, out, x, y); break;
            case 4: gemv16_k<BF16, 4>(W, in, out, x, y); break;
            case 5: gemv16_k<BF16, 5>(W, in, out, x, y); break;
            default: gemv16_k<BF16, 6>(W, in, out, x, y); break;
        }
    }
}

}  // namespace

void gemv16_multi(const std::uint16_t* W, bool bf16, int in, int out, const float* X, int k, float* Y) {
    if (bf16)
        gemv16_multi_impl<true>(W, in, out, X, k, Y);
    else
        gemv16_multi_impl<false>(W, in, out, X, k, Y);
}

// The CPU has AVX-512F and FASTSPEC_FORCE_ISA does not ask for a narrower variant.
bool have_avx512f() noexcept { return kernel_isa() == Isa::avx512; }

void gemv16(const std::uint16_t* W, bool bf16, int in, int out, const float* x, float* y) {
    if (bf16)
        gemv16_impl<true>(W, in, out, x, y);
    else
        gemv16_impl<false>(W, in, out, x, y);
}
#else
bool have_avx512f() noexcept { return false; }
void gemv16(const std::uint16_t*, bool, int, int, const float*, float*) {}
void gemv16_multi(const std::uint16_t*, bool, int, int, const float*, int, float*) {}
#endif

}  // namespace fastspec::detail::cpu
