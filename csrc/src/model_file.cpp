// Reader of the model file, versions 1 to 3 (docs/model-format.md).
//
// The whole file is read into memory, then every field is checked before any weight is used:
// nothing is read outside the buffer (all offsets/sizes are range-checked with overflow-free
// arithmetic), and every failure throws ModelFileError("<path>: <problem>").
#include <algorithm>
#include <array>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <set>
#include <sstream>
#include <tuple>

#include "fastspec/fastspec.hpp"
#include "internal.hpp"

#ifdef FASTSPEC_HAVE_ZLIB
#include <zlib.h>
#endif

namespace fastspec {

struct Model::Impl {
    std::string path;
    int format_version = 1;
    std::vector<LabelInfo> labels;
    std::vector<LayerInfo> layers;
    BroadeningInfo broadening;
    std::size_t n_network_labels = 0;
    std::size_t latent_dim = 0, n_pixels = 0;
    double wl_start = 0, wl_step = 0, output_scale = 1, output_offset = 0;
    Medium medium = Medium::air;
    WeightDtype dtype = WeightDtype::f32;
    std::string provenance;
    std::vector<std::vector<float>> biases;
    std::vector<std::vector<std::uint16_t>> weights16;  // as stored, for 16-bit models (else empty)
    // float32 weights: read at load for f32 models; for 16-bit ones each layer is widened on the first call of
    // weights(k) (batched forward passes need them, batch-1 calls and fits read weights16 directly; a CUDA
    // decoder needs layer 0 only), so a process that never runs a batch holds the 16-bit copy only.
    mutable std::vector<std::vector<float>> weights;
    std::unique_ptr<std::once_flag[]> widen_once;  // one per layer (16-bit models)
    const std::vector<float>& weights32(std::size_t k) const;
    // Emulator error (version 2, optional): RMS (model - truth) per pixel on a (vsini, resolution) node grid.
    std::vector<double> error_vsini, error_resolution;
    std::vector<float> error_rms;  // (n_vsini, n_resolution, n_pixels)
};

namespace {

constexpr char kMagic[8] = {'F', 'S', 'P', 'E', 'C', 'M', 'D', 'L'};
constexpr char kTrailer[4] = {'F', 'E', 'N', 'D'};
constexpr std::uint32_t kOldestVersion = 1, kVersion = 3;
constexpr std::uint64_t kHeaderBytes = 128, kLabelBytes = 80, kLayerBytes = 48, kTrailerBytes = 8;
constexpr std::uint64_t kAlign = 64;
constexpr std::uint64_t kMaxLabels = 64, kMaxLatent = 4096, kMaxLayers = 64, kMaxDim = 1u << 20;
constexpr std::uint64_t kMaxProvenance = 16u << 20;

// Little-endian field access into a buffer whose bounds the caller has already checked.
std::uint32_t u32(const std::uint8_t* p) {
    return std::uint32_t(p[0]) | std::uint32_t(p[1]) << 8 | std::uint32_t(p[2]) << 16 | std::uint32_t(p[3]) << 24;
}
std::uint64_t u64(const std::uint8_t* p) { return std::uint64_t(u32(p)) | std::uint64_t(u32(p + 4)) << 32; }
double f64(const std::uint8_t* p) {
    std::uint64_t bits = u64(p);
    double d;
    std::memcpy(&d, &bits, sizeof d);
    return d;
}
float f32(const std::uint8_t* p) {
    std::uint32_t bits = u32(p);
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

// IEEE binary16 -> float32, exact for every input (subnormals, inf and NaN included).
float half_to_float(std::uint16_t h) {
    std::uint32_t sign = std::uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    } else if (mant == 0) {
        bits = sign;
    } else {  // subnormal: mant * 2^-24, exactly representable as a normal float
        float f = std::ldexp(float(mant), -24);
        std::memcpy(&bits, &f, sizeof bits);
        bits |= sign;
    }
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

float bf16_to_float(std::uint16_t h) {
    std::uint32_t bits = std::uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

bool all_zero(const std::uint8_t* p, std::size_t n) {
    for (std::size_t i = 0; i < n; ++i)
        if (p[i]) return false;
    return true;
}

// Valid UTF-8 (no overlongs, no surrogates, nothing above U+10FFFF).
bool valid_utf8(const std::uint8_t* s, std::size_t n) {
    std::size_t i = 0;
    while (i < n) {
        std::uint8_t c = s[i];
        std::size_t len;
        std::uint32_t cp;
        if (c < 0x80) { ++i; continue; }
        if ((c & 0xe0) == 0xc0) { len = 2; cp = c & 0x1f; }
        else if ((c & 0xf0) == 0xe0) { len = 3; cp = c & 0x0f; }
        else if ((c & 0xf8) == 0xf0) { len = 4; cp = c & 0x07; }
        else return false;
        if (n - i < len) return false;
        for (std::size_t k = 1; k < len; ++k) {
            if ((s[i + k] & 0xc0) != 0x80) return false;
            cp = cp << 6 | (s[i + k] & 0x3f);
        }
        static const std::uint32_t min_cp[5] = {0, 0, 0x80, 0x800, 0x10000};
        if (cp < min_cp[len] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return false;
        i += len;
    }
    return true;
}

std::string fixed_string(const std::uint8_t* p, std::size_t size) {
    std::size_t n = 0;
    while (n < size && p[n]) ++n;
    return std::string(reinterpret_cast<const char*>(p), n);
}

class Reader {
public:
    Reader(std::string path, std::vector<std::uint8_t> data) : path_(std::move(path)), d_(std::move(data)) {}

    template <class... Args>
    [[noreturn]] void fail(const Args&... parts) const {
        std::ostringstream os;
        os << path_ << ": ";
        (os << ... << parts);
        throw ModelFileError(os.str());
    }

    std::shared_ptr<Model::Impl> parse();

private:
    void check_fixed_string(const std::uint8_t* p, std::size_t size, const std::string& what, bool name) const;
    std::string path_;
    std::vector<std::uint8_t> d_;
};

void Reader::check_fixed_string(const std::uint8_t* p, std::size_t size, const std::string& what, bool name) const {
    std::size_t n = 0;
    while (n < size && p[n]) ++n;
    if (n == size) fail(what, " is not NUL-terminated within ", size, " bytes");
    if (!all_zero(p + n, size - n)) fail(what, " has bytes after its NUL terminator");
    if (name && n == 0) fail(what, " is empty");
    for (std::size_t i = 0; i < n; ++i) {
        char c = char(p[i]);
        bool ok = name ? ((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_') : (c >= 0x20 && c < 0x7f);
        if (!ok) fail(what, " has a character (byte ", int(p[i]), ") outside ", name ? "[a-z0-9_]" : "printable ASCII");
    }
}

std::shared_ptr<Model::Impl> Reader::parse() {
    const std::uint64_t size = d_.size();
    const std::uint8_t* h = d_.data();
    if (size < kHeaderBytes + kTrailerBytes)
        fail("truncated: ", size, " bytes is smaller than a header and a trailer (", kHeaderBytes + kTrailerBytes, ")");
    if (std::memcmp(h, kMagic, 8) != 0) fail("not a fastspec model file (bad magic; expected \"FSPECMDL\")");
    const std::uint32_t version = u32(h + 8);
    if (version < kOldestVersion || version > kVersion)
        fail("format version ", version, " is not supported; this reader knows versions ", kOldestVersion, "-", kVersion);
    if (u32(h + 12) != kHeaderBytes) fail("header_bytes is ", u32(h + 12), ", expected ", kHeaderBytes);
    const std::uint64_t file_bytes = u64(h + 16);
    if (file_bytes > size) fail("truncated: header says ", file_bytes, " bytes, file has ", size);
    if (file_bytes < size) fail("header says ", file_bytes, " bytes but the file has ", size, " (trailing data)");
    const std::uint8_t* trailer = h + size - kTrailerBytes;
    if (std::memcmp(trailer, kTrailer, 4) != 0) fail("bad trailer magic (expected \"FEND\"); file truncated or corrupt");
    const std::uint32_t crc_stored = u32(trailer + 4), crc = detail::crc32(h, size - kTrailerBytes);
    if (crc != crc_stored) {
        std::ostringstream os;
        os << std::hex << "CRC-32 mismatch: trailer says 0x" << crc_stored << ", contents give 0x" << crc
           << " (file corrupt)";
        fail(os.str());
    }

    auto m = std::make_shared<Model::Impl>();
    m->path = path_;
    m->format_version = int(version);
    const std::uint64_t n_labels = u32(h + 24), latent = u32(h + 28), n_layers = u32(h + 32);
    const std::uint32_t dtype = u32(h + 36);
    if (n_labels < 1 || n_labels > kMaxLabels) fail("n_labels = ", n_labels, " is outside [1, ", kMaxLabels, "]");
    if (latent > kMaxLatent) fail("latent_dim = ", latent, " is above the limit ", kMaxLatent);
    if (n_layers < 1 || n_layers > kMaxLayers) fail("n_layers = ", n_layers, " is outside [1, ", kMaxLayers, "]");
    if (dtype < 1 || dtype > 3) fail("weight_dtype = ", dtype, " is unknown (1 = f32, 2 = f16, 3 = bf16)");
    m->dtype = WeightDtype(dtype);
    m->latent_dim = latent;
    m->wl_start = f64(h + 40);
    m->wl_step = f64(h + 48);
    if (!std::isfinite(m->wl_start)) fail("wavelength_start = ", m->wl_start, " is not finite");
    if (!std::isfinite(m->wl_step) || !(m->wl_step > 0)) fail("wavelength_step = ", m->wl_step, " must be finite and > 0");
    m->n_pixels = u32(h + 56);
    if (m->n_pixels < 1 || m->n_pixels > kMaxDim) fail("n_pixels = ", m->n_pixels, " is outside [1, ", kMaxDim, "]");
    const std::uint32_t medium = u32(h + 60);
    if (medium != 1 && medium != 2) fail("wavelength_medium = ", medium, " is unknown (1 = air, 2 = vacuum)");
    m->medium = Medium(medium);
    if (u32(h + 64) != 1) fail("output_transform = ", u32(h + 64), " is unknown (1 = scale * sigmoid + offset)");
    // Version 2: the broadening stage (offset 68: 0 = none, 1 = rotation then Gaussian on point samples, version 3
    // also 2 = the same on pixel means; 104: epsilon; 112: segments).
    const std::uint32_t broadening = u32(h + 68);
    if (version == 1 && broadening != 0) fail("reserved header field at offset 68 is not zero");
    if (broadening > 2)
        fail("broadening = ", broadening, " is unknown (0 = none, 1 = rotation then Gaussian on point samples, "
             "2 = on pixel means)");
    if (broadening == 2 && version < 3) fail("broadening = 2 (pixel means) needs format version 3, the file has ", version);
    m->output_scale = f64(h + 72);
    m->output_offset = f64(h + 80);
    if (!std::isfinite(m->output_scale) || m->output_scale == 0) fail("output_scale = ", m->output_scale, " must be finite and non-zero");
    if (!std::isfinite(m->output_offset)) fail("output_offset = ", m->output_offset, " is not finite");
    if (version == 1 && !all_zero(h + 104, 24)) fail("reserved header bytes 104-127 are not zero");
    if (version >= 2 && broadening == 0 && !all_zero(h + 104, 16)) fail("broadening = 0 but header bytes 104-119 are not zero");
    const std::uint64_t error_at = version >= 2 ? u64(h + 120) : 0;  // the emulator-error block, 0 = none
    if (broadening >= 1) {
        m->broadening.enabled = true;
        m->broadening.sampling = broadening == 2 ? Sampling::pixel_mean : Sampling::point;
        m->broadening.epsilon = f64(h + 104);
        if (!(m->broadening.epsilon >= 0 && m->broadening.epsilon <= 1))
            fail("limb darkening epsilon = ", m->broadening.epsilon, " is not in [0, 1]");
        const std::uint32_t segments = u32(h + 112);
        if (segments < 1 || segments > 4096) fail("broadening segments = ", segments, " is not in [1, 4096]");
        m->broadening.segments = int(segments);
        if (!all_zero(h + 116, 4)) fail("reserved header bytes 116-119 are not zero");
    }

    // Tables: sizes are small (limits above), so this arithmetic cannot overflow.
    const std::uint64_t labels_at = kHeaderBytes, layers_at = labels_at + kLabelBytes * n_labels;
    const std::uint64_t tables_end = layers_at + kLayerBytes * n_layers;
    const std::uint64_t payload_end = size - kTrailerBytes;  // blocks must end before the trailer
    if (tables_end > payload_end) fail("truncated: the label and layer tables need ", tables_end, " bytes, file has ", size);
    const std::uint64_t prov_off = u64(h + 88), prov_bytes = u64(h + 96);
    if (prov_off != tables_end) fail("provenance_offset = ", prov_off, ", expected ", tables_end, " (right after the layer table)");
    if (prov_bytes > kMaxProvenance) fail("provenance_bytes = ", prov_bytes, " is above the limit ", kMaxProvenance);
    if (prov_bytes > payload_end - prov_off) fail("provenance (", prov_bytes, " bytes at ", prov_off, ") runs past the end of the data");
    if (!valid_utf8(h + prov_off, prov_bytes)) fail("provenance is not valid UTF-8");
    m->provenance.assign(reinterpret_cast<const char*>(h + prov_off), prov_bytes);

    std::set<std::string> names;
    for (std::uint64_t i = 0; i < n_labels; ++i) {
        const std::uint8_t* r = h + labels_at + kLabelBytes * i;
        const std::string what = "label " + std::to_string(i);
        check_fixed_string(r, 16, what + " name", true);
        LabelInfo l;
        l.name = fixed_string(r, 16);
        check_fixed_string(r + 16, 16, "label '" + l.name + "' unit", false);
        l.unit = fixed_string(r + 16, 16);
        if (!names.insert(l.name).second) fail("label name '", l.name, "' appears twice");
        l.min = f64(r + 32);
        l.max = f64(r + 40);
        if (!std::isfinite(l.min) || !std::isfinite(l.max) || !(l.min < l.max))
            fail("label '", l.name, "': range [", l.min, ", ", l.max, "] must be finite with min < max");
        const std::uint32_t scaling = u32(r + 48);
        if (scaling != 1 && scaling != 2) fail("label '", l.name, "': scaling = ", scaling, " is unknown (1 = linear, 2 = log10)");
        l.scaling = Scaling(scaling);
        if (l.scaling == Scaling::log10 && !(l.min > 0)) fail("label '", l.name, "': log10 scaling needs min > 0, min is ", l.min);
        const std::uint32_t role = u32(r + 52);  // reserved (0) in version 1
        if ((version == 1 && role != 0) || !all_zero(r + 72, 8)) fail("label '", l.name, "': reserved bytes are not zero");
        if (role > 2) fail("label '", l.name, "': role = ", role, " is unknown (0 = network, 1 = vsini, 2 = resolution)");
        l.role = LabelRole(role);
        l.norm_offset = f64(r + 56);
        l.norm_scale = f64(r + 64);
        if (!std::isfinite(l.norm_offset)) fail("label '", l.name, "': norm_offset = ", l.norm_offset, " is not finite");
        if (!std::isfinite(l.norm_scale) || l.norm_scale == 0) fail("label '", l.name, "': norm_scale = ", l.norm_scale, " must be finite and non-zero");
        if (l.role == LabelRole::network) ++m->n_network_labels;
        m->labels.push_back(std::move(l));
    }
    // The broadening stage takes exactly one v sin i and one R label; without it every label feeds the network.
    for (LabelRole role : {LabelRole::vsini, LabelRole::resolution}) {
        std::size_t count = 0, at = 0;
        for (std::size_t i = 0; i < m->labels.size(); ++i)
            if (m->labels[i].role == role) ++count, at = i;
        if (!m->broadening.enabled && count) fail("label '", m->labels[at].name, "' has role ", to_string(role), " but the file has no broadening stage");
        if (m->broadening.enabled && count != 1)
            fail("the broadening stage needs exactly one label with role ", to_string(role), ", the file has ", count);
        if (!count) continue;
        const LabelInfo& l = m->labels[at];
        if (role == LabelRole::vsini && !(l.min >= 0 && l.max <= 3000))
            fail("label '", l.name, "' (vsini): range [", l.min, ", ", l.max, "] km/s must lie in [0, 3000]");
        if (role == LabelRole::resolution && !(l.min >= 10))
            fail("label '", l.name, "' (resolution): min = ", l.min, " must be >= 10");
        (role == LabelRole::vsini ? m->broadening.vsini_label : m->broadening.resolution_label) = at;
    }

    // Layers: dims chain, blocks aligned, inside [end of provenance, trailer), and disjoint.
    const std::uint64_t elem = m->dtype == WeightDtype::f32 ? 4 : 2;
    const std::uint64_t blocks_from = prov_off + prov_bytes;
    std::vector<std::pair<std::uint64_t, std::uint64_t>> extents;  // [begin, end) of every block
    std::uint64_t expected_in = latent + m->n_network_labels;
    for (std::uint64_t k = 0; k < n_layers; ++k) {
        const std::uint8_t* r = h + layers_at + kLayerBytes * k;
        const std::uint64_t in = u32(r), out = u32(r + 4);
        const std::uint32_t act = u32(r + 8);
        const bool last = k + 1 == n_layers;
        if (in < 1 || in > kMaxDim || out < 1 || out > kMaxDim)
            fail("layer ", k, ": in = ", in, ", out = ", out, " must be in [1, ", kMaxDim, "]");
        if (in != expected_in)
            fail("layer ", k, ": in = ", in, " but ", k == 0 ? "latent_dim + network labels" : "the previous layer's out", " is ", expected_in);
        if (last && out != m->n_pixels) fail("layer ", k, " (the last): out = ", out, " but n_pixels = ", m->n_pixels);
        const std::uint32_t want_act = last ? 2 : 1;
        if (act != want_act)
            fail("layer ", k, ": activation = ", act, ", expected ", want_act, last ? " (sigmoid on the last layer)" : " (ReLU on hidden layers)");
        if (u32(r + 12) != 0) fail("layer ", k, ": reserved field is not zero");
        const std::uint64_t w_off = u64(r + 16), w_bytes = u64(r + 24), b_off = u64(r + 32), b_bytes = u64(r + 40);
        if (w_bytes != in * out * elem)
            fail("layer ", k, ": weight_bytes = ", w_bytes, ", expected out * in * ", elem, " = ", in * out * elem);
        if (b_bytes != out * 4) fail("layer ", k, ": bias_bytes = ", b_bytes, ", expected out * 4 = ", out * 4);
        for (auto [what, off, bytes] : {std::tuple{"weight", w_off, w_bytes}, std::tuple{"bias", b_off, b_bytes}}) {
            if (off % kAlign) fail("layer ", k, ": ", what, "_offset = ", off, " is not 64-byte aligned");
            if (off < blocks_from || off > payload_end || bytes > payload_end - off)
                fail("layer ", k, ": ", what, " block [", off, ", +", bytes, ") lies outside the data area [", blocks_from, ", ", payload_end, ")");
            extents.emplace_back(off, off + bytes);
        }
        m->layers.push_back(LayerInfo{int(in), int(out), Activation(act)});
        expected_in = out;
    }
    // The emulator-error block: u32 n_vsini, n_resolution, n_pixels, reserved; f64 nodes; f32 RMS values.
    std::uint64_t nv = 0, nr = 0, error_values_at = 0;
    if (error_at) {
        if (error_at % kAlign) fail("emulator_error_offset = ", error_at, " is not 64-byte aligned");
        if (error_at < blocks_from || error_at > payload_end || payload_end - error_at < 16)
            fail("emulator-error block at ", error_at, " lies outside the data area [", blocks_from, ", ", payload_end, ")");
        nv = u32(h + error_at), nr = u32(h + error_at + 4);
        if (nv < 1 || nv > 64 || nr < 1 || nr > 64) fail("emulator error: ", nv, " x ", nr, " nodes, each must be in [1, 64]");
        if (u32(h + error_at + 8) != m->n_pixels) fail("emulator error: n_pixels = ", u32(h + error_at + 8), ", expected ", m->n_pixels);
        if (u32(h + error_at + 12) != 0) fail("emulator error: reserved field is not zero");
        error_values_at = error_at + 16 + 8 * (nv + nr);
        const std::uint64_t bytes = 16 + 8 * (nv + nr) + 4 * nv * nr * m->n_pixels;
        if (bytes > payload_end - error_at) fail("emulator-error block (", bytes, " bytes at ", error_at, ") runs past the end of the data");
        extents.emplace_back(error_at, error_at + bytes);
        for (const char* name : {"vsini", "resolution"})
            if (std::none_of(m->labels.begin(), m->labels.end(), [&](const LabelInfo& l) { return l.name == name; }))
                fail("emulator error needs labels named 'vsini' and 'resolution'");
        for (std::uint64_t i = 0; i < nv + nr; ++i) {
            const double v = f64(h + error_at + 16 + 8 * i), prev = i && i != nv ? f64(h + error_at + 8 + 8 * i) : -1.0;
            if (!std::isfinite(v) || v < 0 || (i >= nv && !(v > 0)) || (i && i != nv && !(v > prev)))
                fail("emulator error: node ", i, " = ", v, " (nodes must be finite, increasing, vsini >= 0, resolution > 0)");
        }
    }
    std::sort(extents.begin(), extents.end());
    for (std::size_t i = 1; i < extents.size(); ++i)
        if (extents[i].first < extents[i - 1].second) fail("weight/bias blocks overlap at offset ", extents[i].first);

    // All checks passed: decode weights (16-bit ones kept as stored, see Impl::weights) and biases.
    if (m->dtype != WeightDtype::f32) m->widen_once = std::make_unique<std::once_flag[]>(n_layers);
    for (std::uint64_t k = 0; k < n_layers; ++k) {
        const std::uint8_t* r = h + layers_at + kLayerBytes * k;
        const std::uint64_t count = std::uint64_t(m->layers[k].in) * m->layers[k].out;
        const std::uint8_t* w = h + u64(r + 16);
        if (m->dtype == WeightDtype::f32) {
            std::vector<float> wf(count);
            for (std::uint64_t i = 0; i < count; ++i) wf[i] = f32(w + 4 * i);
            for (std::uint64_t i = 0; i < count; ++i)
                if (!std::isfinite(wf[i])) fail("layer ", k, ": weight ", i, " is not finite");
            m->weights.push_back(std::move(wf));
        } else {
            std::vector<std::uint16_t> raw(count);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
            std::memcpy(raw.data(), w, 2 * count);  // the file is little-endian too
#else
            for (std::uint64_t i = 0; i < count; ++i) raw[i] = std::uint16_t(w[2 * i] | w[2 * i + 1] << 8);
#endif
            // Inf or NaN: all exponent bits set (binary16: 5 bits, bfloat16: 8 bits). A branch-free count first
            // (it vectorises), the index only for the message.
            const std::uint16_t exp_mask = m->dtype == WeightDtype::f16 ? 0x7c00u : 0x7f80u;
            std::uint64_t bad = 0;
            for (std::uint64_t i = 0; i < count; ++i) bad += (raw[i] & exp_mask) == exp_mask;
            if (bad)
                for (std::uint64_t i = 0; i < count; ++i)
                    if ((raw[i] & exp_mask) == exp_mask) fail("layer ", k, ": weight ", i, " is not finite");
            m->weights16.push_back(std::move(raw));
            m->weights.emplace_back();  // widened on first use (weights32)
        }
        const std::uint8_t* b = h + u64(r + 32);
        std::vector<float> bf(m->layers[k].out);
        for (std::size_t i = 0; i < bf.size(); ++i) {
            bf[i] = f32(b + 4 * i);
            if (!std::isfinite(bf[i])) fail("layer ", k, ": bias ", i, " is not finite");
        }
        m->biases.push_back(std::move(bf));
    }
    if (error_at) {
        for (std::uint64_t i = 0; i < nv; ++i) m->error_vsini.push_back(f64(h + error_at + 16 + 8 * i));
        for (std::uint64_t i = 0; i < nr; ++i) m->error_resolution.push_back(f64(h + error_at + 16 + 8 * (nv + i)));
        m->error_rms.resize(nv * nr * m->n_pixels);
        for (std::size_t i = 0; i < m->error_rms.size(); ++i) {
            m->error_rms[i] = f32(h + error_values_at + 4 * i);
            if (!std::isfinite(m->error_rms[i]) || m->error_rms[i] < 0) fail("emulator error: value ", i, " = ", m->error_rms[i], " must be finite and >= 0");
        }
    }
    return m;
}

}  // namespace

const std::vector<float>& Model::Impl::weights32(std::size_t k) const {
    if (k >= layers.size()) throw std::out_of_range("Model::weights: layer " + std::to_string(k) + " of " + std::to_string(layers.size()));
    if (!weights16.empty()) {
        std::call_once(widen_once[k], [this, k] {
            const auto& raw = weights16[k];
            std::vector<float> wf(raw.size());
            if (dtype == WeightDtype::f16)
                for (std::size_t i = 0; i < raw.size(); ++i) wf[i] = half_to_float(raw[i]);
            else
                for (std::size_t i = 0; i < raw.size(); ++i) wf[i] = bf16_to_float(raw[i]);
            weights[k] = std::move(wf);  // its own element: other layers may be widened concurrently
        });
    }
    return weights[k];
}

#ifdef FASTSPEC_HAVE_ZLIB
std::uint32_t detail::crc32(const std::uint8_t* data, std::size_t n) {
    // zlib's crc32 (vectorised; the same polynomial and conventions as the trailer's CRC-32), fed in pieces
    // because its length argument is 32-bit.
    uLong c = ::crc32(0L, Z_NULL, 0);
    for (std::size_t done = 0; done < n;) {
        const uInt piece = uInt(std::min<std::size_t>(n - done, std::size_t(1) << 30));
        c = ::crc32(c, data + done, piece);
        done += piece;
    }
    return std::uint32_t(c);
}
#else
std::uint32_t detail::crc32(const std::uint8_t* data, std::size_t n) {
    // Without zlib (the build found no zlib.h): the table-driven reference, byte by byte.
    static const auto table = [] {
        std::array<std::uint32_t, 256> t{};
        for (std::uint32_t i = 0; i < 256; ++i) {
            std::uint32_t c = i;
            for (int k = 0; k < 8; ++k) c = c & 1 ? 0xedb88320u ^ (c >> 1) : c >> 1;
            t[i] = c;
        }
        return t;
    }();
    std::uint32_t c = 0xffffffffu;
    for (std::size_t i = 0; i < n; ++i) c = table[(c ^ data[i]) & 0xff] ^ (c >> 8);
    return c ^ 0xffffffffu;
}
#endif

Model Model::load(const std::string& path) {
    errno = 0;
    std::ifstream f(path, std::ios::binary | std::ios::ate);
    if (!f) {
        int e = errno ? errno : ENOENT;
        throw FileAccessError(path + ": cannot open model file: " + std::strerror(e), e);
    }
    std::error_code ec;
    if (std::filesystem::is_directory(path, ec)) throw FileAccessError(path + ": is a directory, not a model file", EISDIR);
    const std::streamoff size = f.tellg();
    if (size < 0) throw FileAccessError(path + ": cannot determine the file size", EIO);
    std::vector<std::uint8_t> data(static_cast<std::size_t>(size));
    f.seekg(0);
    if (size > 0 && !f.read(reinterpret_cast<char*>(data.data()), size))
        throw FileAccessError(path + ": read error", errno ? errno : EIO);
    return Model(Reader(path, std::move(data)).parse());
}

int Model::format_version() const { return impl_->format_version; }
std::size_t Model::n_labels() const { return impl_->labels.size(); }
std::size_t Model::n_network_labels() const { return impl_->n_network_labels; }
const BroadeningInfo& Model::broadening() const { return impl_->broadening; }
std::size_t Model::latent_dim() const { return impl_->latent_dim; }
std::size_t Model::n_pixels() const { return impl_->n_pixels; }
const std::vector<LabelInfo>& Model::labels() const { return impl_->labels; }
const std::vector<LayerInfo>& Model::layers() const { return impl_->layers; }
double Model::wavelength_start() const { return impl_->wl_start; }
double Model::wavelength_step() const { return impl_->wl_step; }
std::vector<double> Model::wavelength() const {
    std::vector<double> wl(impl_->n_pixels);
    for (std::size_t i = 0; i < wl.size(); ++i) wl[i] = impl_->wl_start + impl_->wl_step * double(i);
    return wl;
}
Medium Model::medium() const { return impl_->medium; }
WeightDtype Model::weight_dtype() const { return impl_->dtype; }
double Model::output_scale() const { return impl_->output_scale; }
double Model::output_offset() const { return impl_->output_offset; }
const std::string& Model::provenance_json() const { return impl_->provenance; }
const std::string& Model::path() const { return impl_->path; }
const float* Model::weights(std::size_t k) const { return impl_->weights32(k).data(); }
const float* Model::biases(std::size_t k) const { return impl_->biases.at(k).data(); }
const std::uint16_t* Model::stored_weights16(std::size_t k) const {
    if (impl_->weights16.empty()) return nullptr;
    return impl_->weights16.at(k).data();
}
bool Model::has_emulator_error() const { return !impl_->error_rms.empty(); }

bool Model::emulator_error(double vsini, double resolution, float* out) const {
    const Impl& m = *impl_;
    if (m.error_rms.empty()) return false;
    if (!std::isfinite(vsini) || !(resolution > 0)) throw InputError("emulator_error: vsini and resolution must be finite, resolution > 0");
    // Bilinear in (vsini, log10 R) between the nodes, constant beyond the outermost ones.
    auto bracket = [](const std::vector<double>& nodes, double x, std::size_t& i, double& t) {
        if (nodes.size() == 1 || x <= nodes.front()) { i = 0, t = 0; return; }
        if (x >= nodes.back()) { i = nodes.size() - 2, t = 1; return; }
        i = std::size_t(std::upper_bound(nodes.begin(), nodes.end(), x) - nodes.begin()) - 1;
        t = (x - nodes[i]) / (nodes[i + 1] - nodes[i]);
    };
    std::vector<double> log_r(m.error_resolution.size());
    for (std::size_t k = 0; k < log_r.size(); ++k) log_r[k] = std::log10(m.error_resolution[k]);
    std::size_t iv, ir;
    double tv, tr;
    bracket(m.error_vsini, vsini, iv, tv);
    bracket(log_r, std::log10(resolution), ir, tr);
    const std::size_t nr = log_r.size(), np = m.n_pixels;
    const std::size_t iv1 = std::min(iv + 1, m.error_vsini.size() - 1), ir1 = std::min(ir + 1, nr - 1);
    const float* a = &m.error_rms[(iv * nr + ir) * np];
    const float* b = &m.error_rms[(iv * nr + ir1) * np];
    const float* c = &m.error_rms[(iv1 * nr + ir) * np];
    const float* d = &m.error_rms[(iv1 * nr + ir1) * np];
    for (std::size_t p = 0; p < np; ++p)
        out[p] = float((1 - tv) * ((1 - tr) * a[p] + tr * b[p]) + tv * ((1 - tr) * c[p] + tr * d[p]));
    return true;
}

std::size_t Model::parameter_count() const {
    std::size_t n = 0;
    for (const auto& l : impl_->layers) n += std::size_t(l.in) * l.out + l.out;
    return n;
}

const char* to_string(Scaling s) noexcept { return s == Scaling::log10 ? "log10" : "linear"; }
const char* to_string(Activation a) noexcept { return a == Activation::sigmoid ? "sigmoid" : "relu"; }
const char* to_string(WeightDtype d) noexcept {
    return d == WeightDtype::f16 ? "f16" : d == WeightDtype::bf16 ? "bf16" : "f32";
}
const char* to_string(Medium m) noexcept { return m == Medium::vacuum ? "vacuum" : "air"; }
const char* to_string(LabelRole r) noexcept {
    return r == LabelRole::vsini ? "vsini" : r == LabelRole::resolution ? "resolution" : "network";
}

}  // namespace fastspec
