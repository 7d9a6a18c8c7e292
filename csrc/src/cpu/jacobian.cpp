// Decoder::forward_jacobian: flux and dF/d(labels) in one call, by forward-mode differentiation.
//
// For every spectrum we carry n_labels tangent rows next to the primal activations. The tangent of the
// decoder input is d(normalised label j)/d(label j) in column latent_dim + j of tangent row j (z has no
// tangent). Each layer multiplies the tangents by W (one BLAS GEMM over all rows * n_labels tangent rows,
// no bias), hidden layers then apply the ReLU mask of the primal, and the last layer multiplies by the
// derivative of scale * sigmoid(a) + offset. Cost: one forward pass for the flux plus one GEMM pass over
// n_labels times as many rows, about (1 + n_labels) forward passes.
#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <mutex>
#include <vector>

#include "../internal.hpp"

namespace fastspec {

namespace {

// Buffers of one Jacobian pass over a chunk of rows. Grown on demand and pooled process-wide (like
// forward's workspaces), so repeated calls allocate nothing once warm; concurrent calls take separate ones.
struct JacobianWorkspace {
    std::vector<float> input, tangent_in, h[2], t[2], last;
};

std::mutex g_pool_mutex;
std::vector<std::unique_ptr<JacobianWorkspace>> g_pool;

std::unique_ptr<JacobianWorkspace> acquire() {
    std::lock_guard<std::mutex> lock(g_pool_mutex);
    if (g_pool.empty()) return std::make_unique<JacobianWorkspace>();
    auto ws = std::move(g_pool.back());
    g_pool.pop_back();
    return ws;
}

void release(std::unique_ptr<JacobianWorkspace> ws) {
    std::lock_guard<std::mutex> lock(g_pool_mutex);
    g_pool.push_back(std::move(ws));
}

void grow(std::vector<float>& v, std::size_t n) {
    if (v.size() < n) v.resize(n);
}

// y (rows, out) = x (rows, in) W^T, W row-major (out, in): the tangent GEMM, no bias.
void gemm_xwt(const float* x, std::size_t rows, const float* W, int in, int out, float* y) {
    scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, blasint(rows), out, in, 1.0f, x, in, W, in, 0.0f, y,
                      out);
}

// The same product for a handful of rows (one spectrum's n_labels tangents): GEMVs over blocks of 256
// rows of W, so each block is read from memory once and from cache for the other rows. With so few rows a
// GEMM spends its time packing W; measured on the default model (19000 x 1024): 12.8 -> 8.6 ms.
void few_rows_xwt(const float* x, std::size_t rows, const float* W, int in, int out, float* y) {
    constexpr int block = 256;
    for (int o = 0; o < out; o += block) {
        const int nb = std::min(block, out - o);
        for (std::size_t r = 0; r < rows; ++r)
            scipy_cblas_sgemv(CblasRowMajor, CblasNoTrans, nb, in, 1.0f, W + std::size_t(o) * in, in, x + r * in, 1,
                              0.0f, y + r * out + o, 1);
    }
}

}  // namespace

