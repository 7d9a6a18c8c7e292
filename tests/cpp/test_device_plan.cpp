// The CUDA backend's host side, on any machine: chunk and buffer arithmetic, the graph cache policy (plain-only keys
// after a failed capture included), where a bias goes when cuBLASLt has no fused epilogue, the float -> 16-bit
// rounding (device_plan.hpp), and the errors of Device::cuda without a backend or GPU.
#include <limits>

#include "device_plan.hpp"
#include "test_util.hpp"

namespace dp = fastspec::detail::device_plan;

namespace {

float half_to_float(std::uint16_t h) {
    const int e = (h >> 10) & 0x1f, m = h & 0x3ff;
    const float sign = (h & 0x8000) ? -1.0f : 1.0f;
    if (e == 0x1f) return m ? std::numeric_limits<float>::quiet_NaN() : sign * std::numeric_limits<float>::infinity();
    if (e == 0) return sign * std::ldexp(float(m), -24);
    return sign * std::ldexp(float(m + 1024), e - 25);
}
float bf16_to_float(std::uint16_t b) {
    const std::uint32_t x = std::uint32_t(b) << 16;
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}

void test_rounding(std::mt19937_64& rng) {
    CHECK(dp::float_to_half(1.0f) == 0x3c00);
    CHECK(dp::float_to_half(-2.0f) == 0xc000);
    CHECK(dp::float_to_half(65504.0f) == 0x7bff);
    CHECK(dp::float_to_half(65520.0f) == 0x7c00);            // rounds up to infinity
    CHECK(dp::float_to_half(std::ldexp(1.0f, -24)) == 0x0001);  // the smallest subnormal
    CHECK(dp::float_to_half(std::ldexp(1.5f, -24)) == 0x0002);  // a tie: to even
    CHECK(dp::float_to_half(std::ldexp(1.0f, -26)) == 0x0000);
    CHECK(dp::float_to_half(1.0f + std::ldexp(1.0f, -11)) == 0x3c00);      // a tie: to even (down)
    CHECK(dp::float_to_half(1.0f + 3 * std::ldexp(1.0f, -11)) == 0x3c02);  // a tie: to even (up)
    CHECK((dp::float_to_half(std::numeric_limits<float>::quiet_NaN()) & 0x7fff) > 0x7c00);
    CHECK(dp::float_to_bf16(1.0f) == 0x3f80);
    CHECK(dp::float_to_bf16(1.0f + std::ldexp(1.0f, -8)) == 0x3f80);
    CHECK(dp::float_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)) == 0x3f82);
    CHECK(std::isnan(bf16_to_float(dp::float_to_bf16(std::numeric_limits<float>::quiet_NaN()))));
    // Random values: the result is a nearest representable value (ties to even).
    std::uniform_real_distribution<float> mant(-1.0f, 1.0f);
    std::uniform_int_distribution<int> ex(-30, 17);
    int bad_h = 0, bad_b = 0;
    for (int i = 0; i < 200000; ++i) {
        const float f = std::ldexp(mant(rng), ex(rng));
        const std::uint16_t h = dp::float_to_half(f);
        const double back = half_to_float(h);
        if (std::isfinite(back)) {  // no representable neighbour is nearer (h + 1 is farther from 0, h - 1 nearer)
            const double up = half_to_float(std::uint16_t(h + 1));
            const double down = (h & 0x7fff) ? half_to_float(std::uint16_t(h - 1)) : back;
            if (std::abs(back - f) > std::abs(up - f) || std::abs(back - f) > std::abs(down - f)) ++bad_h;
        }
        const std::uint16_t b = dp::float_to_bf16(f);
        const double bb = bf16_to_float(b);
        const double bu = bf16_to_float(std::uint16_t(b + 1)), bd = bf16_to_float(std::uint16_t(b - 1));
        if (std::abs(bb - f) > std::abs(bu - f) || std::abs(bb - f) > std::abs(bd - f)) ++bad_b;
    }
    CHECK_MSG(bad_h == 0, "%d half roundings not to nearest", bad_h);
    CHECK_MSG(bad_b == 0, "%d bfloat16 roundings not to nearest", bad_b);
}

