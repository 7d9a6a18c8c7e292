// A tiny test harness and a C++ writer of version-1 model files (docs/model-format.md), so the C++
// tests need neither a test framework nor Python. The writer mirrors python/fastspec/model_format.py.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <random>
#include <string>
#include <unistd.h>
#include <vector>

#include "fastspec/fastspec.hpp"

// ---- harness -----------------------------------------------------------------------------------
inline int& failures() {
    static int n = 0;
    return n;
}
#define CHECK(cond)                                                                       \
    do {                                                                                  \
        if (!(cond)) {                                                                    \
            std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
            ++failures();                                                                 \
        }                                                                                 \
    } while (0)
#define CHECK_MSG(cond, ...)                                                              \
    do {                                                                                  \
        if (!(cond)) {                                                                    \
            std::fprintf(stderr, "%s:%d: CHECK failed: %s: ", __FILE__, __LINE__, #cond); \
            std::fprintf(stderr, __VA_ARGS__);                                            \
            std::fprintf(stderr, "\n");                                                   \
            ++failures();                                                                 \
        }                                                                                 \
    } while (0)

// Runs fn and checks that it throws E whose message contains `needle`.
template <class E>
void check_throws(const std::function<void()>& fn, const std::string& needle, const char* where) {
    try {
        fn();
        std::fprintf(stderr, "%s: expected an exception containing '%s', none thrown\n", where, needle.c_str());
        ++failures();
    } catch (const E& e) {
        if (std::string(e.what()).find(needle) == std::string::npos) {
            std::fprintf(stderr, "%s: message '%s' lacks '%s'\n", where, e.what(), needle.c_str());
            ++failures();
        }
    }
}

inline int finish(const char* name) {
    if (failures()) {
        std::fprintf(stderr, "%s: %d check(s) failed\n", name, failures());
        return 1;
    }
    std::printf("%s: all checks passed\n", name);
    return 0;
}

// A seed that differs every run (printed so that a failure can be reproduced with FASTSPEC_TEST_SEED).
inline std::uint64_t test_seed(const char* name) {
    std::uint64_t seed = std::random_device{}();
    if (const char* s = std::getenv("FASTSPEC_TEST_SEED")) seed = std::strtoull(s, nullptr, 10);
    std::printf("%s: seed %llu\n", name, (unsigned long long)seed);
    return seed;
}

// ---- model writer ------------------------------------------------------------------------------
struct TestLabel {
    const char* name;
    const char* unit;
    double min, max;
    std::uint32_t scaling;  // 1 linear, 2 log10
    double s(double v) const { return scaling == 2 ? std::log10(v) : v; }
    double offset() const { return (s(min) + s(max)) / 2; }
    double scale() const { return (s(max) - s(min)) / 2; }
};

inline const std::vector<TestLabel>& standard_labels() {
    static const std::vector<TestLabel> labels = {
        {"teff", "K", 4000, 11000, 1},  {"logg", "dex", 2, 5, 1}, {"vsini", "km/s", 0, 300, 1},
        {"mh", "dex", -1.5, 1.5, 1},    {"vmic", "km/s", 0, 4, 1}, {"resolution", "", 1000, 115000, 2}};
    return labels;
}

struct TestLayer {
    int in, out;
    std::vector<float> W, b;  // W (out, in) row-major
};

struct TestModel {
    int latent = 0, n_pixels = 0;
    std::uint32_t dtype = 1;  // 1 f32, 2 f16, 3 bf16
    double scale = 1, offset = 0;
    std::vector<TestLayer> layers;
    const std::vector<TestLabel>& labels = standard_labels();
};

// Random weights that are exactly representable in f32, f16 and bf16 (k * 2^-e with |k| <= 255),
// so the reference uses the very values the file stores whatever the dtype.
inline TestModel random_model(std::mt19937_64& rng, int latent, std::vector<int> widths, int n_pixels,
                              std::uint32_t dtype) {
    TestModel m;
    m.latent = latent;
    m.n_pixels = n_pixels;
    m.dtype = dtype;
    std::uniform_int_distribution<int> k(-255, 255);
    std::normal_distribution<float> nb(0.0f, 0.1f);
    widths.push_back(n_pixels);
    int in = latent + int(m.labels.size());
    for (int out : widths) {
        TestLayer L{in, out, std::vector<float>(std::size_t(in) * out), std::vector<float>(out)};
        // k * 2^-e with k uniform in [-255, 255] (std 147 * 2^-e) and 2^-e near sqrt(2 / in) / 147: He scaling.
        const int e = int(std::lround(std::log2(147.0 / std::sqrt(2.0 / in))));
        for (auto& w : L.W) w = std::ldexp(float(k(rng)), -e);
        for (auto& b : L.b) b = nb(rng);
        m.layers.push_back(std::move(L));
        in = out;
    }
    return m;
}

inline std::uint32_t test_crc32(const std::uint8_t* p, std::size_t n) {
    std::uint32_t c = 0xffffffffu;
    for (std::size_t i = 0; i < n; ++i) {
        c ^= p[i];
        for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (0xedb88320u & (0u - (c & 1u)));
    }
    return ~c;
}

inline std::uint16_t exact_to_half(float f) {  // f is exactly representable as a normal f16 (or 0)
    std::uint32_t bits;
    std::memcpy(&bits, &f, 4);
    const std::uint32_t sign = (bits >> 16) & 0x8000u, exp = (bits >> 23) & 0xff, mant = bits & 0x7fffffu;
    if (exp == 0) return std::uint16_t(sign);
    return std::uint16_t(sign | ((exp - 127 + 15) << 10) | (mant >> 13));
}

class Bytes {
public:
    std::vector<std::uint8_t> d;
    template <class T>
    void put(T v) {
        std::uint8_t b[sizeof(T)];
        std::memcpy(b, &v, sizeof(T));  // little-endian host assumed (x86-64, aarch64)
        d.insert(d.end(), b, b + sizeof(T));
    }
    void str(const char* s, std::size_t size) {
        std::size_t n = std::strlen(s);
        for (std::size_t i = 0; i < size; ++i) d.push_back(i < n ? std::uint8_t(s[i]) : 0);
    }
    void pad(std::size_t align) {
        while (d.size() % align) d.push_back(0);
    }
};

inline std::vector<std::uint8_t> model_bytes(const TestModel& m, const std::string& provenance = "{\"test\": true}") {
    const std::size_t nl = m.labels.size(), nlay = m.layers.size(), elem = m.dtype == 1 ? 4 : 2;
    const std::size_t tables_end = 128 + 80 * nl + 48 * nlay;
    std::vector<std::uint64_t> woff, boff;
    std::size_t cur = tables_end + provenance.size();
    for (const auto& L : m.layers) {
        cur += (64 - cur % 64) % 64;
        woff.push_back(cur);
        cur += L.W.size() * elem;
        cur += (64 - cur % 64) % 64;
        boff.push_back(cur);
        cur += L.b.size() * 4;
    }
    const std::uint64_t file_bytes = cur + (64 - cur % 64) % 64 + 8;
    Bytes b;
    b.str("FSPECMDL", 8);
    b.put<std::uint32_t>(1), b.put<std::uint32_t>(128), b.put<std::uint64_t>(file_bytes);
    b.put<std::uint32_t>(std::uint32_t(nl)), b.put<std::uint32_t>(m.latent), b.put<std::uint32_t>(std::uint32_t(nlay));
    b.put<std::uint32_t>(m.dtype);
    b.put<double>(4450.0), b.put<double>(0.05), b.put<std::uint32_t>(m.n_pixels), b.put<std::uint32_t>(1);
    b.put<std::uint32_t>(1), b.put<std::uint32_t>(0), b.put<double>(m.scale), b.put<double>(m.offset);
    b.put<std::uint64_t>(tables_end), b.put<std::uint64_t>(provenance.size());
    b.pad(128);
    for (const auto& l : m.labels) {
        b.str(l.name, 16), b.str(l.unit, 16);
        b.put<double>(l.min), b.put<double>(l.max), b.put<std::uint32_t>(l.scaling), b.put<std::uint32_t>(0);
        b.put<double>(l.offset()), b.put<double>(l.scale()), b.put<std::uint64_t>(0);
    }
    for (std::size_t k = 0; k < nlay; ++k) {
        const auto& L = m.layers[k];
        b.put<std::uint32_t>(L.in), b.put<std::uint32_t>(L.out), b.put<std::uint32_t>(k + 1 == nlay ? 2 : 1);
        b.put<std::uint32_t>(0);
        b.put<std::uint64_t>(woff[k]), b.put<std::uint64_t>(L.W.size() * elem);
        b.put<std::uint64_t>(boff[k]), b.put<std::uint64_t>(L.b.size() * 4);
    }
    b.d.insert(b.d.end(), provenance.begin(), provenance.end());
    for (const auto& L : m.layers) {
        b.pad(64);
        for (float w : L.W) {
            if (m.dtype == 1) b.put<float>(w);
            else if (m.dtype == 2) b.put<std::uint16_t>(exact_to_half(w));
            else {
                std::uint32_t bits;
                std::memcpy(&bits, &w, 4);
                b.put<std::uint16_t>(std::uint16_t(bits >> 16));
            }
        }
        b.pad(64);
        for (float x : L.b) b.put<float>(x);
    }
    b.pad(64);
    b.str("FEND", 4);
    b.put<std::uint32_t>(test_crc32(b.d.data(), b.d.size() - 4));
    if (b.d.size() != file_bytes) std::abort();
    return b.d;
}

inline void write_file(const std::string& path, const std::vector<std::uint8_t>& bytes, std::size_t n) {
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    f.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(n));
}
inline void write_file(const std::string& path, const std::vector<std::uint8_t>& bytes) {
    write_file(path, bytes, bytes.size());
}

