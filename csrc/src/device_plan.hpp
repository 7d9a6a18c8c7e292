// Host-side arithmetic of the CUDA backend, kept free of CUDA so that the CPU tests check it
// (tests/cpp/test_device_plan.cpp, tests/test_cuda_host.py through fastspec._core): how many rows a pass takes,
// what each device buffer holds, when a CUDA graph is captured and replayed (and when a batch size stays on plain
// launches), whether a layer's bias(+ReLU) is fused into cuBLASLt's epilogue or applied by a kernel, and the
// float -> 16-bit rounding of the hidden biases.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <list>
#include <string>
#include <utility>
#include <vector>

namespace fastspec::detail::device_plan {

// A forward_jacobian pass keeps (rows * n_network, n_pixels) float32 tangents of the last layer (and the
// (rows, n_pixels, n_labels) Jacobian when it is copied back to the host): rows are capped so that these stay
// within this many bytes, whatever max_chunk says.
constexpr std::size_t kJacobianBudget = std::size_t(1) << 30;
constexpr std::size_t kAlign = 256;  // every device buffer (and every part of one) starts on this boundary
constexpr std::size_t kLtWorkspace = std::size_t(32) << 20;  // cuBLASLt workspace (Hopper's recommendation)

inline std::size_t align_up(std::size_t n, std::size_t a = kAlign) { return (n + a - 1) / a * a; }

// The sizes a plan needs, taken from the model.
struct Dims {
    std::size_t input_dim = 0, widest_hidden = 0, n_pixels = 0, n_labels = 0, n_network = 0;
    std::size_t elem = 4;   // bytes of a weight and of a hidden activation: 4 (f32) or 2 (f16, bf16)
    // 16-bit models run the first layer in float32 (its input, the normalised labels, must not be rounded to 16
    // bits: the flux would be piecewise constant in them); its float32 output (first_f32 wide, 0: no such layer)
    // goes through the logits buffer (and its tangents through tangent_last) before the conversion to elem.
    std::size_t first_f32 = 0;
    bool broadening = false;
    std::size_t nodes = 0;  // broadening nodes
    int max_half = 0;       // the widest kernel half-width
};

// Bytes of every device buffer of a workspace for `rows` rows (0 where the mode does not use it).
struct Buffers {
    std::size_t input = 0;        // [out/jacobian pointers | input rows (float32) | tangent scales]
    std::size_t hidden = 0;       // each of the two ping-pong activation buffers
    std::size_t logits = 0;       // the last layer's pre-activation, float32 (first, the first_f32 layer's output)
    std::size_t intrinsic = 0;    // the network's flux before the broadening stage
    std::size_t staging_out = 0;  // out (and jacobian, jacobian_vmac) on the device when the caller's are host memory
    std::size_t tangent_in = 0, tangent_hidden = 0, tangent_last = 0;  // forward_jacobian: tangents
    std::size_t kernels = 0;      // broadening kernels of every row: [row records | node half-widths | taps]
    std::size_t lt_workspace = kLtWorkspace;
    std::size_t total() const {
        return input + 2 * hidden + logits + intrinsic + staging_out + tangent_in + 2 * tangent_hidden + tangent_last +
               kernels + lt_workspace;
    }
};

inline std::size_t kernel_row_floats(const Dims& d, bool jacobian) {
    return d.nodes * (2 * std::size_t(d.max_half) + 1) * (jacobian ? 4 : 1);  // flux | d/dvsini, d/dR, d/dvmac
}

struct RowRecord {  // one row's broadening kernels in the kernels buffer (device layout, 16 bytes)
    std::uint64_t taps = 0;  // offset of its taps, in floats, from the start of the taps area
    std::int32_t half = 0;   // its kernels' half-width: 2 * half + 1 taps per node
    std::int32_t zero = 0;   // bit 0: its v sin i column is 0 (clamped), bit 1: its R column
};

// The input rows are float32 whatever the weights' dtype (the first layer runs in float32, see Dims::first_f32).
inline std::size_t input_bytes(const Dims& d, std::size_t rows, bool jacobian) {
    return kAlign + align_up(rows * d.input_dim * 4) + (jacobian ? align_up(rows * d.n_network * 4) : 0);
}

inline Buffers buffers(const Dims& d, std::size_t rows, bool jacobian, bool host_output) {
    Buffers b;
    b.input = input_bytes(d, rows, jacobian);
    b.hidden = align_up(rows * d.widest_hidden * d.elem);
    const std::size_t f32_width = std::max(d.n_pixels, d.first_f32);
    b.logits = align_up(rows * f32_width * 4);
    if (d.broadening) b.intrinsic = align_up(rows * d.n_pixels * 4);
    // out | the Jacobian | its vmac column
    if (host_output) b.staging_out = align_up(rows * d.n_pixels * 4 * (jacobian ? 2 + d.n_labels : 1));
    if (jacobian) {
        b.tangent_in = align_up(rows * d.n_network * d.input_dim * 4);
        b.tangent_hidden = align_up(rows * d.n_network * d.widest_hidden * d.elem);
        b.tangent_last = align_up(rows * d.n_network * f32_width * 4);
    }
    if (d.broadening)
        b.kernels = align_up(rows * sizeof(RowRecord)) + align_up(rows * d.nodes * 4) +
                    align_up(rows * kernel_row_floats(d, jacobian) * 4);
    return b;
}

// Rows per pass: all n when they fit, else max_chunk; a forward_jacobian pass also keeps its tangents (and a host
// caller's Jacobian) within kJacobianBudget. Always >= 1.
inline std::size_t chunk_rows(const Dims& d, std::size_t n, std::size_t max_chunk, bool jacobian, bool host_output) {
    std::size_t rows = std::max<std::size_t>(1, std::min(n, max_chunk));
    if (jacobian) {
        const std::size_t per_row =
            std::max<std::size_t>(1, d.n_pixels * 4 * (d.n_network + (host_output ? 2 + d.n_labels : 0)));
        rows = std::min(rows, std::max<std::size_t>(1, kJacobianBudget / per_row));
    }
    return rows;
}

inline std::size_t chunk_count(std::size_t n, std::size_t rows) { return rows ? (n + rows - 1) / rows : 0; }

// The passes of a call: (first row, rows) for each.
inline std::vector<std::pair<std::size_t, std::size_t>> chunks(std::size_t n, std::size_t rows) {
    std::vector<std::pair<std::size_t, std::size_t>> out;
    for (std::size_t r0 = 0; r0 < n; r0 += rows) out.emplace_back(r0, std::min(rows, n - r0));
    return out;
}

// --- bias(+ReLU): cuBLASLt's epilogue or a kernel -------------------------------------------------------------------
// cuBLASLt may have no algorithm for a fused bias epilogue (cublasLtMatmulAlgoGetHeuristic fails or returns nothing,
// e.g. for n = 1 columns, or a 2-byte-aligned 16-bit output of odd size): the product then runs without an epilogue
// and a small elementwise kernel adds the bias (and applies ReLU). Decided once per cached cuBLASLt plan.
enum class BiasPath { none, fused, kernel };
inline const char* to_string(BiasPath b) { return b == BiasPath::none ? "none" : b == BiasPath::fused ? "fused" : "kernel"; }

// Whether a heuristic query gave a usable algorithm: status and the first result's state are
// CUBLAS_STATUS_SUCCESS (0), and at least one result was returned.
inline bool heuristic_usable(int status, int found, int first_state) { return status == 0 && found > 0 && first_state == 0; }

// has_bias: the product wants a bias (hidden or last layer, not a tangent). fused_usable: heuristic_usable() of the
// query with the epilogue (not asked when !has_bias).
inline BiasPath bias_path(bool has_bias, bool fused_usable) {
    return !has_bias ? BiasPath::none : fused_usable ? BiasPath::fused : BiasPath::kernel;
}

// --- CUDA graphs ------------------------------------------------------------------------------------------------
// A graph holds the network pass of one chunk on the workspace's fixed buffers: everything that varies per call
// (the input rows, the tangent scales, where the output goes) is copied into those buffers before it is
// launched. So what it depends on is the number of rows and the mode. z and clip are not part of the key: both
// are consumed on the host (the input rows and tangent scales are built there), so keying on them would only
// capture the same graph again.
struct GraphKey {
    std::size_t rows = 0;
    bool jacobian = false;
    bool operator==(const GraphKey& o) const { return rows == o.rows && jacobian == o.jacobian; }
};

enum class GraphAction { plain, capture, replay };
inline const char* to_string(GraphAction a) {
    return a == GraphAction::plain ? "plain" : a == GraphAction::capture ? "capture" : "replay";
}

// Which keys have a graph. A key seen for the first time runs plain launches (a one-off batch size never pays for
// a capture); the second time it is captured, then replayed. A key whose capture or instantiation failed
// (failed()) runs plain launches from then on, never captured again. At most `capacity` graphs are kept, the
// least recently used one is dropped first (store() says which, so its owner frees it). Not thread-safe: one per
// workspace, and a workspace serves one call at a time.
template <class Graph>
class GraphCache {
public:
    explicit GraphCache(std::size_t capacity = 8) : capacity_(std::max<std::size_t>(1, capacity)) {}