void test_chunks() {
    dp::Dims d;
    d.input_dim = 20, d.widest_hidden = 1024, d.n_pixels = 19000, d.n_labels = 6, d.n_network = 4, d.elem = 2;
    CHECK(dp::chunk_rows(d, 1, 1024, false, false) == 1);
    CHECK(dp::chunk_rows(d, 17, 1024, false, false) == 17);
    CHECK(dp::chunk_rows(d, 5000, 1024, false, false) == 1024);
    CHECK(dp::chunk_rows(d, 0, 1024, false, false) == 1);
    // forward_jacobian: 4 tangents * 19000 * 4 bytes a row = 304000 -> 1 GiB / 304000 = 3532 rows
    CHECK(dp::chunk_rows(d, 100000, 100000, true, false) == (std::size_t(1) << 30) / 304000);
    // with a host Jacobian: (4 + 1 + 6 + 1) * 19000 * 4 a row (tangents, out, the Jacobian, its vmac column)
    CHECK(dp::chunk_rows(d, 100000, 100000, true, true) == (std::size_t(1) << 30) / (12 * 19000 * 4));
    CHECK(dp::chunk_rows(d, 10, 3, true, true) == 3);
    const auto c = dp::chunks(17, 5);
    CHECK(c.size() == 4 && dp::chunk_count(17, 5) == 4);
    CHECK(c[0].first == 0 && c[0].second == 5 && c[3].first == 15 && c[3].second == 2);
    std::size_t covered = 0;
    for (const auto& [r0, rows] : dp::chunks(1000, 7)) {
        CHECK(r0 == covered);
        covered += rows;
    }
    CHECK(covered == 1000);
    // Buffers: every part aligned; the total counts each buffer once (two of hidden and tangent_hidden).
    const auto b = dp::buffers(d, 3, false, false);
    CHECK(b.input == dp::kAlign + dp::align_up(3 * 20 * 4));  // input rows float32 whatever the dtype
    CHECK(b.hidden == dp::align_up(3 * 1024 * 2) && b.logits == dp::align_up(3 * 19000 * 4));
    CHECK(b.intrinsic == 0 && b.tangent_last == 0 && b.kernels == 0 && b.staging_out == 0);
    CHECK(b.total() == b.input + 2 * b.hidden + b.logits + b.lt_workspace);
    d.broadening = true, d.nodes = 9, d.max_half = 388;
    const auto j = dp::buffers(d, 3, true, true);
    CHECK(j.intrinsic == dp::align_up(3 * 19000 * 4));
    CHECK(j.staging_out == dp::align_up(3 * 19000 * 4 * 8));  // out | Jacobian (6) | vmac column
    CHECK(j.tangent_last == dp::align_up(3 * 4 * 19000 * 4));
    CHECK(j.kernels == dp::align_up(3 * 16) + dp::align_up(3 * 9 * 4) + dp::align_up(3 * 9 * 777 * 4 * 4));  // flux, d/dvsini, d/dR, d/dvmac
    CHECK(j.input == dp::kAlign + dp::align_up(3 * 20 * 4) + dp::align_up(3 * 4 * 4));
    CHECK(j.tangent_in == dp::align_up(3 * 4 * 20 * 4));
    CHECK(sizeof(dp::RowRecord) == 16);
    // A 16-bit model's float32 first layer goes through logits / tangent_last: they hold the wider of the two.
    d.first_f32 = 25000;
    const auto f = dp::buffers(d, 3, true, false);
    CHECK(f.logits == dp::align_up(3 * 25000 * 4) && f.tangent_last == dp::align_up(3 * 4 * 25000 * 4));
    d.first_f32 = 256;
    CHECK(dp::buffers(d, 3, true, false).logits == dp::align_up(3 * 19000 * 4));
}

void test_graph_cache() {
    dp::GraphCache<int> cache(2);
    const dp::GraphKey a{64, false}, b{64, true}, c{1, false}, d{7, false};
    CHECK(cache.action(a) == dp::GraphAction::plain);    // first sighting: no capture
    CHECK(cache.action(a) == dp::GraphAction::capture);  // second: capture
    CHECK(cache.store(a, 1).empty());
    CHECK(cache.action(a) == dp::GraphAction::replay && *cache.find(a) == 1);
    CHECK(cache.action(b) == dp::GraphAction::plain);  // the mode is part of the key
    CHECK(cache.action(b) == dp::GraphAction::capture);
    CHECK(cache.store(b, 2).empty());
    CHECK(cache.action(a) == dp::GraphAction::replay);  // a is now the most recently used
    CHECK(cache.action(c) == dp::GraphAction::plain);
    CHECK(cache.action(c) == dp::GraphAction::capture);
    const auto dropped = cache.store(c, 3);  // capacity 2: b, the least recently used, goes
    CHECK(dropped.size() == 1 && dropped[0] == 2);
    CHECK(cache.find(b) == nullptr && cache.graphs() == 2);
    CHECK(cache.action(b) == dp::GraphAction::plain);  // forgotten entirely: seen anew
    CHECK(cache.action(d) == dp::GraphAction::plain);
    const auto all = cache.clear();
    CHECK(all.size() == 2 && cache.graphs() == 0);
    CHECK(cache.action(a) == dp::GraphAction::plain);
    CHECK(std::string(dp::to_string(dp::GraphAction::replay)) == "replay");
    // A failed capture: that key runs plain launches from then on (also after clear()), the others are unaffected.
    dp::GraphCache<int> f(4);
    const dp::GraphKey e{5, false};
    CHECK(f.action(e) == dp::GraphAction::plain && f.action(e) == dp::GraphAction::capture);
    f.failed(e);
    CHECK(f.plain_only(e) && f.find(e) == nullptr);
    for (int i = 0; i < 3; ++i) CHECK(f.action(e) == dp::GraphAction::plain);
    CHECK(f.action(a) == dp::GraphAction::plain && f.action(a) == dp::GraphAction::capture);
    CHECK(f.store(a, 7).empty() && f.action(a) == dp::GraphAction::replay);
    CHECK(f.clear().size() == 1);
    CHECK(f.action(e) == dp::GraphAction::plain && f.action(e) == dp::GraphAction::plain);
    CHECK(f.action(a) == dp::GraphAction::plain && f.action(a) == dp::GraphAction::capture);
    // Bounded: many one-off batch sizes do not grow the cache without limit.
    for (std::size_t r = 100; r < 200; ++r) f.action(dp::GraphKey{r, false});
    CHECK(f.graphs() == 0);
}