// The decoder in double precision, from the test's own copy of the weights.
inline std::vector<double> reference_forward(const TestModel& m, const std::vector<double>& labels, const float* z,
                                             std::size_t n, bool clip = false) {
    const std::size_t nl = m.labels.size();
    std::vector<double> out;
    for (std::size_t r = 0; r < n; ++r) {
        std::vector<double> x(m.latent + nl, 0.0);
        for (int j = 0; j < m.latent; ++j) x[j] = z ? z[r * m.latent + j] : 0.0;
        for (std::size_t j = 0; j < nl; ++j) {
            const auto& l = m.labels[j];
            double v = labels[r * nl + j];
            if (clip) v = std::min(std::max(v, l.min), l.max);
            x[m.latent + j] = (l.s(v) - l.offset()) / l.scale();
        }
        for (std::size_t k = 0; k < m.layers.size(); ++k) {
            const auto& L = m.layers[k];
            std::vector<double> y(L.out);
            for (int o = 0; o < L.out; ++o) {
                double a = L.b[o];
                for (int i = 0; i < L.in; ++i) a += double(L.W[std::size_t(o) * L.in + i]) * x[i];
                y[o] = k + 1 == m.layers.size() ? m.scale / (1.0 + std::exp(-a)) + m.offset : std::max(a, 0.0);
            }
            x = std::move(y);
        }
        out.insert(out.end(), x.begin(), x.end());
    }
    return out;
}

inline std::vector<double> random_labels(std::mt19937_64& rng, std::size_t n) {
    std::vector<double> v;
    for (std::size_t r = 0; r < n; ++r)
        for (const auto& l : standard_labels()) v.push_back(std::uniform_real_distribution<double>(l.min, l.max)(rng));
    return v;
}

inline std::string temp_path(const std::string& name) {
    const char* dir = std::getenv("TMPDIR");
    return std::string(dir ? dir : "/tmp") + "/fastspec_cpptest_" + std::to_string(::getpid()) + "_" + name;
}

// Writes m to a temporary model file, loads it and removes the file.
inline fastspec::Model load_test_model(const TestModel& m, const std::string& name) {
    const std::string path = temp_path(name);
    write_file(path, model_bytes(m));
    auto model = fastspec::Model::load(path);
    std::remove(path.c_str());
    return model;
}
