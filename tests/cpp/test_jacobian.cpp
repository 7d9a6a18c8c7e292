// Decoder::forward_jacobian against central differences of the float64 reference, on fresh random
// models (f32 and f16 weights), poisoned outputs, batch 1 and larger, z given or not, and clip.
#include <limits>

#include "test_util.hpp"

namespace {

constexpr float kPoison = std::numeric_limits<float>::quiet_NaN();

// Labels 5 % inside their ranges, so that the finite-difference steps stay inside too.
std::vector<double> inner_labels(std::mt19937_64& rng, std::size_t n) {
    std::vector<double> v;
    for (std::size_t r = 0; r < n; ++r)
        for (const auto& l : standard_labels()) {
            const double pad = 0.05 * (l.max - l.min);
            v.push_back(std::uniform_real_distribution<double>(l.min + pad, l.max - pad)(rng));
        }
    return v;
}

void test_against_finite_differences(std::mt19937_64& rng) {
    const std::size_t nl = standard_labels().size();
    for (std::uint32_t dtype : {1u, 2u}) {
        TestModel tm = random_model(rng, 4, {32, 64}, 100, dtype);
        tm.scale = 1.05;
        const auto model = load_test_model(tm, "jacobian.fsm");
        fastspec::Decoder dec(model);
        for (std::size_t n : {1, 3, 17}) {
            const auto labels = inner_labels(rng, n);
            std::vector<float> z(n * tm.latent);
            std::normal_distribution<float> nz;
            for (auto& v : z) v = nz(rng);
            for (bool with_z : {false, true}) {
                const float* zp = with_z ? z.data() : nullptr;
                std::vector<float> out(n * tm.n_pixels, kPoison), jac(n * tm.n_pixels * nl, kPoison);
                dec.forward_jacobian(labels.data(), n, out.data(), jac.data(), zp);
                std::vector<float> plain(n * tm.n_pixels, kPoison);
                dec.forward(labels.data(), n, plain.data(), zp);
                CHECK_MSG(std::memcmp(out.data(), plain.data(), out.size() * sizeof(float)) == 0,
                          "dtype %u n %zu: flux differs from forward()", dtype, n);
                bool all_written = true;
                for (float v : jac) all_written &= std::isfinite(v);
                CHECK_MSG(all_written, "dtype %u n %zu: Jacobian not fully written", dtype, n);

                double worst = 0;
                for (std::size_t r = 0; r < n; ++r) {
                    const float* zr = with_z ? z.data() + r * tm.latent : nullptr;
                    for (std::size_t j = 0; j < nl; ++j) {
                        std::vector<double> up(labels.begin() + r * nl, labels.begin() + (r + 1) * nl), down = up;
                        const auto& l = standard_labels()[j];
                        // A step of 1e-6 of the normalised range: far above float64 rounding, far below
                        // the distance to a ReLU kink for all but a vanishing fraction of draws.
                        const double h = l.scaling == 2 ? 1e-6 * up[j] : 1e-6 * (l.max - l.min);
                        up[j] += h;
                        down[j] -= h;
                        const auto fu = reference_forward(tm, up, zr, 1), fd = reference_forward(tm, down, zr, 1);
                        double column_max = 0;
                        for (int p = 0; p < tm.n_pixels; ++p) column_max = std::max(column_max, std::abs(fu[p] - fd[p]) / (2 * h));
                        for (int p = 0; p < tm.n_pixels; ++p) {
                            const double ref = (fu[p] - fd[p]) / (2 * h);
                            const double got = jac[(r * tm.n_pixels + p) * nl + j];
                            worst = std::max(worst, std::abs(got - ref) / std::max(std::abs(ref), 0.1 * column_max + 1e-300));
                        }
                    }
                }
                CHECK_MSG(worst <= 1e-4, "dtype %u n %zu z %d: Jacobian rel error %g vs central differences", dtype, n,
                          int(with_z), worst);
            }
        }
    }
}

void test_clipped_label_has_zero_derivative(std::mt19937_64& rng) {
    TestModel tm = random_model(rng, 2, {16}, 20, 1);
    const std::string path = temp_path("jacobian_clip.fsm");
    write_file(path, model_bytes(tm));
    fastspec::Decoder dec(fastspec::Model::load(path));
    std::remove(path.c_str());
    const std::size_t nl = standard_labels().size();
    std::vector<double> labels = {3000.0, 4.0, 100.0, 0.0, 2.0, 20000.0};  // teff below its range
    std::vector<float> out(tm.n_pixels, kPoison), jac(tm.n_pixels * nl, kPoison);
    check_throws<fastspec::InputError>([&] { dec.forward_jacobian(labels.data(), 1, out.data(), jac.data()); },
                                       "teff", "forward_jacobian without clip");
    dec.forward_jacobian(labels.data(), 1, out.data(), jac.data(), nullptr, true);
    bool teff_zero = true, others_written = true;
    for (int p = 0; p < tm.n_pixels; ++p) {
        teff_zero &= jac[p * nl + 0] == 0.0f;
        for (std::size_t j = 1; j < nl; ++j) others_written &= std::isfinite(jac[p * nl + j]);
    }
    CHECK_MSG(teff_zero, "a clamped label must have derivative 0");
    CHECK(others_written);
}

}  // namespace

int main() {
    std::mt19937_64 rng(test_seed("test_jacobian"));
    test_against_finite_differences(rng);
    test_clipped_label_has_zero_derivative(rng);
    return finish("test_jacobian");
}