void test_bias_path() {
    // The heuristic's answer -> where the bias (+ReLU) goes (status/state 0 = CUBLAS_STATUS_SUCCESS; 7 =
    // CUBLAS_STATUS_INVALID_VALUE, 15 = CUBLAS_STATUS_NOT_SUPPORTED).
    CHECK(dp::heuristic_usable(0, 1, 0) && dp::heuristic_usable(0, 4, 0));
    CHECK(!dp::heuristic_usable(7, 0, 0));   // INVALID_VALUE (n = 1 with a bias epilogue)
    CHECK(!dp::heuristic_usable(0, 0, 0));   // success, but no algorithm
    CHECK(!dp::heuristic_usable(0, 1, 15));  // a result whose state is an error
    CHECK(dp::bias_path(true, true) == dp::BiasPath::fused);
    CHECK(dp::bias_path(true, false) == dp::BiasPath::kernel);
    CHECK(dp::bias_path(false, false) == dp::BiasPath::none && dp::bias_path(false, true) == dp::BiasPath::none);
    CHECK(std::string(dp::to_string(dp::BiasPath::kernel)) == "kernel");
}

void test_errors_without_gpu(std::mt19937_64& rng) {
    TestModel tm = random_model(rng, 2, {16}, 20, 1);
    const auto model = load_test_model(tm, "device.fsm");
    fastspec::Decoder cpu(model);
    CHECK(cpu.device() == fastspec::Device::cpu && cpu.device_description() == "cpu");
    const auto labels = random_labels(rng, 1);
    float dummy[20];
    check_throws<fastspec::DeviceError>([&] { cpu.forward_device(labels.data(), 1, dummy, 0); }, "runs on the CPU",
                                        "forward_device on a cpu decoder");
    check_throws<fastspec::DeviceError>([&] { cpu.forward_jacobian_device(labels.data(), 1, dummy, dummy, 0); },
                                        "runs on the CPU", "forward_jacobian_device on a cpu decoder");
    CHECK(std::string(fastspec::to_string(fastspec::Device::cuda)) == "cuda");
    const std::string reason = fastspec::cuda_unavailable_reason();
    CHECK(fastspec::cuda_available() == reason.empty());
    if (!fastspec::cuda_available()) {
        std::printf("test_device_plan: CUDA not usable here: %s\n", reason.c_str());
        fastspec::DecoderOptions o;
        o.device = fastspec::Device::cuda;
        // The reason from cuda_unavailable_reason() is the message (the library, the driver or the GPU).
        const std::string needle = fastspec::build_info().cuda_compiled ? "device = cuda" : "built without the CUDA backend";
        check_throws<fastspec::DeviceError>([&] { fastspec::Decoder d(model, o); }, needle, "Device::cuda without a GPU");
    }
    // DeviceMemoryError carries the batch and the bytes and is a DeviceError.
    try {
        throw fastspec::DeviceMemoryError("out of GPU memory", 4096, 123);
    } catch (const fastspec::DeviceError& e) {
        const auto* m = dynamic_cast<const fastspec::DeviceMemoryError*>(&e);
        CHECK(m && m->batch() == 4096 && m->bytes() == 123);
    }
}

}  // namespace

int main() {
    std::mt19937_64 rng(test_seed("test_device_plan"));
    test_rounding(rng);
    test_chunks();
    test_graph_cache();
    test_bias_path();
    test_errors_without_gpu(rng);
    return finish("test_device_plan");
}