    // What to do for key; for capture, the caller then calls store() with the graph (or nothing if capture fails).
    GraphAction action(const GraphKey& key) {
        for (auto it = entries_.begin(); it != entries_.end(); ++it)
            if (it->key == key) {
                entries_.splice(entries_.begin(), entries_, it);  // most recently used first
                return it->plain_only ? GraphAction::plain : it->has_graph ? GraphAction::replay : GraphAction::capture;
            }
        entries_.push_front(Entry{key, false, false, Graph{}});
        trim();
        return GraphAction::plain;
    }
    // The capture (or instantiation) of key failed: plain launches for it from now on.
    void failed(const GraphKey& key) {
        for (auto& e : entries_)
            if (e.key == key && !e.has_graph) e.plain_only = true;
    }
    bool plain_only(const GraphKey& key) const {
        for (const auto& e : entries_)
            if (e.key == key) return e.plain_only;
        return false;
    }
    // Keep the graph captured for key; returns the graphs evicted to stay within capacity.
    std::vector<Graph> store(const GraphKey& key, Graph g) {
        for (auto& e : entries_)
            if (e.key == key) {
                e.graph = std::move(g);
                e.has_graph = true;
            }
        std::vector<Graph> dropped;
        while (graphs() > capacity_) {
            for (auto it = entries_.rbegin(); it != entries_.rend(); ++it)
                if (it->has_graph) {
                    dropped.push_back(std::move(it->graph));
                    entries_.erase(std::next(it).base());
                    break;
                }
        }
        trim();
        return dropped;
    }
    Graph* find(const GraphKey& key) {
        for (auto& e : entries_)
            if (e.key == key && e.has_graph) return &e.graph;
        return nullptr;
    }
    // Every graph (the workspace's buffers moved: all of them are stale). Keys marked plain-only stay so.
    std::vector<Graph> clear() {
        std::vector<Graph> out;
        for (auto& e : entries_)
            if (e.has_graph) out.push_back(std::move(e.graph));
        entries_.remove_if([](const Entry& e) { return !e.plain_only; });
        return out;
    }
    std::size_t graphs() const {
        return std::size_t(std::count_if(entries_.begin(), entries_.end(), [](const Entry& e) { return e.has_graph; }));
    }

private:
    struct Entry {
        GraphKey key;
        bool has_graph;
        bool plain_only;
        Graph graph;
    };
    // Keys without a graph are forgotten beyond 4 * capacity, the least recently used first (bounded memory; a
    // forgotten plain-only key is tried once more if it comes back).
    void trim() {
        while (entries_.size() > 4 * capacity_) {
            auto it = std::find_if(entries_.rbegin(), entries_.rend(), [](const Entry& e) { return !e.has_graph; });
            if (it == entries_.rend()) break;
            entries_.erase(std::next(it).base());
        }
    }
    std::size_t capacity_;
    std::list<Entry> entries_;
};

// --- 16-bit rounding (the hidden biases of 16-bit models) ------------------------------------------------------
// Round to nearest, ties to even (as CUDA's __float2half_rn / __float2bfloat16_rn); NaN stays NaN.
inline std::uint16_t float_to_bf16(float f) {
    std::uint32_t x;
    std::memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return std::uint16_t((x >> 16) | 0x40);  // quiet NaN
    x += 0x7fffu + ((x >> 16) & 1u);
    return std::uint16_t(x >> 16);
}

inline std::uint16_t float_to_half(float f) {
    std::uint32_t x;
    std::memcpy(&x, &f, 4);
    const std::uint32_t sign = (x >> 16) & 0x8000u;
    const std::uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return std::uint16_t(sign | 0x7e00u);  // NaN
    if (ax >= 0x477ff000u) return std::uint16_t(sign | 0x7c00u);  // rounds to >= 65520: inf
    if (ax < 0x38800000u) {  // below the smallest normal half (2^-14): subnormal or 0, in units of 2^-24
        float a;
        std::memcpy(&a, &ax, 4);
        return std::uint16_t(sign | std::uint32_t(std::nearbyint(a * 16777216.0f)));  // exact scaling, RNE
    }
    const std::uint32_t mant = ax & 0x7fffffu, exp = (ax >> 23) - 127 + 15;
    std::uint32_t h = (exp << 10) | (mant >> 13);
    const std::uint32_t rest = mant & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // may carry into the exponent: still right
    return std::uint16_t(sign | h);
}

inline std::string bytes_text(std::size_t b) {
    const double mib = double(b) / double(1 << 20);
    char buf[64];
    std::snprintf(buf, sizeof buf, "%zu bytes (%.1f MiB)", b, mib);
    return buf;
}

}  // namespace fastspec::detail::device_plan
