// The CUDA backend through the public API (host pointers; the device-pointer entry points are covered by
// tests/test_cuda.py with CuPy). Exits 77, which ctest reports as skipped, when no CUDA GPU is usable: the skip
// reason printed starts with "no CUDA GPU".
//
// Stated bounds (max over pixels of |out - ref| / max(|ref|, 0.1 |scale|), the criterion of test_forward.cpp),
// against the float64 reference: f32 1e-5; f16 5e-3; bf16 4e-2 (16-bit activations and hidden biases, fp32
// accumulation; the test weights are exact in every dtype); f32 with tf32 5e-3.
// CPU against CUDA (the same as tests/test_cuda.py): the default model (f16), ||cuda - cpu|| / ||cpu|| <= 2e-3 and
// max |cuda - cpu| <= 1e-2; Jacobian columns ||cuda - cpu|| / ||cpu|| <= 2e-2 (16-bit), 2e-3 (f32). PROVISIONAL:
// set before any GPU run; once the first run (benchmarks/gpu_check.sh) measures them, tighten each to at most 5x
// the measured value, here and in tests/test_cuda.py together.
#include <algorithm>
#include <limits>
#include <memory>
#include <thread>

#include "test_util.hpp"

namespace {

double rel_error(const std::vector<float>& out, const std::vector<double>& ref, double scale) {
    double worst = 0;
    for (std::size_t i = 0; i < ref.size(); ++i) {
        const double e = std::abs(double(out[i]) - ref[i]) / std::max(std::abs(ref[i]), 0.1 * std::abs(scale));
        worst = std::isnan(e) ? std::numeric_limits<double>::infinity() : std::max(worst, e);
    }
    return worst;
}

double bound(std::uint32_t dtype, bool tf32) { return dtype == 1 ? (tf32 ? 5e-3 : 1e-5) : dtype == 2 ? 5e-3 : 4e-2; }

// CPU against CUDA, provisional (see the header; the same numbers as tests/test_cuda.py).
constexpr double kCpuCudaNorm = 2e-3, kCpuCudaMax = 1e-2;  // the default model's flux (f16)
double jacobian_bound(bool f32) { return f32 ? 2e-3 : 2e-2; }  // ||cuda - cpu|| / ||cpu|| per Jacobian column

// Each Jacobian column of b against a (n * np rows, nl columns): the worst ||b - a|| / ||a||.
void check_jacobian_columns(const std::vector<float>& ja, const std::vector<float>& jb, std::size_t rows,
                            std::size_t nl, double limit, const char* what) {
    for (std::size_t j = 0; j < nl; ++j) {
        double num = 0, den = 0;
        for (std::size_t q = 0; q < rows; ++q) {
            const double d = double(ja[q * nl + j]) - jb[q * nl + j];
            num += d * d;
            den += double(ja[q * nl + j]) * ja[q * nl + j];
        }
        const double rel = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
        CHECK_MSG(rel <= limit, "%s: Jacobian column %zu: |cpu - cuda| / |cpu| = %g > %g", what, j, rel, limit);
    }
}

fastspec::DecoderOptions cuda_options(std::size_t max_chunk = 1024, bool graphs = true, bool tf32 = false) {
    fastspec::DecoderOptions o;
    o.device = fastspec::Device::cuda;
    o.max_chunk = max_chunk;
    o.cuda_graphs = graphs;
    o.tf32 = tf32;
    return o;
}

bool all_finite(const std::vector<float>& v) {
    for (float x : v)
        if (!std::isfinite(x)) return false;
    return true;
}

void test_against_reference(std::mt19937_64& rng) {
    struct Case { int latent; std::vector<int> widths; int n_pixels; };
    const Case cases[] = {{4, {64, 128}, 300}, {16, {256, 512, 1024}, 19000}, {0, {17}, 33}};
    for (std::uint32_t dtype : {1u, 2u, 3u})
        for (const auto& c : cases) {
            TestModel tm = random_model(rng, c.latent, c.widths, c.n_pixels, dtype);
            tm.scale = std::uniform_real_distribution<double>(0.5, 2.0)(rng);
            tm.offset = std::uniform_real_distribution<double>(-0.5, 0.5)(rng);
            const auto model = load_test_model(tm, "cuda.fsm");
            struct Variant { bool tf32, graphs; std::size_t chunk; std::unique_ptr<fastspec::Decoder> dec; };
            std::vector<Variant> variants;
            for (bool tf32 : dtype == 1 ? std::vector<bool>{false, true} : std::vector<bool>{false})
                for (bool graphs : {true, false})
                    for (std::size_t chunk : {std::size_t(1024), std::size_t(7)})  // 7: forces chunking
                        variants.push_back({tf32, graphs, chunk,
                                            std::make_unique<fastspec::Decoder>(model, cuda_options(chunk, graphs, tf32))});
            for (std::size_t n : {1, 2, 17, 1000}) {
                if (c.n_pixels == 19000 && n == 1000) continue;  // the float64 reference would take minutes
                const auto labels = random_labels(rng, n);
                std::vector<float> z(n * c.latent);
                std::normal_distribution<float> nz;
                for (auto& v : z) v = nz(rng);
                const auto ref = reference_forward(tm, labels, z.data(), n);
                for (auto& v : variants) {
                    CHECK(v.dec->device() == fastspec::Device::cuda);
                    for (int repeat = 0; repeat < 3; ++repeat) {  // plain, capture, replay
                        std::vector<float> out(n * c.n_pixels, std::numeric_limits<float>::quiet_NaN());
                        v.dec->forward(labels.data(), n, out.data(), z.data());
                        CHECK_MSG(all_finite(out), "dtype %u n %zu: output not fully written", dtype, n);
                        const double err = rel_error(out, ref, tm.scale);
                        CHECK_MSG(err <= bound(dtype, v.tf32),
                                  "dtype %u tf32 %d pixels %d n %zu chunk %zu graphs %d repeat %d: rel error %g > %g",
                                  dtype, int(v.tf32), c.n_pixels, n, v.chunk, int(v.graphs), repeat, err,
                                  bound(dtype, v.tf32));
                    }
                }
            }
        }
}

// The default model (version 2: f16 network + broadening stage): CPU and CUDA decoders on the same file, forward and
// forward_jacobian, with and without clip.
void test_cpu_agreement(std::mt19937_64& rng) {
    const auto model = fastspec::Model::load(FASTSPEC_DEFAULT_MODEL);
    fastspec::Decoder cpu(model);
    fastspec::Decoder gpu(model, cuda_options(16));
    const std::size_t np = model.n_pixels(), nl = model.n_labels();
    for (std::size_t n : {1, 2, 17, 40}) {
        auto labels = random_labels(rng, n);
        std::vector<float> a(n * np), b(n * np, std::numeric_limits<float>::quiet_NaN());
        cpu.forward(labels.data(), n, a.data());
        gpu.forward(labels.data(), n, b.data());
        double worst = 0, num = 0, den = 0;
        for (std::size_t i = 0; i < a.size(); ++i) {
            const double d = double(a[i]) - b[i];
            worst = std::max(worst, std::abs(d));
            num += d * d;
            den += double(a[i]) * a[i];
        }
        const double rel = std::sqrt(num / den);
        CHECK_MSG(all_finite(b) && worst <= kCpuCudaMax && rel <= kCpuCudaNorm,
                  "default model n %zu: max |cpu - cuda| = %g, |cpu - cuda| / |cpu| = %g", n, worst, rel);
        // Jacobian, with labels pushed outside the range and clip.
        labels[0] = 3000;  // teff below its range
        labels[2] = 350;   // vsini above
        std::vector<float> fa(n * np), ja(n * np * nl), fb(n * np, NAN), jb(n * np * nl, NAN);
        cpu.forward_jacobian(labels.data(), n, fa.data(), ja.data(), nullptr, true);
        gpu.forward_jacobian(labels.data(), n, fb.data(), jb.data(), nullptr, true);
        CHECK(all_finite(fb) && all_finite(jb));
        check_jacobian_columns(ja, jb, n * np, nl, jacobian_bound(model.weight_dtype() == fastspec::WeightDtype::f32),
                               "default model");
        for (std::size_t p = 0; p < np; ++p) CHECK(jb[p * nl + 0] == 0.0f && jb[p * nl + 2] == 0.0f);  // clamped
    }
}

// A version-1 model (no broadening stage: the Jacobian is written by the last layer's kernel, every label a network
// label): CPU and CUDA forward_jacobian into NaN-poisoned buffers, so that an entry left unwritten fails; with and
// without clip; f32 and f16; a one-row batch (no fused epilogue for n = 1 on some cuBLASLt versions) and chunking.
void test_jacobian_v1(std::mt19937_64& rng) {
    for (std::uint32_t dtype : {1u, 2u}) {
        TestModel tm = random_model(rng, 3, {64, 96}, 501, dtype);
        const auto model = load_test_model(tm, "cuda_v1.fsm");
        CHECK(!model.broadening().enabled);
        fastspec::Decoder cpu(model);
        fastspec::Decoder gpu(model, cuda_options(8));
        const std::size_t np = model.n_pixels(), nl = model.n_labels();
        for (std::size_t n : {1, 19})
            for (bool clip : {false, true}) {
                auto labels = random_labels(rng, n);
                if (clip) labels[0] = tm.labels[0].min - 100;  // row 0's first label below its range: clamped
                std::vector<float> z(n * 3);
                std::normal_distribution<float> nz;
                for (auto& v : z) v = nz(rng);
                std::vector<float> fa(n * np), ja(n * np * nl), fb(n * np, NAN), jb(n * np * nl, NAN);
                cpu.forward_jacobian(labels.data(), n, fa.data(), ja.data(), z.data(), clip);
                for (int repeat = 0; repeat < 3; ++repeat) {  // plain, capture, replay
                    std::fill(fb.begin(), fb.end(), NAN);
                    std::fill(jb.begin(), jb.end(), NAN);
                    gpu.forward_jacobian(labels.data(), n, fb.data(), jb.data(), z.data(), clip);
                    CHECK_MSG(all_finite(fb) && all_finite(jb), "v1 dtype %u n %zu clip %d: output not fully written",
                              dtype, n, int(clip));
                    check_jacobian_columns(ja, jb, n * np, nl, jacobian_bound(dtype == 1), "v1 model");
                    if (clip)
                        for (std::size_t p = 0; p < np; ++p) CHECK(jb[p * nl + 0] == 0.0f);  // clamped
                }
            }
    }
}

void test_concurrent(std::mt19937_64& rng) {
    const auto model = fastspec::Model::load(FASTSPEC_DEFAULT_MODEL);
    fastspec::Decoder gpu(model, cuda_options(64));
    const std::size_t np = model.n_pixels(), n = 33;
    const auto labels = random_labels(rng, n);
    std::vector<float> ref(n * np);
    gpu.forward(labels.data(), n, ref.data());
    std::vector<std::thread> threads;
    std::vector<int> bad(4, 0);
    for (int t = 0; t < 4; ++t)
        threads.emplace_back([&, t] {
            std::vector<float> out(n * np);
            for (int i = 0; i < 10; ++i) {
                std::fill(out.begin(), out.end(), NAN);
                gpu.forward(labels.data(), n, out.data());
                if (std::memcmp(out.data(), ref.data(), out.size() * 4) != 0) ++bad[t];
            }
        });
    for (auto& th : threads) th.join();
    for (int t = 0; t < 4; ++t) CHECK_MSG(bad[t] == 0, "thread %d: %d results differ from the serial one", t, bad[t]);
}

}  // namespace

int main() {
    if (!fastspec::cuda_available()) {
        std::printf("test_cuda: skipped: no CUDA GPU (%s)\n", fastspec::cuda_unavailable_reason().c_str());
        return 77;
    }
    std::mt19937_64 rng(test_seed("test_cuda"));
    test_against_reference(rng);
    test_cpu_agreement(rng);
    test_jacobian_v1(rng);
    test_concurrent(rng);
    return finish("test_cuda");
}
