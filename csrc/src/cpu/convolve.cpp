// CPU backend of the broadening stage: the direct correlation of one spectrum with one kernel.
//
// Direct, not FFT, by measurement (benchmarks/results): with register-blocked outputs the widest kernel of
// the label ranges (v sin i = 300 km/s and R = 1000: 775 taps) takes about as long as the FFTs of the
// segment windows would, and the usual kernels (tens of taps) take a small fraction of it.
#include "../broadening.hpp"
#include "../internal.hpp"


namespace fastspec::detail::cpu {

// 64 outputs at a time stay in registers (4 AVX-512 or 8 AVX2 vectors) while the kernel streams past: two
// loads per FMA vector and no stores until the block is done.
namespace {
FASTSPEC_ALWAYS_INLINE void correlate_body(const float* x, int n, const float* k, int half, float* y) {
    constexpr int B = 128;
    const int taps = 2 * half + 1;
    for (int i0 = 0; i0 < n; i0 += B) {
        float acc[B] = {};
        const float* src = x + i0 + half;  // x[i - m] for m = -half .. half is src[j - t], t = m + half
        for (int t = 0; t < taps; ++t) {
            const float w = k[t];
            const float* s = src - t;
            for (int j = 0; j < B; ++j) acc[j] += w * s[j];
        }
        for (int j = 0; j < B; ++j) y[i0 + j] = acc[j];
    }
}
}  // namespace

FASTSPEC_KERNEL_VARIANTS(correlate, (const float* x, int n, const float* k, int half, float* y), (x, n, k, half, y))

}  // namespace fastspec::detail::cpu
