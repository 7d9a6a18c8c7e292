// Decoder::forward against a float64 reference on fresh random models (f32, f16, bf16 weights),
// with poisoned outputs, several batch sizes (chunking included), z given or not, and clip.
#include <limits>

#include "test_util.hpp"

namespace {

double rel_error(const std::vector<float>& out, const std::vector<double>& ref, double scale) {
    // Same criterion as tests/test_core.py: |out - ref| / max(|ref|, 0.1 |scale|).
    double worst = 0;
    for (std::size_t i = 0; i < ref.size(); ++i)
        worst = std::max(worst, std::abs(double(out[i]) - ref[i]) / std::max(std::abs(ref[i]), 0.1 * std::abs(scale)));
    return worst;
}

void test_against_reference(std::mt19937_64& rng) {
    struct Case { int latent; std::vector<int> widths; int n_pixels; };
    const Case cases[] = {{4, {32, 64}, 100}, {0, {17}, 33}, {16, {128}, 300}};
    for (std::uint32_t dtype : {1u, 2u, 3u})
        for (const auto& c : cases) {
            TestModel tm = random_model(rng, c.latent, c.widths, c.n_pixels, dtype);
            tm.scale = std::uniform_real_distribution<double>(0.5, 2.0)(rng);
            tm.offset = std::uniform_real_distribution<double>(-0.5, 0.5)(rng);
            const auto model = load_test_model(tm, "forward.fsm");
            CHECK(model.weight_dtype() == fastspec::WeightDtype(dtype));
            for (std::size_t k = 0; k < tm.layers.size(); ++k)
                CHECK(std::memcmp(model.weights(k), tm.layers[k].W.data(), tm.layers[k].W.size() * 4) == 0);
            for (std::size_t chunk : {std::size_t(1024), std::size_t(5)}) {
                fastspec::Decoder dec(model, {1, chunk});
                for (std::size_t n : {1, 2, 17, 40}) {
                    const auto labels = random_labels(rng, n);
                    std::vector<float> z(n * c.latent);
                    std::normal_distribution<float> nz;
                    for (auto& v : z) v = nz(rng);
                    for (bool with_z : {false, true}) {
                        std::vector<float> out(n * c.n_pixels, std::numeric_limits<float>::quiet_NaN());
                        dec.forward(labels.data(), n, out.data(), with_z ? z.data() : nullptr);
                        bool all_written = true;
                        for (float v : out) all_written &= std::isfinite(v);
                        CHECK_MSG(all_written, "dtype %u n %zu: output not fully written", dtype, n);
                        const auto ref = reference_forward(tm, labels, with_z ? z.data() : nullptr, n);
                        const double err = rel_error(out, ref, tm.scale);
                        CHECK_MSG(err <= 1e-5, "dtype %u latent %d n %zu chunk %zu z %d: rel error %g", dtype, c.latent,
                                  n, chunk, int(with_z), err);
                    }
                }
            }
        }
}

void test_labels_and_clip(std::mt19937_64& rng) {
    TestModel tm = random_model(rng, 2, {16}, 20, 1);
    const std::string path = temp_path("labels.fsm");
    write_file(path, model_bytes(tm));
    fastspec::Decoder dec(fastspec::Model::load(path));
    std::remove(path.c_str());
    std::vector<double> labels = {5777, 4.44, 2, 0, 1, 50000, 5777, 7, 2, 0, 1, 50000};
    std::vector<float> out(2 * 20, -7.0f);
    check_throws<fastspec::InputError>([&] { dec.forward(labels.data(), 2, out.data()); },
                                       "row 1: label 'logg' = 7 is outside [2, 5]; pass clip=true to clamp", "range");
    bool untouched = true;
    for (float v : out) untouched &= v == -7.0f;
    CHECK_MSG(untouched, "forward wrote output before rejecting a label");
    labels[6] = std::numeric_limits<double>::quiet_NaN();
    check_throws<fastspec::InputError>([&] { dec.forward(labels.data(), 2, out.data(), nullptr, true); },
                                       "label 'teff' = nan is not finite", "nan with clip");
    labels[6] = 1e9;  // clip: identical to forwarding the clamped labels
    dec.forward(labels.data(), 2, out.data(), nullptr, true);
    auto clamped = labels;
    clamped[6] = 11000, clamped[7] = 5;
    std::vector<float> out2(2 * 20);
    dec.forward(clamped.data(), 2, out2.data());
    CHECK(out == out2);
    CHECK(rel_error(out, reference_forward(tm, labels, nullptr, 2, true), 1.0) <= 1e-5);
}

}  // namespace

int main() {
    std::mt19937_64 rng(test_seed("test_forward"));
    test_against_reference(rng);
    test_labels_and_clip(rng);
    return finish("test_forward");
}
