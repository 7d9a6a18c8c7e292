// Several std::threads calling forward() concurrently on one Decoder give the same results as
// sequential calls (workspaces are pooled per call, nothing is shared between calls).
#include <thread>

#include "test_util.hpp"

int main() {
    std::mt19937_64 rng(test_seed("test_threads"));
    const TestModel tm = random_model(rng, 4, {64, 128}, 500, 1);
    const std::string path = temp_path("threads.fsm");
    write_file(path, model_bytes(tm));
    const fastspec::Decoder dec(fastspec::Model::load(path), {1, 8});
    std::remove(path.c_str());

    const std::size_t sizes[] = {1, 3, 8, 9, 20, 1, 33, 2};
    const std::size_t T = std::size(sizes);
    std::vector<std::vector<double>> labels(T);
    std::vector<std::vector<float>> expected(T);
    for (std::size_t t = 0; t < T; ++t) {
        labels[t] = random_labels(rng, sizes[t]);
        expected[t].resize(sizes[t] * 500);
        dec.forward(labels[t].data(), sizes[t], expected[t].data());
    }
    std::vector<int> mismatches(T, 0);
    std::vector<std::thread> threads;
    for (std::size_t t = 0; t < T; ++t)
        threads.emplace_back([&, t] {
            std::vector<float> out(sizes[t] * 500);
            for (int rep = 0; rep < 20; ++rep) {
                std::fill(out.begin(), out.end(), std::nanf(""));
                dec.forward(labels[t].data(), sizes[t], out.data());
                if (out != expected[t]) ++mismatches[t];
            }
        });
    for (auto& th : threads) th.join();
    for (std::size_t t = 0; t < T; ++t) CHECK_MSG(mismatches[t] == 0, "thread %zu: %d mismatching runs", t, mismatches[t]);
    return finish("test_threads");
}