void Decoder::forward_jacobian(const double* labels, std::size_t n, float* out, float* jacobian, const float* z,
                               bool clip) const {
    if (n == 0) return;
    if (!labels || !out || !jacobian) throw InputError("forward_jacobian: labels, out and jacobian must not be null");
    // The flux is forward()'s, bit for bit (it validates every input before writing anything).
    forward(labels, n, out, z, clip);

    const Model& m = model();
    const auto& layers = m.layers();
    const auto& info = m.labels();
    const std::size_t nl = m.n_labels(), nz = m.latent_dim(), np = m.n_pixels(), in0 = m.input_dim();
    std::size_t widest = 0;
    for (std::size_t k = 0; k + 1 < layers.size(); ++k) widest = std::max<std::size_t>(widest, layers[k].out);
    // The last layer's tangents are a (rows * nl, n_pixels) scratch before they are transposed into the
    // (n, n_pixels, nl) output: keep a chunk to 32 rows (~15 MB at 19000 pixels) and the GEMM's M within blasint.
    const std::size_t chunk = std::max<std::size_t>(
        1, std::min({options().max_chunk, std::size_t(32), std::size_t(0x7fffffff) / (nl * std::max<std::size_t>(np, widest))}));
    const double scale = m.output_scale(), offset = m.output_offset();

    auto ws = acquire();
    try {
        grow(ws->input, chunk * in0);
        grow(ws->tangent_in, chunk * nl * in0);
        for (auto* v : {&ws->h[0], &ws->h[1]}) grow(*v, chunk * widest);
        for (auto* v : {&ws->t[0], &ws->t[1]}) grow(*v, chunk * nl * widest);
        grow(ws->last, chunk * nl * np);

        for (std::size_t r0 = 0; r0 < n; r0 += chunk) {
            const std::size_t rows = std::min(chunk, n - r0);
            const double* lab = labels + r0 * nl;
            detail::make_input_rows(m, lab, z ? z + r0 * nz : nullptr, rows, clip, ws->input.data());
            // Input tangents: tangent row (r, j) is d(input row r)/d(label j), nonzero in one column only.
            float* tin = ws->tangent_in.data();
            std::fill(tin, tin + rows * nl * in0, 0.0f);
            for (std::size_t r = 0; r < rows; ++r)
                for (std::size_t j = 0; j < nl; ++j) {
                    const LabelInfo& l = info[j];
                    const double v = lab[r * nl + j];
                    // A clamped label does not move the output: its derivative is 0 outside the range.
                    if (clip && (v < l.min || v > l.max)) continue;
                    const double ds = l.scaling == Scaling::log10 ? 1.0 / (v * std::log(10.0)) : 1.0;
                    tin[(r * nl + j) * in0 + nz + j] = float(ds / l.norm_scale);
                }

            const float* x = ws->input.data();
            const float* t = tin;
            for (std::size_t k = 0; k < layers.size(); ++k) {
                const LayerInfo& L = layers[k];
                if (k + 1 == layers.size()) {
                    float* tl = ws->last.data();
                    if (rows == 1)
                        few_rows_xwt(t, nl, m.weights(k), L.in, L.out, tl);
                    else
                        gemm_xwt(t, rows * nl, m.weights(k), L.in, L.out, tl);
                    // dF/da = scale * s (1 - s), s = sigmoid(a) = (F - offset) / scale from forward()'s flux;
                    // written transposed into the (pixel, label) layout of the output.
                    for (std::size_t r = 0; r < rows; ++r) {
                        const float* f = out + (r0 + r) * np;
                        float* jr = jacobian + (r0 + r) * np * nl;
                        for (std::size_t p = 0; p < np; ++p) {
                            const double s = std::clamp((double(f[p]) - offset) / scale, 0.0, 1.0);
                            const float g = float(scale * s * (1.0 - s));
                            for (std::size_t j = 0; j < nl; ++j) jr[p * nl + j] = g * tl[(r * nl + j) * np + p];
                        }
                    }
                } else {
                    float* h = ws->h[k % 2].data();
                    float* tk = ws->t[k % 2].data();
                    detail::cpu::dense_relu(x, rows, m.weights(k), m.biases(k), L.in, L.out, h);
                    gemm_xwt(t, rows * nl, m.weights(k), L.in, L.out, tk);
                    // ReLU: derivative 1 where the output is positive, else 0 (also at the kink a = 0,
                    // the convention of torch.relu's backward).
                    for (std::size_t r = 0; r < rows; ++r) {
                        const float* hr = h + r * L.out;
                        for (std::size_t j = 0; j < nl; ++j) {
                            float* tr = tk + (r * nl + j) * L.out;
                            for (int i = 0; i < L.out; ++i)
                                if (!(hr[i] > 0.0f)) tr[i] = 0.0f;
                        }
                    }
                    x = h;
                    t = tk;
                }
            }
        }
    } catch (...) {
        release(std::move(ws));
        throw;
    }
    release(std::move(ws));
}

}  // namespace fastspec
