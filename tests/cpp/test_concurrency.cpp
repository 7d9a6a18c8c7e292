// Concurrent forward() and forward_jacobian() -- both documented const and thread-safe -- from many
// std::threads at once: on decoders SHARED between the threads and on SEPARATE per-thread decoders of the same
// Model, with DIFFERENT OpenBLAS thread counts (1 and 2: OpenBLAS keeps one process-wide count, which every
// call sets when it differs, so the decoders toggle it under each other's feet), on an f32 model and an f16
// one (batch 1 then takes the direct 16-bit GEMV on AVX-512F CPUs), batch 1 (GEMV) and larger (GEMM, several
// max_chunk passes), with and without z. Every result must equal, bit for bit, the one computed beforehand by
// a single thread (all decoders here have the same max_chunk: how rows are chunked decides which rows take the
// 1-row GEMV path, so decoders with different max_chunk may differ in the last bits; the thread count does not). CI also runs this test under ThreadSanitizer (.ci/tsan.sh), which reports any data race
// on the pooled workspaces or elsewhere in the core even when the numbers happen to come out right.
#include <atomic>
#include <thread>

#include "test_util.hpp"

namespace {

struct Task {
    std::size_t model;  // index into models
    std::vector<double> labels;
    std::vector<float> z;  // empty: z = 0
    bool jacobian;
    std::vector<float> flux, jac;  // expected
};

}  // namespace

int main() {
    std::mt19937_64 rng(test_seed("test_concurrency"));
    const int kPixels = 700, kLatent = 4;
    const std::size_t nl = standard_labels().size();
    std::vector<fastspec::Model> models;
    for (std::uint32_t dtype : {1u, 2u}) {
        TestModel tm = random_model(rng, kLatent, {48, 96}, kPixels, dtype);
        tm.scale = 1.05;
        const std::string path = temp_path("concurrency.fsm");
        write_file(path, model_bytes(tm));
        models.push_back(fastspec::Model::load(path));
        std::remove(path.c_str());
    }

    // The tasks and their single-threaded results (a fresh decoder per model, 1 OpenBLAS thread).
    std::vector<Task> tasks;
    std::normal_distribution<float> nz;
    for (std::size_t m = 0; m < models.size(); ++m)
        for (std::size_t n : {1, 2, 1, 9, 20, 1, 33})
            for (bool jacobian : {false, true})
                for (bool with_z : {false, true}) {
                    Task t{m, random_labels(rng, n), {}, jacobian, {}, {}};
                    if (with_z) {
                        t.z.resize(n * kLatent);
                        for (auto& v : t.z) v = nz(rng);
                    }
                    tasks.push_back(std::move(t));
                }
    for (std::size_t m = 0; m < models.size(); ++m) {
        const fastspec::Decoder single(models[m], {1, 8});
        for (auto& t : tasks) {
            if (t.model != m) continue;
            const std::size_t n = t.labels.size() / nl;
            t.flux.assign(n * kPixels, std::nanf(""));
            const float* z = t.z.empty() ? nullptr : t.z.data();
            if (t.jacobian) {
                t.jac.assign(n * kPixels * nl, std::nanf(""));
                single.forward_jacobian(t.labels.data(), n, t.flux.data(), t.jac.data(), z);
            } else {
                single.forward(t.labels.data(), n, t.flux.data(), z);
            }
        }
    }

    // Shared decoders: one per (model, OpenBLAS thread count), all used by every thread.
    std::vector<std::unique_ptr<fastspec::Decoder>> shared;
    for (std::size_t m = 0; m < models.size(); ++m)
        for (int threads : {1, 2}) shared.push_back(std::make_unique<fastspec::Decoder>(models[m], fastspec::DecoderOptions{threads, 8}));

    const int kThreads = 6, kRounds = 3;
    std::atomic<int> mismatches{0}, errors{0}, calls{0};
    std::atomic<bool> go{false};
    std::vector<std::thread> pool;
    for (int th = 0; th < kThreads; ++th)
        pool.emplace_back([&, th] {
            // This thread's own decoders: 2 OpenBLAS threads on odd threads, 1 on even ones.
            std::vector<std::unique_ptr<fastspec::Decoder>> own;
            for (const auto& model : models)
                own.push_back(std::make_unique<fastspec::Decoder>(model, fastspec::DecoderOptions{1 + th % 2, 8}));
            std::mt19937_64 order(std::uint64_t(th) * 7919u);
            while (!go.load()) std::this_thread::yield();
            for (int round = 0; round < kRounds; ++round)
                for (std::size_t k = 0; k < tasks.size(); ++k) {
                    const Task& t = tasks[(k + std::size_t(th) * 5) % tasks.size()];
                    const int which = int(order() % 3);  // own decoder, shared 1-thread, shared 2-thread
                    const fastspec::Decoder& dec =
                        which == 0 ? *own[t.model] : *shared[t.model * 2 + std::size_t(which - 1)];
                    const std::size_t n = t.labels.size() / nl;
                    const float* z = t.z.empty() ? nullptr : t.z.data();
                    std::vector<float> flux(n * kPixels, std::nanf(""));
                    try {
                        if (t.jacobian) {
                            std::vector<float> jac(n * kPixels * nl, std::nanf(""));
                            dec.forward_jacobian(t.labels.data(), n, flux.data(), jac.data(), z);
                            if (std::memcmp(jac.data(), t.jac.data(), jac.size() * sizeof(float)) != 0) ++mismatches;
                        } else {
                            dec.forward(t.labels.data(), n, flux.data(), z);
                        }
                        if (std::memcmp(flux.data(), t.flux.data(), flux.size() * sizeof(float)) != 0) ++mismatches;
                    } catch (const std::exception& e) {
                        std::fprintf(stderr, "thread %d: %s\n", th, e.what());
                        ++errors;
                    }
                    ++calls;
                }
        });
    go = true;
    for (auto& t : pool) t.join();
    std::printf("test_concurrency: %d calls from %d threads on %zu shared and %d separate decoders\n", calls.load(),
                kThreads, shared.size(), kThreads * int(models.size()));
    CHECK_MSG(errors.load() == 0, "%d calls threw", errors.load());
    CHECK_MSG(mismatches.load() == 0, "%d results differ from the single-threaded ones", mismatches.load());
    CHECK(calls.load() == kThreads * kRounds * int(tasks.size()));
    return finish("test_concurrency");
}
