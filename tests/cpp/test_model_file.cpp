// The loader rejects every truncated prefix and random byte flips of a small model with
// ModelFileError naming the file, and never crashes or reads out of bounds (run under ASan/UBSan).
#include "test_util.hpp"

int main() {
    std::mt19937_64 rng(test_seed("test_model_file"));
    const TestModel tm = random_model(rng, 3, {5, 7}, 9, 2);
    const auto bytes = model_bytes(tm);
    const std::string path = temp_path("model_file.fsm");

    write_file(path, bytes);
    const auto model = fastspec::Model::load(path);
    CHECK(model.n_pixels() == 9 && model.latent_dim() == 3 && model.layers().size() == 3);
    CHECK(model.labels()[5].name == "resolution" && model.labels()[5].scaling == fastspec::Scaling::log10);
    CHECK(model.path() == path);

    for (std::size_t len = 0; len < bytes.size(); ++len) {
        write_file(path, bytes, len);
        check_throws<fastspec::ModelFileError>([&] { fastspec::Model::load(path); }, path + ": ", "truncation");
    }
    std::uniform_int_distribution<std::size_t> pos(0, bytes.size() - 1);
    std::uniform_int_distribution<int> flip(1, 255);
    for (int i = 0; i < 500; ++i) {
        auto b = bytes;
        b[pos(rng)] ^= std::uint8_t(flip(rng));
        write_file(path, b);
        check_throws<fastspec::ModelFileError>([&] { fastspec::Model::load(path); }, path + ": ", "byte flip");
    }
    // Random 8-byte values in the header and tables with a valid CRC: rejected or loaded, never a crash.
    const std::size_t tables_end = 128 + 80 * 6 + 48 * 3;
    std::uniform_int_distribution<std::size_t> fpos(8, tables_end - 8);
    const std::uint64_t values[] = {0, 1, 64, 0xffffffffu, 0x100000001ull, ~0ull, ~0ull - 63, bytes.size()};
    int loaded = 0;
    for (int i = 0; i < 500; ++i) {
        auto b = bytes;
        std::memcpy(&b[fpos(rng)], &values[rng() % 8], 8);
        const std::uint32_t crc = test_crc32(b.data(), b.size() - 8);
        std::memcpy(&b[b.size() - 4], &crc, 4);
        write_file(path, b);
        try {
            fastspec::Model::load(path);
            ++loaded;
        } catch (const fastspec::ModelFileError& e) {
            CHECK(std::string(e.what()).rfind(path + ": ", 0) == 0);
        }
    }
    std::printf("test_model_file: %d of 500 patched files still valid\n", loaded);
    std::remove(path.c_str());
    check_throws<fastspec::FileAccessError>([&] { fastspec::Model::load(path + ".missing"); }, "cannot open", "missing");
    return finish("test_model_file");
}
