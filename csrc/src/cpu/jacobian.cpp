// Decoder::forward_jacobian: flux and dF/d(labels) in one call, by forward-mode differentiation.
//
// For every spectrum we carry one tangent row per network label next to the primal activations. The tangent of
// the decoder input is d(normalised label)/d(label) in that label's input column (z has no tangent). Each layer
// multiplies the tangents by W (one BLAS GEMM over all rows * network-label tangent rows, no bias; at batch 1 one
// multi-vector GEMV), hidden layers then apply the ReLU mask of the primal, and the last layer multiplies by the
// derivative of scale * sigmoid(a) + offset. A broadening stage then broadens the flux and the network columns
// and gives the v sin i and R columns from its kernels' derivatives.
#include <algorithm>
#include <cmath>
#include <memory>
#include <mutex>
#include <vector>

#include "../decoder_impl.hpp"
#include "blas.hpp"

namespace fastspec {

namespace {

void grow(std::vector<float>& v, std::size_t n) {
    if (v.size() < n) v.resize(n);
}

// y (rows, out) = x (rows, in) W^T, W row-major (out, in): the tangent GEMM, no bias.
void gemm_xwt(const float* x, std::size_t rows, const float* W, int in, int out, float* y) {
    detail::blas::gemm_xwt(x, int(rows), W, in, out, y);
}

// The same product for a handful of rows (one spectrum's n_labels tangents): GEMVs over blocks of 256
// rows of W, so each block is read from memory once and from cache for the other rows. With so few rows a
// GEMM spends its time packing W; measured on the default model (19000 x 1024): 12.8 -> 8.6 ms.
void few_rows_xwt(const float* x, std::size_t rows, const float* W, int in, int out, float* y) {
    constexpr int block = 256;
    for (int o = 0; o < out; o += block) {
        const int nb = std::min(block, out - o);
        for (std::size_t r = 0; r < rows; ++r)
            detail::blas::gemv(W + std::size_t(o) * in, nb, in, in, x + r * in, y + r * out + o);
    }
}

// The same from 16-bit weights (f16, or bf16 when bf16) with the AVX-512 multi-vector GEMV: every weight is
// read once, in half the bytes of the float32 copy, for all the rows (the last layer's weights are most of a
// batch-1 Jacobian's memory traffic).
void few_rows_xwt16(const float* x, std::size_t rows, const std::uint16_t* W, bool bf16, int in, int out, float* y) {
    detail::cpu::gemv16_multi(W, bf16, in, out, x, int(rows), y);
}

// The network's Jacobian: jacobian (n, n_pixels, n_labels) gets d(network output)/d(label) in the columns of the
// network labels and 0 in the others (a broadening stage's, filled by the caller). flux is the network's output
// for these inputs (already computed and validated): the sigmoid's derivative is read from it.
void network_jacobian(const Model& m, const DecoderOptions& options, bool direct16, const double* labels,
                      std::size_t n, const float* flux, float* jacobian, const float* z, bool clip, JacobianBuffers& ws) {
    const auto& layers = m.layers();
    const auto& info = m.labels();
    const std::size_t nl = m.n_labels(), nz = m.latent_dim(), np = m.n_pixels(), in0 = m.input_dim();
    std::vector<std::size_t> net;  // the label index of each network input
    for (std::size_t j = 0; j < nl; ++j)
        if (info[j].role == LabelRole::network) net.push_back(j);
    const std::size_t nt = net.size();  // tangent rows per spectrum
    std::size_t widest = 0;
    for (std::size_t k = 0; k + 1 < layers.size(); ++k) widest = std::max<std::size_t>(widest, layers[k].out);
    // The last layer's tangents are a (rows * nt, n_pixels) scratch before they are transposed into the
    // (n, n_pixels, nl) output: keep a chunk to 32 rows (~15 MB at 19000 pixels) and the GEMM's M within blasint.
    const std::size_t chunk = std::max<std::size_t>(
        1, std::min({options.max_chunk, std::size_t(32), std::size_t(0x7fffffff) / (nt * std::max<std::size_t>(np, widest))}));
    const double scale = m.output_scale(), offset = m.output_offset();

    {
        grow(ws.input, chunk * in0);
        grow(ws.scales, chunk * nt);
        grow(ws.tangent_in, chunk * nt * in0);
        for (auto* v : {&ws.h[0], &ws.h[1]}) grow(*v, chunk * widest);
        for (auto* v : {&ws.t[0], &ws.t[1]}) grow(*v, chunk * nt * widest);
        grow(ws.last, chunk * nt * np);

        for (std::size_t r0 = 0; r0 < n; r0 += chunk) {
            const std::size_t rows = std::min(chunk, n - r0);
            const double* lab = labels + r0 * nl;
            detail::make_input_rows(m, lab, z ? z + r0 * nz : nullptr, rows, clip, ws.input.data());
            // Input tangents: tangent row (r, t) is d(input row r)/d(label net[t]), nonzero in one column only.
            detail::network_tangent_scales(m, lab, rows, clip, ws.scales.data());
            float* tin = ws.tangent_in.data();
            std::fill(tin, tin + rows * nt * in0, 0.0f);
            for (std::size_t r = 0; r < rows; ++r)
                for (std::size_t t = 0; t < nt; ++t) tin[(r * nt + t) * in0 + nz + t] = ws.scales[r * nt + t];

            const float* x = ws.input.data();
            const float* tg = tin;
            for (std::size_t k = 0; k < layers.size(); ++k) {
                const LayerInfo& L = layers[k];
                if (k + 1 == layers.size()) {
                    float* tl = ws.last.data();
                    if (rows == 1 && direct16)
                        few_rows_xwt16(tg, nt, m.stored_weights16(k), m.weight_dtype() == WeightDtype::bf16, L.in,
                                       L.out, tl);
                    else if (rows == 1)
                        few_rows_xwt(tg, nt, m.weights(k), L.in, L.out, tl);
                    else
                        gemm_xwt(tg, rows * nt, m.weights(k), L.in, L.out, tl);
                    // dF/da = scale * s (1 - s), s = sigmoid(a) = (F - offset) / scale from the network's flux;
                    // written transposed into the (pixel, label) layout of the output.
                    for (std::size_t r = 0; r < rows; ++r) {
                        const float* f = flux + (r0 + r) * np;
                        float* jr = jacobian + (r0 + r) * np * nl;
                        for (std::size_t p = 0; p < np; ++p) {
                            const double s = std::clamp((double(f[p]) - offset) / scale, 0.0, 1.0);
                            const float g = float(scale * s * (1.0 - s));
                            float* jp = jr + p * nl;
                            if (nt != nl) std::fill(jp, jp + nl, 0.0f);
                            for (std::size_t t = 0; t < nt; ++t) jp[net[t]] = g * tl[(r * nt + t) * np + p];
                        }
                    }
                } else {
                    float* h = ws.h[k % 2].data();
                    float* tk = ws.t[k % 2].data();
                    detail::cpu::dense_relu(x, rows, m.weights(k), m.biases(k), L.in, L.out, h);
                    gemm_xwt(tg, rows * nt, m.weights(k), L.in, L.out, tk);
                    // ReLU: derivative 1 where the output is positive, else 0 (also at the kink a = 0,
                    // the convention of torch.relu's backward).
                    for (std::size_t r = 0; r < rows; ++r) {
                        const float* hr = h + r * L.out;
                        for (std::size_t t = 0; t < nt; ++t) {
                            float* tr = tk + (r * nt + t) * L.out;
                            for (int i = 0; i < L.out; ++i)
                                if (!(hr[i] > 0.0f)) tr[i] = 0.0f;
                        }
                    }
                    x = h;
                    tg = tk;
                }
            }
        }
    }
}

}  // namespace

void Decoder::forward_jacobian(const double* labels, std::size_t n, float* out, float* jacobian, const float* z,
                               bool clip, const double* vmac, float* jacobian_vmac,
                               const double* resolution_factors) const {
    if (n == 0) return;
    if (!labels || !out || !jacobian) throw InputError("forward_jacobian: labels, out and jacobian must not be null");
    if (impl_->device)  // cuda
        return impl_->run_on_device(labels, n, out, jacobian, false, 0, z, false, clip, vmac, jacobian_vmac,
                                    resolution_factors);
    const Model& m = model();
    const std::size_t np = m.n_pixels(), nl = m.n_labels();
    if (!impl_->stage) {
        // The flux is forward()'s, bit for bit (it validates every input before writing anything).
        forward(labels, n, out, z, clip, vmac, resolution_factors);  // vmac 0, no factors here (validated)
        if (jacobian_vmac) std::fill(jacobian_vmac, jacobian_vmac + n * np, 0.0f);
        auto ws = impl_->acquire();
        try {
            network_jacobian(m, options(), impl_->direct16, labels, n, out, jacobian, z, clip, ws->jac);
        } catch (...) {
            impl_->release(std::move(ws));
            throw;
        }
        impl_->release(std::move(ws));
        return;
    }
    // With a broadening stage: the network's intrinsic flux and its Jacobian first, then every row's flux and
    // network columns are broadened with the row's kernels (the stage is linear in the flux), and the v sin i
    // and R columns are the intrinsic flux under the kernels' derivatives.
    detail::validate_inputs(m, labels, n, z, clip);
    impl_->validate_vmac(vmac, n);
    impl_->validate_resolution_factors(labels, n, clip, resolution_factors);
    detail::cpu::ensure_blas_threads(options().threads);
    auto ws = impl_->acquire();
    try {
        // The whole batch's network flux (one call, so the flux is forward()'s bit for bit); per call, so that a
        // large batch leaves no large buffer in the pool.
        std::vector<float> intrinsic(n * np);
        std::vector<float>& column = ws->jac.column;
        grow(column, np);
        impl_->run_network(labels, n, intrinsic.data(), z, clip, *ws);
        network_jacobian(m, options(), impl_->direct16, labels, n, intrinsic.data(), jacobian, z, clip, ws->jac);
        const BroadeningInfo& b = m.broadening();
        const auto& info = m.labels();
        using W = detail::BroadeningStage::Which;
        auto& k = ws->kernels;
        auto& scratch = ws->broadening_scratch;
        for (std::size_t r = 0; r < n; ++r) {
            double vsini, resolution;
            impl_->broadening_labels(labels, r, clip, vsini, resolution);
            impl_->stage->make_kernels(vsini, resolution, vmac ? vmac[r] : 0.0, true, k, resolution_factors);
            const float* f = intrinsic.data() + r * np;
            float* jr = jacobian + r * np * nl;
            impl_->stage->apply(k, W::flux, f, out + r * np, scratch);  // as forward() computes it
            if (jacobian_vmac) impl_->stage->apply(k, W::d_vmac, f, jacobian_vmac + r * np, scratch);
            for (std::size_t j = 0; j < nl; ++j) {
                const W which = j == b.vsini_label ? W::d_vsini : j == b.resolution_label ? W::d_resolution : W::flux;
                if (which == W::flux) {  // a network label: broaden its column of the intrinsic Jacobian
                    for (std::size_t p = 0; p < np; ++p) column[p] = jr[p * nl + j];
                    impl_->stage->apply(k, W::flux, column.data(), column.data(), scratch);
                } else {
                    // A clamped label does not move the output: its derivative is 0 outside the range.
                    const double v = labels[r * nl + j];
                    if (clip && (v < info[j].min || v > info[j].max)) {
                        for (std::size_t p = 0; p < np; ++p) jr[p * nl + j] = 0.0f;
                        continue;
                    }
                    impl_->stage->apply(k, which, f, column.data(), scratch);
                }
                for (std::size_t p = 0; p < np; ++p) jr[p * nl + j] = column[p];
            }
        }
    } catch (...) {
        impl_->release(std::move(ws));
        throw;
    }
    impl_->release(std::move(ws));
}

}  // namespace fastspec
