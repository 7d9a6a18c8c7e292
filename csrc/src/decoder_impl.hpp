// Decoder::Impl, shared by decoder.cpp (forward) and cpu/jacobian.cpp (forward_jacobian).
#pragma once

#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "broadening.hpp"
#include "internal.hpp"

namespace fastspec {

namespace detail {
class DeviceBackend;  // backend.hpp
}

// Buffers of one call, pooled per decoder (forward and forward_jacobian share the pool; concurrent calls take
// separate workspaces, and a workspace lives as long as its decoder). forward: the input rows and two
// ping-pong buffers for the hidden activations (the last layer writes straight into the caller's output), and
// the broadening stage's kernels and scratch. forward_jacobian adds its tangents (grown on first use).
struct JacobianBuffers {
    std::vector<float> input, scales, tangent_in, h[2], t[2], last;  // network pass over <= 32 rows: primal + tangents
    std::vector<float> column;                               // broadening stage: one Jacobian column
};
struct DecoderWorkspace {
    std::vector<float> input, a, b;
    detail::BroadeningStage::Kernels kernels;
    std::vector<float> broadening_scratch;
    JacobianBuffers jac;
};

struct Decoder::Impl {
    Impl(Model m, DecoderOptions o);
    Model model;
    DecoderOptions options;
    std::size_t widest_hidden = 0;
    bool direct16 = false;
    std::optional<detail::BroadeningStage> stage;  // version-2 models with a broadening stage
    std::unique_ptr<detail::DeviceBackend> device;  // Device::cuda: the loaded backend (device_decoder.cpp)
    mutable std::mutex pool_mutex;
    mutable std::vector<std::unique_ptr<DecoderWorkspace>> pool;  // idle workspaces, reused across calls

    std::unique_ptr<DecoderWorkspace> acquire() const;
    void release(std::unique_ptr<DecoderWorkspace> ws) const;
    // The network alone (inputs already validated): rows of (intrinsic, for a broadening model) flux into out.
    void run_network(const double* labels, std::size_t n, float* out, const float* z, bool clip,
                     DecoderWorkspace& ws) const;
    // The (v sin i, R) of row r of labels, clamped to the ranges when clip.
    void broadening_labels(const double* labels, std::size_t r, bool clip, double& vsini, double& resolution) const;
    // Throws InputError for a vmac row that the model cannot apply (NaN, out of [0, kMaxVmac], > 0 without a
    // pixel-mean stage), naming the row and the model's format; vmac may be nullptr (0 for every row).
    void validate_vmac(const double* vmac, std::size_t n) const;
    // Throws InputError unless every row's R (clamped with clip) times every factor is one the stage takes
    // (BroadeningStage::check_resolution_factors), naming the row; or for factors on a model without a stage.
    // resolution_factors may be nullptr (none). Labels already validated.
    void validate_resolution_factors(const double* labels, std::size_t n, bool clip,
                                     const double* resolution_factors) const;
    // A Device::cuda call (device_decoder.cpp): validates on the host, then the backend runs it. out and jacobian
    // (nullptr: forward only) are device pointers when on_device, z a device pointer when z_on_device.
    void run_on_device(const double* labels, std::size_t n, float* out, float* jacobian, bool on_device,
                       std::uintptr_t stream, const float* z, bool z_on_device, bool clip, const double* vmac,
                       float* jacobian_vmac, const double* resolution_factors) const;
    ~Impl();
};

}  // namespace fastspec
