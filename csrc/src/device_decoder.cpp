// The Decoder's side of a device backend (backend.hpp): builds the backend of a Device::cuda Decoder, and for
// every call validates the inputs on the host and hands the backend the core's own host-side work (input rows,
// tangent scales, broadening kernels) through HostRows. Nothing here needs CUDA.
#include <algorithm>
#include <optional>

#include "backend.hpp"
#include "decoder_impl.hpp"

namespace fastspec {

namespace detail {

device_plan::Dims device_plan_dims(const Model& m, const BroadeningStage* stage) {
    device_plan::Dims d;
    d.input_dim = m.input_dim();
    d.n_pixels = m.n_pixels();
    d.n_labels = m.n_labels();
    d.n_network = m.n_network_labels();
    d.elem = m.weight_dtype() == WeightDtype::f32 ? 4 : 2;
    for (std::size_t k = 0; k + 1 < m.layers().size(); ++k)
        d.widest_hidden = std::max<std::size_t>(d.widest_hidden, m.layers()[k].out);
    if (d.elem == 2 && m.layers().size() > 1) d.first_f32 = m.layers()[0].out;
    if (m.broadening().enabled) {
        std::optional<BroadeningStage> own;  // only when the caller has none
        if (!stage) stage = &own.emplace(m);
        d.broadening = true;
        d.nodes = stage->node_count();
        d.max_half = stage->max_half();
    }
    return d;
}

std::unique_ptr<DeviceBackend> make_cuda_backend(const Model& m, const DecoderOptions& o, const BroadeningStage* stage) {
    const BackendModule& mod = cuda_backend_module();  // DeviceError when the library is absent
    std::string why;
    const int count = mod.device_count(&why);
    if (count < 0) throw DeviceError("device = cuda: " + why);
    if (count == 0) throw DeviceError("device = cuda: no CUDA GPU is visible (the driver reports 0 devices)");
    if (o.cuda_device < 0 || o.cuda_device >= count)
        throw DeviceError("device = cuda: cuda_device = " + std::to_string(o.cuda_device) + ", but " +
                          std::to_string(count) + " GPU(s) are visible (0 .. " + std::to_string(count - 1) + ")");
    NetworkSpec spec;
    spec.dtype = m.weight_dtype();
    for (std::size_t k = 0; k < m.layers().size(); ++k) {
        const LayerInfo& L = m.layers()[k];
        NetworkSpec::Layer l;
        l.in = L.in;
        l.out = L.out;
        l.weights = spec.dtype == WeightDtype::f32 ? static_cast<const void*>(m.weights(k))
                                                   : static_cast<const void*>(m.stored_weights16(k));
        // float32 copies only where the backend reads them: layer 0 of a 16-bit model (every layer of an f32 one)
        // (widening all of a 16-bit model's layers would hold 3x its size on the host for nothing).
        l.weights_f32 = spec.dtype == WeightDtype::f32 || k == 0 ? m.weights(k) : nullptr;
        l.bias = m.biases(k);
        spec.layers.push_back(l);
    }
    spec.output_scale = m.output_scale();
    spec.output_offset = m.output_offset();
    spec.n_pixels = m.n_pixels();
    spec.latent_dim = m.latent_dim();
    spec.input_dim = m.input_dim();
    spec.n_labels = m.n_labels();
    for (std::size_t j = 0; j < m.n_labels(); ++j)
        if (m.labels()[j].role == LabelRole::network) spec.network_labels.push_back(j);
    if (stage) {
        spec.broadening = true;
        spec.vsini_label = m.broadening().vsini_label;
        spec.resolution_label = m.broadening().resolution_label;
        spec.max_half = stage->max_half();
        for (std::size_t s = 0; s < stage->node_count(); ++s)
            spec.nodes.push_back(NetworkSpec::Node{stage->node_lo(s), stage->node_hi(s), stage->node_hat(s)});
    }
    spec.dims = device_plan_dims(m, stage);
    BackendOptions bo;
    bo.device = o.cuda_device;
    bo.graphs = o.cuda_graphs;
    bo.tf32 = o.tf32;
    bo.max_chunk = o.max_chunk;
    return std::unique_ptr<DeviceBackend>(mod.create(spec, bo));
}

}  // namespace detail

namespace {

// The core's host-side work for one device call over validated inputs.
class CoreRows final : public detail::HostRows {
public:
    CoreRows(const Decoder::Impl& impl, const double* labels, const float* z, bool clip, const double* vmac,
             const double* resolution_factors)
        : impl_(impl), labels_(labels), z_(z), clip_(clip), vmac_(vmac), resolution_factors_(resolution_factors) {}
    void input_rows(std::size_t r0, std::size_t rows, float* dst) const override {
        const Model& m = impl_.model;
        detail::make_input_rows(m, labels_ + r0 * m.n_labels(), z_ ? z_ + r0 * m.latent_dim() : nullptr, rows, clip_,
                                dst);
    }
    void tangent_scales(std::size_t r0, std::size_t rows, float* dst) const override {
        detail::network_tangent_scales(impl_.model, labels_ + r0 * impl_.model.n_labels(), rows, clip_, dst);
    }
    void kernels(std::size_t r, bool derivatives, detail::BroadeningStage::Kernels& k) const override {
        double vsini, resolution;
        impl_.broadening_labels(labels_, r, clip_, vsini, resolution);
        impl_.stage->make_kernels(vsini, resolution, vmac_ ? vmac_[r] : 0.0, derivatives, k, resolution_factors_);
    }
    bool clamped(std::size_t r, std::size_t j) const override {
        const LabelInfo& l = impl_.model.labels()[j];
        const double v = labels_[r * impl_.model.n_labels() + j];
        return clip_ && (v < l.min || v > l.max);
    }

private:
    const Decoder::Impl& impl_;
    const double* labels_;
    const float* z_;
    bool clip_;
    const double* vmac_;
    const double* resolution_factors_;
};

}  // namespace

void Decoder::Impl::run_on_device(const double* labels, std::size_t n, float* out, float* jacobian, bool on_device,
                                  std::uintptr_t stream, const float* z, bool z_on_device, bool clip,
                                  const double* vmac, float* jacobian_vmac, const double* resolution_factors) const {
    if (n == 0) return;
    std::vector<float> z_host;
    if (z && z_on_device) {  // z is small: read it back, so that it is checked and used by the one host path
        z_host.resize(n * model.latent_dim());
        device->copy_to_host(z_host.data(), z, z_host.size() * sizeof(float), stream);
        z = z_host.data();
    }
    detail::validate_inputs(model, labels, n, z, clip);  // everything, before any output is written
    validate_vmac(vmac, n);
    validate_resolution_factors(labels, n, clip, resolution_factors);
    // The factors only change the kernels the backend takes from the host (same sizes: R_s >= the R label's min).
    CoreRows rows(*this, labels, z, clip, vmac, resolution_factors);
    detail::DeviceCall call;
    call.host = &rows;
    call.n = n;
    call.out = out;
    call.jacobian = jacobian;
    call.jacobian_vmac = jacobian ? jacobian_vmac : nullptr;
    call.on_device = on_device;
    call.stream = stream;
    call.clip = clip;
    call.z = z != nullptr;
    device->run(call);
}

void Decoder::forward_device(const double* labels_host, std::size_t n, float* out_device, std::uintptr_t stream,
                             const float* z_device, bool clip, const double* vmac_host,
                             const double* resolution_factors_host) const {
    if (!impl_->device)
        throw DeviceError("forward_device: this Decoder runs on the CPU (DecoderOptions.device = cpu); use forward()");
    if (n == 0) return;
    if (!labels_host || !out_device) throw InputError("forward_device: labels and out must not be null");
    impl_->run_on_device(labels_host, n, out_device, nullptr, true, stream, z_device, true, clip, vmac_host, nullptr,
                         resolution_factors_host);
}

void Decoder::forward_jacobian_device(const double* labels_host, std::size_t n, float* out_device,
                                      float* jacobian_device, std::uintptr_t stream, const float* z_device,
                                      bool clip, const double* vmac_host, float* jacobian_vmac_device,
                                      const double* resolution_factors_host) const {
    if (!impl_->device)
        throw DeviceError("forward_jacobian_device: this Decoder runs on the CPU (DecoderOptions.device = cpu); "
                          "use forward_jacobian()");
    if (n == 0) return;
    if (!labels_host || !out_device || !jacobian_device)
        throw InputError("forward_jacobian_device: labels, out and jacobian must not be null");
    impl_->run_on_device(labels_host, n, out_device, jacobian_device, true, stream, z_device, true, clip, vmac_host,
                         jacobian_vmac_device, resolution_factors_host);
}

Device Decoder::device() const { return impl_->device ? Device::cuda : Device::cpu; }

std::string Decoder::device_description() const { return impl_->device ? impl_->device->description() : "cpu"; }

}  // namespace fastspec
