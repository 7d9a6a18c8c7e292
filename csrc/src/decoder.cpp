// Decoder: validates the inputs, then runs the layers chunk by chunk with a pooled workspace.
#include <algorithm>
#include <mutex>
#include <sstream>

#include "backend.hpp"
#include "decoder_impl.hpp"

namespace fastspec {

Decoder::Impl::Impl(Model m, DecoderOptions o) : model(std::move(m)), options(o) {
    if (model.broadening().enabled) stage.emplace(model);
}

Decoder::Impl::~Impl() = default;

std::unique_ptr<DecoderWorkspace> Decoder::Impl::acquire() const {
    {
        std::lock_guard<std::mutex> lock(pool_mutex);
        if (!pool.empty()) {
            auto ws = std::move(pool.back());
            pool.pop_back();
            return ws;
        }
    }
    auto ws = std::make_unique<DecoderWorkspace>();
    ws->input.resize(options.max_chunk * model.input_dim());
    ws->a.resize(options.max_chunk * widest_hidden);
    ws->b.resize(options.max_chunk * widest_hidden);
    return ws;
}

void Decoder::Impl::release(std::unique_ptr<DecoderWorkspace> ws) const {
    std::lock_guard<std::mutex> lock(pool_mutex);
    pool.push_back(std::move(ws));
}

void Decoder::Impl::broadening_labels(const double* labels, std::size_t r, bool clip, double& vsini,
                                      double& resolution) const {
    const BroadeningInfo& b = model.broadening();
    const auto& info = model.labels();
    const std::size_t nl = model.n_labels();
    vsini = labels[r * nl + b.vsini_label];
    resolution = labels[r * nl + b.resolution_label];
    if (clip) {
        vsini = std::clamp(vsini, info[b.vsini_label].min, info[b.vsini_label].max);
        resolution = std::clamp(resolution, info[b.resolution_label].min, info[b.resolution_label].max);
    }
}

void Decoder::Impl::validate_vmac(const double* vmac, std::size_t n) const {
    if (!vmac) return;
    for (std::size_t r = 0; r < n; ++r) {
        const double v = vmac[r];
        if (!(v >= 0 && v <= detail::kMaxVmac)) {  // NaN and inf too
            std::ostringstream os;
            os.precision(10);
            os << "vmac = " << v << " km/s (row " << r << ") is outside [0, " << detail::kMaxVmac << "]";
            throw InputError(os.str());
        }
        if (v > 0 && !(stage && stage->sampling() == Sampling::pixel_mean)) {
            std::ostringstream os;
            os.precision(10);
            os << "vmac = " << v << " km/s (row " << r << "): macroturbulence is applied by the pixel-mean broadening "
               << "stage of format-3 models; " << model.path() << " is format " << model.format_version()
               << (stage ? " (its stage takes point samples)" : " (no broadening stage)") << ", so only vmac = 0 works";
            throw InputError(os.str());
        }
    }
}

void Decoder::Impl::validate_resolution_factors(const double* labels, std::size_t n, bool clip,
                                                const double* resolution_factors) const {
    if (!resolution_factors) return;
    if (!stage)
        throw InputError("resolution factors shape the broadening stage's line-spread function; " + model.path() +
                         " has no broadening stage (format " + std::to_string(model.format_version()) + ")");
    for (std::size_t r = 0; r < n; ++r) {
        double vsini, resolution;
        broadening_labels(labels, r, clip, vsini, resolution);
        try {
            stage->check_resolution_factors(resolution, resolution_factors);
        } catch (const InputError& e) {
            throw InputError(std::string(e.what()) + " (row " + std::to_string(r) + ")");
        }
    }
}

std::vector<double> Decoder::stage_node_wavelengths() const {
    std::vector<double> w(impl_->stage ? impl_->stage->node_count() : 0);
    for (std::size_t s = 0; s < w.size(); ++s) w[s] = impl_->stage->node_wavelength(s);
    return w;
}

Decoder::Decoder(Model model, DecoderOptions options) {
    if (options.threads < 1) throw Error("DecoderOptions.threads = " + std::to_string(options.threads) + " must be >= 1");
    if (options.max_chunk < 1) throw Error("DecoderOptions.max_chunk must be >= 1");
    // blasint is 32-bit: keep every GEMM dimension product within range.
    const std::size_t widest_out = std::max<std::size_t>(model.n_pixels(), 1);
    options.max_chunk = std::min<std::size_t>(options.max_chunk, std::size_t(0x7fffffff) / widest_out);
    impl_ = std::make_unique<Impl>(std::move(model), options);
    impl_->direct16 = options.direct_16bit && impl_->model.stored_weights16(0) && detail::cpu::have_avx512f();
    const auto& layers = impl_->model.layers();
    for (std::size_t k = 0; k + 1 < layers.size(); ++k)
        impl_->widest_hidden = std::max<std::size_t>(impl_->widest_hidden, layers[k].out);
    if (options.device == Device::cuda) {
        impl_->direct16 = false;
        impl_->device = detail::make_cuda_backend(impl_->model, impl_->options,
                                                  impl_->stage ? &*impl_->stage : nullptr);
    } else if (options.device != Device::cpu) {
        throw Error("DecoderOptions.device must be Device::cpu or Device::cuda");
    }
}

Decoder::~Decoder() = default;
Decoder::Decoder(Decoder&&) noexcept = default;
Decoder& Decoder::operator=(Decoder&&) noexcept = default;

const Model& Decoder::model() const { return impl_->model; }
const DecoderOptions& Decoder::options() const { return impl_->options; }
bool Decoder::uses_direct_16bit() const { return impl_->direct16; }

void Decoder::Impl::run_network(const double* labels, std::size_t n, float* out, const float* z, bool clip,
                                DecoderWorkspace& ws) const {
    const Model& m = model;
    const auto& layers = m.layers();
    const std::size_t nl = m.n_labels(), nz = m.latent_dim(), np = m.n_pixels(), chunk = options.max_chunk;
    const float scale = float(m.output_scale()), offset = float(m.output_offset());
    const bool use16 = direct16 && n == 1, bf16 = m.weight_dtype() == WeightDtype::bf16;
    for (std::size_t r0 = 0; r0 < n; r0 += chunk) {
        const std::size_t rows = std::min(chunk, n - r0);
        detail::make_input_rows(m, labels + r0 * nl, z ? z + r0 * nz : nullptr, rows, clip, ws.input.data());
        const float* x = ws.input.data();
        float* bufs[2] = {ws.a.data(), ws.b.data()};
        for (std::size_t k = 0; k < layers.size(); ++k) {
            const LayerInfo& L = layers[k];
            const bool last = k + 1 == layers.size();
            float* y = last ? out + r0 * np : bufs[k % 2];
            if (use16 && last)
                detail::cpu::dense_sigmoid_output_16(x, m.stored_weights16(k), bf16, m.biases(k), L.in, L.out, scale,
                                                     offset, y);
            else if (use16)
                detail::cpu::dense_relu_16(x, m.stored_weights16(k), bf16, m.biases(k), L.in, L.out, y);
            else if (last)
                detail::cpu::dense_sigmoid_output(x, rows, m.weights(k), m.biases(k), L.in, L.out, scale, offset, y);
            else
                detail::cpu::dense_relu(x, rows, m.weights(k), m.biases(k), L.in, L.out, y);
            x = y;
        }
    }
}

void Decoder::forward(const double* labels, std::size_t n, float* out, const float* z, bool clip,
                      const double* vmac, const double* resolution_factors) const {
    if (n == 0) return;
    if (!labels || !out) throw InputError("forward: labels and out must not be null");
    if (impl_->device)
        return impl_->run_on_device(labels, n, out, nullptr, false, 0, z, false, clip, vmac, nullptr,
                                    resolution_factors);
    const Model& m = impl_->model;
    detail::validate_inputs(m, labels, n, z, clip);  // everything, before any output is written
    impl_->validate_vmac(vmac, n);
    impl_->validate_resolution_factors(labels, n, clip, resolution_factors);
    detail::cpu::ensure_blas_threads(impl_->options.threads);
    auto ws = impl_->acquire();
    try {
        impl_->run_network(labels, n, out, z, clip, *ws);
        if (impl_->stage) {  // the network gave the intrinsic spectra: broaden each row in place
            const std::size_t np = m.n_pixels();
            for (std::size_t r = 0; r < n; ++r) {
                double vsini, resolution;
                impl_->broadening_labels(labels, r, clip, vsini, resolution);
                impl_->stage->make_kernels(vsini, resolution, vmac ? vmac[r] : 0.0, false, ws->kernels,
                                           resolution_factors);
                impl_->stage->apply(ws->kernels, detail::BroadeningStage::Which::flux, out + r * np, out + r * np,
                                    ws->broadening_scratch);
            }
        }
    } catch (...) {
        impl_->release(std::move(ws));
        throw;
    }
    impl_->release(std::move(ws));
}

}  // namespace fastspec
