// The interface between the core and a device backend (the CUDA one, csrc/src/cuda/, built as the separate
// shared library libfastspec_cuda.so and loaded with dlopen only when a Decoder asks for Device::cuda).
//
// Only plain C++ crosses it: the core describes the network as layer sizes and pointers to the weights as the
// file stores them, and does all the host-side work a backend needs (label validation, the one normalisation in
// labels.cpp, the broadening kernels of BroadeningStage) through the HostRows callbacks, chunk by chunk. The
// backend never calls into the core, so the library links nothing of it (no duplicated state, no core symbols).
// Bump kBackendAbi on any change here: the loader refuses a library of another version.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "broadening.hpp"
#include "device_plan.hpp"
#include "fastspec/fastspec.hpp"

namespace fastspec::detail {

constexpr int kBackendAbi = 3;

// What a backend needs of a Model.
struct NetworkSpec {
    struct Layer {
        int in = 0, out = 0;
        const void* weights = nullptr;  // (out, in) row-major: float32, or IEEE half / bfloat16 bits
        const float* weights_f32 = nullptr;  // the same as float32 (exact): every layer of an f32 model, layer 0 of a
                                             // 16-bit one (which runs layer 0 in float32), else nullptr
        const float* bias = nullptr;    // (out)
    };
    std::vector<Layer> layers;
    WeightDtype dtype = WeightDtype::f32;
    double output_scale = 1, output_offset = 0;
    std::size_t n_pixels = 0, latent_dim = 0, input_dim = 0, n_labels = 0;
    std::vector<std::size_t> network_labels;  // label index of each network input, in input order (the tangents)
    // The broadening stage (broadening == false: none): the node layout of BroadeningStage.
    bool broadening = false;
    std::size_t vsini_label = 0, resolution_label = 0;
    int max_half = 0;
    struct Node {
        int lo = 0, hi = 0;
        std::vector<float> hat;
    };
    std::vector<Node> nodes;
    device_plan::Dims dims;  // device_plan_dims(model): the sizes every plan of the backend is made from
};

struct BackendOptions {
    int device = 0;
    bool graphs = true, tf32 = false;
    std::size_t max_chunk = 1024;
};

// The core's host-side work for one call, over validated inputs. Thread-safe: a backend may call kernels() from
// several threads at once (for different rows).
class HostRows {
public:
    virtual ~HostRows() = default;
    // Rows [r0, r0 + rows) of the network input [z | normalised network labels]: (rows, input_dim) floats.
    virtual void input_rows(std::size_t r0, std::size_t rows, float* dst) const = 0;
    // d(normalised network input t)/d(label network_labels[t]) for rows [r0, r0 + rows): (rows, n_network) floats,
    // 0 for a label clamped by clip.
    virtual void tangent_scales(std::size_t r0, std::size_t rows, float* dst) const = 0;
    // Row r's broadening kernels (BroadeningStage::make_kernels of its v sin i and R, clamped with clip, its
    // macroturbulence and the call's resolution factors; with derivatives, d_vmac too).
    virtual void kernels(std::size_t r, bool derivatives, BroadeningStage::Kernels& k) const = 0;
    // Whether row r's label j is outside its range (clamped by clip): its Jacobian column is 0.
    virtual bool clamped(std::size_t r, std::size_t j) const = 0;
};

// One call. out and jacobian are device pointers when *_on_device, else host memory the backend copies into
// (and then waits for the stream). jacobian == nullptr: forward only.
struct DeviceCall {
    const HostRows* host = nullptr;
    std::size_t n = 0;
    float* out = nullptr;
    float* jacobian = nullptr;
    float* jacobian_vmac = nullptr;  // (n, n_pixels) dF/dvmac, or nullptr (only with jacobian)
    bool on_device = false;  // out, jacobian and jacobian_vmac: device memory (true) or host memory (false)
    std::uintptr_t stream = 0;
    bool clip = false, z = false;
};

class DeviceBackend {
public:
    virtual ~DeviceBackend() = default;
    virtual std::string description() const = 0;
    // Device (or host) memory to host memory, ordered on stream; waits for it.
    virtual void copy_to_host(void* dst, const void* src, std::size_t bytes, std::uintptr_t stream) const = 0;
    // Throws DeviceError (a failed CUDA/cuBLAS call, a pointer or stream of another device) or DeviceMemoryError.
    virtual void run(const DeviceCall& call) const = 0;
};

// What the backend library's one exported symbol, fastspec_cuda_backend_module(), returns.
struct BackendModule {
    int abi;              // kBackendAbi of the library
    const char* summary;  // e.g. "CUDA 13.0, cuBLASLt 13.1.0, sm_80 sm_90"
    // Number of usable GPUs (>= 0), or -1 with a reason in *why (no driver, driver too old, ...). Never throws.
    int (*device_count)(std::string* why);
    // A backend for spec on options.device; the spec's weight pointers need to live only during the call.
    DeviceBackend* (*create)(const NetworkSpec& spec, const BackendOptions& options);
};

// device_decoder.cpp: the sizes of a model that device_plan.hpp's arithmetic takes (its broadening stage is
// built unless the caller passes the one it has).
device_plan::Dims device_plan_dims(const Model& model, const BroadeningStage* stage = nullptr);

// device_decoder.cpp: the backend of a Device::cuda Decoder (loads the library; DeviceError if it cannot).
std::unique_ptr<DeviceBackend> make_cuda_backend(const Model& model, const DecoderOptions& options,
                                                 const BroadeningStage* stage);

// backend_loader.cpp: the module, loaded (dlopen) on first use and kept; throws DeviceError saying why it cannot be
// (and tries again on the next call).
const BackendModule& cuda_backend_module();

}  // namespace fastspec::detail

extern "C" {
// The one symbol libfastspec_cuda.so exports.
typedef const fastspec::detail::BackendModule* (*fastspec_cuda_backend_module_fn)();
}
