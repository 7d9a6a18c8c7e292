// The CPU backend's fused epilogues against double precision: the branch-free exp used by the sigmoid
// (every float in a dense sweep of its range) and the bias+ReLU / bias+sigmoid+transform passes on
// odd sizes (vector remainders), in whichever variant (AVX-512, AVX2, baseline) this CPU dispatches to.
#include <limits>

#include "internal.hpp"
#include "test_util.hpp"

namespace cpu = fastspec::detail::cpu;

int main() {
    std::mt19937_64 rng(test_seed("test_kernels"));
    double worst = 0;
    float worst_x = 0;
    for (float x = -87.0f; x <= 88.0f; x += 0.000977f) {  // ~180k points across the whole range
        const double ref = std::exp(double(x)), err = std::abs(double(cpu::fast_exp(x)) - ref) / ref;
        if (err > worst) worst = err, worst_x = x;
    }
    std::printf("test_kernels: fast_exp max relative error %.3g at x = %g\n", worst, double(worst_x));
    CHECK_MSG(worst <= 3e-7, "fast_exp relative error %g at %g", worst, double(worst_x));
    CHECK(cpu::fast_exp(-1000.0f) >= 0.0f && cpu::fast_exp(-1000.0f) < 1e-37f);
    CHECK(std::isfinite(cpu::fast_exp(1000.0f)) && cpu::fast_exp(1000.0f) > 1e38f);
    CHECK(std::abs(cpu::fast_exp(0.0f) - 1.0f) <= 1e-7f);

    std::normal_distribution<float> nd(0.0f, 6.0f);
    for (int out : {1, 7, 16, 33, 1000, 1031}) {
        for (std::size_t rows : {std::size_t(1), std::size_t(3)}) {
            std::vector<float> y(rows * out), b(out);
            for (auto& v : y) v = nd(rng);
            for (auto& v : b) v = nd(rng);
            y[0] = -200.0f;  // saturating inputs
            if (y.size() > 1) y[1] = 200.0f;
            const float scale = 1.7f, offset = -0.3f;
            auto z = y;
            cpu::bias_relu(z.data(), rows, b.data(), out);
            for (std::size_t i = 0; i < y.size(); ++i) CHECK(z[i] == std::max(y[i] + b[i % out], 0.0f));
            z = y;
            cpu::bias_sigmoid_output(z.data(), rows, b.data(), out, scale, offset);
            double err = 0;
            for (std::size_t i = 0; i < y.size(); ++i) {
                const double a = double(y[i] + b[i % out]);  // the sum is rounded to float in the kernel too
                const double ref = scale / (1.0 + std::exp(-a)) + offset;
                err = std::max(err, std::abs(z[i] - ref) / std::max(std::abs(ref), 0.1 * scale));
            }
            CHECK_MSG(err <= 1e-6, "sigmoid epilogue out=%d rows=%zu: rel error %g", out, rows, err);
        }
    }
    // The batch-1 GEMV on 16-bit weights (where the CPU has AVX-512F), all tail lengths, f16 and bf16,
    // against double precision on the same (exactly representable) weights.
    if (!cpu::have_avx512f()) {
        std::printf("test_kernels: no AVX-512F here: gemv16 not tested (the float32 path is used instead)\n");
    } else {
        std::uniform_int_distribution<int> k(-255, 255);
        std::normal_distribution<float> nx(0.0f, 1.0f);
        for (bool bf16 : {false, true})
            for (int in : {1, 5, 15, 16, 17, 31, 106, 1000})
                for (int out : {1, 3, 4, 5, 8, 9, 13, 16, 29}) {
                    std::vector<float> W(std::size_t(in) * out), x(in), y(out, std::nanf(""));
                    std::vector<std::uint16_t> W16(W.size());
                    for (std::size_t i = 0; i < W.size(); ++i) {
                        W[i] = std::ldexp(float(k(rng)), -10);
                        std::uint32_t bits;
                        std::memcpy(&bits, &W[i], 4);
                        W16[i] = bf16 ? std::uint16_t(bits >> 16) : exact_to_half(W[i]);
                    }
                    for (auto& v : x) v = nx(rng);
                    cpu::gemv16(W16.data(), bf16, in, out, x.data(), y.data());
                    for (int o = 0; o < out; ++o) {
                        double ref = 0, mag = 0;
                        for (int i = 0; i < in; ++i) {
                            ref += double(W[std::size_t(o) * in + i]) * x[i];
                            mag += std::abs(double(W[std::size_t(o) * in + i]) * x[i]);
                        }
                        // float32 accumulation: error bounded by ~in * eps * sum |w x|
                        CHECK_MSG(std::abs(y[o] - ref) <= 1e-6 * mag + 1e-30, "gemv16 bf16=%d in=%d out=%d row %d: %g vs %g",
                                  int(bf16), in, out, o, double(y[o]), ref);
                    }
                }
    }
    return finish("test_kernels");
}
